r"""Precision of FOAM's states and weights: which dtype the moments are stored in, which dtype the step computes
in, and how a fp32 value is written into bf16 storage (stochastic rounding by a counter hash): always for bf16
moments, and for bf16 weights under ``weight_rounding="stochastic"``.

Everything that knows about state dtypes lives here, below :mod:`foam_hf.optim`, :mod:`foam_hf.memory`,
:mod:`foam_hf.convert` and the memory report, so that none of them re-derives the rule.

Rule (moments): a group's ``state_dtype`` (``"float32"``, ``"bfloat16"``, their ``torch.dtype`` spellings, or ``None``)
wins when given; ``None`` keeps fp32 states for fp16/bf16 parameters and the parameter's dtype otherwise.

Rule (weights): the new weight is computed in fp32 (fp64 for fp64 parameters) and stored in the parameter's
dtype, rounded to nearest (as torch's AdamW stores it), or, for bf16 parameters of a group with
``weight_rounding="stochastic"``, stochastically rounded with the moments' hash under its own salt
(:data:`WEIGHT_SALT`). Round-to-nearest loses every update below half a bf16 spacing: at lr 1e-4 a weight of
magnitude 0.5-1 (spacing 2^-8) never moves. Stochastic rounding keeps each update in expectation.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import FoamConfigError

__all__ = [
    "PARAM_DTYPES",
    "STATE_DTYPES",
    "WEIGHT_ROUNDINGS",
    "WEIGHT_SALT",
    "check_weight_rounding",
    "compute_dtype",
    "normalize_state_dtype",
    "rounding_dither",
    "state_dtype_for",
    "state_itemsize",
    "store_moment",
    "store_weight",
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


#: How a group's new weights are stored into bf16 parameters (``weight_rounding``): ``"nearest"`` (round to
#: nearest even, as torch's optimizers do; the default) or ``"stochastic"`` (:func:`store_weight`). Other
#: parameter dtypes are stored as they are computed (fp32, fp64), or to nearest (fp16).
WEIGHT_ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")

#: The salt of the weights' dither (the moments use 0 for ``exp_avg`` and 1 for ``exp_avg_sq``).
WEIGHT_SALT = 2


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
    flat = value.contiguous().view(-1)
    # A run of _ROUNDING_CHUNK entries at a time: the hash's int64 temporaries (~32 bytes an entry) stay a few MiB
    # however large the tensor, written straight into contiguous storage, else into one bf16 copy first.
    out = stored.view(-1) if stored.is_contiguous() else torch.empty_like(flat, dtype=torch.bfloat16)
    for start in range(0, flat.numel(), _ROUNDING_CHUNK):
        run = flat[start : start + _ROUNDING_CHUNK]
        out[start : start + run.numel()].copy_(_stochastically_rounded(run, step, salt, offset + start))
    if not stored.is_contiguous():
        stored.copy_(out.view(value.shape))


#: Entries :func:`store_moment` rounds at a time.
_ROUNDING_CHUNK = 1 << 16


def _stochastically_rounded(values: torch.Tensor, step: float, salt: int, offset: int) -> torch.Tensor:
    """fp32 ``values`` (1-D, contiguous) with the dither of flat indices ``offset``... added to their bit patterns and
    the low 16 bits dropped: fp32 tensors holding bf16 values exactly."""
    dither = rounding_dither(values.shape, step, salt, values.device, offset)
    rounded = ((values.view(torch.int32) + dither) & -65536).view(torch.float32)
    # Non-finite values keep their class (a carry must not turn NaN into -0). A finite value above bf16's largest
    # (3.3895e38, the top 1/256 of fp32's range) rounds up to inf with the probability of its position between
    # the two, as the C++ and Triton kernels do: a moment that large has overflowed bf16 anyway.
    return torch.where(torch.isfinite(values), rounded, values)


def check_weight_rounding(
    params: list[torch.Tensor], rounding: str, where: str, names: list[str | None] | None = None
) -> None:
    """Refuse ``weight_rounding="stochastic"`` over fp16 parameters (``where``: e.g. ``"param group 2"``; ``names``:
    the parameters' names, where known): the rule rounds fp32 values to bf16 bit patterns only."""
    if rounding != "stochastic":
        return
    for p, name in zip(params, names or [None] * len(params)):
        if p.dtype == torch.float16:
            raise FoamConfigError(
                f"FOAM: {where} sets weight_rounding='stochastic' and holds a float16 parameter of shape "
                f"{tuple(p.shape)}{f' ({name})' if name else ''}; stochastic rounding is defined for bf16 weights "
                "only. Fix: convert the model to bf16 (model.to(torch.bfloat16)), or pass weight_rounding='nearest' "
                "for this group."
            )


def store_weight(param: torch.Tensor, weight: torch.Tensor, step: float, rounding: str, offset: int = 0) -> None:
    r"""Write the new weights ``weight`` (computed in the compute dtype) into ``param`` (a no-op when they are one
    tensor): stochastically rounded, as :func:`store_moment` rounds moments but with salt :data:`WEIGHT_SALT`,
    where ``rounding`` is ``"stochastic"`` and ``param`` is bf16; otherwise by ``copy_`` (to nearest).

    The dither of an entry is a function of its C-order index in ``param`` (``offset`` is that of the first
    entry when ``param`` is a run of rows of the parameter) and of the step: a resumed run rounds exactly as the
    uninterrupted one. Under sharding the index is that of the tensor the optimizer steps (a rank's local shard),
    so sharded runs draw other dithers than one process does.
    """
    if param is weight:
        return
    if rounding == "stochastic" and param.dtype == torch.bfloat16:
        store_moment(param, weight, step, salt=WEIGHT_SALT, offset=offset)
    else:
        param.copy_(weight)
