"""Former location of the ``foam-hf`` command line, now :mod:`foam_hf.tools.cli`.

Environments installed before the move run ``foam_hf.cli:main`` as their ``foam-hf`` console script, so
these names are re-exported as they are, without a warning (one would print on every command).
"""

from .tools.cli import build_parser, main

__all__ = ["build_parser", "main"]
