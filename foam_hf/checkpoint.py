"""Checkpoint validation of FOAM's optimizer state: what :meth:`foam_hf.FOAM.load_state_dict` refuses, and how
it restores the moments in FOAM's own state dtype.

A FOAM state can only be continued exactly under the same folding: the same ``block_size`` and
``second_moment`` per group, the same parameter shapes (a ``(6, 8)`` and a ``(6, 7)`` weight both fold to
``(6, 2)`` at ``B = 4``, so shapes are recorded in ``state_dict()['param_groups'][i]['param_shapes']``) and
moments of the folded shape. Every refusal raises :class:`~foam_hf.errors.FoamStateError` before anything
is loaded, so a refused load leaves the optimizer untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real
from typing import Any

import torch
from torch.nn.parameter import is_lazy

from .distributed import is_dtensor, shard_like
from .errors import FoamStateError
from .folding import folded_shape, is_foldable
from .precision import state_dtype_for

__all__ = ["STRUCTURAL_KEYS", "UPDATE_KEYS", "check_loadable", "restore_moments"]

#: Keys whose value decides the *shape or meaning* of the saved state: a checkpoint written under other
#: values cannot be continued exactly, so it is refused instead of silently adopting them.
STRUCTURAL_KEYS = ("block_size", "second_moment")

#: FOAM's own update options. The state continues under other values, but torch's load would put the saved
#: ones back over those the optimizer was built with, silently: a difference is refused instead.
UPDATE_KEYS = ("scale", "res_scale")

ParamIndex = dict[int, tuple[torch.Tensor, dict[str, Any], int]]


def _is_real_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def check_loadable(
    param_groups: list[dict[str, Any]],
    state_dict: Any,
    state_shape: Callable[[torch.Tensor, dict[str, Any]], torch.Size] | None = None,
) -> ParamIndex:
    """Raise :class:`FoamStateError` unless ``state_dict`` continues ``param_groups`` exactly; return the map
    from saved parameter ids to ``(parameter, group, group index)``. ``state_shape(param, group)`` gives the
    shape each moment must have (default: the folded shape; ZeRO partitions keep another, see
    :class:`foam_hf.zero.ZeroFOAM`)."""
    if not isinstance(state_dict, dict):
        raise FoamStateError(
            f"FOAM.load_state_dict: expected the dict optimizer.state_dict() returns, got {type(state_dict).__name__}."
        )
    saved_groups = state_dict.get("param_groups")
    saved_state = state_dict.get("state")
    if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
        raise FoamStateError(
            "FOAM.load_state_dict: expected a dict with 'state' and 'param_groups' (what "
            f"optimizer.state_dict() returns); got keys {sorted(map(str, state_dict))}. The file may be "
            "truncated or not an optimizer state."
        )
    for index, saved in enumerate(saved_groups):
        missing = [k for k in STRUCTURAL_KEYS if not isinstance(saved, dict) or k not in saved]
        if missing:
            raise FoamStateError(
                f"FOAM.load_state_dict: saved param group {index} has no {missing}: this state was not "
                "written by FOAM (an AdamW checkpoint?). Fix: load it into the optimizer that wrote it, "
                "or convert it to FOAM states first (foam_hf.convert.foam_state_from_adamw; a Trainer "
                "checkpoint: foam_hf.convert.convert_trainer_checkpoint)."
            )
    from .zero import FULL_SHAPE_KEY

    saved_by_zero = any(FULL_SHAPE_KEY in g for g in saved_groups)
    if len(saved_groups) != len(param_groups) and saved_by_zero != any(FULL_SHAPE_KEY in g for g in param_groups):
        # ZeroFOAM gives every folded tensor a group of its own (FULL_SHAPE_KEY): another layout, not other options.
        writer, reader = ("ZeroFOAM", "FOAM") if saved_by_zero else ("FOAM", "ZeroFOAM")
        raise FoamStateError(
            f"FOAM.load_state_dict: the saved state was written by {writer} ({len(saved_groups)} param groups) and "
            f"this optimizer is a {reader} ({len(param_groups)}): ZeroFOAM gives every folded tensor a group of its "
            "own, so neither loads the other's state. Fix: resume under the engine that saved it (under DeepSpeed "
            "ZeRO, optim='foam' builds ZeroFOAM; without ZeRO, FOAM)."
        )
    if len(saved_groups) != len(param_groups):
        # Built by name, FOAM has a group per (block size, decayed or not): another count almost always means
        # other block sizes than the run that saved it.
        raise FoamStateError(
            f"FOAM.load_state_dict: the saved state has {len(saved_groups)} param groups, this optimizer "
            f"has {len(param_groups)}; their block sizes are {[g['block_size'] for g in saved_groups]} (saved) "
            f"and {[g['block_size'] for g in param_groups]} (here). With optim='foam' each block size (decayed "
            "or not) is a group, so the run that saved it had other block_size, block_sizes or target_modules. "
            "Fix: resume with that run's optim_args (its training_args.bin holds them), or build the optimizer "
            "with the same groups."
        )
    _check_names(saved_groups, param_groups)
    id_to_param: dict[int, tuple[torch.Tensor, dict[str, Any], int]] = {}
    for index, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        for key in STRUCTURAL_KEYS:
            if saved[key] != group[key]:
                fix = f"build FOAM with {key}={saved[key]!r} to resume this checkpoint"
                if key == "block_size" and len(saved_groups) > 1:  # built by name: a group per block size
                    fix = (
                        f"resume with the optim_args of the run that saved it (its training_args.bin holds them; "
                        f"per group, the block sizes are {[g['block_size'] for g in saved_groups]} saved and "
                        f"{[g['block_size'] for g in param_groups]} here), or build FOAM with the same groups"
                    )
                raise FoamStateError(
                    f"FOAM.load_state_dict: param group {index} was saved with {key}={saved[key]!r} but "
                    f"this optimizer has {key}={group[key]!r}; its states cannot be continued exactly. "
                    f"Fix: {fix}."
                )
        for key in UPDATE_KEYS:
            if key in saved and saved[key] != group[key]:
                raise FoamStateError(
                    f"FOAM.load_state_dict: param group {index} was saved with {key}={saved[key]!r} but this "
                    f"optimizer was built with {key}={group[key]!r}; loading puts the saved value back (as torch "
                    f"does for every option), so yours would be dropped silently. Fix: build FOAM with "
                    f"{key}={saved[key]!r} (with the Trainer: resume with the saving run's optim_args); to change "
                    f"it, load first, then set optimizer.param_groups[{index}][{key!r}]."
                )
        if len(saved["params"]) != len(group["params"]):
            raise FoamStateError(
                f"FOAM.load_state_dict: param group {index} holds {len(group['params'])} parameters but "
                f"the saved group holds {len(saved['params'])}. Fix: build the optimizer over the same "
                "parameters, in the same order, as the run that saved it."
            )
        shapes = saved.get("param_shapes")
        if shapes is not None:
            for position, (shape, p) in enumerate(zip(shapes, group["params"])):
                if shape is None or is_lazy(p):  # saved or loaded before the parameter had a shape
                    continue
                if tuple(shape) != tuple(p.shape):
                    raise FoamStateError(
                        f"FOAM.load_state_dict: parameter {position} of param group {index} was saved with "
                        f"shape {tuple(shape)} but has shape {tuple(p.shape)} here. Fix: build the model and "
                        "the optimizer as in the run that saved the checkpoint."
                    )
        for pid, p in zip(saved["params"], group["params"]):
            id_to_param[pid] = (p, group, index)
    for pid, pstate in saved_state.items():
        if pid not in id_to_param:
            raise FoamStateError(f"FOAM.load_state_dict: saved state for parameter id {pid} has no parameter.")
        p, group, index = id_to_param[pid]
        if state_shape is not None:
            expected = state_shape(p, group)
        else:
            expected = folded_shape(p.shape, group["block_size"]) if is_foldable(p, group["block_size"]) else p.shape
        step = pstate.get("step")
        if not (isinstance(step, torch.Tensor) and step.numel() == 1) and not _is_real_number(step):
            raise FoamStateError(
                f"FOAM.load_state_dict: saved state of a parameter of shape {tuple(p.shape)} in group {index} "
                f"has no 'step' counter (keys: {sorted(pstate)}); not a FOAM state. Fix: load a state written "
                "by FOAM.state_dict()."
            )
        for key in ("exp_avg", "exp_avg_sq"):
            value = pstate.get(key)
            if not isinstance(value, torch.Tensor):
                raise FoamStateError(
                    f"FOAM.load_state_dict: saved state of a parameter of shape {tuple(p.shape)} in group "
                    f"{index} has no tensor '{key}' (keys: {sorted(pstate)}); not a FOAM state."
                )
            if value.shape != expected:
                raise FoamStateError(
                    f"FOAM.load_state_dict: saved '{key}' of a parameter of shape {tuple(p.shape)} in group "
                    f"{index} has shape {tuple(value.shape)}, but with block_size={group['block_size']} "
                    f"FOAM keeps shape {tuple(expected)}. The checkpoint was written with other folding "
                    "(or by AdamW). Fix: resume with the block sizes of the run that saved it."
                )
    return id_to_param


def _named_positions(groups: list[dict[str, Any]]) -> dict[str, tuple[int, int | None]]:
    """Where each named parameter sits: its name -> (group index, position) from torch's ``param_names``. In a group
    whose tensors a ZeRO partition flattened (more names than tensors) a name's position is ``None``: somewhere in
    that group, in the order of its names (DeepSpeed concatenates the group's tensors in that order)."""
    where: dict[str, tuple[int, int | None]] = {}
    for index, group in enumerate(groups):
        names = group.get("param_names")
        if not isinstance(names, list):
            continue
        whole = len(names) == len(group.get("params", ()))
        for position, name in enumerate(names):
            where.setdefault(name, (index, position if whole else None))
    return where


def _check_names(saved_groups: list[dict[str, Any]], param_groups: list[dict[str, Any]]) -> None:
    """Refuse a state whose parameters sit elsewhere here than when it was saved.

    torch loads a state by position: the i-th saved parameter's moments go to the i-th parameter here (and DeepSpeed
    restores the master weights of a ZeRO partition by group). Where both sides name their parameters (FOAM built
    by name saves ``param_names``) the names say whether that is right:

    * a saved name found here in another group, or at another position of its group, would load onto another
      parameter, even where every shape agrees (one layer's ``block_sizes`` override moved to a layer of the same
      shape, say): refused;
    * where the two sides share names at all, a position whose names differ is refused too (``l0.weight`` saved
      where ``l1.weight`` is now): one model, other parameters;
    * a group flattened into a ZeRO partition on both sides must hold the same names in the same order;
    * names of which none is found here (a renamed model) say nothing of the order: the state loads by position,
      as torch loads it.
    """
    here = _named_positions(param_groups)
    saved = _named_positions(saved_groups)
    if not here or not saved or here.keys().isdisjoint(saved):
        return

    def name_here(index: int, position: int | None) -> str | None:
        """The name of the parameter here at ``(index, position)``, where there is one to name."""
        names = param_groups[index].get("param_names") if index < len(param_groups) else None
        return names[position] if position is not None and isinstance(names, list) and position < len(names) else None

    for name, (index, position) in saved.items():
        found, onto = here.get(name), name_here(index, position)
        # where both sides know the position in the group (not a flattened ZeRO partition), it must agree too
        moved = found is not None and (found[0] != index or (None not in (position, found[1]) and found[1] != position))
        if found is None and onto is not None:
            why = f"{name!r} is not among this optimizer's parameters"  # one model: another parameter sits there
        elif moved:
            place = (
                f"parameter {found[1]} of param group {found[0]}"
                if found[1] is not None
                else f"in param group {found[0]}"
            )
            why = f"here {name!r} is {place} (block_size={param_groups[found[0]]['block_size']})"
        else:  # where it was saved, or a name of a renamed model (no order to check)
            continue
        target = (
            repr(onto)
            if onto is not None
            else f"param group {index}" + ("" if position is None else f", parameter {position}")
        )
        raise FoamStateError(
            f"FOAM.load_state_dict: the saved state of {name!r} (param group {index}, block_size="
            f"{saved_groups[index]['block_size']}) would load onto {target}: {why}. The run that saved it grouped or "
            "chose the parameters differently (other block_size, block_sizes or target_modules, or another model). "
            "Fix: resume with that run's optim_args (its training_args.bin holds them) and model, or build the "
            "optimizer with the same groups."
        )
    for index, (saved_group, group) in enumerate(zip(saved_groups, param_groups)):
        saved_names, names = saved_group.get("param_names"), group.get("param_names")
        flattened = isinstance(names, list) and len(names) != len(group.get("params", ()))
        if flattened and isinstance(saved_names, list) and saved_names != names:
            raise FoamStateError(
                f"FOAM.load_state_dict: param group {index} is a flattened ZeRO partition whose tensors were saved in "
                f"the order {saved_names} and are {names} here; its moments and master weights are restored as "
                "one flat tensor, so they would land on other parameters. Fix: resume with the saving run's "
                "optim_args and model."
            )


def restore_moments(optimizer: torch.optim.Optimizer, saved_state: dict[Any, Any], id_to_param: ParamIndex) -> int:
    """After torch's ``load_state_dict``: put back the moments in the group's state dtype and the step as a CPU
    fp32 scalar (torch casts floating states to the parameter's dtype, which would round fp32 moments of half
    parameters). A full moment of a sharded (DTensor) parameter, as a one-process run saves it, is sharded like
    the parameter: each rank keeps the rows (or pieces) it steps. Returns how many saved moments were in another
    dtype (converted: rounded once to nearest when narrowed)."""
    converted = 0
    for pid, pstate in saved_state.items():
        p, _, index = id_to_param[pid]
        dtype = state_dtype_for(p, optimizer.param_groups[index]["state_dtype"])
        for key in ("exp_avg", "exp_avg_sq"):
            converted += pstate[key].dtype != dtype
            moment = pstate[key].to(
                device=p.device, dtype=dtype, copy=True, memory_format=torch.contiguous_format
            )  # contiguous, as FOAM creates them: a checkpoint of a channels_last model may hold other strides
            if is_dtensor(p) and not is_dtensor(moment):  # a full (one-process) state loaded under FSDP2
                moment = shard_like(p, moment)
            optimizer.state[p][key] = moment
        step = optimizer.state[p]["step"]
        if not isinstance(step, torch.Tensor):  # a plain number, as torch.optim.Adam accepts it
            optimizer.state[p]["step"] = torch.tensor(float(step), dtype=torch.float32)
        else:
            # A copy, as the moments are: a state_dict of a live optimizer would otherwise share its step counter.
            optimizer.state[p]["step"] = step.detach().to(device="cpu", dtype=torch.float32, copy=True).reshape(())
    for group in optimizer.param_groups:
        group.pop("param_shapes", None)  # written afresh by state_dict()
    return converted
