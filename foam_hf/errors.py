"""Error types of foam_hf.

Every error subclasses ``ValueError`` so that ``except ValueError`` keeps working for callers who do not
know about foam_hf. Messages follow one rule: name the value, the rule it broke and the fix.
"""

from __future__ import annotations

__all__ = ["FoamConfigError", "FoamStateError", "NoMatchingModuleError"]


class FoamConfigError(ValueError):
    """A FOAM hyper-parameter or option is invalid (raised at construction, never mid-training)."""


class NoMatchingModuleError(FoamConfigError):
    """A per-module override or a target-module pattern matched no parameter of the model."""


class FoamStateError(ValueError):
    """An optimizer state cannot be loaded into this FOAM instance (different block sizes, shapes or
    second-moment rule, or a state written by another optimizer)."""
