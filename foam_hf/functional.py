r"""FOAM's step as functions of tensor lists, in the layout of ``torch.optim.adam``'s functional API.

:func:`foam` steps one param group: it asks :func:`foam_hf.implementation.select_implementation` which path
runs and calls it. :func:`_single_tensor_foam` is the readable path, each line a line of the algorithm box of
:class:`~foam_hf.FOAM`; :func:`_multi_tensor_foam` is the ``torch._foreach_*`` path (tensors batched by device
and dtype, in pieces of bounded size); the fused kernels are :func:`foam_hf._fused_cpu._fused_foam` (C++) and
:func:`foam_hf._fused_triton._fused_foam_triton` (CUDA). The Python paths take their scalars from
:func:`foam_hf.step_scalars.step_constants`; the C++ kernel forms the same expressions in double.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from . import _chunking, _fused_cpu
from .folding import block_mean, is_foldable, unfold
from .implementation import Implementation, _triton, check_fused_tensors, select_implementation
from .options import validate_group_options
from .precision import check_weight_rounding
from .precision import compute_dtype as _compute_dtype
from .precision import store_moment as _store_moment
from .precision import store_weight as _store_weight
from .step_scalars import step_constants

__all__ = ["foam"]


def foam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    block_size: int,
    scale: float,
    res_scale: float,
    second_moment: str,
    foreach: bool | None = None,
    fused: bool | None = None,
    weight_rounding: str = "nearest",
) -> None:
    r"""Functional FOAM step over one group's tensors; see :class:`FOAM` for the algorithm.

    The options are checked first, as :class:`FOAM` checks them at construction (a misspelled
    ``second_moment`` or a ``block_size`` below 1 is an error, never another algorithm). Which path runs is
    :func:`foam_hf.implementation.select_implementation`'s choice: with both ``None``, a fused kernel where one
    covers every tensor, else the foreach path on CUDA and the readable path on CPU.
    """
    options = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, block_size=block_size)
    options |= dict(scale=scale, res_scale=res_scale, second_moment=second_moment, foreach=foreach, fused=fused)
    options |= dict(weight_rounding=weight_rounding)
    validate_group_options({**options, "betas": (beta1, beta2)}, where="foam_hf.foam")  # a group holds betas
    check_weight_rounding(params, weight_rounding, "foam_hf.foam")
    _foam(params, grads, exp_avgs, exp_avg_sqs, state_steps, **options)


def _foam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    block_size: int,
    scale: float,
    res_scale: float,
    second_moment: str,
    foreach: bool | None = None,
    fused: bool | None = None,
    weight_rounding: str = "nearest",
) -> None:
    """:func:`foam` without the option checks: what :class:`FOAM` calls, whose groups were checked when added."""
    _refuse_cuda_graph_capture(params)
    implementation = select_implementation(
        params,
        exp_avgs,
        foreach=foreach,
        fused=fused,
        exp_avg_sqs=exp_avg_sqs,
        block_size=block_size,
        second_moment=second_moment,
        weight_rounding=weight_rounding,
    )
    if fused:  # asked for, not chosen: say why a kernel cannot step these tensors, before it is called
        check_fused_tensors(params, exp_avgs, block_size)
    impl = _step_function(implementation)
    impl(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        lr=float(lr),
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(eps),
        weight_decay=float(weight_decay),
        block_size=int(block_size),
        scale=float(scale),
        res_scale=float(res_scale),
        second_moment=second_moment,
        weight_rounding=weight_rounding,
    )


def _refuse_cuda_graph_capture(params: list[torch.Tensor]) -> None:
    """Raise when a step of CUDA tensors is being captured into a CUDA graph: every path takes its bias corrections
    and the bf16 moments' rounding keys from the step count on the host, as Python numbers baked into the kernels it
    launches, so each replay of the graph would repeat this step's update (torch's Adam refuses the same unless
    ``capturable=True``, which FOAM has no counterpart of). Asked only for CUDA tensors, so a CPU step never
    touches CUDA, and not while Dynamo traces (as torch's optimizers: the launches run eagerly)."""
    if (
        any(p.is_cuda for p in params)
        and not torch.compiler.is_compiling()
        and torch.cuda.is_current_stream_capturing()
    ):
        raise RuntimeError(
            "FOAM: optimizer.step() is being captured into a CUDA graph, but FOAM computes its bias corrections and "
            "rounding keys on the host from each step's count, so every replay would repeat this step's update. "
            "Fix: capture the forward and backward only and call optimizer.step() outside the graph."
        )


def _single_tensor_foam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    block_size: int,
    scale: float,
    res_scale: float,
    second_moment: str,
    weight_rounding: str = "nearest",
) -> None:
    """The readable path: one tensor at a time, each line matching a line of the algorithm box."""
    for param, grad, stored_avg, stored_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        compute_dtype = _compute_dtype(param)
        # Half-precision parameters or bf16 states: compute on fp32 copies, write back at the end.
        weight = param if param.dtype == compute_dtype else param.to(compute_dtype)
        grad = grad.to(compute_dtype)
        exp_avg = stored_avg.to(compute_dtype)
        exp_avg_sq = stored_avg_sq.to(compute_dtype)

        step_t += 1
        step = step_t.item()
        decay, step_size, bias_correction2_sqrt = step_constants(
            step, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay
        )

        # W ← W(1 − γλ), on the old weights, as AdamW.
        weight.mul_(decay)

        if is_foldable(param, block_size):
            n = grad.shape[-1]
            # g̃ = blockmean(G);  g̃⁽²⁾ = blockmean(G⊙G) or g̃⊙g̃
            grad_mean = block_mean(grad, block_size)
            if second_moment == "mean_sq":
                grad_sq_mean = block_mean(grad * grad, block_size)
            else:
                grad_sq_mean = grad_mean * grad_mean
            # m̃ ← β1 m̃ + (1−β1) g̃;  ṽ ← β2 ṽ + (1−β2) g̃⁽²⁾
            exp_avg.lerp_(grad_mean, 1 - beta1)
            exp_avg_sq.mul_(beta2).add_(grad_sq_mean, alpha=1 - beta2)
            # M = unfold(m̃) + ρR;  V = unfold(ṽ) + ρ²R⊙R;  R = G − unfold(g̃)
            first = unfold(exp_avg, n, block_size)
            second = unfold(exp_avg_sq, n, block_size)
            if res_scale != 0:
                residual = grad - unfold(grad_mean, n, block_size)
                first = first + res_scale * residual
                second = second + (res_scale * res_scale) * (residual * residual)
            # W ← W − γα (M/bc1) / (sqrt(V/bc2) + ε)
            denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
            weight.addcdiv_(first, denom, value=-step_size * scale)
        else:
            # Plain AdamW, op for op as torch.optim.AdamW's single-tensor path.
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            weight.addcdiv_(exp_avg, denom, value=-step_size)

        _store_weight(param, weight, step, weight_rounding)  # to nearest, or stochastically into bf16
        _store_moment(stored_avg, exp_avg, step, salt=0)
        _store_moment(stored_avg_sq, exp_avg_sq, step, salt=1)


