"""The scalars of one Adam step, from the step count: one function that every implementation of FOAM uses.

The readable and foreach paths (:mod:`foam_hf.functional`), the Triton kernels (:mod:`foam_hf._fused_triton`)
and ZeRO's cut blocks (:mod:`foam_hf.zero_layout`) take their bias corrections and decay from
:func:`step_constants`; the C++ kernel forms the same expressions in double (``make_hyper`` in
``csrc/foam_cpu.cpp``).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["StepConstants", "step_constants"]


class StepConstants(NamedTuple):
    r"""The scalars of step :math:`t` of a tensor: what every path computes from ``state["step"]``.

    The readable and foreach paths use them as torch's AdamW does, ``W ← W·decay`` then
    ``W ← W − step_size · M / (√V / bias_correction2_sqrt + ε)``; the fused kernels move ε inside so that one
    division suffices, ``W ← W·decay + step_scale · M / (√V + ε·bias_correction2_sqrt)``, with
    ``step_scale = −step_size · α · bias_correction2_sqrt`` (see :meth:`fused`). The C++ kernel computes the
    same expressions in double (``make_hyper`` in ``csrc/foam_cpu.cpp``).
    """

    decay: float  #: 1 − γλ
    step_size: float  #: γ / (1 − β1ᵗ)
    bias_correction2_sqrt: float  #: √(1 − β2ᵗ)

    def fused(self, eps: float, scale: float) -> tuple[float, float]:
        """``(eps · bias_correction2_sqrt, −step_size · scale · bias_correction2_sqrt)`` for the fused form."""
        return eps * self.bias_correction2_sqrt, -self.step_size * scale * self.bias_correction2_sqrt


def step_constants(step: float, *, lr: float, beta1: float, beta2: float, weight_decay: float) -> StepConstants:
    """:class:`StepConstants` at step count ``step`` (1 at the first step), exactly as torch's AdamW forms them."""
    return StepConstants(1 - lr * weight_decay, lr / (1 - beta1**step), (1 - beta2**step) ** 0.5)
