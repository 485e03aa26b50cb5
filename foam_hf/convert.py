r"""Convert optimizer state between AdamW and FOAM: switch mid-training, resume an AdamW checkpoint, export.

:func:`foam_state_from_adamw` folds AdamW's moments block-wise into a FOAM optimizer's state;
:func:`adamw_state_from_foam` unfolds them back into a state dict that :class:`torch.optim.AdamW` loads.
Given the AdamW optimizer itself, parameters are matched by identity (FOAM may hold them in any order and
grouping); given its ``state_dict()``, by *position*: the order in which they appear across the param groups
(what ``state_dict()`` numbers them by), so both optimizers must then be built over the same parameters in the
same order. The number of parameters and every shape are checked.

Why the block mean is the right fold. Write :math:`A` for the fold matrix (block mean, see
:mod:`foam_hf.reference`) and let AdamW and FOAM see the same gradients :math:`G_1, \ldots, G_t`.

* First moment. AdamW's :math:`m_t = (1-\beta_1)\sum_s \beta_1^{t-s} G_s` is linear in the gradients, and
  so is the fold, so :math:`m_t A = (1-\beta_1)\sum_s \beta_1^{t-s} G_s A`, which is exactly FOAM's
  :math:`\tilde m_t`. Folding :math:`m` by block mean gives the state FOAM would hold had it run from step
  one: the conversion is exact.
* Second moment, ``second_moment="mean_sq"``. FOAM's :math:`\tilde v_t` is the same EMA of
  :math:`(G_s \odot G_s) A` and AdamW's :math:`v_t` the EMA of :math:`G_s \odot G_s`; by the same
  linearity :math:`v_t A = \tilde v_t`. Exact again.
* Second moment, ``second_moment="sq_mean"``. FOAM's :math:`\tilde v_t` is the EMA of
  :math:`(G_s A)^{\odot 2}`, the squared block mean, which AdamW's per-entry :math:`v_t` cannot recover (it
  has lost the signs and the cross terms). By Jensen, :math:`(G_s A)^{\odot 2} \le (G_s \odot G_s) A`
  entry-wise, so :math:`v_t A` is an *upper bound* on the state FOAM would hold: the denominators after
  conversion are at least as large, the first FOAM steps are at most as long as they would have been, and
  the excess decays as :math:`\beta_2^{\,t - t_0}`. No other fold of :math:`v` is both available and safe:
  anything smaller than the block mean can undershoot the true value and lengthen steps.

The residual :math:`R` is never stored, so nothing else needs converting; the step counter carries over,
so bias corrections continue where AdamW left them. The unfold (:func:`adamw_state_from_foam`) broadcasts
each folded entry over its block: every entry of a block gets the block's mean moment, which is what FOAM's
own update uses for the stored part of :math:`M` and :math:`V`.
"""

from __future__ import annotations

import os
from numbers import Real
from pathlib import Path
from typing import Any

import torch

from .distributed import is_dtensor
from .errors import FoamStateError
from .folding import block_mean, folded_shape, is_foldable, unfold
from .precision import state_dtype_for

__all__ = ["adamw_state_from_foam", "convert_trainer_checkpoint", "foam_state_from_adamw"]

_ADAM_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def _ordered_params(optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, dict[str, Any], int]]:
    """(param, group, group index) in state_dict order: group by group, param by param."""
    return [(p, group, i) for i, group in enumerate(optimizer.param_groups) for p in group["params"]]


def _check_is_foam(optimizer: Any, argument: str) -> None:
    from .optim import FOAM

    if not isinstance(optimizer, FOAM):
        raise TypeError(
            f"{argument} must be a foam_hf.FOAM optimizer, got {type(optimizer).__name__}. Fix: build FOAM over "
            "the same parameters, in the same order, and pass it here."
        )


