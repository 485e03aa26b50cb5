"""Old import paths of modules that moved: a module-level ``__getattr__`` that forwards, with a warning.

A module that moved keeps a file at its old path holding only ``__getattr__ = forward(__name__, NEW)``, so
``from <old module> import name`` and ``<old module>.name`` still work. Each look-up gives the object from its
new place and a ``DeprecationWarning`` naming that place, attributed to the line that looked it up.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

__all__ = ["forward"]


def forward(old: str, new: str, elsewhere: dict[str, str] | None = None) -> Callable[[str], object]:
    """The ``__getattr__`` of module ``old``, whose contents moved to module ``new``.

    Every attribute of ``new`` is forwarded under its own name. ``elsewhere`` maps the old names that moved
    somewhere else, or were renamed, to ``"module:attribute"``.
    """
    elsewhere = dict(elsewhere or {})

    def __getattr__(name: str) -> object:
        if name.startswith("__"):  # module protocol look-ups (__path__, __file__ ...) are not forwarded
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        module, attribute = elsewhere[name].split(":") if name in elsewhere else (new, name)
        target = importlib.import_module(module)
        if not hasattr(target, attribute):
            raise AttributeError(f"module {old!r} has no attribute {name!r} (its contents moved to {new})")
        warnings.warn(
            f"{old}.{name} is deprecated: use {module}.{attribute} (the module moved).",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(target, attribute)

    return __getattr__
