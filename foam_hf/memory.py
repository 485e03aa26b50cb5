r"""Optimizer-state memory of FOAM against AdamW, in bytes.

For a tensor of shape ``(*rows, n)`` with state dtype of ``s`` bytes:

.. math::

    \text{FOAM} = 2 s \cdot \textit{rows} \cdot \lceil n / B \rceil \ \text{(folded)}, \qquad
    \text{AdamW} = 2 p \cdot \textit{rows} \cdot n

(``p``: the parameter's bytes per entry, the dtype torch's AdamW keeps its moments in) plus one 4-byte ``step``
tensor per parameter for both. Figures are computed from the parameter groups
(:func:`state_memory` needs no step to have run), so the callback, the CLI and the benchmarks can report
them before training starts; they count every trainable parameter as stepped, so once each has had a gradient
they equal the bytes actually held (tested; a parameter that never gets a gradient gets no state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .folding import folded_shape, is_foldable
from .precision import state_itemsize

__all__ = ["StateMemory", "adamw_state_bytes", "foam_state_bytes", "state_memory"]

_STEP_BYTES = 4  # state["step"] is a float32 scalar tensor, as in torch.optim.Adam


def foam_state_bytes(param: torch.Tensor, block_size: int, state_dtype: str | torch.dtype | None = None) -> int:
    """Bytes FOAM holds for ``param`` under ``block_size``: two moments plus the step counter.

    ``state_dtype`` is the group option (``None``: fp32 for half parameters, else the parameter's dtype;
    ``"bfloat16"``: 2 bytes per moment entry).
    """
    shape = folded_shape(param.shape, block_size) if is_foldable(param, block_size) else param.shape
    return 2 * shape.numel() * state_itemsize(param, state_dtype) + _STEP_BYTES


def adamw_state_bytes(param: torch.Tensor) -> int:
    """Bytes ``torch.optim.AdamW`` holds for ``param``: two full moments in the parameter's own dtype (torch keeps
    bf16 moments for bf16 parameters, where FOAM's default keeps fp32 ones) plus the step."""
    return 2 * param.numel() * param.element_size() + _STEP_BYTES


@dataclass(frozen=True)
class StateMemory:
    """Optimizer-state size of one optimizer, with its AdamW equivalent.

    Attributes:
        foam_bytes: bytes of FOAM's states (moments and step counters) over trainable parameters.
        adamw_bytes: bytes AdamW would hold for the same parameters.
        folded_params: number of parameter tensors with folded states.
        unfolded_params: number of parameter tensors with full AdamW states.
    """

    foam_bytes: int
    adamw_bytes: int
    folded_params: int
    unfolded_params: int

    @property
    def ratio(self) -> float:
        """AdamW bytes over FOAM bytes: how many times smaller FOAM's states are."""
        return self.adamw_bytes / self.foam_bytes if self.foam_bytes else float("inf")

    @property
    def saved_bytes(self) -> int:
        return self.adamw_bytes - self.foam_bytes


def state_memory(optimizer: torch.optim.Optimizer) -> StateMemory:
    """Optimizer-state bytes of a FOAM optimizer (from its groups' ``block_size``) and of AdamW.

    Parameters with ``requires_grad=False`` are skipped (no optimizer builds state for them) unless they already
    hold state: a layer frozen during training keeps its moments.
    """
    foam_total = adamw_total = folded = unfolded = 0
    seen: set[int] = set()
    for group in optimizer.param_groups:
        block_size = group.get("block_size", 1)
        state_dtype = group.get("state_dtype")
        for p in group["params"]:
            if id(p) in seen or not (p.requires_grad or optimizer.state.get(p)):
                continue
            seen.add(id(p))
            foam_total += foam_state_bytes(p, block_size, state_dtype)
            adamw_total += adamw_state_bytes(p)
            if is_foldable(p, block_size):
                folded += 1
            else:
                unfolded += 1
    return StateMemory(foam_total, adamw_total, folded, unfolded)
