"""Every touch of transformers internals, in one place.

transformers accepts optimizer names from a closed enum (``TrainingArguments.__post_init__`` runs
``OptimizerNames(self.optim)``) and builds optimizers through a handler table. To make
``optim="foam"`` a name like any other we rely on exactly six things, each checked by :func:`check_seam`
(run by :func:`install`, place by place as lazy registration installs, and by the test suite), so a
transformers release that changes one of them fails loudly with this module's name in the message:

1. ``transformers.training_args.OptimizerNames`` is a ``str`` ``Enum`` we can add members to;
2. ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` maps those members to handlers taking an
   ``OptimizerContext`` (``args``, ``model``) and returning ``(optimizer_cls, kwargs)``, where
   ``kwargs["params"]`` replaces the Trainer's param groups;
3. ``TrainingArguments.__post_init__`` exists (we validate FOAM's ``optim_args`` right after it, so a
   typo fails when the arguments are built, not when training starts);
4. ``Trainer.create_optimizer(self, model=None)`` exists (while it runs, FOAM's groups take that Trainer's
   weight-decay rule; right after it we attach :class:`FoamCallback`, at the front of
   ``trainer.callback_handler.callbacks`` so reporting callbacks see its logs);
5. ``Trainer.get_decay_parameter_names(self, model)`` uses no trainer state (we call it to get the
   Trainer's own weight-decay rule where no Trainer is building the optimizer);
6. ``Trainer.train`` exists (when it returns *or raises*, we take ``optim="foam_layerwise"``'s hooks off the
   model: callbacks hear of a normal end only, and hooks left on would go on stepping the model and freeing the
   gradients of whatever trains it next).

This module is the mechanism only: what runs at each place (validation, the handler, the callback)
is passed in by :mod:`foam_hf.integration`, which wires in the policy of
:mod:`foam_hf.integration.transformers`. It imports nothing from transformers at module level, so that
registration can wait until transformers is imported (``foam_hf.integration.register_lazily``).

Tested with transformers 5.23-5.25 (see pyproject.toml for the supported range).
"""

from __future__ import annotations

import contextvars
import enum
import functools

TYPE_CHECKING = False  # imported at start-up by the launcher's hooks: no typing, no inspect until needed
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = [
    "FOAM_OPTIMIZER_NAMES",
    "SeamError",
    "check_seam",
    "decay_parameter_names",
    "install",
    "install_handler",
    "install_names",
    "install_train_exit",
    "install_trainer",
]

#: Enum member name -> the string users write in ``optim=``.
FOAM_OPTIMIZER_NAMES: dict[str, str] = {"FOAM": "foam", "FOAM_LAYERWISE": "foam_layerwise"}

_MARK = "_foam_hf_wrapped"
#: The Trainer whose ``create_optimizer`` is running, if any (see :func:`decay_parameter_names`).
_building_trainer: contextvars.ContextVar[Any] = contextvars.ContextVar("foam_hf_building_trainer", default=None)


class SeamError(RuntimeError):
    """transformers changed something foam_hf's ``optim="foam"`` registration relies on."""


def _fail(what: str) -> SeamError:
    import transformers

    return SeamError(
        f"foam_hf cannot register optim='foam' with transformers {transformers.__version__}: {what}. "
        "foam_hf.integration._seam lists what it relies on; this transformers release is outside the tested "
        "range (see foam_hf's pyproject.toml). Workaround: pass the optimizer explicitly, "
        "Trainer(..., optimizer_cls_and_kwargs=foam_hf.integration.optimizer_cls_and_kwargs(args, model)), or for "
        "trainers without that argument (TRL's DPOTrainer, GRPOTrainer, ...) set trainer.optimizer_cls_and_kwargs "
        "= foam_hf.integration.optimizer_cls_and_kwargs(trainer.args, trainer.model) before train() "
        "(docs/integration.md, 'When transformers changes')."
    )


