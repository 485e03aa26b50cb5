"""foam-hf: FOAM, the folded-state Adam optimizer, for PyTorch and the Hugging Face trainers.

``from foam_hf import FOAM`` gives a ``torch.optim.Optimizer``. Importing ``foam_hf`` also registers
``optim="foam"`` and ``optim="foam_layerwise"`` with ``transformers.TrainingArguments``, so
``Trainer`` and every TRL trainer build FOAM by name.
"""

from __future__ import annotations

from .config import FoamConfig
from .errors import FoamConfigError, FoamStateError, NoMatchingModuleError
from .folding import block_mean, folded_shape, is_foldable, unfold
from .integration import FoamCallback
from .integration import install as _install_transformers_names
from .layerwise import LayerwiseFOAM
from .memory import StateMemory, adamw_state_bytes, foam_state_bytes, state_memory
from .optim import FOAM, foam

__version__ = "0.1.0"

_install_transformers_names()

__all__ = [
    "FOAM",
    "FoamCallback",
    "FoamConfig",
    "FoamConfigError",
    "FoamStateError",
    "LayerwiseFOAM",
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
