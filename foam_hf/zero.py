r"""FOAM under DeepSpeed ZeRO 1, 2 and 3: folded states on flat partitions, equal to one-process FOAM.

What ZeRO hands the client optimizer (DeepSpeed 0.19):

* ZeRO-1/2 flatten each param group into one buffer, pad it to a multiple of ``2 * world`` and split it
  into ``world`` equal partitions; the optimizer's group then holds one flat fp32 tensor, this rank's
  partition. The group dict itself survives, so keys put in it reach the optimizer.
* ZeRO-3 splits every parameter into ``world`` flat slices of ``ceil(numel / world)`` elements (the last
  padded), packs the slices of a group into fp32 sub-groups and steps the optimizer once per sub-group with
  that sub-group as the group's only tensor.

:class:`ZeroFOAM` makes both layouts known: every tensor that folds gets a param group of its own, which
records the tensor's shape under ``"full_shape"``. With one tensor per group, rank ``r`` of ``W`` holds
elements ``[r P, r P + P)`` of the tensor flattened row-major, ``P`` being the partition's length, under
all three stages (the padding is at the end of the group). :class:`FlatSlice` turns that range into rows
and blocks, aligned to the tensor's own column index:

* the blocks that lie wholly inside the range are stepped by :func:`foam_hf.functional.foam` on 2-D views of
  the partition (a leading partial row, the whole rows, a trailing partial row), with the moments as views
  of one flat local buffer: the same arithmetic as on one process, fused CPU kernel included;
* a block cut by a partition boundary (at most one per boundary) needs the sums of all its entries: each
  rank adds up its part (:math:`\sum g` and :math:`\sum g^2`), one all-reduce per call of ``step()`` carries
  the partial sums of every cut block of every group it steps (ZeRO-1/2 calls ``step()`` once per param group,
  so there it is one all-reduce per folded tensor per optimizer step), and every rank that touches the block updates its
  own copy of that block's moments from the full sums. Those copies stay equal, since they start at zero
  and see the same sums, so each rank applies exactly the one-process update to its entries.

Moments per rank: the blocks its range touches, ``last_block - first_block + 1`` per tensor; over all
ranks, the folded size plus one duplicate per cut block. Parameters that do not fold (1-D tensors,
``block_size = 1``) keep element-wise AdamW states, for which any slicing is exact, and stay in shared
groups. See ``docs/method.md`` ("Sharded states") and ``docs/scale-out.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .errors import FoamConfigError, FoamStateError
from .folding import shape_folds
from .optim import FOAM, state_dtype_for
from .zero_layout import FlatSlice, _shape_of, partial_block_sums, partitions_of, step_slice

__all__ = [
    "FULL_SHAPE_KEY",
    "PARTITION_KEY",
    "FlatSlice",
    "ZeroFOAM",
    "check_zero_config",
    "state_bytes_per_rank",
    "zero_stage",
]

#: Group key holding the shape of the one tensor a folded group optimizes (a list of ints).
FULL_SHAPE_KEY = "full_shape"
#: Group key recording the partition FOAM stepped: ``{"rank", "world_size", "partition_numel"}``. It is saved
#: with the optimizer state, so a checkpoint loaded onto another partitioning is refused instead of mis-read.
PARTITION_KEY = "zero_partition"


class ZeroFOAM(FOAM):
    r""":class:`~foam_hf.FOAM` that folds exactly under DeepSpeed ZeRO 1, 2 and 3 (see the module docstring).

    Every tensor that folds gets a param group of its own (its options copied from the group it came in,
    its shape recorded under ``"full_shape"``); tensors that do not fold stay together. Without ZeRO (or
    under ZeRO stage 0) the groups hold the real tensors and the step is :class:`~foam_hf.FOAM`'s. When a
    group holds a flat partition instead, the step folds that partition's rows and blocks as one-process FOAM
    folds the whole tensor, with one all-reduce per call of ``step()`` for the blocks that partition boundaries cut
    (ZeRO-1/2 calls it once per group).

    Args:
        params, lr, betas, eps, weight_decay, block_size, scale, res_scale, second_moment, foreach, fused,
            state_dtype, weight_rounding: as for :class:`~foam_hf.FOAM`.
        process_group: the data-parallel process group ZeRO partitions over (default: None, the whole world,
            which is DeepSpeed's data-parallel group for pure data parallelism as Trainer runs it).

    Example::

        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=ZeroFOAM(model.parameters(), lr=1e-3, block_size=8),
            config={"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, ...})
    """

    def __init__(self, params: Any, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        self._process_group = process_group
        super().__init__(params, *args, **kwargs)
        # ZeRO replaces the groups' tensors by partitions (ZeRO-3 empties them between steps): take the
        # whole-model figures now, from the full shapes.
        self._whole_model_memory = _memory_from_shapes(self.param_groups)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Two callers: unpickling (torch pickles defaults, state and groups only: no process group, and the groups
        # hold whole tensors again) and load_state_dict, which ends with __setstate__ on a live optimizer whose
        # groups ZeRO has replaced by flat partitions: that keeps its process group and whole-model figures.
        process_group = self.__dict__.get("_process_group")
        memory = self.__dict__.get("_whole_model_memory")
        super().__setstate__(state)
        self._process_group = process_group
        self._whole_model_memory = memory if memory is not None else _memory_from_shapes(self.param_groups)

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add ``param_group``, giving every tensor that folds a group of its own (see the class docstring)."""
        if not isinstance(param_group, dict) or "params" not in param_group or FULL_SHAPE_KEY in param_group:
            if isinstance(param_group, dict) and FULL_SHAPE_KEY in param_group:
                _check_single_tensor_group(param_group, len(self.param_groups))
            super().add_param_group(param_group)
            return
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        names = param_group.get("param_names")
        names = list(names) if names is not None else None
        block_size = param_group.get("block_size", self.defaults["block_size"])
        # Named parameters arrive as (name, tensor) pairs (torch.optim accepts model.named_parameters()).
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        # Frozen tensors stay in the shared group: ZeRO 1/2 drops them from its groups, and a group of one would be
        # left empty (DeepSpeed then fails at initialisation); they never get state anyway.
        folded = [
            i
            for i, p in enumerate(tensors)
            if isinstance(p, torch.Tensor) and p.requires_grad and shape_folds(_shape_of(p), block_size)
        ]
        options = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}

        def subgroup(indices: list[int], **extra: Any) -> dict[str, Any]:
            group = {**options, **extra, "params": [params[i] for i in indices]}
            if names is not None:
                group["param_names"] = [names[i] for i in indices]
            return group

        for i in folded:
            super().add_param_group(subgroup([i], **{FULL_SHAPE_KEY: list(_shape_of(tensors[i]))}))
        rest = [i for i in range(len(params)) if i not in set(folded)]
        # A shared group of only frozen tensors would be left empty by ZeRO 1/2 too: they never get state, so such
        # a group is not made (its tensors are not the optimizer's, as ZeRO 1/2 leaves them out of its own groups).
        trained_rest = any(isinstance(tensors[i], torch.Tensor) and tensors[i].requires_grad for i in rest)
        if trained_rest or not folded:
            super().add_param_group(subgroup(rest))

    # ------------------------------------------------------------------ step

    def _rank_and_world(self) -> tuple[int, int]:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return 0, 1
        return dist.get_rank(self._process_group), dist.get_world_size(self._process_group)

    def _layout(self, index: int, group: dict[str, Any]) -> FlatSlice | None:
        """The partition ``group`` holds, or ``None`` when it holds whole tensors (no ZeRO, stage 0)."""
        shape = group.get(FULL_SHAPE_KEY)
        if shape is None or not group["params"]:
            return None
        if len(group["params"]) != 1:
            raise FoamStateError(
                f"ZeroFOAM: param group {index} (full_shape={list(shape)}) holds {len(group['params'])} tensors; "
                "a folded group holds one tensor, so that its partition's rows and blocks are known. Fix: let "
                "ZeroFOAM build the groups (do not merge or re-split them)."
            )
        param = group["params"][0]
        if tuple(param.shape) == tuple(shape):
            return None
        rank, world = self._rank_and_world()
        layout = FlatSlice(tuple(shape), group["block_size"], param.numel(), rank, world)
        numel = layout.numel
        stage3, stage12 = -(-numel // world), -(-numel // (2 * world)) * 2
        if param.ndim != 1 or param.numel() not in (stage3, stage12):
            raise FoamStateError(
                f"ZeroFOAM: param group {index} is a tensor of shape {tuple(shape)}, but holds a tensor of shape "
                f"{tuple(param.shape)} on rank {rank} of {world}; ZeRO's flat partitions of it have "
                f"{stage3} (stage 3) or {stage12} (stages 1-2) elements. The partitioning is not one ZeroFOAM "
                "knows, or ZeRO partitions over another process group than FOAM reads. Fix: pass ZeroFOAM "
                "process_group=<the data-parallel group>; see docs/scale-out.md for the supported setups."
            )
        record = {"rank": rank, "world_size": world, "partition_numel": param.numel()}
        saved = group.get(PARTITION_KEY)
        if saved is not None and saved != record:
            raise _partition_mismatch(index, saved, record)
        group[PARTITION_KEY] = record
        return layout

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform a single optimization step (one all-reduce of cut-block sums per call, when groups hold partitions).

        Args:
            closure: a closure that re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_rounding_still_applies()
        sliced = []
        for index, group in enumerate(self.param_groups):
            layout = self._layout(index, group)
            if layout is None:
                self._step_group(group)
            else:
                sliced.append((index, group, layout))
        if sliced:
            self._step_partitions(sliced)
        return loss

    def _structure_change_matters(self, group: dict[str, Any], old: tuple[Any, ...], now: tuple[Any, ...]) -> bool:
        """A group holding a partition folds it by its layout, not by its flat tensor's shape: any moment there
        depends on every structural option."""
        if self._layout(self._index_of(group), group) is None:
            return super()._structure_change_matters(group, old, now)
        return any("exp_avg" in self.state.get(p, {}) for p in group["params"])

    def _step_partitions(self, sliced: list[tuple[int, dict[str, Any], FlatSlice]]) -> None:
        for _, group, _ in sliced:
            self._check_structure(group)
        sums = []
        for _, group, layout in sliced:
            param = group["params"][0]
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            sums.append(partial_block_sums(layout, grad))
        sizes = [s.numel() for s in sums]
        if sum(sizes) and self._rank_and_world()[1] > 1:
            flat = torch.cat([s.flatten() for s in sums])
            device = self._collective_device(flat.device)
            reduced = flat.to(device)
            torch.distributed.all_reduce(reduced, group=self._process_group)
            sums = [chunk.view(2, -1) for chunk in reduced.to(flat.device).split(sizes)]
        for (index, group, layout), block_sums in zip(sliced, sums):
            param = group["params"][0]
            if param.grad is None:
                continue
            state = self.state[param]
            local = torch.Size([layout.num_local_blocks])
            if len(state) == 0:
                dtype = state_dtype_for(param, group["state_dtype"])
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros(local, dtype=dtype, device=param.device)
                state["exp_avg_sq"] = torch.zeros(local, dtype=dtype, device=param.device)
            for key in ("exp_avg", "exp_avg_sq"):
                if state[key].shape != local:
                    raise FoamStateError(
                        f"ZeroFOAM: param group {index} (shape {layout.shape}, rank {layout.rank} of "
                        f"{layout.world_size}) has state[{key!r}] of shape {tuple(state[key].shape)}, but this "
                        f"partition folds to {layout.num_local_blocks} blocks. The state was loaded by a tool "
                        "that assumes AdamW-sized states (DeepSpeed's universal or elastic checkpoints). Fix: "
                        "resume from the regular ZeRO checkpoint at the world size that wrote it."
                    )
            step_slice(
                layout, param, param.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], block_sums, group
            )

    def _collective_device(self, device: torch.device) -> torch.device:
        """NCCL reduces CUDA tensors only: CPU partitions (ZeRO-Offload) send their few sums through CUDA."""
        backend = str(torch.distributed.get_backend(self._process_group))
        if "nccl" in backend and device.type != "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return device

    # ------------------------------------------------------------------ checkpoints and memory

    def _state_shape(self, param: torch.Tensor, group: dict[str, Any]) -> torch.Size:
        index = next(i for i, g in enumerate(self.param_groups) if g is group)
        layout = self._layout(index, group)
        if layout is None:
            return super()._state_shape(param, group)
        return torch.Size([layout.num_local_blocks])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """:meth:`FOAM.load_state_dict`, refusing a state saved by another rank or on another partitioning."""
        saved_groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(saved_groups, list) and len(saved_groups) == len(self.param_groups):
            for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
                if saved.get(FULL_SHAPE_KEY) != group.get(FULL_SHAPE_KEY):
                    raise FoamStateError(
                        f"ZeroFOAM.load_state_dict: param group {index} was saved for a tensor of shape "
                        f"{saved.get(FULL_SHAPE_KEY)} but holds one of shape {group.get(FULL_SHAPE_KEY)} here. "
                        "Fix: build the model and the optimizer as in the run that saved the checkpoint."
                    )
                group.pop(PARTITION_KEY, None)
                layout = self._layout(index, group)
                current = group.get(PARTITION_KEY) if layout is not None else None
                if PARTITION_KEY in saved and saved[PARTITION_KEY] != current:
                    raise _partition_mismatch(index, saved.get(PARTITION_KEY), current)
        super().load_state_dict(state_dict)

    def state_memory(self) -> Any:
        """State bytes of the *whole model* (all ranks together, before duplicated cut blocks) against AdamW's,
        from the tensors' full shapes: the figures one-process FOAM reports. This rank's bytes:
        :meth:`held_state_bytes`."""
        return self._whole_model_memory

    def held_state_bytes(self) -> int:
        """Bytes of the optimizer states this rank holds now (moments and step counters)."""
        return sum(
            value.numel() * value.element_size()
            for state in self.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        )


def _memory_from_shapes(groups: list[dict[str, Any]]) -> Any:
    from .memory import StateMemory

    foam_bytes = adamw_bytes = folded = unfolded = 0
    for group in groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            shape = _shape_of(p)
            itemsize = torch.empty((), dtype=state_dtype_for(p, group["state_dtype"])).element_size()
            adamw_itemsize = torch.empty((), dtype=state_dtype_for(p)).element_size()
            numel = math.prod(shape)
            if shape_folds(shape, group["block_size"]):
                folded += 1
                moment = numel // shape[-1] * -(-shape[-1] // group["block_size"])
            else:
                unfolded += 1
                moment = numel
            foam_bytes += 2 * moment * itemsize + 4  # + the float32 step counter
            adamw_bytes += 2 * numel * adamw_itemsize + 4
    return StateMemory(foam_bytes, adamw_bytes, folded, unfolded)


def _partition_mismatch(index: int, saved: Any, current: Any) -> FoamStateError:
    return FoamStateError(
        f"ZeroFOAM: param group {index} was saved on partition {saved} but this run partitions it as {current}. "
        "Folded moments of a partition are only valid on the same rank, world size and partition length: ZeRO "
        "checkpoints of FOAM resume at the world size that wrote them. Fix: resume with that world size, or "
        "start the optimizer afresh from the weights (zero_to_fp32 extracts them)."
    )


def _check_single_tensor_group(group: dict[str, Any], index: int) -> None:
    params = group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    if len(params) != 1 or _shape_of(params[0]) != tuple(group[FULL_SHAPE_KEY]):
        raise FoamConfigError(
            f"ZeroFOAM: param group {index} sets full_shape={group[FULL_SHAPE_KEY]!r} but holds "
            f"{[_shape_of(p) for p in params]}; full_shape is the shape of the group's one tensor. Fix: leave "
            "full_shape out and let ZeroFOAM split the groups."
        )


# ---------------------------------------------------------------------------- DeepSpeed configs


def _load_config(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if isinstance(config, str):
        import json

        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    if not isinstance(config, dict):
        raise TypeError(
            f"check_deepspeed_config: expected a DeepSpeed config dict or JSON path, got {type(config).__name__}."
        )
    return config


#: The ZeRO stages DeepSpeed knows (``ZeroStageEnum``); anything else fails its config validation.
_ZERO_STAGES = (0, 1, 2, 3)


def zero_stage(config: Any) -> int | str:
    """The ZeRO stage of a DeepSpeed config (dict or JSON path): 0 without one, ``"auto"`` if unresolved.

    Read as DeepSpeed reads it: ``"zero_optimization": true`` (its deprecated form) is stage 1, and ``"2"`` or
    ``2.0`` is stage 2. ``"auto"`` is returned as is: accelerate and the Trainer fill it in from the accelerate
    config before DeepSpeed reads it (DeepSpeed alone would take its default, 0). Raises
    :class:`FoamConfigError` for anything that is not a stage DeepSpeed runs (``4``, ``None``, ``"two"``).
    """
    config = _load_config(config)
    if config is None:
        return 0
    stage = _zero_section(config).get("stage", 0)
    if isinstance(stage, str) and stage == "auto":
        return "auto"
    number = _as_int(stage)
    if number not in _ZERO_STAGES:
        raise FoamConfigError(
            f"FOAM under DeepSpeed: zero_optimization.stage={stage!r} is not a ZeRO stage; DeepSpeed runs stage 0, "
            '1, 2 or 3 (or "auto", which accelerate and the Trainer fill in). Fix: set "stage" to 0, 1, 2 or 3.'
        )
    return number


def _zero_section(config: dict[str, Any]) -> dict[str, Any]:
    """``config["zero_optimization"]`` as a dict (DeepSpeed's deprecated ``true``/``false`` form is stage 1/0)."""
    zero = config.get("zero_optimization")
    if zero is None:
        return {}
    if isinstance(zero, bool):
        return {"stage": int(zero)}
    if not isinstance(zero, dict):
        raise FoamConfigError(
            f"FOAM under DeepSpeed: zero_optimization={zero!r} is not a section; DeepSpeed expects a dict such as "
            '{"stage": 2}. Fix: write "zero_optimization": {"stage": <0, 1, 2 or 3>, ...}.'
        )
    return zero


def _as_int(value: Any) -> int | None:
    """``value`` as DeepSpeed's config model (pydantic, lax) reads an int field, or ``None`` if it would refuse it:
    ints and bools, floats with no fraction, and strings of an integer."""
    if isinstance(value, int):  # bool included: pydantic reads True as 1
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _int_setting(section: Any, key: str, default: int, where: str) -> int:
    """``section[key]`` read as DeepSpeed reads an int setting. Absent or ``"auto"``: ``default``, since DeepSpeed
    drops ``"auto"`` values and uses its default (accelerate refuses an ``"auto"`` it cannot fill before that)."""
    value = section.get(key, default) if isinstance(section, dict) else default
    if isinstance(value, str) and value == "auto":
        return default
    number = _as_int(value)
    if number is None:
        raise FoamConfigError(
            f"FOAM under DeepSpeed: {where}={value!r} is not an integer, and DeepSpeed reads it as one. Fix: set "
            f"it to an integer, or remove it (DeepSpeed's default is {default})."
        )
    return number


def _bool_setting(section: Any, key: str) -> bool:
    """``section[key]`` read as DeepSpeed's config model reads a bool field that defaults to false: absent or
    ``"auto"`` is false, and so are pydantic's false strings (``"false"``, ``"0"``, ``"no"``, ``"off"``)."""
    value = section.get(key, False) if isinstance(section, dict) else False
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on", "t", "y")
    return bool(value)


def _offload_device(section: Any) -> str:
    device = (section or {}).get("device", "none") if isinstance(section, dict) else "none"
    return str(device).lower() if device is not None else "none"


def _offload_ratio(section: Any) -> float:
    """``offload_optimizer.ratio`` as DeepSpeed reads it (default and ``"auto"``: 1.0, everything offloaded); a
    value that is not a number is left to DeepSpeed's own check (read as 1.0 here)."""
    value = section.get("ratio", 1.0) if isinstance(section, dict) else 1.0
    try:
        return float(value)
    except (TypeError, ValueError):
        return 1.0


#: (where, test, why, fix) of DeepSpeed settings under which ZeroFOAM's states would not be what it expects.
_UNSUPPORTED: tuple[tuple[str, Callable[[dict, dict], bool], str, str], ...] = (
    (
        "an 'optimizer' section",
        lambda c, z: "optimizer" in c,
        "DeepSpeed then builds its own optimizer and the Trainer's optim='foam' is silently replaced",
        "remove the 'optimizer' section (keep 'scheduler' if you want DeepSpeed's)",
    ),
    (
        "zero_optimization.offload_optimizer.device=nvme",
        lambda c, z: _offload_device(z.get("offload_optimizer")) == "nvme",
        "NVMe swapping moves optimizer states sized like the partition, which FOAM's folded states are not",
        "use offload_optimizer.device='cpu' (tested) or no offload",
    ),
    (
        "zero_optimization.offload_optimizer with zero_force_ds_cpu_optimizer true (its default)",
        # DeepSpeed and accelerate both test the value's truth: 0, false and null turn it off, "auto" does not.
        lambda c, z: (
            _offload_device(z.get("offload_optimizer")) not in ("none", "")
            and bool(c.get("zero_force_ds_cpu_optimizer", True))
        ),
        "accelerate and DeepSpeed then replace FOAM by DeepSpeedCPUAdam (full AdamW states); a device of 'auto' "
        "counts as an offload, since accelerate may fill it with 'cpu'",
        'set "zero_force_ds_cpu_optimizer": false at the top of the DeepSpeed config; FOAM steps the CPU partitions '
        "with its fused CPU kernel. An accelerate config that describes DeepSpeed in its own YAML (deepspeed_config: "
        "{zero_stage: ..., offload_optimizer_device: cpu}) cannot set that key: write the DeepSpeed config to a JSON "
        "file that has it and name that file in the YAML as deepspeed_config: {deepspeed_config_file: <path>}",
    ),
    (
        "zero_optimization.offload_optimizer.ratio < 1",
        lambda c, z: (
            _offload_device(z.get("offload_optimizer")) not in ("none", "")
            and _offload_ratio(z.get("offload_optimizer")) < 1.0
        ),
        "a partial offload steps part of each partition on the GPU with DeepSpeed's own Adam, and DeepSpeed "
        "accepts only DeepSpeedCPUAdam as the optimizer then",
        "remove ratio (full offload, tested) or set it to 1",
    ),
    (
        "zero_optimization.offload_optimizer.super_offload=true",
        lambda c, z: _bool_setting(z.get("offload_optimizer"), "super_offload"),
        "SuperOffload replaces the optimizer's step with DeepSpeed's CPU Adam",
        "remove super_offload (plain offload_optimizer with device 'cpu' runs FOAM's fused CPU kernel)",
    ),
    (
        "checkpoint.load_universal=true",
        lambda c, z: bool((c.get("checkpoint") or {}).get("load_universal", False)),
        "universal checkpoints hold AdamW-sized moment fragments per parameter, so FOAM's folded moments would "
        "be lost or mis-read",
        "resume from the regular ZeRO checkpoint at the world size that wrote it",
    ),
    (
        "zero_optimization.elastic_checkpoint=true",
        lambda c, z: _bool_setting(z, "elastic_checkpoint"),
        "elastic checkpoints re-split moments as if they were partition-sized",
        "set elastic_checkpoint=false (the default)",
    ),
    (
        "zero_optimization.mics_shard_size > 0 or zero_hpz_partition_size > 1",
        lambda c, z: (
            _int_setting(z, "mics_shard_size", -1, "zero_optimization.mics_shard_size") > 0
            or _int_setting(z, "zero_hpz_partition_size", 1, "zero_optimization.zero_hpz_partition_size") > 1
        ),
        "MiCS and ZeRO++ hpZ partition over sub-groups of ranks that FOAM does not read (not tested)",
        "leave them unset, or build ZeroFOAM yourself with process_group=<the partition group>",
    ),
    (
        "sequence_parallel_size / tensor_parallel.autotp_size",
        lambda c, z: (
            _int_setting(c, "sequence_parallel_size", 1, "sequence_parallel_size") > 1
            or _int_setting(c.get("tensor_parallel"), "autotp_size", 0, "tensor_parallel.autotp_size") > 1
        ),
        "ZeRO then partitions over DeepSpeed's sequence-data-parallel group (sequence parallelism) or over the "
        "data-parallel group only (tensor parallelism), not necessarily the whole world FOAM reads by default; "
        "neither has been run with FOAM",
        "leave them unset, or build ZeroFOAM yourself with process_group=<the group ZeRO partitions over>",
    ),
)


def check_zero_config(config: Any) -> None:
    """Raise :class:`FoamConfigError` for DeepSpeed settings FOAM cannot run under exactly.

    ZeRO stages 0-3 (``"auto"`` included) are accepted and any other stage is refused. Settings are read as
    DeepSpeed reads them: an ``"auto"`` number takes DeepSpeed's default (DeepSpeed drops ``"auto"`` values), and
    ``zero_force_ds_cpu_optimizer`` is off when false, 0 or null. What is refused, and why, is listed in
    ``docs/scale-out.md`` (the optimizer section, NVMe, partial and Super offload, offload without
    ``zero_force_ds_cpu_optimizer: false``, universal and elastic checkpoints, MiCS/hpZ, sequence and tensor
    parallelism).
    """
    config = _load_config(config)
    if config is None:
        return
    zero = _zero_section(config)
    stage = zero_stage(config)
    for where, test, why, fix in _UNSUPPORTED:
        if stage == 0 and where.startswith("zero_optimization"):
            continue
        if test(config, zero):
            raise FoamConfigError(f"FOAM under DeepSpeed: {where} is not supported: {why}. Fix: {fix}.")


def state_bytes_per_rank(optimizer: ZeroFOAM, world_size: int, stage: int) -> list[int]:
    """Optimizer-state bytes each rank will hold under ZeRO ``stage`` on ``world_size`` ranks, predicted from
    ``optimizer``'s groups before DeepSpeed partitions them (what :meth:`ZeroFOAM.held_state_bytes` measures).

    Folded tensors: ``2 * itemsize`` per block the rank's partition touches, plus the 4-byte step. Other groups
    keep AdamW states of their partition: under ZeRO-1/2 one flat partition per group (the group padded to a
    multiple of ``2 * world_size``), under ZeRO-3 one sub-group holding every tensor's ``ceil(numel / world)``
    slice (the default ``sub_group_size`` is larger than any group here).
    """
    held = [0] * world_size
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            continue
        itemsize = torch.empty((), dtype=state_dtype_for(params[0], group["state_dtype"])).element_size()
        shape = group.get(FULL_SHAPE_KEY)
        if shape is not None:
            for rank, layout in enumerate(partitions_of(shape, group["block_size"], world_size, stage)):
                held[rank] += 2 * itemsize * layout.num_local_blocks + 4
            continue
        numels = [math.prod(_shape_of(p)) for p in params]
        if stage == 3:
            partition = sum(-(-n // world_size) for n in numels)
        else:
            partition = -(-sum(numels) // (2 * world_size)) * 2
        for rank in range(world_size):
            held[rank] += 2 * itemsize * partition + 4
    return held
