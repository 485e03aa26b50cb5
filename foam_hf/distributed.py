r"""FOAM on sharded parameters: FSDP2 DTensors, and the engines whose sharding FOAM refuses.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter and gradient is a
:class:`~torch.distributed.tensor.DTensor` sharded along dim 0: each rank holds a block of whole rows. FOAM
folds along the *last* dimension, row by row, so folding each rank's local rows is folding the full tensor
restricted to those rows, and the step is exact on the local shards. FOAM therefore steps the local
tensors and keeps each moment as a DTensor with the parameter's mesh and placements and the *folded*
global shape ``(*rows, ceil(n / B))``: ``torch.distributed.checkpoint`` then saves, loads and re-shards it
like any other sharded optimizer state.

A placement that splits the folded (last) dimension, ``Shard(ndim - 1)`` (tensor parallelism's row-wise
split), is exact too where every piece holds whole blocks; one that would cut blocks across ranks is refused
when the parameter group is built (:func:`check_sharding`).
One-dimensional tensors never fold, so any sharding of them is exact.

DeepSpeed ZeRO hands the client optimizer flat 1-D partitions instead; :class:`foam_hf.zero.ZeroFOAM` folds
those exactly, and :func:`check_deepspeed_config` refuses the DeepSpeed settings it cannot run under (see
``docs/scale-out.md``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from .errors import FoamConfigError

__all__ = [
    "check_deepspeed_config",
    "check_sharding",
    "is_dtensor",
    "local_grad",
    "local_tensor",
    "shard_like",
    "sum_over_shards",
    "zeros_state_like",
]


@functools.cache
def _dtensor_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a :class:`~torch.distributed.tensor.DTensor` (False when distributed is absent)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


#: Plain tensors, no subclass: local_tensor returns them at once, and they are the only types the fused kernels
#: step (subclasses such as DTensor and quantised wrappers have no flat data of their own to step).
PLAIN_TENSOR_TYPES: tuple[type, ...] = (torch.Tensor, torch.nn.Parameter)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage, so in-place updates land), else ``tensor``."""
    if type(tensor) in PLAIN_TENSOR_TYPES:  # the common case, checked first: every step calls this per tensor
        return tensor
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _shards(placement: Any) -> bool:
    """Whether ``placement`` splits a tensor dimension: ``Shard``, and the ``_StridedShard`` FSDP2 uses over
    tensor parallelism (a ``Shard`` subclass in older torch, a class of its own, not counted by ``is_shard()``,
    in newer)."""
    return placement.is_shard() or type(placement).__name__ == "_StridedShard"


def _is_plain_shard(placement: Any) -> bool:
    """``Shard`` itself: torch.chunk's contiguous split (not a strided one, whatever torch's class tree)."""
    from torch.distributed.tensor import Shard

    return type(placement) is Shard


