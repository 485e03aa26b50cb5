"""The Hugging Face side of foam_hf: ``optim="foam"`` for Trainer and every TRL trainer, and the callback.

Importing :mod:`foam_hf` calls :func:`register_lazily`: the names ``"foam"`` and ``"foam_layerwise"`` are
registered with transformers at once if it is imported, else the moment it is (so ``import foam_hf`` stays
light, and both import orders work). :func:`register` does it now. What that touches in transformers is
listed in :mod:`foam_hf.integration._seam`; what runs there is :mod:`foam_hf.integration.transformers`.
"""

from __future__ import annotations

TYPE_CHECKING = False  # no typing import at start-up


if TYPE_CHECKING:
    from typing import Any

    from ._seam import SeamError, check_seam
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
    "register",
    "register_lazily",
]


# Trampolines: the policy module (which imports torch and foam_hf's optimizer) is imported on first use, when a
# TrainingArguments is built or a Trainer builds its optimizer, never at registration.
def _validate(args: Any) -> None:
    from .transformers import validate_training_arguments

    validate_training_arguments(args)


def _handler(ctx: Any) -> Any:
    from .transformers import foam_handler

    return foam_handler(ctx)


def _after_create(trainer: Any) -> None:
    from .transformers import after_create_optimizer

    after_create_optimizer(trainer)


def _after_train(trainer: Any) -> None:
    from .transformers import after_train

    after_train(trainer)


def register() -> None:
    """Register ``optim="foam"`` and ``optim="foam_layerwise"`` with transformers now (imports it; idempotent)."""
    from ._seam import install as _install

    _install(_handler, _validate, _after_create, _after_train)


#: (transformers module, the _seam installer for that place, the policy it installs).
_PLACES = (
    ("transformers.training_args", "install_names", _validate),
    ("transformers.trainer_optimizer", "install_handler", _handler),
    ("transformers.trainer", "install_trainer", _after_create),
    ("transformers.trainer", "install_train_exit", _after_train),
)


def register_lazily() -> None:
    """Register when transformers' modules are imported (at once for those already imported). Imports only the
    import hook: under the launcher and ``autoregister`` this runs at every interpreter start-up."""
    from ._import_hooks import when_imported

    for name, installer, policy in _PLACES:

        def install(module: Any, installer: str = installer, policy: Any = policy) -> None:
            from . import _seam

            getattr(_seam, installer)(module, policy)

        when_imported(name, install)


install = register  # the name of foam_hf <= 0.1.0


def __getattr__(name: str) -> Any:
    if name in ("SeamError", "check_seam"):
        from . import _seam

        return getattr(_seam, name)
    if name == "FoamCallback":
        from .callback import FoamCallback

        return FoamCallback
    if name in ("foam_config_from_args", "is_foam_optim", "optimizer_cls_and_kwargs"):
        from . import transformers as policy

        return getattr(policy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
