"""foam-hf: FOAM, the folded-state Adam optimizer, for PyTorch and the Hugging Face trainers.

``from foam_hf import FOAM`` gives a ``torch.optim.Optimizer``. Importing ``foam_hf`` also registers
``optim="foam"`` and ``optim="foam_layerwise"`` with ``transformers.TrainingArguments`` (at once if
transformers is imported, else when it is), so ``Trainer`` and every TRL trainer build FOAM by name.

``import foam_hf`` itself is light: it imports neither torch nor transformers. Each public name below is
imported from its module on first use.
"""

from __future__ import annotations

from .integration import register_lazily as _register_lazily

TYPE_CHECKING = False  # typing stays unimported: start-up hooks import this package in every process


__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "FOAM": "optim",
    "foam": "functional",
    "FoamCallback": "integration.callback",
    "FoamConfig": "config",
    "FoamConfigError": "errors",
    "FoamStateError": "errors",
    "NoMatchingModuleError": "errors",
    "LayerwiseFOAM": "layerwise",
    "StateMemory": "memory",
    "adamw_state_bytes": "memory",
    "foam_state_bytes": "memory",
    "state_memory": "memory",
    "foam_param_groups": "param_groups",
    "block_mean": "folding",
    "folded_shape": "folding",
    "is_foldable": "folding",
    "unfold": "folding",
}

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
    "foam_param_groups",
    "foam_state_bytes",
    "folded_shape",
    "is_foldable",
    "state_memory",
    "unfold",
]

if TYPE_CHECKING:
    from .config import FoamConfig
    from .errors import FoamConfigError, FoamStateError, NoMatchingModuleError
    from .folding import block_mean, folded_shape, is_foldable, unfold
    from .functional import foam
    from .integration.callback import FoamCallback
    from .layerwise import LayerwiseFOAM
    from .memory import StateMemory, adamw_state_bytes, foam_state_bytes, state_memory
    from .optim import FOAM


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


_register_lazily()
