"""Folding primitives against the explicit fold/unfold matrices, and their properties (hypothesis)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from foam_hf import FOAM, block_mean, folded_shape, unfold
from foam_hf.reference import FoamReference, fold_matrix, unfold_matrix

# Small dims keep hypothesis fast while still hitting n < B, n = B, n = kB + 1.
dims = st.integers(min_value=1, max_value=13)
block_sizes = st.integers(min_value=1, max_value=9)


@given(rows=dims, n=dims, block_size=block_sizes)
@settings(max_examples=60, deadline=None)
def test_block_mean_and_unfold_equal_the_matrices(rows, n, block_size):
    x = torch.randn(rows, n, dtype=torch.float64)
    torch.testing.assert_close(block_mean(x, block_size), x @ fold_matrix(n, block_size), atol=1e-12, rtol=0)
    y = torch.randn(rows, math.ceil(n / block_size), dtype=torch.float64)
    torch.testing.assert_close(unfold(y, n, block_size), y @ unfold_matrix(n, block_size), atol=0, rtol=0)


@given(lead=st.lists(dims, min_size=1, max_size=3), n=dims, block_size=block_sizes)
@settings(max_examples=60, deadline=None)
def test_residual_sums_to_zero_in_every_block(lead, n, block_size):
    g = torch.randn(*lead, n, dtype=torch.float64)
    residual = g - unfold(block_mean(g, block_size), n, block_size)
    per_block = residual.reshape(-1, n) @ unfold_matrix(n, block_size).T  # sum over each block
    torch.testing.assert_close(per_block, torch.zeros_like(per_block), atol=1e-12, rtol=0)


@given(lead=st.lists(dims, min_size=1, max_size=3), n=dims, block_size=block_sizes)
@settings(max_examples=40, deadline=None)
def test_state_shape_is_leading_by_ceil_n_over_b(lead, n, block_size):
    p = torch.randn(*lead, n, requires_grad=True)
    opt = FOAM([p], block_size=block_size)
    p.grad = torch.randn_like(p)
    opt.step()
    expected = (*lead, math.ceil(n / block_size)) if block_size > 1 else (*lead, n)
    assert tuple(opt.state[p]["exp_avg"].shape) == expected
    assert folded_shape(p.shape, block_size) == (*lead, math.ceil(n / block_size))


@given(
    shapes=st.lists(st.lists(dims, min_size=1, max_size=3), min_size=1, max_size=4),
    block_size=block_sizes,
    res_scale=st.sampled_from([0.0, 0.5, 1.0]),
    second_moment=st.sampled_from(["mean_sq", "sq_mean"]),
    weight_decay=st.sampled_from([0.0, 0.1]),
)
@settings(max_examples=40, deadline=None)
def test_foreach_path_equals_reference(shapes, block_size, res_scale, second_moment, weight_decay):
    params = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]
    kwargs = dict(
        lr=1e-2,
        betas=(0.9, 0.99),
        eps=1e-8,
        weight_decay=weight_decay,
        block_size=block_size,
        scale=1.3,
        res_scale=res_scale,
        second_moment=second_moment,
    )
    opt = FOAM(params, foreach=True, **kwargs)
    reference = FoamReference(params, **kwargs)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        reference.step(grads)
    for p, w in zip(params, reference.weights):
        torch.testing.assert_close(p.detach(), w, atol=1e-10, rtol=0)
