"""foam-hf: FOAM, the folded-state Adam optimizer, for PyTorch and the Hugging Face trainers.

``from foam_hf import FOAM`` gives a ``torch.optim.Optimizer``; importing ``foam_hf`` also registers
``optim="foam"`` with ``transformers.TrainingArguments`` when transformers is installed.
"""

from __future__ import annotations

from .errors import FoamConfigError, FoamStateError, NoMatchingModuleError
from .folding import block_mean, folded_shape, is_foldable, unfold
from .memory import StateMemory, adamw_state_bytes, foam_state_bytes, state_memory
from .optim import FOAM, foam

__version__ = "0.1.0"

__all__ = [
    "FOAM",
    "FoamConfigError",
    "FoamStateError",
    "NoMatchingModuleError",
    "StateMemory",
    "adamw_state_bytes",
    "block_mean",
    "foam",
    "foam_state_bytes",
    "folded_shape",
    "is_foldable",
    "state_memory",
    "unfold",
]
