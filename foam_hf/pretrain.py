"""Deprecated: the pre-training benchmark engine moved out of the library.

The demo's training run (corpus, tiny Llama, one ``transformers.Trainer`` run per ``optim``) is
:mod:`foam_hf.tools.demo_training`; the benchmark engine (peer optimizers, run cache, plain-loop helpers) is
``benchmarks/_engine.py`` in the source tree. The names that still exist are forwarded from
:mod:`foam_hf.tools.demo_training` with a ``DeprecationWarning``; this module will be removed in a later release.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__: list[str] = []

_MOVED = ("MODEL_SIZES", "Corpus", "build_model", "load_corpus", "optimizer_state_bytes")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from .tools import demo_training

        warnings.warn(
            f"foam_hf.pretrain.{name} is deprecated: use foam_hf.tools.demo_training.{name}.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(demo_training, name)
    raise AttributeError(
        f"foam_hf.pretrain has no attribute {name!r}: the benchmark engine moved to benchmarks/_engine.py (and "
        "the demo's Trainer run to foam_hf.tools.demo_training.train). Fix: import it from there."
    )
