"""The fused CPU kernel against the readable path (``_single_tensor_foam``), over weights and states.

If the kernel cannot be built where a C++ compiler exists, these tests fail (with the build error): a
broken kernel must not hide behind the fallback. Where no compiler exists, the parity tests are skipped
with that reason, and the fallback itself is tested (it needs no compiler).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from _helpers import (
    HPARAMS,
    SHAPES,
    _fused_cpu,
    assert_same_state,
    clone_params,
    grad_sequence,
    make_params,
    run,
    saved_and_loaded,
)

from foam_hf import FOAM, foam

# 2, 4, 8 (and 16 with AVX-512): in-register blocks; 16, 32: blocks of whole vectors; 3: the portable code.
BLOCK_SIZES = [1, 2, 3, 4, 8, 16, 32]
RES_SCALES = [0.0, 0.5, 1.0]
MODES = ["mean_sq", "sq_mean"]
# Every term besides the residual (scale != 1, weight decay on); the residual weight is swept above.
SCALED = HPARAMS["scaled"]
STEPS = 6  # several steps: the bias corrections and the moments' history both matter

# (dtype, weight atol, weight rtol). fp32: the kernel moves eps inside the square root's scale (one
# division instead of two), worth ~1 ulp per step. bf16: the fp32 results may round to neighbouring bf16
# values, one bf16 ulp = 2**-8 relative, so 2**-7 bounds it. States are fp32 for both.
DTYPES = [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-6, 2**-7)]


def simd_params(dtype):
    return make_params(SHAPES["simd"], dtype)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("res_scale", RES_SCALES)
@pytest.mark.parametrize("second_moment", MODES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_fused_matches_single_tensor(isa, block_size, second_moment, res_scale, dtype, atol, rtol):
    params = simd_params(dtype)
    ours, theirs = clone_params(params), clone_params(params)
    kwargs = dict(block_size=block_size, second_moment=second_moment, res_scale=res_scale, **SCALED)
    fused = FOAM(ours, fused=True, **kwargs)
    reference = FOAM(theirs, foreach=False, fused=False, **kwargs)
    grads = grad_sequence(params, STEPS)
    run(fused, ours, grads)
    run(reference, theirs, grads)
    for a, b in zip(ours, theirs):
        assert a.dtype == dtype
        torch.testing.assert_close(a.detach().float(), b.detach().float(), atol=atol, rtol=rtol)
        for key in ("exp_avg", "exp_avg_sq"):
            assert fused.state[a][key].shape == reference.state[b][key].shape
            assert fused.state[a][key].dtype == torch.float32
            # States depend only on gradients: summation order is the only difference.
            torch.testing.assert_close(fused.state[a][key], reference.state[b][key], atol=1e-7, rtol=1e-5)
        assert fused.state[a]["step"].item() == reference.state[b]["step"].item() == STEPS


def test_default_picks_fused_on_cpu_fp32(kernel, monkeypatch):
    calls = []
    original = _fused_cpu._fused_foam
    monkeypatch.setattr(_fused_cpu, "_fused_foam", lambda *a, **k: calls.append(1) or original(*a, **k))
    params = simd_params(torch.float32)
    opt = FOAM(params, block_size=4)
    run(opt, params, grad_sequence(params, 1))
    assert calls == [1]
    # float64 with float64 states (its default) is fused too; with bf16 states the for-loop path steps it.
    doubles = simd_params(torch.float64)
    run(FOAM(doubles, block_size=4), doubles, grad_sequence(doubles, 1))
    assert calls == [1, 1]
    run(FOAM(doubles, block_size=4, state_dtype="bfloat16"), doubles, grad_sequence(doubles, 1))
    assert calls == [1, 1]


def test_kernel_threads_as_torch_does(kernel):
    # Built without -fopenmp, at::parallel_for in the kernel would run on one thread while torch uses several:
    # results identical, the step up to N times slower. Where torch runs on OpenMP, the kernel must too.
    assert kernel.openmp() == torch.backends.openmp.is_available()


def test_state_dict_continuation(kernel):
    params = simd_params(torch.float32)
    opt = FOAM(params, block_size=3, fused=True, **SCALED)
    grads = grad_sequence(params, 10)
    run(opt, params, grads[:5])
    saved = saved_and_loaded(opt.state_dict())
    # A checkpoint from before the ``fused`` option existed must still load.
    for group in saved["param_groups"]:
        del group["fused"]
    resumed_params = clone_params(params)
    resumed = FOAM(resumed_params, block_size=3, fused=True, **SCALED)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["fused"] is True  # this optimizer's own choice, kept by load_state_dict
    run(opt, params, grads[5:])
    run(resumed, resumed_params, grads[5:])
    assert_same_state(opt, resumed)


@pytest.fixture
def broken_build(monkeypatch, tmp_path):
    """Simulate a machine where the extension cannot be built (no compiler): load raises, over an empty cache."""

    def fail(**kwargs):
        raise RuntimeError("simulated: no C++ compiler")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr("torch.utils.cpp_extension.load", fail)
    for name, value in (("_tried", False), ("_kernel", None), ("_error", None)):
        monkeypatch.setattr(_fused_cpu, name, value)


def test_build_failure_warns_once_and_falls_back(broken_build, caplog):
    params = simd_params(torch.float32)
    ours, theirs = clone_params(params), clone_params(params)
    with caplog.at_level(logging.WARNING, logger=_fused_cpu.__name__):
        opt = FOAM(ours, block_size=4, **SCALED)  # fused=None
        run(opt, ours, grad_sequence(params, 3))
    warnings = [r for r in caplog.records if "could not be built" in r.getMessage()]
    assert len(warnings) == 1 and "simulated: no C++ compiler" in warnings[0].getMessage()
    reference = FOAM(theirs, block_size=4, foreach=False, **SCALED)
    run(reference, theirs, grad_sequence(params, 3))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)  # the fallback is the for-loop path itself
    with pytest.raises(RuntimeError, match="fused CPU kernel could not be built: RuntimeError: simulated"):
        FOAM(clone_params(params), fused=True)


def test_fused_does_not_touch_grads(kernel):
    params = simd_params(torch.bfloat16)
    opt = FOAM(params, block_size=4, fused=True, **SCALED)
    grads = grad_sequence(params, 1)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    before = copy.deepcopy([p.grad for p in params])
    opt.step()
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)


def test_fp32_gradients_of_16_bit_parameters_step_unrounded():
    """A gradient of another dtype than its bf16/fp16 parameter (FSDP2 reduce_dtype=float32) is not rounded to
    the parameter's dtype, as the kernel would: that tensor steps exactly as on the readable path, the others
    of the group on the kernel. The Triton kernels do the same (tests/test_fused_triton.py)."""
    gen = torch.Generator().manual_seed(5)
    # (parameter, gradient) dtypes. The other 16-bit format is no wider but rounds too, and a bf16 gradient past
    # fp16's 65504 (the 1e5 below) became inf in the kernel's fp16 copy: each of those steps on the readable path.
    dtypes = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
    dtypes += [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16), (torch.bfloat16, torch.bfloat16)]
    magnitudes = [1e-2, 1e-2, 1e5, 1e-2, 1e-2]
    start = [torch.randn(6, 16, generator=gen).to(p) for p, _ in dtypes]
    states = {name: ([w.clone() for w in start], [], [], []) for name in ("fused", "readable")}
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, block_size=4, scale=1.0)
    hyper |= dict(res_scale=1.0, second_moment="mean_sq")
    for params, avgs, avg_sqs, steps in states.values():
        avgs += [torch.zeros(6, 4) for _ in params]
        avg_sqs += [torch.zeros(6, 4) for _ in params]
        steps += [torch.tensor(0.0) for _ in params]
    for _ in range(3):
        grads = [(torch.randn(6, 16, generator=gen) * size).to(g) for (_, g), size in zip(dtypes, magnitudes)]
        for name, (params, avgs, avg_sqs, steps) in states.items():
            paths = dict(fused=True) if name == "fused" else dict(fused=False, foreach=False)
            foam(params, [g.clone() for g in grads], avgs, avg_sqs, steps, **hyper, **paths)
    fused, readable = states["fused"], states["readable"]
    for i in range(4):  # the gradients of another dtype: the readable path's bits, all finite
        assert torch.equal(fused[0][i], readable[0][i]) and torch.equal(fused[1][i], readable[1][i]), dtypes[i]
        assert fused[0][i].isfinite().all(), dtypes[i]
    # the bf16 gradient took the kernel: within the kernel's bf16 tolerance of the readable path
    torch.testing.assert_close(fused[0][4].float(), readable[0][4].float(), atol=1e-6, rtol=2**-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_a_block_far_wider_than_its_rows_takes_buffers_of_the_row_not_of_the_block(kernel, dtype):
    # B >= n is one block per row. The kernel's tile buffers were sized 4 * B entries whatever the row length:
    # 2**40 asked for 16 Ti entries (std::bad_alloc); 2**24 took half a GB and half a second per step.
    params = make_params([(16, 40)], dtype)
    ours, theirs = clone_params(params), clone_params(params)
    fused = FOAM(ours, block_size=2**40, fused=True, **SCALED)
    reference = FOAM(theirs, block_size=2**40, foreach=False, fused=False, **SCALED)
    grads = grad_sequence(params, 3)
    run(fused, ours, grads)
    run(reference, theirs, grads)
    assert fused.state[ours[0]]["exp_avg"].shape == (16, 1)
    torch.testing.assert_close(ours[0].detach(), theirs[0].detach(), atol=1e-6, rtol=1e-5)
