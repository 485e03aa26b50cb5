"""The Hugging Face side of foam_hf: ``optim="foam"`` for Trainer and every TRL trainer, and the callback.

Importing :mod:`foam_hf` runs :func:`install`, which registers the names ``"foam"`` and
``"foam_layerwise"`` with transformers (see :mod:`foam_hf.integration._seam` for what that touches).
"""

from __future__ import annotations

from ._seam import SeamError, check_seam, install
from .callback import FoamCallback
from .transformers import foam_config_from_args, is_foam_optim, optimizer_cls_and_kwargs

__all__ = [
    "FoamCallback",
    "SeamError",
    "check_seam",
    "foam_config_from_args",
    "install",
    "is_foam_optim",
    "optimizer_cls_and_kwargs",
]
