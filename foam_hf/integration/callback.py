r"""FoamCallback: reports what FOAM saves and how much the folding discards, into the Trainer's logs.

Logged keys (every ``report_to`` backend sees them, and ``trainer.state.log_history`` keeps them):

* at the first log after train start: ``foam/state_bytes``, ``foam/adamw_state_bytes``,
  ``foam/state_ratio`` (AdamW over FOAM), ``foam/folded_params``, ``foam/unfolded_params``;
* at each logging step: ``foam/residual_ratio`` :math:`= \lVert R \rVert / \lVert G \rVert` over the
  folded parameters, with :math:`R = G - \operatorname{unfold}(\operatorname{blockmean}(G))` — the
  share of the gradient that the folded states do not see and the residual term carries (0: each block
  is constant; near 1: blocks average to nothing);
* ``foam/first_nonfinite_step``: the first optimizer step whose folded gradients held a NaN or inf;
* under ``optim="foam_layerwise"``, ``grad_norm`` replaced by the norm of the gradients the hooks stepped on
  (the Trainer computes it after backward, when layer-wise FOAM has already freed every gradient: 0.0).

It observes and never changes hyper-parameters. It fails fast at train start when the optimizer in use
is not FOAM (e.g. a trainer that bypassed ``optim="foam"``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import TrainerCallback

from ..distributed import local_tensor, sum_over_shards
from ..errors import FoamConfigError
from ..folding import block_mean, is_foldable, unfold
from ..layerwise import LayerwiseFOAM
from ..optim import FOAM

__all__ = ["FoamCallback", "LayerwiseHooksCallback"]


def _squared_norms(grad: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\lVert G \rVert^2` and :math:`\lVert R \rVert^2` of a folded gradient, in fp64, with
    :math:`R = G - \operatorname{unfold}(\operatorname{blockmean}(G))`."""
    g = grad.float()
    residual = g - unfold(block_mean(g, block_size), g.shape[-1], block_size)
    return g.square().sum().double(), residual.square().sum().double()


logger = logging.getLogger(__name__)