def check_seam() -> None:
    """Raise :class:`SeamError` naming the first internal that is not as foam_hf expects (imports transformers'
    trainer). Lazy registration runs the same checks place by place, as each module is imported."""
    import importlib

    training_args, trainer_optimizer, trainer = (importlib.import_module(name) for name in _PLACES)
    _check_names(training_args)
    _check_handlers(trainer_optimizer)
    _check_trainer(trainer)


def _check_names(training_args: Any) -> None:
    """Internals 1 and 3: the ``OptimizerNames`` enum and ``TrainingArguments.__post_init__``."""
    names = getattr(training_args, "OptimizerNames", None)
    if not (isinstance(names, type) and issubclass(names, enum.Enum) and issubclass(names, str)):
        raise _fail("transformers.training_args.OptimizerNames is no longer a str Enum")
    for attr in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not hasattr(names, attr):
            raise _fail(f"OptimizerNames has no {attr}")
    if "__post_init__" not in vars(training_args.TrainingArguments):
        raise _fail("TrainingArguments.__post_init__ is gone")


def _check_handlers(trainer_optimizer: Any) -> None:
    """Internal 2: the handler table and the ``OptimizerContext`` its handlers take."""
    from transformers.training_args import OptimizerNames

    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(handlers, dict) or OptimizerNames.ADAMW_TORCH not in handlers:
        raise _fail("transformers.trainer_optimizer._OPTIMIZER_HANDLERS is no longer the handler table")
    context = getattr(trainer_optimizer, "OptimizerContext", None)
    fields = set(getattr(context, "__dataclass_fields__", {}))
    if not {"args", "model", "optimizer_kwargs"} <= fields:
        raise _fail(f"OptimizerContext has fields {sorted(fields)}, expected args, model, optimizer_kwargs")


def _check_trainer(trainer: Any) -> None:
    """Internals 4, 5 and 6: ``Trainer.create_optimizer``, ``get_decay_parameter_names`` and ``train``."""
    import inspect

    params = list(inspect.signature(trainer.Trainer.create_optimizer).parameters)
    if params[:2] != ["self", "model"]:
        raise _fail(f"Trainer.create_optimizer has parameters {params}, expected (self, model=None)")
    params = list(inspect.signature(trainer.Trainer.get_decay_parameter_names).parameters)
    if params != ["self", "model"]:
        raise _fail(f"Trainer.get_decay_parameter_names has parameters {params}, expected (self, model)")
    if not callable(getattr(trainer.Trainer, "train", None)):
        raise _fail("Trainer.train is gone")


def decay_parameter_names(model: Any) -> list[str]:
    """The names of ``model``'s parameters that weight decay applies to, by the rule of the Trainer building the
    optimizer (its own ``get_decay_parameter_names``, a subclass's override included) while ``create_optimizer``
    runs, else by transformers' base rule (biases and norm weights excluded)."""
    from transformers import Trainer

    trainer = _building_trainer.get()
    if trainer is not None:
        return list(trainer.get_decay_parameter_names(model))
    return list(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]


def _name_from_pickle(value: str) -> Any:
    """Unpickling target of our enum members: registers the names first, so a pickled
    ``training_args.bin`` loads in a process that has not imported foam_hf."""
    from . import register

    register()
    from transformers.training_args import OptimizerNames

    return OptimizerNames(value)


def _add_member(names: type[enum.Enum], member_name: str, value: str) -> enum.Enum:
    if value in names._value2member_map_:
        return names._value2member_map_[value]
    member = str.__new__(names, value)
    member._name_ = member_name
    member._value_ = value
    member.__objclass__ = names
    member.__init__()  # Enum.__init__ is a no-op kept for symmetry with members built by EnumType
    member.__reduce_ex__ = lambda protocol, _v=value: (_name_from_pickle, (_v,))  # instance-level: see above
    names._member_map_[member_name] = member
    names._value2member_map_[value] = member
    names._member_names_.append(member_name)
    type.__setattr__(names, member_name, member)
    return member