def _refuse_sharded(function: str, tensors: Any) -> None:
    """These functions fold and unfold whole moments: refuse FSDP2's DTensor shards before torch fails on them
    mid-way with a mixed-type error."""
    sharded = next((t for t in tensors if is_dtensor(t)), None)
    if sharded is not None:
        raise FoamStateError(
            f"{function}: a tensor of shape {tuple(sharded.shape)} is a DTensor (FSDP2 shard); this function "
            "converts whole (one-process) moments. Fix: convert on an unsharded copy of the model and load the "
            "resulting FOAM.state_dict() into the sharded FOAM (FOAM.load_state_dict gives each rank its rows), "
            "or convert before fully_shard."
        )


def _target_dtype(param: torch.Tensor, group: dict[str, Any]) -> torch.dtype:
    return state_dtype_for(param, group.get("state_dtype"))


def foam_state_from_adamw(adamw: torch.optim.Optimizer | dict[str, Any], foam_optimizer: Any) -> None:
    """Fill ``foam_optimizer``'s state with AdamW's moments, folded block-wise (see the module docstring).

    Args:
        adamw: a :class:`torch.optim.AdamW` or :class:`torch.optim.Adam` optimizer, or the dict its
            ``state_dict()`` returns (e.g. loaded from an AdamW checkpoint with ``torch.load``).
        foam_optimizer: a :class:`foam_hf.FOAM` built over the same parameters: matched to AdamW's by identity
            when ``adamw`` is the optimizer itself (any order and grouping), by position for a state dict (the same
            order, as ``state_dict`` numbers them).

    Parameters AdamW holds no state for (never stepped) get no FOAM state either: FOAM initializes them
    lazily at their first step, as AdamW would have. Existing FOAM state for converted parameters is
    replaced. Hyper-parameters (lr, betas, eps, weight decay) are *not* copied: they are FOAM's own.
    FOAM has no ``maximize``: an AdamW run with ``maximize=True`` kept the moments of the negated gradients,
    which are exactly those of the FOAM run that goes on from it minimizing the negated objective, as it must.

    Raises:
        FoamStateError: the parameter counts differ, a moment's shape differs from its parameter's, the
            state is not an Adam state (no ``exp_avg``/``exp_avg_sq``), or it uses ``amsgrad``, which FOAM
            does not implement; given the optimizer, one of FOAM's parameters is not among AdamW's (another
            model object), or AdamW holds moments for a parameter FOAM does not step.
    """
    _check_is_foam(foam_optimizer, "foam_state_from_adamw: foam_optimizer")
    _refuse_sharded("foam_state_from_adamw", (p for group in foam_optimizer.param_groups for p in group["params"]))
    state_dict = adamw.state_dict() if isinstance(adamw, torch.optim.Optimizer) else adamw
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
        raise FoamStateError(
            f"foam_state_from_adamw: expected an AdamW optimizer or its state_dict() (a dict with 'state' and "
            f"'param_groups'), got {type(adamw).__name__}. Fix: pass the optimizer or torch.load(path) of its "
            "state_dict."
        )
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list):
        raise FoamStateError(
            "foam_state_from_adamw: the state dict has no 'param_groups' list; not an optimizer state."
        )
    for index, group in enumerate(saved_groups):
        if group.get("amsgrad", False):
            raise FoamStateError(
                f"foam_state_from_adamw: AdamW param group {index} uses amsgrad=True; FOAM has no max-of-v "
                "state to fold it into. Fix: convert from an AdamW run with amsgrad=False."
            )
    saved_ids = [pid for group in saved_groups for pid in group["params"]]
    targets = _ordered_params(foam_optimizer)
    if isinstance(adamw, torch.optim.Optimizer):
        # The optimizer itself names its parameters: match them by identity, whatever order and groups FOAM holds
        # them in (ZeroFOAM gives every folded tensor a group of its own, ahead of the rest).
        saved_ids = _matched_by_identity(adamw, targets, saved_ids, state_dict["state"])
    if len(saved_ids) != len(targets):
        raise FoamStateError(
            f"foam_state_from_adamw: AdamW holds {len(saved_ids)} parameters but FOAM holds {len(targets)}. "
            "Fix: build FOAM over the same parameters, in the same order, as the AdamW optimizer "
            "(e.g. both from model.parameters(), with the same param groups)."
        )
    converted: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
    for position, (pid, (param, group, index)) in enumerate(zip(saved_ids, targets)):
        adam_state = state_dict["state"].get(pid)
        if not adam_state:
            continue
        # torch keeps `step` as a tensor but loads a plain number too; the moments must be tensors.
        missing = [
            k
            for k in _ADAM_STATE_KEYS
            if not isinstance(adam_state.get(k), torch.Tensor)
            and not (k == "step" and isinstance(adam_state.get(k), Real) and not isinstance(adam_state[k], bool))
        ]
        if missing:
            raise FoamStateError(
                f"foam_state_from_adamw: the state of parameter {position} lacks {missing} as tensors (a number "
                f"will do for 'step'; keys: {sorted(adam_state)}); it was not written by Adam/AdamW. Fix: pass an "
                "Adam or AdamW state."
            )
        for key in ("exp_avg", "exp_avg_sq"):
            if adam_state[key].shape != param.shape:
                raise FoamStateError(
                    f"foam_state_from_adamw: AdamW's '{key}' of parameter {position} has shape "
                    f"{tuple(adam_state[key].shape)} but FOAM's parameter {position} (group {index}) has shape "
                    f"{tuple(param.shape)}. The parameter lists do not line up. Fix: build both optimizers "
                    "over the same parameters in the same order, or pass the AdamW optimizer itself (matched by "
                    "identity); a Trainer checkpoint: foam_hf.convert.convert_trainer_checkpoint (docs/scale-out.md)."
                )
        dtype = _target_dtype(param, group)
        block_size = group["block_size"]
        step = torch.as_tensor(adam_state["step"]).detach()
        new_state: dict[str, torch.Tensor] = {"step": step.to(device="cpu", dtype=torch.float32).clone()}
        for key in ("exp_avg", "exp_avg_sq"):
            # Fold in at least fp32, round once to the state dtype.
            moment = adam_state[key].detach().to(device=param.device)
            wide = moment.to(torch.promote_types(moment.dtype, torch.float32))
            if is_foldable(param, block_size):
                wide = block_mean(wide, block_size)
            new_state[key] = wide.to(dtype).clone()
        converted[param] = new_state
    # Validate everything before touching the target, then commit.
    for param, new_state in converted.items():
        foam_optimizer.state[param] = new_state


