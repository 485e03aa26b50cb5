"""Deprecated location: this module is :mod:`foam_hf.tools.model_shapes`; names looked up here are forwarded from there
with a ``DeprecationWarning``."""

from ._moved import forward

__getattr__ = forward(__name__, "foam_hf.tools.model_shapes")