def local_grad(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``grad``, laid out as ``param``'s. A DTensor gradient placed otherwise than its
    parameter is redistributed to the parameter's placements first, as torch's DTensor ops do when an optimizer
    combines the two: tensor parallelism's vocabulary-parallel embedding, a ``Shard(0)`` weight, gets a
    ``Replicate()`` gradient, which each rank then slices to its own rows (no communication)."""
    if type(grad) in PLAIN_TENSOR_TYPES:
        return grad
    if is_dtensor(grad) and is_dtensor(param) and tuple(grad.placements) != tuple(param.placements):
        grad = grad.redistribute(param.device_mesh, param.placements)
    return local_tensor(grad)


def check_sharding(param: torch.Tensor, block_size: int, where: str = "", name: str | None = None) -> None:
    """Raise :class:`FoamConfigError` if ``param`` is a DTensor whose sharding cuts folded blocks across ranks.

    Only tensors FOAM folds (``ndim >= 2`` and ``block_size > 1``) are checked; shards along any other
    dimension, replication, and any sharding of tensors that do not fold are exact. A plain ``Shard`` of the last
    dimension (tensor parallelism's row-wise split) on one mesh dimension of size ``k > 1`` cuts each row of ``n``
    entries at multiples of ``c = ceil(n / k)`` (torch.chunk's split): it is exact when ``c`` is a multiple
    of ``block_size`` (every block stays on one rank, and the folded moment, ``ceil(n / B)`` columns, splits
    the same way), or when only one rank holds entries (``n <= 1``). The last dimension split on two mesh
    dimensions, or strided, is refused, as is a cut inside a block; the error names ``name`` (the parameter's)
    where it is given.
    """
    if not is_dtensor(param) or block_size <= 1 or param.ndim < 2:
        return
    last = param.ndim - 1
    cuts = [
        (mesh_dim, placement)
        for mesh_dim, placement in enumerate(param.placements)
        if _shards(placement)
        and getattr(placement, "dim", None) is not None
        and placement.dim % param.ndim == last
        and param.device_mesh.size(mesh_dim) > 1
    ]
    if not cuts:
        return
    n = param.shape[-1]
    module = (name.rpartition(".")[0] or name) if name else "MODULE"  # the owning module, as block_sizes matches
    keep_adamw = f"AdamW states for it (optim_args block_sizes={module}:1, or a param group with block_size=1)"
    named = f"parameter {name!r}" if name else "a parameter"
    at = f" in {where}" if where else ""
    placed = f"sharded as {', '.join(repr(p) for _, p in cuts)} on mesh dimension(s) {[d for d, _ in cuts]}"
    mesh_dim, placement = cuts[0]
    if len(cuts) > 1 or not _is_plain_shard(placement):
        raise FoamConfigError(
            f"FOAM: {named} of shape {tuple(param.shape)}{at} is {placed}: its last dimension, along which FOAM "
            f"folds blocks of block_size={block_size}, is split on several mesh dimensions or strided, and FOAM "
            "takes only one plain Shard of it (whose pieces it can check hold whole blocks). Fix: "
            f"{keep_adamw}, or shard it along another dimension."
        )
    chunk = -(-n // param.device_mesh.size(mesh_dim))
    if chunk % block_size == 0 or chunk >= n:
        return
    divisor = math.gcd(chunk, block_size)
    smaller = f"a block size that divides {chunk} (optim_args block_sizes={module}:{divisor}), " if divisor > 1 else ""
    raise FoamConfigError(
        f"FOAM: {named} of shape {tuple(param.shape)}{at} is {placed}, which splits its last dimension ({n} "
        f"entries) into pieces of {chunk}; FOAM folds blocks of block_size={block_size} along that dimension, so "
        f"blocks would be cut across ranks. Fix: {smaller}{keep_adamw}, or shard it along dim 0 (FSDP2's "
        "fully_shard default)."
    )


def zeros_state_like(param: torch.Tensor, local_shape: torch.Size, global_shape: torch.Size, dtype: torch.dtype):
    """A zero moment of ``local_shape`` on this rank, wrapped as a DTensor like ``param`` when it is one."""
    local = local_tensor(param)
    zeros = torch.zeros(local_shape, dtype=dtype, device=local.device)
    if not is_dtensor(param):
        return zeros
    stride = torch.empty(global_shape, device="meta").stride()
    return type(param).from_local(
        zeros, param.device_mesh, param.placements, run_check=False, shape=global_shape, stride=stride
    )


def shard_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full``, a moment's global value held whole by every rank, as a DTensor placed like the DTensor ``param``:
    each rank keeps its own piece (torch.chunk's split, as the moments FOAM creates). Every rank calls it: with
    no communication where torch's ``distribute_tensor`` takes ``src_data_rank=None``, else it scatters rank 0's
    copy, the same pieces."""
    import inspect

    from torch.distributed.tensor import distribute_tensor

    local_data = {"src_data_rank": None} if "src_data_rank" in inspect.signature(distribute_tensor).parameters else {}
    return distribute_tensor(full, param.device_mesh, param.placements, **local_data)


def sum_over_shards(values: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """Add up per-shard reductions into their global value, as a plain tensor on the CPU.

    Each entry is ``(value, like)``: ``value`` is a sum over this rank's shard of ``like`` (a sum of
    squares of ``local_tensor(grad)``, a count of non-finite entries, ...). Entries whose ``like`` is a
    DTensor are also summed over the ranks that hold its other shards: one all-reduce per distinct mesh and
    sharding pattern, over the mesh dimensions where ``like`` is sharded (replicated dimensions, as in HSDP,
    are not counted twice). Every rank must call this with the same parameters, as for any collective.
    Returns ``None`` for an empty list.
    """
    total: torch.Tensor | None = None
    sharded: dict[tuple[Any, tuple[bool, ...]], tuple[torch.Tensor, torch.Tensor]] = {}
    for value, like in values:
        if is_dtensor(like):
            key = (like.device_mesh, tuple(map(_shards, like.placements)))
            previous = sharded.get(key)
            sharded[key] = (like, value if previous is None else previous[1] + value)
        else:
            total = value.cpu() if total is None else total + value.cpu()
    if sharded:
        from torch.distributed.tensor import Partial, Replicate

        for like, value in sharded.values():
            placements = [Partial() if _shards(p) else Replicate() for p in like.placements]
            reduced = type(like).from_local(value, like.device_mesh, placements, run_check=False).full_tensor()
            total = reduced.cpu() if total is None else total + reduced.cpu()
    return total


def check_deepspeed_config(config: Any) -> None:
    """Refuse a DeepSpeed config that FOAM cannot run under exactly, naming the setting and the fix.

    Args:
        config: the DeepSpeed config as a dict, a path to its JSON file, or ``None`` (no DeepSpeed: passes).
            ``TrainingArguments.deepspeed`` and ``accelerate``'s ``DeepSpeedPlugin.deepspeed_config`` are
            both accepted.

    ZeRO stages 0-3 run (stages >= 1 through :class:`foam_hf.zero.ZeroFOAM`); the refused settings are
    listed in :func:`foam_hf.zero.check_zero_config`.
    """
    from .zero import check_zero_config  # zero.py builds on optim.py, which imports this module

    check_zero_config(config)