def adamw_state_from_foam(foam_optimizer: Any) -> dict[str, Any]:
    """An AdamW ``state_dict`` with FOAM's moments unfolded (broadcast over each block), for export.

    Load it with ``torch.optim.AdamW(same_params_in_same_order).load_state_dict(...)``. The groups carry
    FOAM's ``lr``, ``betas``, ``eps`` and ``weight_decay`` and ``amsgrad=False``; AdamW fills its other
    options with its defaults. The residual part of FOAM's moments is never stored, so the exported
    moments are constant within each block.
    """
    _check_is_foam(foam_optimizer, "adamw_state_from_foam: foam_optimizer")
    _refuse_sharded("adamw_state_from_foam", (p for group in foam_optimizer.param_groups for p in group["params"]))
    state: dict[int, dict[str, torch.Tensor]] = {}
    groups: list[dict[str, Any]] = []
    position = 0
    for group in foam_optimizer.param_groups:
        ids = []
        for param in group["params"]:
            ids.append(position)
            foam_state = foam_optimizer.state.get(param)
            if foam_state:
                out: dict[str, torch.Tensor] = {"step": foam_state["step"].clone()}
                for key in ("exp_avg", "exp_avg_sq"):
                    moment = foam_state[key]
                    if is_foldable(param, group["block_size"]):
                        expected = folded_shape(param.shape, group["block_size"])
                        if moment.shape != expected:
                            raise FoamStateError(
                                f"adamw_state_from_foam: '{key}' of parameter {position} has shape "
                                f"{tuple(moment.shape)}, expected the folded shape {tuple(expected)}."
                            )
                        moment = unfold(moment, param.shape[-1], group["block_size"])
                    out[key] = moment.clone()
                state[position] = out
            position += 1
        groups.append(
            dict(
                params=ids,
                lr=group["lr"],
                betas=group["betas"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                amsgrad=False,
            )
        )
    return {"state": state, "param_groups": groups}


def _group_map(adamw: torch.optim.Optimizer, foam_optimizer: Any) -> list[int]:
    """For each of FOAM's param groups, the AdamW group its parameters came from (by identity): one per group,
    since a FOAM group takes one learning rate and one scheduler entry."""
    adamw_group = {id(p): i for i, group in enumerate(adamw.param_groups) for p in group["params"]}
    mapping = []
    for index, group in enumerate(foam_optimizer.param_groups):
        sources = {adamw_group.get(id(p)) for p in group["params"]}
        if None in sources or len(sources) != 1:
            raise FoamStateError(
                f"convert_trainer_checkpoint: FOAM's param group {index} holds parameters of AdamW's groups "
                f"{sorted(i for i in sources if i is not None)}"
                f"{' and some AdamW does not hold' if None in sources else ''}; each FOAM group takes one "
                "learning rate and one scheduler entry, so it must come from one AdamW group. Fix: build both "
                "Trainers over the same model, with the same weight decay and learning rate rules."
            )
        mapping.append(sources.pop())
    return mapping


def _matched_by_identity(adamw: torch.optim.Optimizer, targets: list, saved_ids: list, saved_state: dict) -> list:
    """AdamW's state ids for FOAM's parameters (``targets``, in FOAM's order), each found by identity among AdamW's;
    AdamW's other parameters may only be ones it holds no state for (frozen, never stepped)."""
    adamw_params = [p for group in adamw.param_groups for p in group["params"]]
    position = {id(p): i for i, p in enumerate(adamw_params)}
    absent = [k for k, (p, _, _) in enumerate(targets) if id(p) not in position]
    if absent:
        shape = tuple(targets[absent[0]][0].shape)
        raise FoamStateError(
            f"foam_state_from_adamw: {len(absent)} of FOAM's {len(targets)} parameters are not among the AdamW "
            f"optimizer's (the first: FOAM's parameter {absent[0]}, shape {shape}): the two optimizers hold "
            "different tensors, e.g. FOAM was built over a reloaded or copied model. Fix: build both over the same "
            "model object, or pass adamw.state_dict() to match the parameters by position."
        )
    taken = {position[id(p)] for p, _, _ in targets}
    stateful_extra = [i for i in range(len(adamw_params)) if i not in taken and saved_state.get(saved_ids[i])]
    if stateful_extra:
        raise FoamStateError(
            f"foam_state_from_adamw: AdamW holds {len(adamw_params)} parameters but FOAM holds {len(targets)}, and "
            f"AdamW has moments for {len(stateful_extra)} that FOAM does not step (the first: AdamW's parameter "
            f"{stateful_extra[0]}, shape {tuple(adamw_params[stateful_extra[0]].shape)}). Fix: build FOAM over the "
            "same parameters as the AdamW optimizer (e.g. both from model.parameters(), with the same param groups)."
        )
    return [saved_ids[position[id(p)]] for p, _, _ in targets]


def _sharding_engine(checkpoint: Path) -> str | None:
    """The engine whose optimizer files ``checkpoint`` holds, by the names the Trainer (through accelerate)
    gives them: DeepSpeed's ``global_step*`` folder; FSDP's ``optimizer_0`` folder (sharded) or
    ``optimizer.bin`` (full, keyed by parameter name)."""
    if any(checkpoint.glob("global_step*")):
        return "DeepSpeed"
    if any(checkpoint.glob("optimizer_[0-9]*")) or (checkpoint / "optimizer.bin").exists():
        return "FSDP"
    return None


def convert_trainer_checkpoint(checkpoint: str | os.PathLike, adamw_trainer: Any, foam_trainer: Any) -> None:
    """Rewrite an AdamW Trainer checkpoint so that ``foam_trainer`` resumes from it under FOAM.

    ``adamw_trainer`` is a Trainer built with the arguments that wrote ``checkpoint`` (its optimizer's grouping
    of the parameters), ``foam_trainer`` one with ``optim="foam"``, both over the same model. The Trainer groups
    AdamW's parameters decay / no-decay and FOAM's by block size, so the saved state cannot be converted by
    position; here it is loaded into ``adamw_trainer``'s own optimizer and converted from it by identity
    (:func:`foam_state_from_adamw`). Each FOAM group takes the current learning rate of the AdamW group its
    parameters came from, and the scheduler's per-group lists (``base_lrs``, ``_last_lr``, ...) are laid out
    for FOAM's groups the same way, so the schedule continues where it was. ``optimizer.pt`` and
    ``scheduler.pt`` are rewritten; AdamW's are kept beside them as ``optimizer.adamw.pt`` and
    ``scheduler.adamw.pt``.
    """
    checkpoint = Path(checkpoint)
    optimizer_file, scheduler_file = checkpoint / "optimizer.pt", checkpoint / "scheduler.pt"
    engine = _sharding_engine(checkpoint)
    if not optimizer_file.is_file() and engine is not None:
        raise FoamStateError(
            f"convert_trainer_checkpoint: {checkpoint} was written under {engine}, which saves the optimizer state "
            "in its own format (sharded, or keyed by parameter name), not as optimizer.pt; this function converts "
            "the checkpoints of one-process and DDP runs. Fix: resume under FOAM from the weights only (load the "
            "model from the checkpoint and train a fresh FOAM run), or convert an AdamW checkpoint written without "
            "sharding."
        )
    for required in (optimizer_file, scheduler_file):
        if not required.is_file():
            raise FileNotFoundError(
                f"convert_trainer_checkpoint: {required} does not exist; a Trainer checkpoint holds optimizer.pt and "
                "scheduler.pt. Fix: pass a checkpoint-N folder the Trainer wrote."
            )
    saved = torch.load(optimizer_file, weights_only=True, map_location="cpu")
    if any("block_size" in group for group in saved.get("param_groups", [])):
        raise FoamStateError(
            f"convert_trainer_checkpoint: {optimizer_file} already holds FOAM state (its param groups have a "
            "block_size): converted before? Fix: resume it with optim='foam' as it is; if this function converted "
            f"it, AdamW's original is {checkpoint / 'optimizer.adamw.pt'}."
        )
    adamw = adamw_trainer.optimizer or adamw_trainer.create_optimizer()
    adamw.load_state_dict(saved)
    foam = foam_trainer.optimizer or foam_trainer.create_optimizer()
    foam = getattr(foam, "optimizer", foam)  # accelerate's wrapper, where the Trainer has prepared it
    foam_state_from_adamw(adamw, foam)
    sources = _group_map(adamw, foam)
    for group, source in zip(foam.param_groups, sources):
        for key in ("lr", "initial_lr"):
            if key in adamw.param_groups[source]:
                group[key] = adamw.param_groups[source][key]
    scheduler = torch.load(scheduler_file, weights_only=True)
    per_group = len(adamw.param_groups)
    converted_scheduler = {
        key: [value[source] for source in sources] if isinstance(value, list) and len(value) == per_group else value
        for key, value in scheduler.items()
    }
    foam_state = foam.state_dict()
    os.replace(optimizer_file, checkpoint / "optimizer.adamw.pt")
    os.replace(scheduler_file, checkpoint / "scheduler.adamw.pt")
    torch.save(foam_state, optimizer_file)
    torch.save(converted_scheduler, scheduler_file)
