r"""Where a ZeRO partition lies in its tensor, and the exact FOAM step of one partition.

Pure tensor functions and a frozen layout record, no state, no process groups: :mod:`foam_hf.zero` holds
the optimizer that calls them and performs the one all-reduce; ``tests/test_zero.py`` steps simulated ranks
with them and holds the result to one-process FOAM. The layouts, and why the step is exact at the edges, are
described in :mod:`foam_hf.zero` and ``docs/method.md`` ("Sharded states").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .functional import foam
from .precision import compute_dtype as _compute_dtype
from .precision import store_moment as _store_moment
from .precision import store_weight as _store_weight
from .step_scalars import step_constants

__all__ = ["FlatSlice", "partial_block_sums", "partitions_of", "step_slice"]


def _shape_of(param: torch.Tensor) -> tuple[int, ...]:
    """The full shape of ``param``, also when ZeRO-3 (``deepspeed.zero.Init``) has already partitioned it."""
    shape = getattr(param, "ds_shape", None)
    return tuple(shape) if shape is not None else tuple(param.shape)


@dataclass(frozen=True)
class FlatSlice:
    r"""Rank ``rank``'s partition of a tensor of ``shape``, flattened row-major: elements ``[start, stop)``.

    Rows have length ``n = shape[-1]`` and fold into ``K = ceil(n / B)`` blocks, the last one ragged. Blocks
    are numbered row-major over the whole tensor: entry ``i`` is in block
    :math:`\lfloor i/n \rfloor K + \lfloor (i \bmod n)/B \rfloor`. Block numbers grow with ``i``, so the
    blocks a range touches are consecutive and a rank's moments are one contiguous run of the folded state.
    """

    shape: tuple[int, ...]
    block_size: int
    partition_numel: int
    rank: int
    world_size: int

    @property
    def n(self) -> int:
        return self.shape[-1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def blocks_per_row(self) -> int:
        return -(-self.n // self.block_size)

    @property
    def start(self) -> int:
        return min(self.rank * self.partition_numel, self.numel)

    @property
    def stop(self) -> int:
        return min(self.start + self.partition_numel, self.numel)

    def block_of(self, index: int) -> int:
        row, col = divmod(index, self.n)
        return row * self.blocks_per_row + col // self.block_size

    def block_start(self, block: int) -> int:
        row, k = divmod(block, self.blocks_per_row)
        return row * self.n + k * self.block_size

    def block_stop(self, block: int) -> int:
        row, k = divmod(block, self.blocks_per_row)
        return row * self.n + min((k + 1) * self.block_size, self.n)

    def block_count(self, block: int) -> int:
        """Entries of ``block``: ``B``, or ``n - (K - 1) B`` for the ragged last block of a row."""
        return self.block_stop(block) - self.block_start(block)

    @property
    def first_block(self) -> int:
        return self.block_of(self.start)

    @property
    def num_local_blocks(self) -> int:
        """Blocks this rank keeps moments for: every block its range touches."""
        return 0 if self.stop <= self.start else self.block_of(self.stop - 1) - self.first_block + 1

    def cut_blocks(self) -> list[int]:
        """Blocks that a partition boundary cuts, over all ranks (every rank computes the same list)."""
        cut: list[int] = []
        for k in range(1, self.world_size):
            boundary = k * self.partition_numel
            if boundary >= self.numel:
                break
            block = self.block_of(boundary)
            if self.block_start(block) != boundary and (not cut or cut[-1] != block):
                cut.append(block)
        return cut

    def partial_blocks(self) -> list[int]:
        """This rank's blocks that reach outside ``[start, stop)`` (at most the first and the last)."""
        if self.stop <= self.start:
            return []
        ends = sorted({self.first_block, self.block_of(self.stop - 1)})
        return [b for b in ends if self.block_start(b) < self.start or self.block_stop(b) > self.stop]

    def whole_block_pieces(self) -> list[tuple[int, int, int]]:
        """``(flat_start, rows, length)`` of the 2-D pieces made of whole blocks, in order.

        Each piece starts at a block boundary of its row and ends at a block boundary or at the row's end,
        so folding it as a ``rows x length`` tensor gives exactly the blocks (ragged one included) of the
        full tensor.
        """
        partial = self.partial_blocks()
        lo, hi = self.start, self.stop
        if partial and self.block_start(partial[0]) < self.start:
            lo = self.block_stop(partial[0])
        if partial and self.block_stop(partial[-1]) > self.stop:
            hi = self.block_start(partial[-1])
        if hi <= lo:
            return []
        n = self.n
        row_lo, col_lo = divmod(lo, n)
        row_hi, col_hi = divmod(hi, n)
        if row_lo == row_hi:
            return [(lo, 1, col_hi - col_lo)]
        pieces = []
        if col_lo:
            pieces.append((lo, 1, n - col_lo))
            row_lo += 1
        if row_hi > row_lo:
            pieces.append((row_lo * n, row_hi - row_lo, n))
        if col_hi:
            pieces.append((row_hi * n, 1, col_hi))
        return pieces


