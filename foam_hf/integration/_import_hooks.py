"""Run a function right after a module is first imported: the mechanism behind lazy registration.

``when_imported("transformers.training_args", fn)`` calls ``fn(module)`` at once if that module is already
imported, else right after its code has run, the first time anything imports it (a ``sys.meta_path``
finder wraps the real loader's ``exec_module``). It imports nothing itself, so it is free to install at
interpreter start-up: until the watched module is imported, the only cost is one dictionary look-up per
import.

A failing callback must not break the user's import of transformers: its error is reported as a warning,
and the import goes on.
"""

from __future__ import annotations

import _thread
import sys
import warnings

TYPE_CHECKING = False  # typing is not imported at start-up: this module may run in every process
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

__all__ = ["when_imported"]

_callbacks: dict[str, list[Callable[[ModuleType], None]]] = {}
_lock = _thread.RLock()


def _run(callbacks: list[Callable[[ModuleType], None]], module: ModuleType) -> None:
    for callback in callbacks:
        try:
            callback(module)
        except Exception as exc:  # noqa: BLE001 - reported, never raised into someone else's import
            warnings.warn(f"foam_hf: registering with {module.__name__} failed: {exc}", RuntimeWarning, stacklevel=2)


def _fully_imported(name: str) -> ModuleType | None:
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    if module is None or getattr(spec, "_initializing", False):
        return None
    return module


class _PostImportFinder:
    """Finds nothing itself: asks the other finders for a watched module's spec and wraps its loader."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_notify(module: ModuleType) -> None:
            exec_module(module)
            with _lock:
                callbacks = _callbacks.pop(fullname, [])
            _run(callbacks, module)

        loader.exec_module = exec_then_notify  # this loader instance serves this one module
        return spec


_finder = _PostImportFinder()


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` once module ``name`` is imported: now if it is, else right after its import."""
    with _lock:
        module = _fully_imported(name)
        if module is None:
            _callbacks.setdefault(name, []).append(callback)
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            return
    _run([callback], module)
