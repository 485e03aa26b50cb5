"""Deprecated location: the memory report is :mod:`foam_hf.tools.memory_report` (computation),
:mod:`foam_hf.tools.memory_markdown` (Markdown) and :mod:`foam_hf.tools.cli` (``foam-hf memory``).

Names looked up here are forwarded with a ``DeprecationWarning``. ``python -m foam_hf.memory_report MODEL
...`` still runs ``foam-hf memory MODEL ...``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

from ._moved import forward

__getattr__ = forward(
    __name__,
    "foam_hf.tools.memory_report",
    {
        "DEFAULT_BLOCK_SIZES": "foam_hf.tools.memory_report:DEFAULT_COMPARED_BLOCK_SIZES",
        "format_markdown": "foam_hf.tools.memory_markdown:format_markdown",
    },
)


def _warn_cli(name: str) -> None:
    warnings.warn(
        f"foam_hf.memory_report.{name} is deprecated: the memory subcommand is part of the foam-hf parser, "
        "foam_hf.tools.cli.build_parser() (run it with foam_hf.tools.cli.main(['memory', ...])).",
        DeprecationWarning,
        stacklevel=3,
    )


def add_memory_parser(subparsers: Any) -> Any:
    """Deprecated: add the ``memory`` subcommand to ``subparsers`` and return its parser."""
    from .tools.cli import _add_memory

    _warn_cli("add_memory_parser")
    return _add_memory(subparsers)


def run_memory(args: Any) -> int:
    """Deprecated: run the ``memory`` subcommand on parsed arguments; the exit code."""
    from .tools.cli import _run_memory

    _warn_cli("run_memory")
    if not hasattr(args, "compared_block_sizes"):  # a namespace parsed by the old parser
        args.compared_block_sizes = args.block_sizes
    return _run_memory(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m foam_hf.memory_report MODEL ...``: the same as ``foam-hf memory MODEL ...``."""
    from .tools.cli import main as foam_hf_main

    return foam_hf_main(["memory", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