def _wrap_post_init(cls: type, validate: Callable[[Any], None]) -> None:
    original = cls.__post_init__
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def __post_init__(self: Any) -> None:
        original(self)
        validate(self)

    setattr(__post_init__, _MARK, True)
    cls.__post_init__ = __post_init__


def _wrap_create_optimizer(cls: type, after: Callable[[Any], None]) -> None:
    original = cls.create_optimizer
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def create_optimizer(self: Any, model: Any = None) -> Any:
        token = _building_trainer.set(self)  # whose weight-decay rule the handler applies
        try:
            optimizer = original(self, model)
        finally:
            _building_trainer.reset(token)
        after(self)
        return optimizer

    setattr(create_optimizer, _MARK, True)
    cls.create_optimizer = create_optimizer


def _wrap_train(cls: type, after: Callable[[Any], None]) -> None:
    original = cls.train
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        finally:
            after(self)

    setattr(train, _MARK, True)
    cls.train = train


def insert_callback_first(trainer: Any, callback: Any) -> None:
    """Put ``callback`` before the reporting callbacks so the values it adds to ``logs`` reach them."""
    callback_handler = trainer.callback_handler
    callback_handler.callbacks.insert(0, callback)


# The three places foam_hf plugs into, each installed as soon as its transformers module exists (and no
# sooner: installing at TrainingArguments' import may happen while transformers.trainer is half-imported).
if TYPE_CHECKING:
    Validate = Callable[[Any], None]
    Handler = Callable[[Any], Any]
    AfterCreate = Callable[[Any], None]
    AfterTrain = Callable[[Any], None]


def install_names(training_args: Any, validate: Validate) -> None:
    """Add ``"foam"``/``"foam_layerwise"`` to ``OptimizerNames`` and validate FOAM's options after
    ``TrainingArguments.__post_init__``. Needs nothing but ``transformers.training_args`` itself, so argparse
    parsers built from it (HfArgumentParser, TRL's CLI) offer ``--optim foam``."""
    _check_names(training_args)
    names, arguments = training_args.OptimizerNames, training_args.TrainingArguments
    for member_name, value in FOAM_OPTIMIZER_NAMES.items():
        _add_member(names, member_name, value)
    _wrap_post_init(arguments, validate)


def install_handler(trainer_optimizer: Any, handler: Handler) -> None:
    """Put ``handler`` into transformers' optimizer handler table for both FOAM names."""
    from transformers.training_args import OptimizerNames

    _check_handlers(trainer_optimizer)
    handlers = trainer_optimizer._OPTIMIZER_HANDLERS
    for value in FOAM_OPTIMIZER_NAMES.values():
        handlers[OptimizerNames(value)] = handler


def install_trainer(trainer: Any, after_create: AfterCreate) -> None:
    """Call ``after_create(trainer)`` right after ``Trainer.create_optimizer``."""
    _check_trainer(trainer)
    _wrap_create_optimizer(trainer.Trainer, after_create)


def install_train_exit(trainer: Any, after_train: AfterTrain) -> None:
    """Call ``after_train(trainer)`` whenever ``Trainer.train`` returns or raises (it must not raise itself)."""
    _check_trainer(trainer)
    _wrap_train(trainer.Trainer, after_train)


_PLACES = ("transformers.training_args", "transformers.trainer_optimizer", "transformers.trainer")  # in order


def install(handler: Handler, validate: Validate, after_create: AfterCreate, after_train: AfterTrain) -> None:
    """Install all three places now, importing transformers (idempotent)."""
    import importlib

    modules = [importlib.import_module(name) for name in _PLACES]
    check_seam()
    install_names(modules[0], validate)
    install_handler(modules[1], handler)
    install_trainer(modules[2], after_create)
    install_train_exit(modules[2], after_train)
