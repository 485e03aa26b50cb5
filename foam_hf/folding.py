r"""Block folding along the last dimension: the pure tensor functions FOAM is built on.

A row of length :math:`n` is cut into :math:`K = \lceil n / B \rceil` runs of :math:`B` adjacent
entries. The last run is *ragged* when :math:`B \nmid n`: it holds :math:`n - (K-1)B` entries, and its
mean is taken over those entries only (the paper's released code zero-pads and divides by :math:`B`,
which shrinks the moments of that block; we do not).

.. math::

    \operatorname{fold}_B(x)_{k} = \frac{1}{|b_k|} \sum_{j \in b_k} x_j, \qquad
    \operatorname{unfold}_B(y)_j = y_{k(j)}

where :math:`b_k` is the set of column indices in block :math:`k` and :math:`k(j) = \lfloor j / B \rfloor`.
``unfold(fold(x))`` is the block-wise mean broadcast back to full size; the *residual*
:math:`x - \operatorname{unfold}(\operatorname{fold}(x))` sums to zero within every block.

All leading dimensions act as independent rows. Nothing here holds state or imports anything beyond
``torch``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "block_mean",
    "block_sum",
    "folded_shape",
    "folds_in_full",
    "is_foldable",
    "num_blocks",
    "shape_folds",
    "unfold",
]


def num_blocks(n: int, block_size: int) -> int:
    """Number of blocks a row of length ``n`` folds into: ``ceil(n / block_size)``."""
    return -(-n // block_size)


def is_foldable(param: torch.Tensor, block_size: int) -> bool:
    """Whether FOAM keeps folded states for ``param`` under ``block_size``.

    The rule: tensors with two or more dimensions fold along their last dimension when
    ``block_size > 1``. One-dimensional tensors (biases, norm weights), scalars and empty tensors keep
    full AdamW states. A ``block_size`` larger than the last dimension folds each row to a single
    entry (one ragged block holding the whole row).
    """
    return block_size > 1 and param.ndim >= 2 and param.numel() > 0


def shape_folds(shape: tuple[int, ...] | torch.Size, block_size: int) -> bool:
    """:func:`is_foldable` on a shape (a tensor's full one, where the tensor holds only a partition of it)."""
    return block_size > 1 and len(shape) >= 2 and math.prod(shape) > 0


def folds_in_full(param: torch.Tensor, block_size: int) -> bool:
    """:func:`is_foldable` on the parameter's full shape: also once ``deepspeed.zero.Init`` has partitioned it
    (ZeRO-3 leaves an empty placeholder and keeps the full shape in ``ds_shape``); lazy parameters, whose shape
    is not known yet, do not fold yet."""
    shape = getattr(param, "ds_shape", None)
    if shape is not None:
        return shape_folds(tuple(shape), block_size)
    return not torch.nn.parameter.is_lazy(param) and is_foldable(param, block_size)


def folded_shape(shape: torch.Size | tuple[int, ...], block_size: int) -> torch.Size:
    """Shape of the folded state of a tensor of ``shape``: ``(*leading, ceil(n / block_size))``."""
    *leading, n = shape
    return torch.Size((*leading, num_blocks(n, block_size)))


def _within_row(block_size: int, n: int) -> int:
    """``min(block_size, n)``: a block wider than its row of ``n`` entries is the whole row, one block either way, and
    folding at the row's width pads nothing (at ``block_size = 2**16`` a row of 8 would be padded to 65536)."""
    return min(block_size, n) if n > 0 else block_size


def _block_counts(n: int, block_size: int, like: torch.Tensor) -> torch.Tensor:
    """Entries per block of a row of length ``n``: ``[B, ..., B, n - (K-1)B]``, shaped for broadcasting."""
    k = num_blocks(n, block_size)
    counts = torch.full((k,), float(block_size), dtype=like.dtype, device=like.device)
    counts[-1] = n - (k - 1) * block_size
    return counts


def block_sum(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sum of each run of ``block_size`` adjacent entries along the last dimension (ragged tail included)."""
    n = x.shape[-1]
    block_size = _within_row(block_size, n)
    k = num_blocks(n, block_size)
    pad = k * block_size - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], k, block_size).sum(dim=-1)


def block_mean(x: torch.Tensor, block_size: int) -> torch.Tensor:
    r"""Mean of each block along the last dimension; the ragged last block averages its own entries.

    Returns a tensor of shape :func:`folded_shape` ``(x.shape, block_size)``.
    """
    n = x.shape[-1]
    block_size = _within_row(block_size, n)
    if n % block_size == 0:
        return x.reshape(*x.shape[:-1], n // block_size, block_size).mean(dim=-1)
    return block_sum(x, block_size) / _block_counts(n, block_size, x)


def unfold(y: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """Broadcast each folded entry back over its block: the inverse shape map of :func:`block_mean`.

    ``y`` has shape ``(*leading, ceil(n / block_size))``; the result has shape ``(*leading, n)``.
    """
    k = y.shape[-1]
    if k != num_blocks(n, block_size):
        raise ValueError(
            f"unfold: a folded last dimension of {k} does not match n={n} with block_size={block_size} "
            f"(expected ceil({n}/{block_size}) = {math.ceil(n / block_size)})."
        )
    block_size = _within_row(block_size, n)
    full = y.unsqueeze(-1).expand(*y.shape, block_size).reshape(*y.shape[:-1], k * block_size)
    return full if k * block_size == n else full[..., :n]
