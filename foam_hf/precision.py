r"""Precision of FOAM's states: which dtype the moments are stored in, which dtype the step computes in, and
how a fp32 moment is written into bf16 storage (stochastic rounding by a counter hash).

Everything that knows about state dtypes lives here, below :mod:`foam_hf.optim`, :mod:`foam_hf.memory`,
:mod:`foam_hf.convert` and the memory report, so that none of them re-derives the rule.

Rule: a group's ``state_dtype`` (``"float32"``, ``"bfloat16"``, their ``torch.dtype`` spellings, or ``None``)
wins when given; ``None`` keeps fp32 states for fp16/bf16 parameters and the parameter's dtype otherwise.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "PARAM_DTYPES",
    "STATE_DTYPES",
    "compute_dtype",
    "normalize_state_dtype",
    "rounding_dither",
    "state_dtype_for",
    "state_itemsize",
    "store_moment",
]

#: Parameter dtypes FOAM steps (its update is computed in fp32, or fp64 for fp64 parameters).
PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Storage dtypes of the moments a group may ask for with ``state_dtype``; ``None`` means fp32 for half
#: parameters and the parameter's dtype otherwise. ``"bfloat16"`` halves state memory again: moments are
#: computed in fp32 and stored with stochastic rounding (see :func:`store_moment`).
STATE_DTYPES: dict[str | None, torch.dtype | None] = {
    None: None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
}


def normalize_state_dtype(value: Any) -> Any:
    """Map ``torch.float32``/``torch.bfloat16`` to the strings groups store (plain data in checkpoints)."""
    if isinstance(value, torch.dtype):
        for name, dtype in STATE_DTYPES.items():
            if dtype == value:
                return name
    return value


def state_dtype_for(param: torch.Tensor, state_dtype: str | torch.dtype | None = None) -> torch.dtype:
    """dtype of FOAM's moment states for ``param`` under a group's ``state_dtype`` option (see the module rule)."""
    chosen = STATE_DTYPES.get(normalize_state_dtype(state_dtype))
    if chosen is not None:
        return chosen
    if param.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return param.dtype


def state_itemsize(param: torch.Tensor, state_dtype: str | torch.dtype | None = None) -> int:
    """Bytes per moment entry of ``param`` under ``state_dtype``."""
    return state_dtype_for(param, state_dtype).itemsize


def compute_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype the update is computed in: fp32, or fp64 for fp64 parameters."""
    return torch.promote_types(param.dtype, torch.float32)


# Constants of a counter-based hash (Knuth's multiplicative hash, then murmur3's finaliser steps). The C++
# and Triton kernels use the same constants: their rounding is bit-equal to store_moment's.
_HASH_INDEX, _HASH_STEP, _HASH_SALT, _HASH_MIX = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x7FEB352D
_MASK32 = 0xFFFFFFFF


def rounding_dither(shape: torch.Size, step: float, salt: int, device: torch.device, offset: int = 0) -> torch.Tensor:
    """16 pseudo-random bits per element (int32 in ``[0, 2**16)``), a pure function of index, step and salt.

    A counter-based hash instead of a random generator: no RNG state to checkpoint, and a resumed run
    draws exactly the dither the uninterrupted run drew. The index of an element is its C-order position in
    the whole moment: ``offset`` is that of the first element when ``shape`` is a run of rows of it.
    """
    key = (int(step) * _HASH_STEP + salt * _HASH_SALT) & _MASK32
    index = torch.arange(offset, offset + shape.numel(), dtype=torch.int64, device=device)
    h = (index * _HASH_INDEX + key) & _MASK32
    h ^= h >> 16
    h = (h * _HASH_MIX) & _MASK32
    h ^= h >> 15
    return (h & 0xFFFF).to(torch.int32).view(shape)


def store_moment(stored: torch.Tensor, value: torch.Tensor, step: float, salt: int, offset: int = 0) -> None:
    r"""Write a moment computed in ``value`` into its storage ``stored`` (a no-op when they are one tensor).

    Into bf16 storage the value (fp32, or fp64 first rounded to fp32) is *stochastically rounded*: a uniform
    16-bit dither is added to its bit pattern and the low 16 bits dropped, so
    :math:`\mathbb E[\mathrm{round}(x)] = x`. Round-to-nearest would freeze the second moment: with
    :math:`\beta_2 = 0.999` a step changes :math:`\tilde v` by 0.1 %, below half a bf16 ulp (0.2-0.4 %), so
    decays and small increments would all round away.
    """
    if stored is value:
        return
    if stored.dtype != torch.bfloat16:
        stored.copy_(value)
        return
    if value.dtype != torch.float32:  # fp64 (fp64 parameters compute in fp64): to fp32 first, then the same rounding
        value = value.float()
    bits = value.contiguous().view(torch.int32)
    dither = rounding_dither(value.shape, step, salt, value.device, offset)
    rounded = ((bits + dither) & -65536).view(torch.float32)
    # Non-finite values keep their class (a carry must not turn NaN into -0). A finite value above bf16's largest
    # (3.3895e38, the top 1/256 of fp32's range) rounds up to inf with the probability of its position between
    # the two, as the C++ and Triton kernels do: a moment that large has overflowed bf16 anyway.
    rounded = torch.where(torch.isfinite(value), rounded, value)
    stored.copy_(rounded)  # exact: the low 16 bits are zero
