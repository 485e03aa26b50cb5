r"""Row pieces in bounded batches: how the foreach path keeps its temporaries to a fraction of the parameters.

The foreach path (:func:`foam_hf.functional._multi_tensor_foam`) computes with whole-tensor temporaries: the
fp32 copies of half-precision weights and gradients, ``G⊙G``, the unfolded moments, the residual and the
denominator. Stepping a whole group at once would hold several of them for *every* parameter at the same
time (550 % of the parameter bytes for fp32 parameters, 1500 % for bf16 ones). Instead the step runs batch by
batch, each batch a list of *row pieces* whose temporaries fit in a byte budget:

* a tensor is cut along its rows (the leading dimensions of a folded tensor, flattened; any run of entries of
  a tensor that does not fold), never inside a row, so a piece folds exactly as the whole tensor does;
* pieces are views: the in-place updates of weights and moments land in the tensors themselves;
* a piece knows the C-order index of its first moment entry and of its first parameter entry, so the
  stochastic rounding of bf16 moments and weights (:mod:`foam_hf.precision`) draws the same dither as for the
  whole tensor.

The budget is :data:`TRANSIENT_FRACTION` of the bytes of the parameters being stepped, and at least
:data:`MIN_BATCH_BYTES` (so a group of small tensors is not cut into thousands of launches), and at least one
row: a single row larger than the budget is stepped whole. Where a tensor folds to one block a row, a piece holds
at least two rows: torch reduces to a single output in another order than to several, and a one-row piece would
change the bits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["MIN_BATCH_BYTES", "TRANSIENT_FRACTION", "Piece", "batches", "transient_budget"]

#: The temporaries of a foreach step stay within this fraction of the stepped parameters' bytes.
TRANSIENT_FRACTION = 0.25
#: ...or within this many bytes, whichever is larger: below it, more batches only cost launches.
MIN_BATCH_BYTES = 1 << 20


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, start + rows)`` of one tensor of the step, as views of its four tensors."""

    index: int  # position of the tensor in the step's lists
    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    state_offset: int  # C-order index, in the whole moment, of this piece's first moment entry
    param_offset: int  # C-order index, in the whole parameter, of this piece's first entry


def transient_budget(params: Sequence[torch.Tensor]) -> int:
    """Bytes of temporaries a foreach step of ``params`` may hold at once."""
    total = sum(p.numel() * p.element_size() for p in params)
    return max(MIN_BATCH_BYTES, int(TRANSIENT_FRACTION * total))


def _row_views(tensors: Sequence[torch.Tensor], folded: bool) -> list[torch.Tensor]:
    """Views of ``tensors`` whose dimension 0 runs over rows, as finely as their layouts allow.

    Contiguous tensors flatten: a folded one to ``(rows, last)``, one that does not fold to ``(entries,)``.
    Otherwise dimension 0 is the row dimension as it stands (``narrow`` along it is a view for any strides).
    """
    if all(t.is_contiguous() for t in tensors):
        return [t.view(-1, t.shape[-1]) if folded else t.view(-1) for t in tensors]
    return [t if t.ndim else t.view(1) for t in tensors]


def _pieces(
    index: int,
    tensors: Sequence[torch.Tensor],
    folded: bool,
    bytes_per_entry: int,
    budget: int,
    offset: int = 0,
    param_offset: int = 0,
) -> Iterator[Piece]:
    """Row pieces of one tensor (``offset`` and ``param_offset``: the C-order indices of ``tensors``' first moment
    entry in the whole moment and first entry in the whole parameter). A non-contiguous tensor of three or more
    dimensions is cut along dimension 0 only; where one of those slabs is over the budget it is cut again along its
    own rows, so the bound holds whatever the layout."""
    param, grad, exp_avg, exp_avg_sq = views = _row_views(tensors, folded)
    rows = param.shape[0] if param.ndim else 1
    if param.numel() == 0:
        return
    param_row = param.numel() // rows
    row_bytes = param_row * bytes_per_entry
    state_row = exp_avg.numel() // rows
    if row_bytes > budget and param.ndim > (2 if folded else 1):  # a slab that still holds rows: cut inside it
        for start in range(rows):
            yield from _pieces(
                index,
                [t.select(0, start) for t in views],
                folded,
                bytes_per_entry,
                budget,
                offset + start * state_row,
                param_offset + start * param_row,
            )
        return
    rows_per_piece = max(1, budget // row_bytes)
    if folded and state_row == 1 and rows > 1:
        # One block a row: a piece of one row is a reduction to one output, which torch computes in another
        # order (over threads) than a reduction to many, so its bits would depend on where the pieces fall.
        rows_per_piece = max(2, rows_per_piece)
    start = 0
    while start < rows:
        length = min(rows_per_piece, rows - start)
        if folded and state_row == 1 and rows - start - length == 1:
            length += 1  # nor a last piece of one row: it joins the one before
        yield Piece(
            index,
            param.narrow(0, start, length),
            grad.narrow(0, start, length),
            exp_avg.narrow(0, start, length),
            exp_avg_sq.narrow(0, start, length),
            offset + start * state_row,
            param_offset + start * param_row,
        )
        start += length


def batches(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    folded: Sequence[bool],
    bytes_per_entry: Sequence[int],
    budget: int,
) -> Iterator[list[Piece]]:
    """Lists of pieces, in tensor order, whose ``numel * bytes_per_entry`` sum to at most ``budget``.

    ``bytes_per_entry[i]`` bounds the temporaries one entry of tensor ``i`` costs while its batch is stepped.
    A batch exceeds ``budget`` only when it is a single row that does.
    """
    batch: list[Piece] = []
    used = 0
    for i, tensors in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        for piece in _pieces(i, tensors, folded[i], bytes_per_entry[i], budget):
            cost = piece.param.numel() * bytes_per_entry[i]
            if batch and used + cost > budget:
                yield batch
                batch, used = [], 0
            batch.append(piece)
            used += cost
    if batch:
        yield batch