def _multi_tensor_foam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    block_size: int,
    scale: float,
    res_scale: float,
    second_moment: str,
    weight_rounding: str = "nearest",
) -> None:
    """The ``torch._foreach_*`` path: element-wise updates batched over tensors, in batches of bounded size.

    Tensors are stepped by (device, dtype, moment dtype), as torch's foreach optimizers group them, each kind
    cut into row pieces and stepped batch by batch (:mod:`foam_hf._chunking`), so the temporaries of a step
    stay within 25 % of the stepped parameters' bytes instead of several times them.
    Folding is per piece (shapes differ): the unfolded moments are added into the residual by broadcasting,
    never materialised. Same operations on the same values as :func:`_single_tensor_foam`, so the same
    results up to the rounding of vectorised kernels, and the same stochastic rounding of bf16 moments.
    """
    if not params:
        return
    hyper = dict(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        block_size=block_size,
        scale=scale,
        res_scale=res_scale,
        second_moment=second_moment,
        weight_rounding=weight_rounding,
    )
    by_kind: dict[tuple[torch.device, torch.dtype, torch.dtype], list[int]] = {}
    for i, (param, exp_avg) in enumerate(zip(params, exp_avgs)):
        by_kind.setdefault((param.device, param.dtype, exp_avg.dtype), []).append(i)
    if len(by_kind) > 1:  # torch._foreach_* ops take tensors of one device (and run fastest on one dtype)
        for indices in by_kind.values():
            tensors = [[seq[i] for i in indices] for seq in (params, grads, exp_avgs, exp_avg_sqs, state_steps)]
            _multi_tensor_foam(*tensors, **hyper)
        return
    torch._foreach_add_(state_steps, 1)
    steps = [s.item() for s in state_steps]
    folded = [is_foldable(p, block_size) for p in params]
    costs = [
        _foreach_bytes_per_entry(p, g, m, f, block_size, weight_rounding)
        for p, g, m, f in zip(params, grads, exp_avgs, folded)
    ]
    for batch in _chunking.batches(
        params, grads, exp_avgs, exp_avg_sqs, folded, costs, _chunking.transient_budget(params)
    ):
        _foreach_step_batch(batch, steps, folded, **hyper)