def partial_block_sums(layout: FlatSlice, grad: torch.Tensor) -> torch.Tensor:
    r"""This rank's share of each cut block: a float64 ``(2, len(cut_blocks))`` tensor of :math:`\sum g`
    and :math:`\sum g^2` (zero for cut blocks it does not touch). Summed over ranks: the blocks' full sums."""
    cut = layout.cut_blocks()
    sums = torch.zeros(2, len(cut), dtype=torch.float64, device=grad.device)
    for block in layout.partial_blocks():
        lo = max(layout.block_start(block), layout.start) - layout.start
        hi = min(layout.block_stop(block), layout.stop) - layout.start
        g = grad[lo:hi].double()
        column = cut.index(block)
        sums[0, column] = g.sum()
        sums[1, column] = (g * g).sum()
    return sums


def step_slice(
    layout: FlatSlice,
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step_t: torch.Tensor,
    block_sums: torch.Tensor,
    group: dict[str, Any],
) -> None:
    """One FOAM step of a flat partition ``param`` (1-D) of the tensor ``layout`` describes.

    ``exp_avg``/``exp_avg_sq`` are the rank's local moments (``layout.num_local_blocks`` entries) and
    ``block_sums`` the all-reduced :func:`partial_block_sums`. Entries past the tensor's end (ZeRO's padding)
    are not touched.
    """
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    block_size, scale, res_scale = layout.block_size, group["scale"], group["res_scale"]
    start, first = layout.start, layout.first_block
    # bf16 partitions (DeepSpeed's bf16_master_weights_and_grads) under weight_rounding="stochastic": each run of whole
    # blocks draws its weights' dither from its entries' indices within the run, the cut blocks from the partition's
    weight_rounding = group.get("weight_rounding", "nearest")

    # Whole blocks: the library's own step (fused kernel, foreach or the for-loop) on 2-D views.
    params, grads, avgs, avg_sqs = [], [], [], []
    for flat_start, rows, length in layout.whole_block_pieces():
        lo, hi = flat_start - start, flat_start - start + rows * length
        k = -(-length // block_size)
        m_lo = layout.block_of(flat_start) - first
        params.append(param[lo:hi].view(rows, length))
        grads.append(grad[lo:hi].view(rows, length))
        avgs.append(exp_avg[m_lo : m_lo + rows * k].view(rows, k))
        avg_sqs.append(exp_avg_sq[m_lo : m_lo + rows * k].view(rows, k))
    if params:
        foam(
            params,
            grads,
            avgs,
            avg_sqs,
            [step_t.clone() for _ in params],  # each piece counts the step once; the state counts it below
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            block_size=block_size,
            scale=scale,
            res_scale=res_scale,
            second_moment=group["second_moment"],
            foreach=group["foreach"],
            fused=group["fused"],
            weight_rounding=weight_rounding,
        )
    step_t += 1

    # Cut blocks: the same lines as foam_hf.functional._single_tensor_foam, with the block means taken from the
    # all-reduced sums instead of this rank's entries.
    step = step_t.item()
    decay, step_size, bias_correction2_sqrt = step_constants(
        step, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay
    )
    compute_dtype = _compute_dtype(param)
    cut = layout.cut_blocks()
    for block in layout.partial_blocks():
        column, count = cut.index(block), layout.block_count(block)
        lo = max(layout.block_start(block), start) - start
        hi = min(layout.block_stop(block), layout.stop) - start
        weight = param[lo:hi].to(compute_dtype)
        g = grad[lo:hi].to(compute_dtype)
        local = block - first
        stored_avg, stored_avg_sq = exp_avg[local : local + 1], exp_avg_sq[local : local + 1]
        m, v = stored_avg.to(compute_dtype), stored_avg_sq.to(compute_dtype)
        grad_mean = (block_sums[0, column] / count).to(compute_dtype).reshape(1)
        if group["second_moment"] == "mean_sq":
            grad_sq_mean = (block_sums[1, column] / count).to(compute_dtype).reshape(1)
        else:
            grad_sq_mean = grad_mean * grad_mean
        weight.mul_(decay)
        m.lerp_(grad_mean, 1 - beta1)
        v.mul_(beta2).add_(grad_sq_mean, alpha=1 - beta2)
        first_moment, second_moment = m.expand_as(g), v.expand_as(g)
        if res_scale != 0:
            residual = g - grad_mean
            first_moment = first_moment + res_scale * residual
            second_moment = second_moment + (res_scale * res_scale) * (residual * residual)
        denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)
        weight.addcdiv_(first_moment, denom, value=-step_size * scale)
        _store_weight(param[lo:hi], weight, step, weight_rounding, offset=lo)
        _store_moment(stored_avg, m, step, salt=0)
        _store_moment(stored_avg_sq, v, step, salt=1)


def partitions_of(shape: Iterable[int], block_size: int, world_size: int, stage: int) -> list[FlatSlice]:
    """Every rank's :class:`FlatSlice` of a tensor of ``shape`` under ZeRO ``stage`` (1-2 pad the flat
    tensor to a multiple of ``2 * world_size``, 3 to a multiple of ``world_size``); for tests and reports."""
    shape = tuple(shape)
    numel = math.prod(shape)
    align = 2 * world_size if stage in (1, 2) else world_size
    partition = -(-numel // align) * align // world_size
    return [FlatSlice(shape, block_size, partition, rank, world_size) for rank in range(world_size)]
