"""Layer-wise FOAM: each parameter steps as soon as its gradient is complete, inside backward.

A post-accumulate-grad hook on every trainable parameter runs the FOAM step for that parameter and
frees its gradient, so the gradients of the whole model never coexist. It is the same optimizer as
:class:`~foam_hf.FOAM` (one instance, one ``state_dict``), so checkpoints resume exactly and learning-rate
schedulers work on its ``param_groups`` as usual; only *when* the step runs changes.

Gradient accumulation: ``should_step`` is asked in each hook; while it returns ``False`` gradients keep
accumulating in ``p.grad`` (no memory saving on those micro-batches, but exact maths), and on the
micro-batch where it returns ``True`` every parameter steps on its accumulated gradient.

The gradients are gone when backward returns, so whatever reads them per step (a gradient norm, the callback's
residual ratio and finiteness check) must see each one in the hook: :meth:`LayerwiseFOAM.add_gradient_observer`.

The hooks outlive training unless removed: a parameter keeps stepping (and freeing its gradient) in every
later backward, whatever optimizer is meant to step it then. :meth:`LayerwiseFOAM.remove_hooks` detaches them
(the Trainer integration does it at the end of ``train()`` and attaches them again at its start), and a parameter
is stepped by one layer-wise optimizer at a time: a new one takes it over from the one before, with a warning.

What cannot work, and is refused by the Trainer integration rather than silently wrong: gradient
clipping by global norm (the norm needs every gradient at once), fp16 loss scaling (the hook would see
scaled gradients; in a hand-written loop, do not hand a ``LayerwiseFOAM`` to a ``GradScaler``), and DDP/FSDP
(the hook fires before gradients are reduced across ranks). torch's step hooks
(``register_step_pre_hook``/``post_hook``) run around :meth:`LayerwiseFOAM.step`, after backward has already
stepped the hooked parameters.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import ParamsT
from torch.utils.hooks import RemovableHandle

from .optim import FOAM

__all__ = ["LayerwiseFOAM"]

#: id(parameter) -> (the parameter, the LayerwiseFOAM whose hook steps it, that hook's handle), all weak but the
#: handle, so that a parameter is stepped by one layer-wise optimizer at a time.
_HOOK_OWNERS: dict[int, tuple[weakref.ref, weakref.ref, RemovableHandle]] = {}


def _check_takes_no_arguments(should_step: Callable[[], bool]) -> None:
    """Refuse a ``should_step`` that cannot be called without arguments (``lambda step: ...``) when the optimizer is
    built, not with a bare TypeError from inside the first backward. A callable whose signature Python cannot read
    (some builtins) passes."""
    try:
        inspect.signature(should_step).bind()
    except ValueError:  # no signature to read
        return
    except TypeError as err:
        raise TypeError(
            f"LayerwiseFOAM: should_step={should_step!r} cannot be called without arguments ({err}); every gradient "
            "hook calls should_step() to ask whether to step now. Fix: a function of no arguments, e.g. "
            "should_step=lambda: micro_step % accumulation == 0 over a counter your loop keeps."
        ) from None


def warn_if_stepped_in_backward(optimizer: torch.optim.Optimizer) -> None:
    """Warn when parameters of ``optimizer`` (not itself layer-wise) carry a live LayerwiseFOAM's hooks: those step
    them inside backward and free their gradients, so ``optimizer.step()`` would find none and change nothing."""
    if isinstance(optimizer, LayerwiseFOAM):
        return
    hooked = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            owner = _HOOK_OWNERS.get(id(p))
            if owner is not None and owner[0]() is p and owner[1]() is not None:
                hooked += 1
    if hooked:
        warnings.warn(
            f"{type(optimizer).__name__}: {hooked} of its parameter(s) are stepped inside backward by a LayerwiseFOAM "
            "whose hooks are still on: it steps them and frees their gradients, so this optimizer's step() would "
            "find none and change nothing. Fix: call remove_hooks() on the LayerwiseFOAM first.",
            UserWarning,
            stacklevel=3,
        )


class LayerwiseFOAM(FOAM):
    """:class:`~foam_hf.FOAM` whose step runs per parameter inside backward (see the module docstring).

    Args:
        params: as for :class:`~foam_hf.FOAM`.
        should_step: called in every hook; the parameter steps (and its gradient is freed) only when it
            returns ``True``. ``None`` steps on every backward (no gradient accumulation).
        **kwargs: every other :class:`~foam_hf.FOAM` option.

    :meth:`step` updates only the parameters whose hooks did not (those that still hold a gradient: see
    :meth:`step`), after evaluating a closure if given.
    Call :meth:`remove_hooks` to detach the optimizer from its parameters when it is done with them (before
    training them with anything else), :meth:`attach_hooks` to attach it again.
    """

    def __init__(self, params: ParamsT, *, should_step: Callable[[], bool] | None = None, **kwargs: Any) -> None:
        if should_step is not None and not callable(should_step):  # else a TypeError from inside backward()
            raise TypeError(
                f"LayerwiseFOAM: should_step={should_step!r} must be a function of no arguments that returns whether "
                "to step now (asked in every gradient hook). Fix: pass e.g. should_step=lambda: True, or None."
            )
        if should_step is not None:
            _check_takes_no_arguments(should_step)
        super().__init__(params, **kwargs)
        self._should_step = should_step if should_step is not None else (lambda: True)
        # Group *indices*, not dicts: load_state_dict replaces the group dicts (and schedulers edit those).
        self._group_index: dict[int, int] = {}
        self._handles: dict[int, RemovableHandle] = {}  # id(parameter) -> its hook's handle
        # Parameters stepped since the last step()/zero_grad(): a second gradient for one of them before then means
        # its gradient arrived in pieces, and a step on each piece would be a wrong step (see _step_parameter).
        self._stepped: set[int] = set()
        self._gradient_observers: OrderedDict[int, Callable[[torch.Tensor, torch.Tensor, dict], None]] = OrderedDict()
        self._hooks_wanted = True  # attach_hooks() sets it, remove_hooks() clears it
        self._index_groups()
        self.attach_hooks()

    def _index_groups(self) -> None:
        # Every parameter, frozen or not: one unfrozen later (progressive unfreezing) is hooked at the next step().
        self._group_index = {id(p): index for index, group in enumerate(self.param_groups) for p in group["params"]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (``copy.deepcopy``, ``pickle``) has FOAM's state and groups, no hooks and no ``should_step``
        (functions do not pickle): call :meth:`attach_hooks` on it, after handing it the parameters to step.
        (torch's ``load_state_dict`` calls this too, on a live optimizer: its hooks stay.)"""
        super().__setstate__(state)
        if not hasattr(self, "_handles"):  # a copy, not a live optimizer loading a state
            self._should_step = lambda: True
            self._handles = {}
            self._stepped = set()
            self._gradient_observers = OrderedDict()
            self._hooks_wanted = False
        self._index_groups()

    def _trainable_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    @property
    def hooks_attached(self) -> bool:
        """Whether this optimizer's hooks are on its parameters (it steps them in backward)."""
        return bool(self._handles)

    def attach_hooks(self, *, take_over: bool = True) -> None:
        """Put the per-parameter hooks on (again; a no-op where they are on). A parameter another layer-wise
        optimizer steps is taken over from it, with a warning: two would each step it, or the first would free
        the gradient the second waits for. ``take_over=False`` leaves such parameters to the other one."""
        self._hooks_wanted = True
        taken_over = 0
        for p in self._trainable_params():
            if id(p) in self._handles:
                continue
            owner = _HOOK_OWNERS.get(id(p))
            previous = owner[1]() if owner is not None and owner[0]() is p else None
            if previous is not None and previous is not self and not take_over:
                continue
            if previous is not None and previous is not self:
                owner[2].remove()
                previous._handles.pop(id(p), None)
                taken_over += 1
            handle = p.register_post_accumulate_grad_hook(self._step_parameter)
            self._handles[id(p)] = handle
            _HOOK_OWNERS[id(p)] = (weakref.ref(p), weakref.ref(self), handle)
        if taken_over:
            warnings.warn(
                f"LayerwiseFOAM: {taken_over} parameter(s) were stepped by another LayerwiseFOAM, whose hooks were "
                "still on them; this one steps them now and the other no longer does. Fix: call "
                "remove_hooks() on an optimizer you are done with.",
                stacklevel=2,
            )

    @torch.no_grad()
    def _step_parameter(self, param: torch.Tensor) -> None:
        if param.grad is None or not self._asked_to_step():
            return
        if id(param) in self._stepped:
            raise RuntimeError(
                f"LayerwiseFOAM: a parameter of shape {tuple(param.shape)} received a second gradient after it was "
                "stepped, before step() or zero_grad(): its gradient arrives in pieces, each of which would be "
                "stepped as if it were the whole (reentrant gradient checkpointing of layers that share a "
                "parameter, or several backward() calls per optimizer step). Fix: use_reentrant=False in "
                "activation_checkpointing_kwargs (gradient_checkpointing_kwargs before transformers 5.23; "
                "non-reentrant is transformers' default), one backward() per step (or a should_step that says True "
                "only on the last), or optim='foam'."
            )
        self._stepped.add(id(param))
        group = self.param_groups[self._group_index[id(param)]]
        for observer in self._gradient_observers.values():
            observer(param, param.grad, group)
        self._step_group(group, [param])
        param.grad = None

    def _asked_to_step(self) -> bool:
        """``should_step()``, refused unless it is a bool: ``None`` (a function that forgot its ``return``) would
        read as "not now" in every hook, and the optimizer would step nothing inside backward, silently."""
        answer = self._should_step()
        if type(answer).__name__ not in ("bool", "bool_"):  # Python's, or numpy's
            raise TypeError(
                f"LayerwiseFOAM: should_step() returned {answer!r} ({type(answer).__name__}), not True or False"
                f"{' (a missing return?)' if answer is None else ''}: it says, in every gradient hook, whether to "
                "step now. Fix: return a bool, e.g. should_step=lambda: micro_step % accumulation == 0."
            )
        return bool(answer)

    #: torch's GradScaler.step hands the step to an optimizer that says it handles loss scaling; this one refuses it
    #: there, by name, instead of GradScaler's "No inf checks were recorded for this optimizer".
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Evaluate ``closure`` if given, then step the parameters that still hold a gradient; the others were
        updated inside backward.

        A parameter still holds one when its hook did not fire on the last micro-batch of an accumulation window
        (a branch that only some batches use, as a vision tower on a mixed text and image dataset: its gradient
        accumulated over the earlier micro-batches), or when the hooks are off. Only when ``should_step()`` says
        so, as in the hooks: a step inside a window would step a partial sum.

        Refused under torch's ``GradScaler`` (fp16 loss scaling): the hooks step on the scaled gradients, before the
        scaler can unscale them or skip a step that overflowed."""
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            raise RuntimeError(
                "LayerwiseFOAM: stepped by a GradScaler (fp16 loss scaling), which it cannot follow: each parameter "
                "steps inside backward, on its loss-scaled gradient, before the scaler can unscale it or skip a step "
                "that overflowed. Fix: train in bf16 (no loss scaling), or use FOAM, which GradScaler steps as AdamW."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        trainable = self._trainable_params()
        for param in trainable:
            self._step_parameter(param)  # none without a gradient, and only when should_step() says so
        self._stepped.clear()
        if self._hooks_wanted and any(id(p) not in self._handles for p in trainable):
            # Parameters unfrozen since: stepped here this once, in backward from now on.
            self.attach_hooks(take_over=False)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; it also ends the optimizer step for the check of gradients in pieces."""
        super().zero_grad(set_to_none)
        self._stepped.clear()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as :class:`FOAM` does, and put hooks on its trainable parameters (those of a group added
        after construction were never stepped: nothing hooked them, and ``step()`` skipped them)."""
        super().add_param_group(param_group)
        if hasattr(self, "_group_index"):  # not during __init__, which indexes and hooks every group itself
            self._index_groups()
            if self._hooks_wanted:
                self.attach_hooks()

    def add_gradient_observer(self, observer: Callable[[torch.Tensor, torch.Tensor, dict], None]) -> RemovableHandle:
        """Call ``observer(param, grad, group)`` with each gradient a hook is about to step on (the accumulated
        one, on the last micro-batch of a window), before the step and before the gradient is freed. Returns a
        handle whose ``remove()`` detaches it."""
        handle = RemovableHandle(self._gradient_observers)
        self._gradient_observers[handle.id] = observer
        return handle

    def remove_hooks(self) -> None:
        """Detach the per-parameter hooks (after training, or before handing the model to another optimizer):
        backward then leaves the gradients in ``p.grad`` again."""
        self._hooks_wanted = False
        for pid, handle in self._handles.items():
            handle.remove()
            owner = _HOOK_OWNERS.get(pid)
            if owner is not None and owner[2] is handle:
                del _HOOK_OWNERS[pid]
        self._handles.clear()