def _foreach_bytes_per_entry(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, folded: bool, block_size: int, weight_rounding: str
) -> int:
    """An upper bound of the temporaries one entry of ``param`` costs in :func:`_foreach_step_batch`."""
    compute_dtype = _compute_dtype(param)
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    weight_copy = param.dtype != compute_dtype
    state_copies = 2 * (exp_avg.dtype != compute_dtype)
    # Stochastic rounding into bf16 (_store_moment): int64 indices and hash steps, ~48 bytes per moment entry.
    rounding = 48 if exp_avg.dtype == torch.bfloat16 else 0
    # The same rounding of bf16 weights (weight_rounding="stochastic"), per parameter entry.
    weight_rounding_bytes = 48 if weight_rounding == "stochastic" and param.dtype == torch.bfloat16 else 0
    if folded:
        # the weight's copy; G⊙G and the zero-padded copy block_sum makes of ragged rows (⌈n/B⌉·B entries a row,
        # B/n times the row when n < B, as in a convolution's weight) while folding; then the residual (the
        # gradient's copy or clone) and the second moment: 3 full-size buffers at most, 3.5 + padded/n with ragged
        # rows (measured up to 2.9 + padded/n, at n = 1); plus g̃, g̃⁽²⁾ and the moments.
        n = param.shape[-1]
        padded = -(-n // block_size) * block_size
        buffers = 3.0 if padded == n else 3.5 + padded / n
        return weight_rounding_bytes + math.ceil(
            itemsize * (weight_copy + buffers + (2 + state_copies) / block_size) + rounding / block_size
        )
    # weight, gradient and moment copies, and the denominator
    copies = weight_copy + (grad.dtype != compute_dtype) + state_copies + 1
    return itemsize * copies + rounding + weight_rounding_bytes


def _foreach_step_batch(
    batch: list[_chunking.Piece],
    steps: list[float],
    folded: list[bool],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    block_size: int,
    scale: float,
    res_scale: float,
    second_moment: str,
    weight_rounding: str,
) -> None:
    """One batch of :func:`_multi_tensor_foam`: the algorithm box, line by line, over a list of row pieces."""
    compute_dtypes = [_compute_dtype(piece.param) for piece in batch]
    # Half-precision pieces or bf16 states: fp32 copies (of this batch only), written back at the end.
    weights = [piece.param.to(dt) for piece, dt in zip(batch, compute_dtypes)]
    piece_grads = [piece.grad.to(dt) for piece, dt in zip(batch, compute_dtypes)]
    moments = [piece.exp_avg.to(dt) for piece, dt in zip(batch, compute_dtypes)]
    moments_sq = [piece.exp_avg_sq.to(dt) for piece, dt in zip(batch, compute_dtypes)]
    piece_steps = [steps[piece.index] for piece in batch]
    constants = [step_constants(s, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay) for s in piece_steps]
    bias_correction2_sqrts = [c.bias_correction2_sqrt for c in constants]
    step_sizes = [c.step_size for c in constants]

    # W ← W(1 − γλ), on the old weights, as AdamW.
    if weight_decay != 0:
        torch._foreach_mul_(weights, constants[0].decay)

    plain = [i for i, piece in enumerate(batch) if not folded[piece.index]]
    fold = [i for i, piece in enumerate(batch) if folded[piece.index]]

    def pick(seq: list[Any], idx: list[int]) -> list[Any]:
        return [seq[i] for i in idx]

    if plain:  # plain AdamW, op for op as torch.optim.AdamW's foreach path
        p_w, p_g = pick(weights, plain), pick(piece_grads, plain)
        p_m, p_v = pick(moments, plain), pick(moments_sq, plain)
        torch._foreach_lerp_(p_m, p_g, 1 - beta1)
        torch._foreach_mul_(p_v, beta2)
        torch._foreach_addcmul_(p_v, p_g, p_g, 1 - beta2)
        denom = torch._foreach_sqrt(p_v)
        torch._foreach_div_(denom, pick(bias_correction2_sqrts, plain))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p_w, p_m, denom, [-s for s in pick(step_sizes, plain)])
        del denom

    if fold:
        f_w, f_m, f_v = pick(weights, fold), pick(moments, fold), pick(moments_sq, fold)
        # g̃ = blockmean(G);  g̃⁽²⁾ = blockmean(G⊙G) or g̃⊙g̃
        grad_means = [block_mean(piece_grads[i], block_size) for i in fold]
        if second_moment == "mean_sq":
            grad_sq_means = [block_mean(piece_grads[i] * piece_grads[i], block_size) for i in fold]
        else:
            grad_sq_means = torch._foreach_mul(grad_means, grad_means)
        # m̃ ← β1 m̃ + (1−β1) g̃;  ṽ ← β2 ṽ + (1−β2) g̃⁽²⁾
        torch._foreach_lerp_(f_m, grad_means, 1 - beta1)
        torch._foreach_mul_(f_v, beta2)
        torch._foreach_add_(f_v, grad_sq_means, alpha=1 - beta2)
        del grad_sq_means
        firsts, seconds = [], []
        for j, i in enumerate(fold):
            grad = piece_grads[i]
            if res_scale != 0:
                # R = G − unfold(g̃), in the gradient's fp32 copy when there is one (it is not needed after this)
                residual = grad if grad is not batch[i].grad else grad.clone()
                piece_grads[i] = None
                _add_unfolded_(residual, grad_means[j], block_size, subtract=True)
                # V = unfold(ṽ) + ρ²R⊙R;  M = unfold(m̃) + ρR
                second = residual * residual
                second.mul_(res_scale * res_scale)
                _add_unfolded_(second, f_v[j], block_size)
                first = residual.mul_(res_scale)
                _add_unfolded_(first, f_m[j], block_size)
            else:
                first = _unfold_copy(f_m[j], grad.shape[-1], block_size)
                second = _unfold_copy(f_v[j], grad.shape[-1], block_size)
            firsts.append(first)
            seconds.append(second)
        # W ← W − γα (M/bc1) / (sqrt(V/bc2) + ε)
        torch._foreach_sqrt_(seconds)
        torch._foreach_div_(seconds, pick(bias_correction2_sqrts, fold))
        torch._foreach_add_(seconds, eps)
        torch._foreach_addcdiv_(f_w, firsts, seconds, [-s * scale for s in pick(step_sizes, fold)])
        del firsts, seconds

    for piece, weight, step in zip(batch, weights, piece_steps):
        _store_weight(piece.param, weight, step, weight_rounding, offset=piece.param_offset)
    for piece, exp_avg, exp_avg_sq, step in zip(batch, moments, moments_sq, piece_steps):
        _store_moment(piece.exp_avg, exp_avg, step, salt=0, offset=piece.state_offset)
        _store_moment(piece.exp_avg_sq, exp_avg_sq, step, salt=1, offset=piece.state_offset)


