"""Each implementation of the fused CPU kernel (portable, AVX2, AVX-512: those this CPU runs) against the
readable path, over every block size 1..33, ragged last blocks, fp32/bf16/fp16/fp64 parameters, both state
dtypes and both second-moment modes; and the in-kernel stochastic rounding of bf16 states against
``foam_hf.precision.store_moment``, bit for bit.

Nothing here depends on the CPU's instruction set: a path the CPU cannot run is skipped with that reason, and
the portable path runs everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _helpers import (
    HPARAMS,
    _fused_cpu,
    _store_moment,
    clone_params,
    fused_step_results,
    grad_sequence,
    make_params,
    run,
    zero_res_scale_step,
)

from foam_hf import FOAM, FoamConfigError

BLOCK_SIZES = list(range(1, 34))
MODES = ["mean_sq", "sq_mean"]
# Every term on: scale != 1, weight decay, a residual weight that is neither 0 nor 1, and a beta2 low enough
# that the second moment moves within the few steps we run.
EVERY_TERM = HPARAMS["every_term"]
STEPS = 3  # the bias corrections and the moments' history both enter from the second step on

# (dtype, weight atol, weight rtol). fp32: the kernel moves eps inside the square root's scale and sums blocks
# in another order, ~1 ulp per step. bf16/fp16: each step's fp32 result may round to the neighbouring value,
# one ulp (2^-8 / 2^-11 relative) per step: bf16 2^-7 as in test_fused.py; fp16 4 ulps (2^-9) for the STEPS,
# and 2e-5 absolute for weights near zero, where 0.005 has an fp16 spacing of 4e-6. fp64: the fp32 reordering,
# in double.
PARAM_DTYPES = {
    "fp32": (torch.float32, 1e-6, 1e-5),
    "bf16": (torch.bfloat16, 1e-6, 2**-7),
    "fp16": (torch.float16, 2e-5, 2**-9),
    "fp64": (torch.float64, 1e-13, 1e-12),
}


def shapes_for(block_size: int) -> list[tuple[int, ...]]:
    """Widths that give the SIMD code whole chunks of 8 blocks plus a ragged tail, a single ragged block,
    n < B, a width past one moment tile (512 blocks) and a 3-D tensor; plus a 1-D tensor (never folded)."""
    b = block_size
    return [(3, 16 * b + b // 2 + 1), (2, 8 * b), (2, max(1, b - 1)), (2, 3, 9 * b + 1), (1, 513 * b + 3), (37,)]


@pytest.mark.parametrize("param_dtype", list(PARAM_DTYPES), ids=list(PARAM_DTYPES))
@pytest.mark.parametrize("second_moment", MODES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_fp32_states_match_the_readable_path(isa, block_size, second_moment, param_dtype):
    dtype, atol, rtol = PARAM_DTYPES[param_dtype]
    params = make_params(shapes_for(block_size), dtype)
    ours, theirs = clone_params(params), clone_params(params)
    kwargs = dict(block_size=block_size, second_moment=second_moment, **EVERY_TERM)
    fused = FOAM(ours, fused=True, **kwargs)
    reference = FOAM(theirs, foreach=False, fused=False, **kwargs)
    grads = grad_sequence(params, STEPS)
    run(fused, ours, grads)
    run(reference, theirs, grads)
    state_tol = dict(atol=1e-15, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-7, rtol=1e-5)
    for a, b in zip(ours, theirs):
        assert a.dtype == dtype
        torch.testing.assert_close(a.detach().double(), b.detach().double(), atol=atol, rtol=rtol)
        for key in ("exp_avg", "exp_avg_sq"):
            ours_state, ref_state = fused.state[a][key], reference.state[b][key]
            assert ours_state.dtype == ref_state.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert ours_state.shape == ref_state.shape
            torch.testing.assert_close(ours_state, ref_state, **state_tol)
        assert fused.state[a]["step"].item() == STEPS


@pytest.mark.parametrize("param_dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("second_moment", MODES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_bf16_states_are_the_fp32_step_stochastically_rounded(isa, block_size, second_moment, param_dtype):
    """With bf16 states the kernel steps fp32 copies of the moments and rounds them back itself. From the same
    moments, one step must give the weights of the fp32-state step and exactly ``_store_moment`` of its
    moments, bit for bit (the rounding's dither depends on each entry's flat index and on the step)."""
    dtype = PARAM_DTYPES[param_dtype][0]
    params = make_params(shapes_for(block_size), dtype)
    bf16_params, fp32_params = clone_params(params), clone_params(params)
    kwargs = dict(block_size=block_size, second_moment=second_moment, fused=True, **EVERY_TERM)
    bf16 = FOAM(bf16_params, state_dtype="bfloat16", **kwargs)
    fp32 = FOAM(fp32_params, state_dtype="float32", **kwargs)
    for step, grads in enumerate(grad_sequence(params, STEPS), start=1):
        if step > 1:  # start the fp32 twin from the bf16 moments (exact: bf16 widens to fp32 exactly)
            for a, b in zip(bf16_params, fp32_params):
                for key in ("exp_avg", "exp_avg_sq"):
                    fp32.state[b][key].copy_(bf16.state[a][key])
        run(bf16, bf16_params, [grads])
        run(fp32, fp32_params, [grads])
        for a, b in zip(bf16_params, fp32_params):
            assert torch.equal(a, b)
            for salt, key in enumerate(("exp_avg", "exp_avg_sq")):
                stored = bf16.state[a][key]
                assert stored.dtype == torch.bfloat16
                expected = torch.empty_like(stored)
                _store_moment(expected, fp32.state[b][key].clone(), step, salt)
                assert torch.equal(stored.view(torch.int16), expected.view(torch.int16)), (key, step)


def test_bf16_states_round_non_finite_moments_as_the_python_paths(kernel):
    """A gradient of inf/NaN makes non-finite moments: they keep their class (NaN, ±inf) as _store_moment does."""
    weight = torch.zeros(4, 64, requires_grad=True)
    optimizer = FOAM([weight], block_size=4, fused=True, state_dtype="bfloat16")
    grad = torch.randn(4, 64)
    grad[0, 5], grad[1, 9], grad[2, 0] = float("inf"), float("-inf"), float("nan")
    weight.grad = grad
    optimizer.step()
    twin = torch.zeros(4, 64, requires_grad=True)
    reference = FOAM([twin], block_size=4, foreach=False, fused=False, state_dtype="bfloat16")
    twin.grad = grad.clone()
    reference.step()
    for key in ("exp_avg", "exp_avg_sq"):
        ours, theirs = optimizer.state[weight][key].float(), reference.state[twin][key].float()
        assert ours.isnan().any() and ours.isinf().any()  # the gradient above reaches both classes
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(ours), kind(theirs)), (key, kind.__name__)
    assert torch.equal(weight.isnan(), twin.isnan())


def test_each_implementation_rounds_every_class_of_value_as_store_moment(isa, kernel):
    """The whole-tensor rounding entry point uses the implementation's own rounding (explicit SIMD on AVX2): bit
    for bit _store_moment on normals, denormals, signed zeros, the largest finites and ±inf, and every NaN (any
    sign or payload) becomes 0x7FC0, the kernel's rule. Lengths leave every remainder of the 8- and 16-entry
    vectors; specials every 5th entry put one in every vector, every 23rd leave some vectors all finite (the
    SIMD code takes a shortcut for those)."""
    gen = torch.Generator().manual_seed(3)
    nans = torch.tensor([0x7FC00000, 0x7FFFFFFF, -0x00400000, -1, 0x7F800001], dtype=torch.int32).view(torch.float32)
    specials = torch.cat([torch.tensor([0.0, -0.0, 3.4e38, -3.4e38, float("inf"), float("-inf")]), nans])
    for length, every in [(1, 5), (7, 5), (8, 5), (9, 5), (16, 5), (33, 5), (517, 5), (517, 23)]:
        values = torch.randn(length, generator=gen) * torch.logspace(-42, 38, length)  # denormals to near-max
        values[::every] = specials[torch.arange(0, length, every) % len(specials)]
        for step, salt in [(1, 0), (9, 1), (2**33 + 5, 1)]:  # a step past 2**32 wraps the same way
            expected = torch.empty(length, dtype=torch.bfloat16)
            actual = torch.empty(length, dtype=torch.bfloat16)
            _store_moment(expected, values.clone(), step, salt)
            kernel.stochastic_round_bf16(values, actual, step, salt)
            nan = values.isnan()
            assert torch.equal(actual.isnan(), nan), (isa, length)
            assert (actual[nan].view(torch.int16) == 0x7FC0).all(), (isa, length)
            assert torch.equal(actual[~nan].view(torch.int16), expected[~nan].view(torch.int16)), (isa, length, step)


def test_fp64_fused_steps_as_the_readable_path(kernel):
    """torch's fused AdamW steps float64 on CPU; so does FOAM's kernel (it used to refuse fused=True)."""
    params = make_params([(5, 33), (2, 3, 8), (7,)], torch.float64)
    ours, theirs = clone_params(params), clone_params(params)
    fused = FOAM(ours, block_size=4, fused=True, **EVERY_TERM)
    reference = FOAM(theirs, block_size=4, foreach=False, fused=False, **EVERY_TERM)
    grads = grad_sequence(params, 4)
    run(fused, ours, grads)
    run(reference, theirs, grads)
    for a, b in zip(ours, theirs):
        assert fused.state[a]["exp_avg"].dtype == torch.float64
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-12)


def test_fp64_with_other_state_dtypes_is_left_to_the_for_loop_by_default(kernel, monkeypatch):
    # fused=True on the same input is refused: tests/_helpers.py PARAM_ERROR_INPUTS, "fused=True on a float64 ...".
    weight = torch.zeros(4, 8, dtype=torch.float64, requires_grad=True)
    calls = []
    original = _fused_cpu._fused_foam
    monkeypatch.setattr(_fused_cpu, "_fused_foam", lambda *a, **k: calls.append(1) or original(*a, **k))
    default = FOAM([weight], state_dtype="bfloat16")  # fused=None: the for-loop path steps it
    weight.grad = torch.ones_like(weight)
    default.step()
    assert calls == []
    assert default.state[weight]["exp_avg"].dtype == torch.bfloat16


# What the portable code steps at every instruction set: fp64 parameters (float64 states) at any block size and
# unfolded, and the other dtypes' folded tensors at block sizes the SIMD code has no code for (odd ones; 33 is no
# multiple of a vector either). Their unfolded tensors take the SIMD code's AdamW.
PORTABLE_AT_EVERY_ISA = [
    (torch.float64, 1, None, "nearest"),
    (torch.float64, 4, None, "nearest"),
    (torch.float64, 5, None, "nearest"),
    (torch.float64, 32, None, "nearest"),
    (torch.float32, 3, "float32", "nearest"),
    (torch.float32, 33, "bfloat16", "nearest"),
    (torch.float16, 7, "float32", "nearest"),
    (torch.bfloat16, 5, "float32", "nearest"),
    (torch.bfloat16, 5, "float32", "stochastic"),
    (torch.bfloat16, 3, "bfloat16", "stochastic"),
]


@pytest.mark.parametrize(
    "dtype, block_size, state_dtype, weight_rounding",
    PORTABLE_AT_EVERY_ISA,
    ids=[f"{str(d)[6:]}-B{b}-{s}-{r}" for d, b, s, r in PORTABLE_AT_EVERY_ISA],
)
@pytest.mark.parametrize("second_moment", MODES)
def test_each_build_of_the_portable_code_steps_as_the_baseline_build(
    kernel, dtype, block_size, state_dtype, weight_rounding, second_moment
):
    """The portable code is compiled once per instruction set, and the instruction set chosen (FOAM_CPU_ISA, or
    the CPU's best) picks its build, so that an AVX2 CPU's step can be run on an AVX-512 one. The builds must
    compute the same values: the same sums in the same order and no FMA contraction, whatever the vector width.
    Each build this CPU runs is held to the baseline (``portable``) build's weights and moments, bit for bit."""
    isas = kernel.available_isas()
    if len(isas) == 1:
        pytest.skip(f"this CPU runs only the {isas[0]} build of the portable code")
    # rows of one ragged tile, 3-D, and of two full tiles (1024 columns each) and a ragged part of one
    shapes = [(3, 16 * block_size + 3), (2, 3, 9 * block_size + 1), (1, 2048 + 3 * block_size + 1)]
    params = make_params(shapes + [(37,)] if dtype == torch.float64 else shapes, dtype)
    grads = grad_sequence(params, STEPS)
    default = kernel.isa()
    results = {}
    options = dict(block_size=block_size, state_dtype=state_dtype, weight_rounding=weight_rounding)
    try:
        for name in isas:
            kernel.set_isa(name)
            results[name] = fused_step_results(params, grads, second_moment=second_moment, **options, **EVERY_TERM)
    finally:
        kernel.set_isa(default)
    for name in isas[1:]:
        for index, (a, b) in enumerate(zip(results["portable"], results[name])):
            # index // 3: the parameter; index % 3: its weight, exp_avg, exp_avg_sq
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (name, index // 3, index % 3)


@pytest.mark.parametrize("block_size", [2, 4, 8, 16, 32, 5])
def test_bf16_weights_round_special_values_as_torch(isa, block_size):
    """bf16 weights are widened and rounded back by the kernel's own code (two vectors at a time, by column
    parity, on the SIMD paths). Weights that are NaN, ±inf, ±0, subnormal or the largest finite values must come
    out of a step as from the readable path, which rounds through torch: NaN where it has NaN, ±inf and the
    largest values bit for bit (a step cannot move them by a bf16 ulp), the rest within the bf16 tolerance. The
    kernel's NaNs are all 0x7FC0, c10::BFloat16's rounding of a NaN (torch's vectorised bf16 arithmetic keeps
    other NaN payloads, so the readable path's NaN bits are not compared)."""
    torch.manual_seed(block_size)
    huge = [float("inf"), -float("inf"), 3.3e38, -3.3e38]
    specials = torch.tensor([0.0, *huge, 1e-39, -1e-39, 0.0, -0.0]).to(torch.bfloat16)
    specials.view(torch.int16)[0] = -1  # a NaN whose rounding would carry into the sign: 0xFFFF
    nans = torch.tensor([0x7FC0, 0x7FFF, -64], dtype=torch.int16).view(torch.bfloat16)  # 0xFFC0: a negative NaN
    specials = torch.cat([specials, nans])
    weight = torch.randn(4, 16 * block_size + 3).to(torch.bfloat16)
    where = torch.randperm(weight.numel())[: 10 * len(specials)]
    weight.view(-1)[where] = specials.repeat(10)
    grad = (torch.randn(weight.shape) * 1e-3).to(torch.bfloat16)
    ours, theirs = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    for p, fused in ((ours, True), (theirs, False)):
        p.grad = grad.clone()
        FOAM([p], lr=1e-2, weight_decay=0.1, block_size=block_size, fused=fused, foreach=False).step()
    a, b = ours.detach(), theirs.detach()
    assert torch.equal(a.isnan(), b.isnan()) and a.isnan().any()
    assert set(a.view(torch.int16)[a.isnan()].tolist()) == {0x7FC0}
    was_huge = torch.isin(weight.float(), torch.tensor(huge).to(torch.bfloat16).float()) & ~a.isnan()
    assert was_huge.sum() > 0
    assert torch.equal(a[was_huge].view(torch.int16), b[was_huge].view(torch.int16))
    torch.testing.assert_close(a[~a.isnan()].float(), b[~b.isnan()].float(), atol=1e-6, rtol=2**-7)


def round_to_nearest_even_bf16(values: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 bits from the definition: keep the upper 16 bits, add one where the dropped lower 16 are more
    than half (0x8000), or exactly half and the kept bits odd; NaN becomes 0x7FC0 (the kernel's rule)."""
    bits = values.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    upper, lower = bits >> 16, bits & 0xFFFF
    up = (lower > 0x8000) | ((lower == 0x8000) & (upper % 2 == 1))
    rounded = torch.where(values.isnan(), torch.full_like(upper, 0x7FC0), upper + up.to(torch.int64))
    return rounded.to(torch.int32).to(torch.int16)  # the low 16 bits, as torch stores bf16


def test_bf16_weight_stores_round_to_nearest_even(isa, kernel):
    """Both bf16 weight stores of each implementation (the SIMD paths' pairs split by column parity, and their
    lane-wise store) against round-to-nearest-even written from its definition, bit for bit: every exponent,
    ties both ways, the carries into the exponent and into infinity, subnormals, ±0, ±inf and NaNs of any sign
    and payload. Lengths give the pair path, the lane-wise path and the scalar tail."""
    gen = torch.Generator().manual_seed(11)
    random_bits = torch.randint(-(2**31), 2**31, (4096,), generator=gen, dtype=torch.int64)
    upper = torch.randint(0, 2**16, (512,), generator=gen, dtype=torch.int64)
    lower = torch.tensor([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF]).repeat(512 // 6 + 1)[:512]
    ties = (upper << 16) | lower
    edges = torch.tensor(
        [
            0x7F7F8000,
            0x7F7F7FFF,
            0x7F7FFFFF,
            0xFF7F8000,
            0x3F80FFFF,
            0x3F818000,
            0x00008000,
            0x00018000,
            0x007FFFFF,
            0x80000001,
            0x00000000,
            0x80000000,
            0x7F800000,
            0xFF800000,
            0x7FC00000,
            0x7FFFFFFF,
            0xFFC00000,
            0xFFFFFFFF,
            0x7F800001,
        ],
        dtype=torch.int64,
    )
    all_bits = torch.cat([random_bits & 0xFFFFFFFF, ties, edges])
    values = torch.where(all_bits >= 2**31, all_bits - 2**32, all_bits).to(torch.int32).view(torch.float32)
    values = values[torch.randperm(len(values), generator=gen)]
    for length in (1, 7, 16, 17, 31, 32, 33, 48, 63, 64, 65, len(values)):
        src = values[:length].contiguous()
        actual = torch.empty(length, dtype=torch.bfloat16)
        kernel.round_bf16_nearest(src, actual)
        expected = round_to_nearest_even_bf16(src)
        assert torch.equal(actual.view(torch.int16), expected), (isa, length)
    finite = values[values.isfinite()]
    assert torch.equal(round_to_nearest_even_bf16(finite), finite.to(torch.bfloat16).view(torch.int16))


def test_isa_environment_variable_picks_the_implementation(kernel, monkeypatch):
    default = kernel.isa()
    try:
        for name in kernel.available_isas():
            monkeypatch.setenv(_fused_cpu.ISA_ENV, name)
            _fused_cpu._apply_isa_env(kernel)
            assert kernel.isa() == name
        monkeypatch.setenv(_fused_cpu.ISA_ENV, "sse9")
        with pytest.raises(FoamConfigError, match="FOAM_CPU_ISA='sse9' is not an implementation.*avx512. Fix"):
            _fused_cpu._apply_isa_env(kernel)
        # A real name this CPU cannot run (an AVX2-only CPU asked for avx512), whatever CPU runs the test:
        monkeypatch.setattr(kernel, "available_isas", lambda: ["portable"])
        monkeypatch.setenv(_fused_cpu.ISA_ENV, "avx2")
        with pytest.raises(FoamConfigError, match="FOAM_CPU_ISA='avx2' names .* this CPU cannot run .*portable.*Fix"):
            _fused_cpu._apply_isa_env(kernel)
    finally:
        kernel.set_isa(default)


def test_a_misspelt_isa_fails_when_foam_is_built_not_at_the_first_step(monkeypatch):
    # It was read only at the first CPU step: construction passed and the first step raised, with foreach=False
    # never at all. A name that is no implementation is refused by FOAM(...) on any path.
    monkeypatch.setenv(_fused_cpu.ISA_ENV, "avx-512")
    for path in ({}, {"foreach": False}, {"fused": True}):
        with pytest.raises(FoamConfigError, match="FOAM_CPU_ISA='avx-512' is not an implementation"):
            FOAM([torch.zeros(4, 8, requires_grad=True)], **path)


def test_an_isa_this_cpu_cannot_run_is_refused_at_every_fused_step(kernel):
    # Refused once and then ignored used to be the behaviour: the second optimizer ran the best implementation.
    code = (
        "import torch\nfrom foam_hf import FOAM, FoamConfigError\n"
        "for attempt in range(2):\n"
        "    try:\n"
        "        FOAM([torch.zeros(4, 8, requires_grad=True)], fused=True)\n"
        "        print('accepted')\n"
        "    except FoamConfigError as error:\n"
        "        print('refused', 'FOAM_CPU_ISA' in str(error))\n"
    )
    env = {**os.environ, _fused_cpu.ISA_ENV: "sse9"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["refused True", "refused True"]


def test_isa_environment_variable_reaches_a_fresh_process(kernel):
    # The kernel is cached by torch, so the child only loads it.
    code = f"import importlib; print(importlib.import_module({_fused_cpu.__name__!r}).load_kernel().isa())"
    env = {**os.environ, _fused_cpu.ISA_ENV: "portable"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "portable"


# Shares of the one parallel region: tensors over 32768 entries are cut between the threads (rows when folded,
# elements when not), smaller ones go whole to one thread. Sizes that cut unevenly, on both sides of that size.
SHARED_SHAPES = [(257, 301), (3, 40000), (70001,), (8, 100), (5,), (129, 257), (40, 1000), (33000,)]


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [1, 4, 5])
def test_threads_step_the_list_exactly_as_one_thread(isa, block_size, state_dtype):
    """The step of a list of tensors, large and small, folded and not, on two threads and on four (more than
    the rows of some tensors), is bit for bit the step on one thread, which is held to the readable path."""
    params = make_params(SHARED_SHAPES, torch.float32)
    runs = {}
    threads_before = torch.get_num_threads()
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            ours = clone_params(params)
            fused = FOAM(ours, fused=True, block_size=block_size, state_dtype=state_dtype, **EVERY_TERM)
            run(fused, ours, grad_sequence(params, STEPS))
            runs[threads] = (ours, fused)
    finally:
        torch.set_num_threads(threads_before)
    one, one_opt = runs[1]
    for threads in (2, 4):
        many, many_opt = runs[threads]
        for a, b in zip(one, many):
            assert torch.equal(a, b), (threads, tuple(a.shape))
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(one_opt.state[a][key], many_opt.state[b][key]), (threads, key)
    if state_dtype == "float32":  # bf16 states: the bf16-state test above holds them to the fp32 step
        theirs = clone_params(params)
        reference = FOAM(theirs, foreach=False, fused=False, block_size=block_size, **EVERY_TERM)
        run(reference, theirs, grad_sequence(params, STEPS))
        for a, b in zip(one, theirs):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_failed_check_changes_nothing(kernel):
    """The kernel checks every tensor of the list before it changes any: a bad last tensor leaves the good
    ones' weights, moments and step counts as they were."""
    good, bad = torch.randn(4, 16), torch.randn(4, 16)
    moments = [torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 3), torch.zeros(4, 3)]  # bad: 3 blocks, not 4
    steps = [torch.zeros(()), torch.zeros(())]
    before = good.clone()
    # lr, betas, eps, weight decay, B, scale, rho, mean_sq, stochastic weights
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.0, 4, 1.0, 1.0, True, False)
    with pytest.raises(RuntimeError, match=r"moments of params\[1\] hold 12 entries, expected 16"):
        kernel.fused_step([good, bad], [torch.ones(4, 16)] * 2, moments[0::2], moments[1::2], steps, *hyper)
    assert torch.equal(good, before)
    assert all(torch.equal(m, torch.zeros_like(m)) for m in moments)
    assert [s.item() for s in steps] == [0.0, 0.0]


@pytest.mark.parametrize("second_moment", MODES)
def test_zero_res_scale_drops_a_residual_whose_square_overflows(isa, second_moment):
    """tests/test_nonfinite.py's case on each implementation of the kernel: with res_scale=0 no ρ²·R⊙R term may
    turn an overflowing R⊙R into NaN."""
    stepped, expected = zero_res_scale_step("fused", second_moment)
    assert torch.isfinite(stepped).all()
    torch.testing.assert_close(stepped, expected, atol=1e-6, rtol=1e-6)


def fp64_block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """The mean of each run of ``block_size`` entries of each row (the last one ragged), in fp64, block by block."""
    n = x.shape[-1]
    columns = [x[:, c : c + block_size].double().mean(dim=-1) for c in range(0, n, block_size)]
    return torch.stack(columns, dim=-1)


@pytest.mark.parametrize("gradient", ["near 0.1", "all 0.1"])
@pytest.mark.parametrize("block_size", [1000, 3000, 4096, 65536, 100000])
def test_wide_block_means_are_within_1e_6_of_fp64(isa, block_size, gradient):
    # Each block's entries were added left to right (the SIMD code: each lane's): the mean of 65536 fp32 values
    # of 0.1 came out 6e-4 off relative (4e-5 on the SIMD code), torch's sum 2e-7. After one step from zero
    # moments, m̃ = (1-β1)·g̃ and ṽ = (1-β2)·blockmean(G⊙G), each one rounding away from its fp64 value.
    torch.manual_seed(0)
    n = 65536
    g = torch.full((2, n), 0.1) if gradient == "all 0.1" else 0.1 + 0.01 * torch.randn(2, n)
    param = torch.nn.Parameter(torch.zeros(2, n))
    param.grad = g.clone()
    optimizer = FOAM([param], fused=True, block_size=block_size, betas=(0.9, 0.999))
    optimizer.step()
    state = optimizer.state[param]
    for moment, expected in (("exp_avg", 0.1 * fp64_block_means(g, block_size)),
                             ("exp_avg_sq", 0.001 * fp64_block_means(g.double() ** 2, block_size))):  # fmt: skip
        error = ((state[moment].double() - expected).abs() / expected.abs()).max().item()
        assert error < 1e-6, (moment, error)


def test_a_block_size_past_every_row_steps_as_the_readable_path(kernel):
    # ceil(n / B) was computed as (n + B - 1) / B in int64: a block_size near 2**63 overflowed, and the step
    # failed ("moments ... hold 3 entries, expected 0"). A block wider than its row is the row.
    params = make_params([(3, 10), (2, 7)])
    ours, theirs = clone_params(params), clone_params(params)
    fused = FOAM(ours, fused=True, block_size=2**63 - 1, **EVERY_TERM)
    reference = FOAM(theirs, fused=False, foreach=False, block_size=2**63 - 1, **EVERY_TERM)
    grads = grad_sequence(params, STEPS)
    run(fused, ours, grads)
    run(reference, theirs, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert fused.state[a]["exp_avg"].shape == (a.shape[0], 1)
