"""The benchmarks' shared command-line rule: ``--quick`` makes a run small without overriding what was given."""

from __future__ import annotations

import argparse
from typing import Any


def parse_with_quick_defaults(
    parser: argparse.ArgumentParser, argv: list[str] | None, **smaller: Any
) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick``, parse again with ``smaller`` as the defaults, so that sizes given on the
    command line (``--quick --rows 64``) still win over the smoke run's."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**smaller)
        args = parser.parse_args(argv)
    return args
