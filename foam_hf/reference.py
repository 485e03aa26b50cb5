r"""A slow, obviously-correct FOAM written from the paper's explicit fold and unfold matrices.

For a row length :math:`n` and block size :math:`B`, with :math:`K = \lceil n/B \rceil` blocks
:math:`b_1, \ldots, b_K` (the last one ragged when :math:`B \nmid n`):

.. math::

    A \in \mathbb{R}^{n \times K},\ A_{jk} = \frac{[\,j \in b_k\,]}{|b_k|} \quad\text{(fold: block mean)}, \qquad
    E \in \{0, 1\}^{K \times n},\ E_{kj} = [\,j \in b_k\,] \quad\text{(unfold: broadcast)}

A gradient :math:`G` viewed as a matrix of rows :math:`\times\, n` then folds as :math:`\tilde g = G A`
and unfolds as :math:`\tilde g E`. This module shares no code with :mod:`foam_hf.optim` or
:mod:`foam_hf.folding`; the tests hold the library to it.
"""

from __future__ import annotations

import math

import torch

__all__ = ["FoamReference", "fold_matrix", "unfold_matrix"]


def _blocks(n: int, block_size: int) -> list[range]:
    return [range(start, min(start + block_size, n)) for start in range(0, n, block_size)]


def fold_matrix(n: int, block_size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The ``n × K`` matrix :math:`A` whose product with a row takes the mean of each block."""
    blocks = _blocks(n, block_size)
    a = torch.zeros(n, len(blocks), dtype=dtype)
    for k, block in enumerate(blocks):
        for j in block:
            a[j, k] = 1.0 / len(block)
    return a


def unfold_matrix(n: int, block_size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The ``K × n`` 0/1 matrix :math:`E` that copies each block's value to its entries."""
    blocks = _blocks(n, block_size)
    e = torch.zeros(len(blocks), n, dtype=dtype)
    for k, block in enumerate(blocks):
        for j in block:
            e[k, j] = 1.0
    return e


class FoamReference:
    """FOAM on a list of tensors, one step at a time, straight from the equations.

    Tensors with ``ndim >= 2`` and ``block_size > 1`` fold along the last dimension; all others follow
    AdamW's formulas. States and arithmetic are in ``dtype`` (float64 by default) for tight comparisons.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        block_size: int,
        scale: float,
        res_scale: float,
        second_moment: str,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.weights = [p.detach().to(dtype).clone() for p in params]
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.weight_decay, self.block_size = weight_decay, block_size
        self.scale, self.res_scale, self.second_moment = scale, res_scale, second_moment
        self.dtype = dtype
        self.t = 0
        self.m: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for w in self.weights:
            if self._folds(w):
                n = w.shape[-1]
                k = math.ceil(n / block_size)
                shape = (*w.shape[:-1], k)
            else:
                shape = tuple(w.shape)
            self.m.append(torch.zeros(shape, dtype=dtype))
            self.v.append(torch.zeros(shape, dtype=dtype))

    def _folds(self, w: torch.Tensor) -> bool:
        return self.block_size > 1 and w.ndim >= 2 and w.numel() > 0

    def step(self, grads: list[torch.Tensor]) -> None:
        self.t += 1
        b1, b2, t = self.beta1, self.beta2, self.t
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        for i, (w, g) in enumerate(zip(self.weights, grads)):
            g = g.detach().to(self.dtype)
            if self._folds(w):
                shape = w.shape
                n = shape[-1]
                G = g.reshape(-1, n)
                A, E = fold_matrix(n, self.block_size, self.dtype), unfold_matrix(n, self.block_size, self.dtype)
                m = self.m[i].reshape(-1, A.shape[1])
                v = self.v[i].reshape(-1, A.shape[1])
                g_fold = G @ A
                g2_fold = (G * G) @ A if self.second_moment == "mean_sq" else g_fold * g_fold
                m = b1 * m + (1 - b1) * g_fold
                v = b2 * v + (1 - b2) * g2_fold
                R = G - g_fold @ E
                M = m @ E + self.res_scale * R
                V = v @ E + self.res_scale**2 * R * R
                update = self.scale * (M / bc1) / (torch.sqrt(V / bc2) + self.eps)
                self.m[i] = m.reshape(self.m[i].shape)
                self.v[i] = v.reshape(self.v[i].shape)
                self.weights[i] = w * (1 - self.lr * self.weight_decay) - self.lr * update.reshape(shape)
            else:
                self.m[i] = b1 * self.m[i] + (1 - b1) * g
                self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
                update = (self.m[i] / bc1) / (torch.sqrt(self.v[i] / bc2) + self.eps)
                self.weights[i] = w * (1 - self.lr * self.weight_decay) - self.lr * update