def _unwrap(optimizer: Any) -> Any:
    """The optimizer under accelerate's / DeepSpeed's wrappers."""
    seen = set()
    while optimizer is not None and not isinstance(optimizer, FOAM) and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class FoamCallback(TrainerCallback):
    """Log FOAM's state memory, residual ratio and first non-finite gradient step (see module docstring).

    Attached automatically when a Trainer builds FOAM by name; turn that off with
    ``optim_args="...,callback=false"``, or pass your own ``FoamCallback(...)`` in ``callbacks=``.

    Args:
        check_finite: check the folded gradients for NaN/inf before every optimizer step (one read of
            those gradients per step) (default: True).
    """

    def __init__(self, check_finite: bool = True) -> None:
        self.check_finite = check_finite
        self._pending: dict[str, float] = {}
        self._first_nonfinite_step: int | None = None
        self._nonfinite_before_step = False  # seen before this optimizer step, reported once it is taken
        # Layer-wise FOAM: per-gradient sums taken in its hooks (see _observe_layerwise), and whether to take them.
        self._layerwise_sums: list[torch.Tensor] = []
        self._observing = False
        self._observed: LayerwiseFOAM | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        # Each train() (a second call, a search trial) reports its own first step; a resumed one keeps the report
        # its checkpoint's log history holds (restored before this), so the resumed run does not report again.
        reported = [e["foam/first_nonfinite_step"] for e in state.log_history if "foam/first_nonfinite_step" in e]
        self._first_nonfinite_step = reported[0] if reported else None
        foam = _unwrap(optimizer)
        if not isinstance(foam, FOAM):
            asked = getattr(args.optim, "value", args.optim)
            while getattr(optimizer, "optimizer", None) is not None:  # name the user's optimizer, not a wrapper
                optimizer = optimizer.optimizer
            in_use = type(optimizer).__name__ if optimizer is not None else None
            if str(asked) not in ("foam", "foam_layerwise"):  # a FoamCallback the user added to another optimizer
                raise FoamConfigError(
                    f"FoamCallback: the optimizer in use is {in_use} (TrainingArguments.optim={asked!r}), not "
                    "foam_hf.FOAM, so there is nothing for FoamCallback to report. Fix: set optim='foam' to train "
                    "with FOAM, or take FoamCallback out of callbacks=."
                )
            raise FoamConfigError(
                f"FoamCallback: TrainingArguments.optim={asked!r} but the optimizer in use is {in_use}, not "
                "foam_hf.FOAM: something built the optimizer without going through the name (e.g. "
                "Trainer(optimizers=(...)) or a trainer that overrides create_optimizer). Fix: drop the explicit "
                "optimizer, or remove FoamCallback (optim_args='callback=false') if that is intended."
            )
        if isinstance(foam, LayerwiseFOAM) and foam is not self._observed:
            foam.add_gradient_observer(self._observe_layerwise)
            self._observed = foam
        memory = foam.state_memory()  # ZeroFOAM reports the whole model's figures under ZeRO
        self._pending.update(
            {
                "foam/state_bytes": memory.foam_bytes,
                "foam/adamw_state_bytes": memory.adamw_bytes,
                "foam/state_ratio": round(memory.ratio, 3),
                "foam/folded_params": memory.folded_params,
                "foam/unfolded_params": memory.unfolded_params,
            }
        )
        logger.info(
            "FOAM: optimizer state %.2f MiB vs AdamW %.2f MiB (%.1fx smaller); %d tensors folded, %d unfolded",
            memory.foam_bytes / 2**20,
            memory.adamw_bytes / 2**20,
            memory.ratio,
            memory.folded_params,
            memory.unfolded_params,
        )

    def _will_log(self, args: Any, state: Any) -> bool:
        """Whether the Trainer logs after the step about to run, as its DefaultFlowCallback decides. Under the
        "epoch" strategy the last step of an epoch is not known before it runs, so every step is taken as one
        (the log at the epoch's end then carries its last step's figures)."""
        strategy = getattr(args.logging_strategy, "value", args.logging_strategy)
        if args.logging_first_step and state.global_step == 0:
            return True
        if strategy == "epoch":
            return True
        if strategy != "steps" or not args.logging_steps:
            return False
        steps = args.logging_steps
        if isinstance(steps, float) and steps < 1:
            steps = max(1, math.ceil(state.max_steps * steps))
        return (state.global_step + 1) % int(steps) == 0

    def _wants_gradients(self, args: Any, state: Any) -> bool:
        return self._will_log(args, state) or (self.check_finite and self._first_nonfinite_step is None)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._observing = self._wants_gradients(args, state)
        self._layerwise_sums = []

    @torch.no_grad()
    def _observe_layerwise(self, param: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        """A layer-wise hook's gradient, before it is stepped on and freed: [‖G‖², and for a folded parameter
        ‖G‖², ‖R‖² and whether G holds a NaN or inf]."""
        if not self._observing:
            return
        block_size = group["block_size"]
        if is_foldable(param, block_size):
            grad_sq, residual_sq = _squared_norms(grad, block_size)
            largest = torch.linalg.vector_norm(grad, math.inf)  # non-finite exactly when an entry is, unlike grad_sq
            sums = [grad_sq, grad_sq, residual_sq, (~torch.isfinite(largest)).double()]
        else:
            grad_sq = grad.float().square().sum().double()
            sums = [grad_sq, *torch.zeros(3, dtype=torch.float64, device=grad.device)]
        self._layerwise_sums.append(torch.stack(sums))

    def _nonfinite_at_this_step(self, state: Any) -> None:
        self._first_nonfinite_step = state.global_step + 1
        self._pending["foam/first_nonfinite_step"] = self._first_nonfinite_step
        logger.warning(
            "FOAM: non-finite gradients in folded parameters at optimizer step %d. FOAM behaves as AdamW "
            "does: the NaN/inf propagates into the states of the affected blocks.",
            self._first_nonfinite_step,
        )

    def _finish_layerwise_step(self, args: Any, state: Any) -> None:
        """What on_pre_optimizer_step reads from the gradients, from the sums the hooks took (layer-wise FOAM):
        after ``optimizer.step()``, which steps the gradients no hook stepped on the last micro-batch (a branch the
        window's last batch did not use), and whose sums count too."""
        if not self._layerwise_sums:
            return
        device = self._layerwise_sums[0].device  # one device-to-host copy a step, not one per gradient
        sums = torch.stack([t.to(device) for t in self._layerwise_sums]).sum(0)
        grad_sq, folded_sq, residual_sq, nonfinite = sums.tolist()
        self._layerwise_sums = []
        if self.check_finite and self._first_nonfinite_step is None and nonfinite > 0:
            self._nonfinite_at_this_step(state)
        if self._will_log(args, state):
            self._pending["grad_norm"] = math.sqrt(grad_sq)
            if folded_sq > 0:
                self._pending["foam/residual_ratio"] = math.sqrt(residual_sq / folded_sq)

    @torch.no_grad()
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        foam = _unwrap(optimizer)
        if foam is None or isinstance(foam, LayerwiseFOAM):  # layer-wise: summed after the step (on_optimizer_step)
            return
        if not self._wants_gradients(args, state):
            return
        want_residual = self._will_log(args, state)
        folded_grads = []
        for group in foam.param_groups:
            block_size = group["block_size"]
            for p in group["params"]:
                if p.grad is not None and is_foldable(p, block_size):
                    folded_grads.append((p.grad, block_size))
        if not folded_grads:
            return
        # Under FSDP2 the gradients are DTensors: reduce this rank's rows, then sum over the ranks.
        if self.check_finite and self._first_nonfinite_step is None:
            # The largest |g| of each gradient: NaN or inf exactly when an entry is. (A 2-norm overflows for finite
            # gradients: 512 x 512 fp16 entries of 200, or fp32 ones of 1e19.)
            norms = torch._foreach_norm([local_tensor(g) for g, _ in folded_grads], math.inf)
            nonfinite = [((~torch.isfinite(n)).double(), g) for n, (g, _) in zip(norms, folded_grads)]
            # Reported once the step is taken (on_optimizer_step): a loss scaler skips a step whose gradients
            # overflowed (fp16 mixed precision, often in its first steps), and nothing propagates then.
            self._nonfinite_before_step = sum_over_shards(nonfinite).item() > 0
        if want_residual:
            sums = []
            for grad, block_size in folded_grads:
                sums.append((torch.stack(_squared_norms(local_tensor(grad), block_size)), grad))
            grad_sq, residual_sq = sum_over_shards(sums).tolist()
            if grad_sq > 0:
                self._pending["foam/residual_ratio"] = math.sqrt(residual_sq / grad_sq)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if isinstance(_unwrap(optimizer), LayerwiseFOAM):
            self._finish_layerwise_step(args, state)
        if self._nonfinite_before_step:
            self._nonfinite_before_step = False
            if getattr(optimizer, "step_was_skipped", False) is True:  # accelerate's wrapper, under a loss scaler
                logger.info("FOAM: non-finite gradients at optimizer step %d; the loss scaler skipped the step.",
                            state.global_step + 1)  # fmt: skip
            else:
                self._nonfinite_at_this_step(state)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not self._pending or logs is None:
            return
        if "loss" not in logs and "train_loss" not in logs:
            return  # not a training log (an evaluation's, whatever its metric prefix): the figures wait for one
        logs.update(self._pending)
        # Trainer.log appended a copy of `logs` to log_history before calling us; keep the two in step.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}


class LayerwiseHooksCallback(TrainerCallback):
    """Keeps ``optim="foam_layerwise"``'s hooks on its parameters while ``train()`` runs, and only then.

    The hooks step each parameter inside backward; left on after training, they would go on stepping (with the
    finished schedule's learning rate) and freeing the gradients of whatever trains the model next, which then
    trains on nothing. Attached by the Trainer integration with every layer-wise optimizer, ``callback=false``
    or not: at the end of ``train()`` it removes the hooks, at the start of a later ``train()`` of the same
    Trainer it puts them back.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        foam = _unwrap(optimizer)
        if isinstance(foam, LayerwiseFOAM):
            foam.attach_hooks()

    def on_train_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        foam = _unwrap(optimizer)
        if isinstance(foam, LayerwiseFOAM):
            foam.remove_hooks()
