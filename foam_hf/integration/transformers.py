"""``optim="foam"``: TrainingArguments + model -> (FOAM, kwargs), the way transformers' own handlers work.

Hyper-parameters arrive as for AdamW (``learning_rate``, ``adam_beta1``, ``adam_beta2``,
``adam_epsilon``, ``weight_decay`` with the Trainer's no-decay rule for biases and norm weights);
FOAM's own options arrive in ``optim_args`` (parsed by :class:`~foam_hf.FoamConfig`). Parameters are
grouped by resolved block size (:mod:`foam_hf.param_groups`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any

from ..config import FoamConfig, check_one_target_regex, check_targets_fold
from ..distributed import check_deepspeed_config
from ..errors import FoamConfigError
from ..layerwise import LayerwiseFOAM
from ..optim import FOAM
from ..options import check_number
from ..param_groups import build_param_groups, resolve_block_sizes
from ..zero import ZeroFOAM, zero_stage
from ._seam import FOAM_OPTIMIZER_NAMES, decay_parameter_names, insert_callback_first

__all__ = ["ParamGroupsAtBuild", "foam_config_from_args", "is_foam_optim", "optimizer_cls_and_kwargs"]


def is_foam_optim(optim: Any) -> bool:
    """Whether ``TrainingArguments.optim`` names a FOAM optimizer."""
    value = getattr(optim, "value", optim)
    return value in FOAM_OPTIMIZER_NAMES.values()


def _is_layerwise(optim: Any) -> bool:
    return getattr(optim, "value", optim) == FOAM_OPTIMIZER_NAMES["FOAM_LAYERWISE"]


def foam_config_from_args(args: Any) -> FoamConfig:
    """The :class:`FoamConfig` that ``args.optim_args`` describes (errors list the valid keys).

    Parsed once per distinct ``optim_args`` string: validation when the arguments are built, the handler and
    the callback then reuse the same (frozen) config."""
    optim_args = args.optim_args
    if optim_args is None or isinstance(optim_args, str):
        return _parse_optim_args(optim_args)
    return FoamConfig.from_optim_args(optim_args)


@functools.lru_cache(maxsize=64)
def _parse_optim_args(optim_args: str | None) -> FoamConfig:
    return FoamConfig.from_optim_args(optim_args)


def validate_training_arguments(args: Any) -> None:
    """Run right after ``TrainingArguments.__post_init__``: reject bad FOAM options before any model loads."""
    if not is_foam_optim(args.optim):
        _warn_foam_options_for_another_optimizer(args)
        return
    config = foam_config_from_args(args)
    if args.optim_args is not None and not isinstance(args.optim_args, str):
        # A mapping (a YAML or JSON config) or a FoamConfig: transformers reads only the string form.
        args.optim_args = _optim_args_string(config)
    _check_deepspeed_run(args, _deepspeed_config(args))
    _check_fsdp_version(args)
    _check_hyperparameter_fields(args)
    if _is_layerwise(args.optim):
        _check_layerwise_fields(args)


#: optim_args keys only FOAM reads (GaLore, APOLLO and others read scale, rank, ...: those say nothing).
_FOAM_ONLY_KEYS = (
    "block_size",
    "block_sizes",
    "level",
    "res_scale",
    "second_moment",
    "state_dtype",
    "target_modules",
    "weight_rounding",
)


#: optim_args keys that change only how folded tensors step: with nothing folded, they change nothing.
_FOLD_ONLY_KEYS = ("block_size", "level", "scale", "res_scale", "second_moment")


def _optim_args_keys(optim_args: Any) -> set[str]:
    """The keys ``optim_args`` sets, as written (a ``key=value,...`` string or a mapping)."""
    if isinstance(optim_args, str):
        return {item.partition("=")[0].strip() for item in optim_args.split(",")}
    if isinstance(optim_args, Mapping):
        return set(map(str, optim_args))
    return set()


def _warn_foam_options_for_another_optimizer(args: Any) -> None:
    """Warn when ``optim_args`` holds keys only FOAM reads but ``optim`` names another optimizer: the run would
    train with that optimizer, and the options would be dropped without a word."""
    ours = sorted(_optim_args_keys(args.optim_args).intersection(_FOAM_ONLY_KEYS))
    if ours:
        optim = getattr(args.optim, "value", args.optim)
        warnings.warn(
            f"TrainingArguments: optim_args sets FOAM's {ours}, but optim={optim!r}, so this run trains with that "
            "optimizer and FOAM's options do nothing, unless FOAM is handed to the Trainer directly "
            "(optimizer_cls_and_kwargs=foam_hf.integration.optimizer_cls_and_kwargs(args, model) reads them). "
            "Fix: set optim='foam' (--optim foam) to train with FOAM, or drop them from optim_args.",
            UserWarning,
            stacklevel=3,
        )


def _warn_fold_options_where_nothing_folds(args: Any, groups: list[dict[str, Any]]) -> None:
    """Warn when ``optim_args`` sets options that act on folded tensors only and no parameter folds (a LoRA model:
    adapters keep AdamW states by default), so the run is AdamW whatever they say."""
    from ..folding import folds_in_full

    asked = _optim_args_keys(args.optim_args).intersection(_FOLD_ONLY_KEYS)
    unfolded = foam_config_from_args(args).block_size == 1
    if unfolded:  # block_size=1 (level=0) asks for AdamW states: it is heard
        asked -= {"block_size", "level"}
    asked = sorted(asked)
    if not asked or any(folds_in_full(p, g["block_size"]) for g in groups for p in g["params"]):
        return
    if unfolded:
        why = "block_size is 1 (level=0 too): the default targets keep AdamW states"
        fix = "a block_size > 1, block_sizes for the modules that should fold (e.g. block_sizes=q_proj:4)"
    else:
        why = (
            "FOAM's default targets leave out PEFT adapters (their states are small, and folding them cost loss), "
            "one-dimensional tensors, embeddings and the head"
        )
        fix = "fold adapters by name (optim_args='block_sizes=lora_A:4'), name modules in optim_target_modules"
    warnings.warn(
        f"optim='foam': optim_args sets {asked}, but no trainable parameter of this model folds, so they change "
        f"nothing and every tensor steps as with AdamW. {why}. Fix: {fix}, or drop {asked} from optim_args.",
        UserWarning,
        stacklevel=2,
    )


def _check_fsdp_version(args: Any) -> None:
    """Refuse FSDP1: it hands the optimizer flat 1-D shards, which never fold, so FOAM would keep AdamW-sized
    states and save nothing. FSDP1 comes from ``fsdp_config={"version": 1}`` (transformers' default is 2) or from
    ``accelerate launch`` with an FSDP config without ``fsdp_version: 2`` (accelerate's default is 1)."""
    import os

    if args.fsdp:  # the Trainer builds accelerate's plugin from fsdp_config, whatever the environment says
        if int((args.fsdp_config or {}).get("version", 2)) != 1:
            return
        where = "TrainingArguments.fsdp_config['version'] = 1"
        fix = "fsdp_config={'version': 2} (FSDP2, transformers' default)"
    elif (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and os.environ.get("FSDP_VERSION", "1") == "1"
    ):
        version = os.environ.get("FSDP_VERSION")
        set_as = "FSDP_VERSION=1" if version is not None else "FSDP_VERSION unset, which accelerate reads as 1"
        where = (
            f"accelerate's FSDP config without fsdp_version: 2: ACCELERATE_USE_FSDP=true and {set_as} in the "
            "environment, where accelerate launch or an earlier FSDP run in this process put them"
        )
        fix = "add fsdp_version: 2 to the accelerate config file (or pass --fsdp_version 2 to accelerate launch)"
    else:
        return
    optim = getattr(args.optim, "value", args.optim)
    raise FoamConfigError(
        f"optim={optim!r} with FSDP1 ({where}): FSDP1 hands the optimizer flat one-dimensional shards, which never "
        f"fold, so FOAM would keep AdamW-sized states and save nothing. Fix: use FSDP2: {fix}."
    )


def _check_layerwise_fields(args: Any) -> None:
    """What layer-wise FOAM cannot do, refused; checked when the arguments are built and again when the optimizer
    is (a field set on the arguments in between is not missed)."""
    if args.max_grad_norm is not None and args.max_grad_norm > 0:
        raise FoamConfigError(
            f"optim='foam_layerwise' with max_grad_norm={args.max_grad_norm}: clipping by the global "
            "gradient norm needs every gradient at once, and layer-wise FOAM steps each parameter as soon "
            "as its gradient is ready. Fix: pass max_grad_norm=0 (no clipping), or use optim='foam'."
        )
    fp16_from_accelerate = getattr(args, "mixed_precision", None) == "fp16"  # accelerate launch --mixed_precision
    if args.fp16 or fp16_from_accelerate:
        where = "fp16=True" if args.fp16 else "mixed precision fp16 from accelerate (ACCELERATE_MIXED_PRECISION=fp16)"
        raise FoamConfigError(
            f"optim='foam_layerwise' with {where}: the per-parameter step would see loss-scaled gradients, "
            "including the inf steps the scaler would skip. Fix: use bf16 (bf16=True, or --mixed_precision bf16), "
            "or optim='foam'."
        )
    if args.auto_find_batch_size:
        raise FoamConfigError(
            "optim='foam_layerwise' with auto_find_batch_size=True: after an out-of-memory error in backward the "
            "Trainer retries the step with a smaller batch, but the parameters whose hooks already fired were "
            "stepped, the others not. Fix: set per_device_train_batch_size yourself (auto_find_batch_size=False), "
            "or use optim='foam'."
        )


def _optim_args_string(config: FoamConfig) -> str:
    """``config.to_optim_args()``, checked to read back as ``config``: the handler and the callback see only the
    string, so a value it did not carry exactly would change the run without a word."""
    text = config.to_optim_args()
    try:
        reread = FoamConfig.from_optim_args(text)
        problem = None if reread == config else f"reads back as {reread!r}"
    except FoamConfigError as err:
        problem = f"does not read back ({err})"
    if problem is not None:
        raise FoamConfigError(
            f"optim_args: {config!r} is written as the string {text!r} (the only form transformers reads), which "
            f"{problem}: the run would not use the options given. This is a bug in foam_hf; please report it. "
            "Fix: pass optim_args as a 'key=value,...' string (docs/configuration.md)."
        )
    return text


# The TrainingArguments fields FOAM reads, with the option rule of foam_hf.options that each obeys and an example;
# checked under their own names, so that a bad value fails when the arguments are built, not at the first step.
_FIELD_RULES = (
    ("learning_rate", "lr", "1e-4"),
    ("adam_beta1", "beta", "0.9"),
    ("adam_beta2", "beta", "0.999"),
    ("adam_epsilon", "eps", "1e-8"),
    ("weight_decay", "weight_decay", "0.0"),
)


def _deepspeed_config(args: Any) -> Any:
    """The DeepSpeed config the run will use: ``TrainingArguments.deepspeed``, or accelerate's DeepSpeed plugin
    (``accelerate launch`` with a DeepSpeed config); ``None`` without DeepSpeed."""
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "deepspeed_config", None) is not None:
        return plugin.deepspeed_config
    return getattr(args, "deepspeed", None)


def _check_deepspeed_run(args: Any, ds_config: Any) -> None:
    """The DeepSpeed settings FOAM cannot run under (:func:`check_deepspeed_config`), wherever they are given: the
    DeepSpeed config, and accelerate's ``ParallelismConfig`` for DeepSpeed's sequence parallelism, which the config's
    ``sequence_parallel_size`` sets the other way and which accelerate hands DeepSpeed without that config."""
    check_deepspeed_config(ds_config)
    if ds_config is None:
        return
    size, where = _sequence_parallel_size(args)
    if size > 1:
        optim = getattr(args.optim, "value", args.optim)
        raise FoamConfigError(
            f"optim={optim!r} under DeepSpeed with sequence parallelism ({where}): ZeRO then partitions over "
            "DeepSpeed's sequence-data-parallel group, not necessarily the whole world FOAM reads by default, and "
            "this has not been run with FOAM (the DeepSpeed config's sequence_parallel_size > 1 is refused for the "
            "same reason). Fix: set sp_size to 1, or build ZeroFOAM yourself with process_group=<the group ZeRO "
            "partitions over>."
        )


def _sequence_parallel_size(args: Any) -> tuple[int, str]:
    """accelerate's sequence-parallel size for this run and where it was set: ``TrainingArguments.parallelism_config``
    (a ``ParallelismConfig``), else the environment ``accelerate launch`` writes from a config file's
    ``parallelism_config`` (``ACCELERATE_USE_PARALLELISM_CONFIG=true`` and ``PARALLELISM_CONFIG_SP_SIZE``), which
    accelerate reads when the Trainer passes none."""
    import os

    config = getattr(args, "parallelism_config", None)
    if config is not None:
        size = getattr(config, "sp_size", None) or 1
        return int(size), f"parallelism_config=ParallelismConfig(sp_size={size}, ...) in TrainingArguments"
    if os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() == "true":
        size = os.environ.get("PARALLELISM_CONFIG_SP_SIZE", "1")
        try:
            number = int(size)
        except ValueError:
            raise FoamConfigError(
                f"PARALLELISM_CONFIG_SP_SIZE={size!r} in the environment is not an integer; accelerate reads it as "
                "ParallelismConfig's sp_size (ACCELERATE_USE_PARALLELISM_CONFIG=true). Fix: set it to a whole number "
                "(1: no sequence parallelism), e.g. through parallelism_config_sp_size in the accelerate config file."
            ) from None
        return number, f"PARALLELISM_CONFIG_SP_SIZE={size} in the environment, from accelerate's parallelism_config"
    return 1, ""


def _check_hyperparameter_fields(args: Any) -> None:
    import re

    optim = getattr(args.optim, "value", args.optim)
    for name, rule, example in _FIELD_RULES:
        value = getattr(args, name)
        try:
            check_number(
                name,
                value,
                rule,
                owner="TrainingArguments",
                invalid_for=f" for optim={optim!r}",
                fix=f"pass e.g. {name}={example}",
            )
        except TypeError as err:  # TrainingArguments types its fields; a wrong type is a bad value here too
            raise FoamConfigError(str(err)) from None
    targets = args.optim_target_modules
    config = foam_config_from_args(args) if targets is not None else None  # optim_args, parsed once
    in_optim_args = config.target_modules if config is not None else None
    if in_optim_args is not None:
        raise FoamConfigError(
            f"TrainingArguments: target modules are given twice: optim_target_modules={targets!r} and "
            f"target_modules={in_optim_args!r} in optim_args. Fix: keep one."
        )
    if targets is not None:
        if isinstance(targets, (list, tuple)) and not targets:
            raise FoamConfigError(
                "TrainingArguments: optim_target_modules=[] would fold nothing. Fix: pass None for FOAM's default "
                "(linear layers except the head and embeddings), 'all-linear', or module names."
            )
        check_targets_fold(targets, config.block_size, "TrainingArguments: optim_target_modules")
        if isinstance(targets, str) and targets != "all-linear":
            check_one_target_regex(targets, "TrainingArguments: optim_target_modules")
            try:
                re.compile(targets)
            except re.error as err:
                raise FoamConfigError(
                    f"TrainingArguments: optim_target_modules={targets!r} is not a valid regex ({err}). "
                    "Fix: escape it, or pass a list of module names."
                ) from None
        if isinstance(targets, (list, tuple)):  # module names, each matched as a suffix regex, as PEFT does
            for index, entry in enumerate(targets):
                if not isinstance(entry, str) or not entry:
                    raise FoamConfigError(
                        f"TrainingArguments: optim_target_modules[{index}]={entry!r} is not a module name: each "
                        "entry must be a non-empty string. Fix: e.g. optim_target_modules=['q_proj', 'v_proj']."
                    )
                try:
                    re.compile(entry)
                except re.error as err:
                    raise FoamConfigError(
                        f"TrainingArguments: optim_target_modules[{index}]={entry!r} is not a valid regex ({err}); "
                        "each entry matches module-name suffixes as a regex. Fix: escape it (e.g. re.escape), or "
                        "write a suffix such as q_proj."
                    ) from None


class ParamGroupsAtBuild:
    """FOAM's param groups of ``model`` under ``args``, resolved each time they are iterated: when the optimizer
    is built from them, not when :func:`optimizer_cls_and_kwargs` was called. A model may change in between:
    TRL's ``peft_config=`` injects the adapters into it and freezes its base weights inside the trainer, and groups
    resolved before would hold the frozen weights and none of the adapters."""

    def __init__(self, args: Any, model: Any) -> None:
        self.args = args
        self.model = model

    def __iter__(self) -> Any:
        return iter(_param_groups(self.args, self.model))

    def __repr__(self) -> str:
        return f"ParamGroupsAtBuild(model={type(self.model).__name__})"


def _param_groups(args: Any, model: Any) -> list[dict[str, Any]]:
    """FOAM's param groups of ``model`` under ``args``: block sizes per parameter, the Trainer's weight decay."""
    config = foam_config_from_args(args)
    plan = resolve_block_sizes(model, config, args.optim_target_modules)
    return build_param_groups(
        model, plan, weight_decay=args.weight_decay, decay_parameter_names=decay_parameter_names(model)
    )


def optimizer_cls_and_kwargs(args: Any, model: Any) -> tuple[type[FOAM], dict[str, Any]]:
    """``(FOAM, ZeroFOAM or LayerwiseFOAM, kwargs)`` for ``args`` and ``model``; ``kwargs["params"]`` holds the
    groups, a :class:`ParamGroupsAtBuild`: resolved from ``model`` as it is when the optimizer is built.

    Also usable without the name registration: ``Trainer(..., optimizer_cls_and_kwargs=...)``; the Trainer takes
    ``params`` out of ``kwargs`` when it builds the optimizer, so give each Trainer a tuple of its own.
    """
    if model is None:
        raise FoamConfigError("optim='foam' needs the model to choose which weights fold; the Trainer got none.")
    config = foam_config_from_args(args)
    # ZeRO hands the optimizer flat partitions: ZeroFOAM folds them exactly (foam_hf.zero).
    ds_config = _deepspeed_config(args)
    _check_deepspeed_run(args, ds_config)
    kwargs: dict[str, Any] = dict(
        params=ParamGroupsAtBuild(args, model),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
        block_size=config.block_size,
        scale=config.scale,
        res_scale=config.res_scale,
        second_moment=config.second_moment,
        state_dtype=config.state_dtype,
        weight_rounding=config.weight_rounding,
    )
    if not _is_layerwise(args.optim):
        return (ZeroFOAM if zero_stage(ds_config) != 0 else FOAM), kwargs

    from transformers.training_args import ParallelMode

    _check_layerwise_fields(args)
    if args.parallel_mode == ParallelMode.DISTRIBUTED:
        raise FoamConfigError(
            "optim='foam_layerwise' does not support DDP/FSDP: each parameter steps inside backward, before "
            "its gradient is reduced across ranks. Fix: use optim='foam'."
        )
    from accelerate.state import GradientState

    gradient_state = GradientState()
    # The Trainer marks the last micro-batch of each accumulation window; step only then.
    kwargs["should_step"] = lambda: gradient_state.sync_gradients
    return LayerwiseFOAM, kwargs


def foam_handler(ctx: Any) -> tuple[type[FOAM], dict[str, Any]]:
    """The entry of transformers' optimizer handler table for ``optim="foam"`` / ``"foam_layerwise"``."""
    cls, kwargs = optimizer_cls_and_kwargs(ctx.args, ctx.model)
    kwargs["params"] = list(kwargs["params"])  # the Trainer's model, now: errors surface here, not inside torch
    _warn_fold_options_where_nothing_folds(ctx.args, kwargs["params"])
    ctx.optimizer_kwargs.update(kwargs)
    return cls, ctx.optimizer_kwargs


def after_train(trainer: Any) -> None:
    """When ``Trainer.train`` returns or raises: take a layer-wise optimizer's hooks off the model, as
    :class:`~foam_hf.integration.callback.LayerwiseHooksCallback` does at a normal end. A ``train()`` that raised
    (out of memory, an interrupted notebook cell) hears no ``on_train_end``, and hooks left on would go on stepping
    the model and freeing the gradients of whatever trains it next. A later ``train()`` puts them back (that
    callback's ``on_train_begin``), so only hooks it manages come off: a ``LayerwiseFOAM`` handed to the Trainer
    through ``optimizers=`` keeps its hooks, as at a normal end."""
    from ..layerwise import LayerwiseFOAM
    from .callback import LayerwiseHooksCallback, _unwrap

    handler = getattr(trainer, "callback_handler", None)
    if not any(isinstance(cb, LayerwiseHooksCallback) for cb in getattr(handler, "callbacks", ())):
        return
    optimizer = _unwrap(getattr(trainer, "optimizer", None))
    if isinstance(optimizer, LayerwiseFOAM):
        optimizer.remove_hooks()


def after_create_optimizer(trainer: Any) -> None:
    """Attach :class:`~foam_hf.FoamCallback` once, unless ``optim_args`` says ``callback=false``; and, under
    ``optim="foam_layerwise"``, the callback that keeps its hooks on only while ``train()`` runs."""
    from .callback import FoamCallback, LayerwiseHooksCallback

    if not is_foam_optim(trainer.args.optim):
        return
    callbacks = trainer.callback_handler.callbacks
    if _is_layerwise(trainer.args.optim) and not any(isinstance(cb, LayerwiseHooksCallback) for cb in callbacks):
        trainer.callback_handler.add_callback(LayerwiseHooksCallback())
    if not foam_config_from_args(trainer.args).callback:
        return
    if any(isinstance(cb, FoamCallback) for cb in trainer.callback_handler.callbacks):
        return
    insert_callback_first(trainer, FoamCallback())