def _add_unfolded_(x: torch.Tensor, y: torch.Tensor, block_size: int, subtract: bool = False) -> torch.Tensor:
    """``x += unfold(y)`` (or ``x -= unfold(y)``) in place, by broadcasting each folded entry over its block: no
    full-size temporary, and elementwise the same IEEE operation as ``x + unfold(y)`` (``x - unfold(y)``)."""
    n = x.shape[-1]
    whole = n // block_size  # blocks of B entries; a ragged last block holds n mod B
    op = torch.Tensor.sub_ if subtract else torch.Tensor.add_
    if whole:
        op(x[..., : whole * block_size].unflatten(-1, (whole, block_size)), y[..., :whole].unsqueeze(-1))
    if n % block_size:
        op(x[..., whole * block_size :], y[..., whole:])
    return x


def _unfold_copy(y: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """A fresh, contiguous ``unfold(y, n, block_size)`` (``unfold`` itself may return a view of ``y``)."""
    out = y.new_empty((*y.shape[:-1], n))
    whole = n // block_size
    if whole:
        out[..., : whole * block_size].unflatten(-1, (whole, block_size)).copy_(y[..., :whole].unsqueeze(-1))
    if n % block_size:
        out[..., whole * block_size :].copy_(y[..., whole:])
    return out


def _step_function(implementation: Implementation) -> Callable[..., None]:
    """The function of :data:`~foam_hf.implementation.Implementation` ``implementation`` (the Triton module is
    imported only when a CUDA group runs)."""
    if implementation == "fused_cpu":
        return _fused_cpu._fused_foam
    if implementation == "fused_triton":
        return _triton()._fused_foam_triton
    return _multi_tensor_foam if implementation == "foreach" else _single_tensor_foam
