"""The Triton kernels of the CUDA fused path against the readable path, run in Triton's interpreter on CPU.

``TRITON_INTERPRET=1`` executes the ``@triton.jit`` kernels as NumPy code on CPU tensors, so their indexing,
masking, block means, moments and update are checked here, on every machine with Triton installed (the
``dev`` extra installs it); their speed and their compiled form on a GPU are not (docs/benchmarks.md says
what was measured where). The interpreter must be on before Triton is first imported: tests/conftest.py
sets it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys

import _helpers
import pytest
import torch
from _helpers import _single_tensor_foam, _store_moment

from foam_hf import FOAM
from foam_hf.folding import folded_shape, is_foldable
from foam_hf.precision import store_weight

fused_triton = _helpers._fused_triton  # imported only now: after tests/conftest.py set TRITON_INTERPRET
# The shapes and hyper-parameters of the fused CPU kernel's tests (tests/test_fused.py).
SHAPES = _helpers.SHAPES["simd"]
SCALED = _helpers.HPARAMS["scaled"]

# tests/conftest.py turns the interpreter on before anything imports Triton; without it these tests would run
# nothing they claim to.
assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py must set TRITON_INTERPRET=1"

# Every block size the kernel treats alike (powers of two), one it pads (3: a 4-lane tile with a masked lane),
# 1 (the AdamW kernel) and one wider than most rows here (32: a single, ragged block per row).
BLOCK_SIZES = [1, 2, 3, 4, 8, 32]
STEPS = 4  # bias corrections and the moments' history both matter after a few steps
# (dtype, weight atol, weight rtol): as tests/test_fused.py. fp32: a different summation order of the block
# means (a tree in Triton) and ε moved inside one division, ~1 ulp per step. bf16 and fp16: neighbouring values.
DTYPES = [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-6, 2**-7), (torch.float16, 1e-6, 2**-10)]


@pytest.fixture(params=["own launches", "shared launches"], autouse=True)
def launch(request, monkeypatch):
    """Every test here runs with each tensor in a launch of its own, and with the small tensors sharing launches
    (the default: every shape here is small)."""
    if request.param == "own launches":
        monkeypatch.setattr(fused_triton, "_SHARED_MAX_ENTRIES", 0)
    return request.param


def fresh_state(params, block_size, state_dtype=torch.float32):
    exp_avgs = [
        torch.zeros(folded_shape(p.shape, block_size) if is_foldable(p, block_size) else p.shape, dtype=state_dtype)
        for p in params
    ]
    return exp_avgs, [torch.zeros_like(m) for m in exp_avgs], [torch.tensor(0.0) for _ in params]


def step_kwargs(block_size, second_moment="mean_sq", res_scale=1.0, hparams=SCALED, weight_rounding="nearest"):
    betas = hparams["betas"]
    return dict(
        lr=hparams["lr"],
        beta1=betas[0],
        beta2=betas[1],
        eps=hparams["eps"],
        weight_decay=hparams["weight_decay"],
        block_size=block_size,
        scale=hparams["scale"],
        res_scale=res_scale,
        second_moment=second_moment,
        weight_rounding=weight_rounding,
    )


def run_both(
    block_size, second_moment, res_scale, dtype, hparams=SCALED, state_dtype=torch.float32, weight_rounding="nearest"
):
    gen = torch.Generator().manual_seed(0)
    reference = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    triton = [p.clone() for p in reference]
    state_ref = fresh_state(reference, block_size, state_dtype)
    state_triton = fresh_state(triton, block_size, state_dtype)
    kwargs = step_kwargs(block_size, second_moment, res_scale, hparams, weight_rounding)
    for _ in range(STEPS):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
        _single_tensor_foam(reference, grads, *state_ref, **kwargs)
        fused_triton._fused_foam_triton(triton, grads, *state_triton, **kwargs)
    return reference, triton, state_ref, state_triton


@pytest.mark.parametrize("second_moment", ["mean_sq", "sq_mean"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_triton_matches_single_tensor_fp32(block_size, second_moment):
    reference, triton, state_ref, state_triton = run_both(block_size, second_moment, 0.5, torch.float32)
    for p, q in zip(reference, triton):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)
    for expected, actual in zip(state_ref[0] + state_ref[1], state_triton[0] + state_triton[1]):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    assert [s.item() for s in state_triton[2]] == [float(STEPS)] * len(SHAPES)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("res_scale", [0.0, 1.0])
@pytest.mark.parametrize("block_size", [3, 4])
def test_triton_residual_scales_and_dtypes(block_size, res_scale, dtype, atol, rtol):
    reference, triton, _, _ = run_both(block_size, "mean_sq", res_scale, dtype)
    for p, q in zip(reference, triton):
        assert q.dtype == dtype
        torch.testing.assert_close(q.float(), p.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("second_moment", ["mean_sq", "sq_mean"])
def test_triton_zero_res_scale_drops_a_residual_whose_square_overflows(second_moment):
    """As tests/test_nonfinite.py on the CPU paths: with res_scale=0 no ρ²·R⊙R term may turn an overflowing R⊙R
    (a finite gradient) into NaN weights."""
    hparams = _helpers.HPARAMS["decay"]
    start = torch.randn(1, 8, generator=torch.Generator().manual_seed(3))
    param, grad = start.clone(), torch.tensor(_helpers.OVERFLOWING_RESIDUAL)
    kwargs = step_kwargs(4, second_moment, 0.0, dict(hparams, scale=1.0))
    fused_triton._fused_foam_triton([param], [grad], *fresh_state([param], 4), **kwargs)
    expected = _helpers.step_without_residual(start, grad, second_moment, hparams)
    assert torch.isfinite(param).all()
    torch.testing.assert_close(param, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("limit", ["_MAX_GRID_Y", "_MAX_INT32_COLUMN", "_MAX_GRID_X"])
def test_triton_tensors_a_launch_grid_cannot_cover_take_the_looping_kernel(monkeypatch, launch, limit):
    # A CUDA grid's second dimension, the folded kernel's tiles per row, holds at most 65535 (rows of over ~134M
    # entries at B=4), its first 2**31 - 1 rows, and the kernel's int32 columns reach 2**31 (blocks wider than a
    # tile reach it within the grid): such a tensor steps in the shared kernel, whose programs loop over their
    # tiles with int64 indices. Each limit is shrunk here to what the (3, 8192) weight passes and the (2, 1024) one
    # does not: 2 tiles (KB = 512 blocks of 4: rows of 8192 entries are 4 tiles), columns 4096, 2 rows.
    monkeypatch.setattr(fused_triton, limit, dict(_MAX_GRID_Y=2, _MAX_INT32_COLUMN=4096, _MAX_GRID_X=2)[limit])
    shared = []
    real_shared = fused_triton._launch_shared
    monkeypatch.setattr(
        fused_triton,
        "_launch_shared",
        lambda members, *args: shared.append(len(members)) or real_shared(members, *args),
    )
    gen = torch.Generator().manual_seed(3)
    reference = [torch.randn(3, 8192, generator=gen), torch.randn(2, 1024, generator=gen)]  # 4 tiles, and 1
    triton = [p.clone() for p in reference]
    state_ref, state_triton = fresh_state(reference, 4), fresh_state(triton, 4)
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=gen) for p in reference]
        _single_tensor_foam(reference, grads, *state_ref, **step_kwargs(4))
        fused_triton._fused_foam_triton(triton, grads, *state_triton, **step_kwargs(4))
    for p, q in zip(reference, triton):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)
    # own launches: the long rows' tensor alone in a shared launch, the short one in its own; else both share one
    assert shared == ([1, 1] if launch == "own launches" else [2, 2])


def test_triton_large_lerp_weight_uses_torchs_other_branch():
    # beta1 < 0.5 makes 1 - beta1 > 0.5: torch.lerp then computes end - (end - start)(1 - w); so must the kernel.
    hparams = dict(SCALED, betas=(0.3, 0.99))
    reference, triton, state_ref, state_triton = run_both(4, "mean_sq", 1.0, torch.float32, hparams)
    for p, q in zip(reference, triton):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)
    for expected, actual in zip(state_ref[0], state_triton[0]):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


# The interpreter is slow (~10 s a case on a loaded 2-core machine): the AdamW kernel (1), a padded tile (3), a
# single ragged block per row (32), and bf16 parameters at the default B=4.
BF16_STATE_CASES = [(1, *DTYPES[0]), (3, *DTYPES[0]), (32, *DTYPES[0]), (4, *DTYPES[1])]


@pytest.mark.parametrize(
    "block_size, dtype, atol, rtol", BF16_STATE_CASES, ids=["1-fp32", "3-fp32", "32-fp32", "4-bf16"]
)
def test_triton_bf16_states_match_single_tensor(block_size, dtype, atol, rtol):
    reference, triton, state_ref, state_triton = run_both(block_size, "mean_sq", 0.5, dtype, state_dtype=torch.bfloat16)
    for p, q in zip(reference, triton):
        torch.testing.assert_close(q.float(), p.float(), atol=atol, rtol=rtol)
    for expected, actual in zip(state_ref[0] + state_ref[1], state_triton[0] + state_triton[1]):
        assert actual.dtype == torch.bfloat16
        # fp32 moments ~1 ulp apart may round to neighbouring bf16 values: one bf16 spacing.
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-7, atol=1e-30)


def bits_or_nan(x):
    """The bf16 bit patterns, every NaN as one value: torch's own fp32 -> bf16 copy writes NaN as 0x7FC0 or
    0xFFFF depending on whether it ran vectorised, so only "is NaN" is a property of the rounding."""
    return torch.where(x.isnan(), torch.full_like(x, float("nan")), x).view(torch.int16)


@pytest.mark.parametrize(
    "block_size, dtype",
    [(1, torch.float32), (3, torch.bfloat16), (4, torch.float32)],
    ids=["1-fp32", "3-bf16", "4-fp32"],
)
def test_triton_bf16_states_round_bit_for_bit_as_store_moment(block_size, dtype):
    """From the same bf16 states, the kernel's stored moments are foam_hf.precision.store_moment of the fp32
    moments the same kernel computes with fp32 states, bit for bit (the same counter hash of index, step and
    salt), and the weights are the same (both step with the unrounded moments)."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    exp_avgs, exp_avg_sqs, _ = fresh_state(params, block_size, torch.bfloat16)
    for m, v in zip(exp_avgs, exp_avg_sqs):
        m.copy_(torch.randn(m.shape, generator=gen))
        v.copy_(torch.rand(v.shape, generator=gen))
    # every class of value: infinities, NaN, and the largest bf16, whose dithered rounding may carry into inf
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 3.3e38, -3.3e38, 0.0])
    exp_avgs[0].view(-1)[: special.numel()] = special
    kwargs = step_kwargs(block_size, hparams=SCALED)
    for step in range(2):  # the second step starts from moments the kernel itself rounded
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        params_fp32, avgs_fp32, avg_sqs_fp32 = (
            [p.clone() for p in params],
            [m.float() for m in exp_avgs],
            [v.float() for v in exp_avg_sqs],
        )
        fused_triton._fused_foam_triton(
            params_fp32, grads, avgs_fp32, avg_sqs_fp32, [torch.tensor(float(step)) for _ in params], **kwargs
        )
        fused_triton._fused_foam_triton(
            params, grads, exp_avgs, exp_avg_sqs, [torch.tensor(float(step)) for _ in params], **kwargs
        )
        for p, q in zip(params_fp32, params):
            torch.testing.assert_close(q, p, rtol=0, atol=0, equal_nan=True)
        for salt, stored, computed in ((0, exp_avgs, avgs_fp32), (1, exp_avg_sqs, avg_sqs_fp32)):
            for actual, value in zip(stored, computed):
                expected = torch.empty_like(actual)
                _store_moment(expected, value, step + 1, salt=salt)
                assert torch.equal(bits_or_nan(actual), bits_or_nan(expected))


def bits(x):
    """A tensor's bit patterns (as integers, so that NaN equals NaN and -0 differs from 0)."""
    return x.view({4: torch.int32, 2: torch.int16}[x.element_size()])


# weight_rounding="stochastic": folded weights of whole blocks, ragged last blocks and rows narrower than a block
# (B = 4, 3), unfolded ones (the 1-D tensors, and every tensor at B = 1), with fp32 and bf16 moments.
STOCHASTIC_CASES = [(4, torch.float32), (3, torch.bfloat16), (1, torch.bfloat16)]


@pytest.mark.parametrize("block_size, state_dtype", STOCHASTIC_CASES, ids=["4-fp32", "3-bf16", "1-bf16"])
def test_triton_stochastic_bf16_weights_round_bit_for_bit_as_store_weight(block_size, state_dtype):
    """Under weight_rounding="stochastic" a bf16 weight is stored as foam_hf.precision.store_weight stores the fp32
    weight the kernels computed, bit for bit: the moments' hash under WEIGHT_SALT, counted by the entry's C-order
    index in the parameter, keyed by the step (three steps: three dithers, each from weights the kernels rounded).

    The fp32 weights are the same kernels' on fp32 copies of the bf16 weights, with the same gradients and copies of
    the moments: a bf16 weight widens exactly, and only the store differs. That they are the very values the bf16
    launches round shows twice: their moments (stepped by the same arithmetic) are bit for bit the fp32 launch's,
    and under "nearest" their weights are bit for bit the fp32 weights rounded to nearest."""
    gen = torch.Generator().manual_seed(6)
    params = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in SHAPES]
    state = fresh_state(params, block_size, state_dtype)
    for step in range(1, 4):
        grads = [torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in params]
        launches = {  # name: (weights, weight_rounding); each launch on copies of the same moments and step counts
            "fp32": ([p.float() for p in params], "stochastic"),
            "nearest": ([p.clone() for p in params], "nearest"),
            "stochastic": (params, "stochastic"),
        }
        states = {}
        for name, (weights, rounding) in launches.items():
            states[name] = [[t.clone() for t in tensors] for tensors in state]
            kwargs = step_kwargs(block_size, res_scale=0.5, weight_rounding=rounding)
            fused_triton._fused_foam_triton(weights, grads, *states[name], **kwargs)
        computed = launches["fp32"][0]
        for name in ("nearest", "stochastic"):
            for moments, fp32_moments in zip(states[name][:2], states["fp32"][:2]):
                assert all(torch.equal(bits(m), bits(f)) for m, f in zip(moments, fp32_moments))
        for nearest, value in zip(launches["nearest"][0], computed):
            assert torch.equal(bits(nearest), bits(value.to(torch.bfloat16)))  # torch's round to nearest even
        for stored, value in zip(params, computed):
            expected = torch.empty_like(stored)
            store_weight(expected, value, step, "stochastic")
            assert torch.equal(bits(stored), bits(expected))
        state = states["stochastic"]
        assert [s.item() for s in state[2]] == [float(step)] * len(params)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32-states", "bf16-states"])
def test_triton_stochastic_bf16_weights_match_the_readable_path(state_dtype):
    """Four steps of the kernels and of the readable path (_single_tensor_foam, FOAM's fused=False, foreach=False),
    each on its own weights, under weight_rounding="stochastic": every weight within one bf16 spacing, and on the same
    neighbour but for the rare one whose fp32 values, an ulp or so apart, straddle its dither's threshold
    (probability ~ ulps / 2**16). A dither of the kernels' own (a wrong salt, index or step key) puts a third of them
    on the other neighbour, rounding to nearest a quarter: the self-check's allowance, a sixteenth, tells them apart."""
    reference, triton, _, _ = run_both(
        4, "mean_sq", 0.5, torch.bfloat16, state_dtype=state_dtype, weight_rounding="stochastic"
    )
    for p, q in zip(reference, triton):
        assert q.dtype == torch.bfloat16
        torch.testing.assert_close(q.float(), p.float(), atol=1e-6, rtol=2**-7)
    other = sum(int((p != q).sum()) for p, q in zip(reference, triton))
    assert other / sum(p.numel() for p in reference) <= fused_triton._CHECK_ROUNDED_OTHERWISE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=["bf16", "fp32", "fp16"])
def test_nearest_rounding_and_other_dtypes_store_weights_as_before(dtype):
    """weight_rounding="nearest", the default, compiles the kernels it compiled before the option existed (the
    stochastic store is a constexpr, off) and steps the same bits whether it is passed or not (that they are torch's
    rounding to nearest even of the kernels' fp32 weights, the test above checks). fp32 and fp16 weights are never
    stochastically rounded (foam_hf.precision.store_weight; the optimizer refuses fp16 under "stochastic"): the same
    kernels and bits under either option. Two steps, over folded, ragged and unfolded tensors."""
    block_size = 3
    gen = torch.Generator().manual_seed(7)
    start = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES] for _ in range(2)]

    def run(**rounding):
        weights = [p.clone() for p in start]
        state = fresh_state(weights, block_size)
        kwargs = {k: v for k, v in step_kwargs(block_size).items() if k != "weight_rounding"} | rounding
        for step_grads in grads:
            fused_triton._fused_foam_triton(weights, step_grads, *state, **kwargs)
        return weights

    default, nearest, stochastic = run(), run(weight_rounding="nearest"), run(weight_rounding="stochastic")
    assert all(torch.equal(bits(d), bits(n)) for d, n in zip(default, nearest))
    same = [torch.equal(bits(s), bits(n)) for s, n in zip(stochastic, nearest)]
    assert not all(same) if dtype == torch.bfloat16 else all(same)  # the option acts on bf16 weights only
    for weight, exp_avg in zip(start, fresh_state(start, block_size)[0]):
        for rounding in ("nearest", "stochastic"):
            hyper = step_kwargs(block_size, weight_rounding=rounding)
            stochastic_store = fused_triton._common_constexprs(weight, exp_avg, hyper)["STOCHASTIC_WEIGHTS"]
            assert stochastic_store == (dtype == torch.bfloat16 and rounding == "stochastic")


def test_shared_and_own_launches_step_the_same_bits(monkeypatch):
    """A tensor steps the same bits in a launch of its own and in a shared one, whatever it shares it with: tensors
    of the other dtype and of another step count (other shared launches), folded and unfolded ones, and fewer
    programs than tiles (each program then steps several, two per row for the widest tensor)."""
    monkeypatch.setattr(fused_triton, "_SHARED_PROGRAMS", 3)
    block_size = 4
    shapes = SHAPES + [(3, 2100)]  # 2100 columns: 525 blocks of 4, two tiles of 512 blocks per row
    gen = torch.Generator().manual_seed(2)
    dtypes = [torch.float32 if i % 2 else torch.bfloat16 for i in range(len(shapes))]
    start = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)]
    grads = [[torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)] for _ in range(2)]
    first_steps = [5.0 if i % 3 == 0 else 0.0 for i in range(len(shapes))]  # two step counts in the list
    shared_launches = []
    real_launch_shared = fused_triton._launch_shared

    def counting_launch_shared(members, folded, step, aligned, hyper):
        shared_launches.append((folded, members[0][1].dtype, step, len(members)))
        real_launch_shared(members, folded, step, aligned, hyper)

    monkeypatch.setattr(fused_triton, "_launch_shared", counting_launch_shared)

    def run(shared_max_entries):
        params = [p.clone() for p in start]
        exp_avgs, exp_avg_sqs, steps = fresh_state(params, block_size)
        for s, first in zip(steps, first_steps):
            s.fill_(first)
        for g in grads:
            fused_triton._fused_foam_triton(
                params, g, exp_avgs, exp_avg_sqs, steps, shared_max_entries=shared_max_entries,
                **step_kwargs(block_size, res_scale=0.3),
            )  # fmt: skip
        return params + exp_avgs + exp_avg_sqs + steps

    own = run(0)
    assert not shared_launches
    for largest in (1 << 20, 200):  # all shared; only those under 200 entries shared
        shared_launches.clear()
        result = run(largest)
        for expected, actual in zip(own, result):
            assert torch.equal(bits(actual), bits(expected))
        small = [i for i, s in enumerate(shapes) if math.prod(s) < largest]
        folded = [is_foldable(p, block_size) for p in start]
        aligned = [(s[-1] if folded[i] else math.prod(s)) % 16 == 0 for i, s in enumerate(shapes)]
        # rows narrower than B (n = 1, 2) take narrower tiles, so launches of their own
        widths = [fused_triton._padded_width(p, block_size) if folded[i] else 1 for i, p in enumerate(start)]
        kinds = {(folded[i], dtypes[i], first_steps[i], aligned[i], widths[i]) for i in small}
        assert len(shared_launches) == 2 * len(kinds)  # one launch per kind of small tensor, each step
        assert sum(count for *_, count in shared_launches) == 2 * len(small)


def test_each_devices_tensors_launch_with_that_device_current(monkeypatch):
    """One group can span GPUs (a model spread over them in one process, as device_map="auto" does): every launch
    holds one device's tensors and runs with that device current, as Triton launches on the current device. CPU
    and meta tensors stand in for two GPUs here; the launches are recorded, not run."""
    current, launches = [], []

    @contextlib.contextmanager
    def current_device(device):
        current.append(device)
        yield
        current.pop()

    def record(members):
        launches.append((current[-1] if current else None, members))

    monkeypatch.setattr(fused_triton, "_current_device", current_device)
    monkeypatch.setattr(fused_triton, "_launch_folded", lambda tensors, step, hyper: record([tensors]))
    monkeypatch.setattr(fused_triton, "_launch_unfolded", lambda tensors, step, hyper: record([tensors]))
    monkeypatch.setattr(fused_triton, "_launch_shared", lambda members, folded, step, aligned, hyper: record(members))
    shapes = [(4, 8), (300, 16), (7,), (400,)]  # under and over the 100 entries that share launches here
    devices = [torch.device("cpu"), torch.device("meta")]
    params = [torch.zeros(s, device=d) for d in devices for s in shapes] + [torch.zeros(2, 8)]  # cpu, meta, cpu
    exp_avgs, exp_avg_sqs, steps = fresh_state(params, 4)
    exp_avgs = [m.to(p.device) for m, p in zip(exp_avgs, params)]
    exp_avg_sqs = [v.to(p.device) for v, p in zip(exp_avg_sqs, params)]
    grads = [torch.zeros_like(p) for p in params]
    fused_triton._fused_foam_triton(
        params, grads, exp_avgs, exp_avg_sqs, steps, shared_max_entries=100, **step_kwargs(4)
    )  # fmt: skip
    assert not current  # every device context was left
    assert {device for device, _ in launches} == set(devices)
    for device, members in launches:
        assert all(t.device == device for tensors in members for t in tensors)
    assert sorted(id(tensors[1]) for _, members in launches for tensors in members) == sorted(map(id, params))


def test_only_tensors_whose_loads_may_be_16_bytes_wide_are_promised_so():
    # A shared launch promises the compiler 16-byte alignment only where a launch of its own would prove it:
    # every address on a 16-byte boundary, and rows (folded) or entries (unfolded) a multiple of 16.
    def tensors(param):
        return (torch.zeros_like(param), param, torch.zeros(2), torch.zeros(2))

    assert fused_triton._vector_aligned(tensors(torch.zeros(3, 48)), folded=True)
    assert not fused_triton._vector_aligned(tensors(torch.zeros(3, 40)), folded=True)  # 40-entry rows
    assert fused_triton._vector_aligned(tensors(torch.zeros(5, 16)), folded=False)  # 80 entries
    assert not fused_triton._vector_aligned(tensors(torch.zeros(3, 10)), folded=False)  # 30 entries
    offset = torch.zeros(3 * 48 + 1)[1:].view(3, 48)  # starts 4 bytes past an allocation's start
    assert offset.data_ptr() % 16 == 4 and not fused_triton._vector_aligned(tensors(offset), folded=True)
    grad, param, m, v = tensors(torch.zeros(3, 48))
    assert not fused_triton._vector_aligned((grad, param, torch.zeros(9)[1:], v), folded=True)  # a moment


def test_triton_refuses_fp16_states():
    params = [torch.randn(4, 8)]
    with pytest.raises(RuntimeError, match=r"float32 or bfloat16; got torch.float16.*Fix: pass fused=None"):
        fused_triton._fused_foam_triton(
            params,
            [torch.randn(4, 8)],
            [torch.zeros(4, 2, dtype=torch.float16)],
            [torch.zeros(4, 2, dtype=torch.float16)],
            [torch.tensor(0.0)],
            **step_kwargs(4),
        )


def test_cpu_parameters_are_not_triton_parameters():
    # The Triton path is for CUDA tensors only; on CPU, fused=True means the C++ kernel (tests/test_fused.py).
    assert not fused_triton.triton_supported(torch.nn.Parameter(torch.randn(4, 8)))
    assert fused_triton.triton_available()
    FOAM([torch.nn.Parameter(torch.randn(4, 8))], fused=True)  # builds: the CPU kernel takes it


def test_ready_check_runs_the_kernels_once_per_device(monkeypatch):
    monkeypatch.setattr(fused_triton, "_ready", {})
    assert fused_triton.triton_ready(torch.device("cpu"))  # the interpreter runs them on CPU tensors
    calls = []
    monkeypatch.setattr(fused_triton, "_fused_foam_triton", lambda *a, **k: calls.append(1))
    assert fused_triton.triton_ready(torch.device("cpu")) and not calls  # cached: not run again


def test_ready_check_of_cuda_without_an_index_is_the_current_devices(monkeypatch):
    # Tensors say cuda:N; a caller may ask of "cuda". One verdict for both: the check runs once, keyed cuda:N.
    checked = []
    monkeypatch.setattr(fused_triton, "_ready", {})
    monkeypatch.setattr(fused_triton, "_self_check_mismatch", lambda device, kind: checked.append(device))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    kinds = [fused_triton.DEFAULT_CHECK_KINDS[0]]
    assert fused_triton.triton_ready(torch.device("cuda"), kinds)
    assert fused_triton.triton_ready(torch.device("cuda:1"), kinds)
    assert checked == [torch.device("cuda", 1)] and set(fused_triton._ready) == {(torch.device("cuda", 1), kinds[0])}


def test_ready_check_failure_warns_once_and_says_no(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed\nlong compiler log")

    monkeypatch.setattr(fused_triton, "_ready", {})
    monkeypatch.setattr(fused_triton, "_fused_foam_triton", broken)
    with caplog.at_level("WARNING", logger=fused_triton.__name__):
        assert not fused_triton.triton_ready(torch.device("cpu"))
        assert not fused_triton.triton_ready(torch.device("cpu"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "foreach path" in warnings[0] and "RuntimeError: PTX assembly failed" in warnings[0]
    assert "long compiler log" not in warnings[0]


def perturbed_kernels(monkeypatch, perturb):
    """Swap the kernels' launcher for one that runs them and then corrupts their result with ``perturb``."""
    real = fused_triton._fused_foam_triton

    def wrong(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs):
        real(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)
        perturb(params, exp_avgs, exp_avg_sqs)

    monkeypatch.setattr(fused_triton, "_ready", {})
    monkeypatch.setattr(fused_triton, "_fused_foam_triton", wrong)


def nudge_last_weight(params, exp_avgs, exp_avg_sqs):
    params[-1].view(-1)[0] += 1e-3  # one entry of a bias, 1e-3 off: far above the tolerances, far below "inf"


def scale_bf16_moments(params, exp_avgs, exp_avg_sqs):
    for v in exp_avg_sqs:
        if v.dtype == torch.bfloat16:
            v.mul_(1.1)  # a broken bf16 store (10 % off); the fp32-moment case stays right


@pytest.mark.parametrize(
    "perturb, what", [(nudge_last_weight, "weight of shape (16,)"), (scale_bf16_moments, "exp_avg_sq")]
)
def test_ready_check_compares_numbers_and_falls_back_with_one_warning(monkeypatch, caplog, perturb, what):
    perturbed_kernels(monkeypatch, perturb)
    with caplog.at_level("WARNING", logger=fused_triton.__name__):
        assert not fused_triton.triton_ready(torch.device("cpu"))
        assert not fused_triton.triton_ready(torch.device("cpu"))  # decided once per device
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "disagrees with the readable path" in warnings[0] and what in warnings[0]
    assert "foreach path" in warnings[0]


@pytest.mark.parametrize("broken_launch", ["a launch per tensor", "shared launches"])
def test_ready_check_steps_both_kinds_of_launch(monkeypatch, caplog, broken_launch):
    # Kernels wrong only when each tensor has its own launch (or only in shared ones) are caught all the same.
    real = fused_triton._fused_foam_triton

    def wrong_in_one_kind(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs):
        real(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)
        if (kwargs["shared_max_entries"] == 0) == (broken_launch == "a launch per tensor"):
            nudge_last_weight(params, exp_avgs, exp_avg_sqs)

    monkeypatch.setattr(fused_triton, "_ready", {})
    monkeypatch.setattr(fused_triton, "_fused_foam_triton", wrong_in_one_kind)
    with caplog.at_level("WARNING", logger=fused_triton.__name__):
        assert not fused_triton.triton_ready(torch.device("cpu"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and broken_launch in warnings[0]


def test_ready_check_launches_every_kernel_the_step_can(monkeypatch):
    # Own launches of folded and unfolded tensors, and shared launches of both, aligned and not.
    launched = set()
    for name in ("_launch_folded", "_launch_unfolded", "_launch_shared"):
        real = getattr(fused_triton, name)

        def recording(*args, _name=name, _real=real):
            launched.add((_name, args[1], args[3]) if _name == "_launch_shared" else (_name,))
            _real(*args)

        monkeypatch.setattr(fused_triton, name, recording)
    assert fused_triton._self_check_mismatch(torch.device("cpu")) is None
    shared = {("_launch_shared", folded, aligned) for folded in (True, False) for aligned in (True, False)}
    assert launched == {("_launch_folded",), ("_launch_unfolded",)} | shared


def nudge_rows_narrower_than_a_block(params, exp_avgs, exp_avg_sqs):
    for p in params:
        if p.dim() == 2 and p.shape[0] == 2:  # the scratch weight of rows narrower than a block
            p.view(-1)[0] += 1e-3


def test_ready_check_catches_kernels_wrong_only_on_rows_narrower_than_a_block(monkeypatch):
    # Rows of n < B compile a narrower tile than the group's other weights: a miscompile of that tile alone must
    # keep fused=None off the Triton path as any other would.
    perturbed_kernels(monkeypatch, nudge_rows_narrower_than_a_block)
    assert not fused_triton.triton_ready(torch.device("cpu"), [fused_triton.DEFAULT_CHECK_KINDS[0]])


def bf16_moments_of_fp32_weights_off(params, exp_avgs, exp_avg_sqs):
    if params[0].dtype == torch.float32:
        scale_bf16_moments(params, exp_avgs, exp_avg_sqs)  # wrong only for this pairing: its own compiled kernels


def test_ready_check_checks_each_kind_of_step_the_group_takes(monkeypatch, caplog):
    # fp32 weights with bf16 moments compile kernels of their own (dtypes are compile-time constants): the default
    # kinds passing says nothing of them, so fused=None asks of the group's own kind, and that answer is its own.
    perturbed_kernels(monkeypatch, bf16_moments_of_fp32_weights_off)
    mixed = (torch.float32, torch.bfloat16, 4, "mean_sq")
    with caplog.at_level("WARNING", logger=fused_triton.__name__):
        assert fused_triton.triton_ready(torch.device("cpu"))  # fp32/fp32 and bf16/bf16: right
        assert not fused_triton.triton_ready(torch.device("cpu"), [mixed])
        assert not fused_triton.triton_ready(torch.device("cpu"), [mixed, fused_triton.DEFAULT_CHECK_KINDS[0]])
        assert fused_triton.triton_ready(torch.device("cpu"), [(torch.float32, torch.float32, 8, "sq_mean")])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1  # once per device and kind
    assert "torch.float32 parameters, torch.bfloat16 moments, block_size=4, second_moment='mean_sq'" in warnings[0]
    checked = [*fused_triton.DEFAULT_CHECK_KINDS, mixed, (torch.float32, torch.float32, 8, "sq_mean")]
    assert set(fused_triton._ready) == {(torch.device("cpu"), kind) for kind in checked}


@pytest.mark.parametrize("block_size", [1, 2, 3, 8, 32, 2**16, 2**17])
def test_ready_check_steps_the_tile_of_the_groups_large_weights(block_size):
    # The folded kernels compile per block size and tile width (min(B, n) rounded up to a power of two): the
    # scratch weights have rows of at least a block, so the check compiles what a group's large weights run, one
    # with whole blocks and rows a multiple of 16 (the aligned kernels) and one with a ragged last block.
    whole, ragged, *narrow, bias, other_bias = fused_triton._scratch_shapes(block_size)
    width = min(block_size, fused_triton.MAX_BLOCK_WIDTH)
    assert len(bias) == len(other_bias) == 1
    if block_size >= 2:  # and rows narrower than a block: the narrower tile a group with such tensors compiles
        ((rows, n),) = narrow
        weight = torch.empty(rows, n, device="meta")
        assert n < block_size and fused_triton._padded_width(weight, block_size) < 1 << (width - 1).bit_length()
    else:
        assert narrow == []
    for rows, n in (whole, ragged):
        weight = torch.empty(rows, n, device="meta")
        assert fused_triton.block_width(weight, block_size) <= fused_triton.MAX_BLOCK_WIDTH
        if block_size > 1:  # the tile of rows n >= B (the AdamW kernel, B = 1, has none)
            assert fused_triton._padded_width(weight, block_size) == 1 << (width - 1).bit_length()
    assert whole[1] % 16 == 0 and whole[1] % width == 0
    assert ragged[1] % 2 == 1  # odd: the unaligned kernels
    if 1 < block_size <= fused_triton.MAX_BLOCK_WIDTH:
        assert ragged[1] % block_size != 0


@pytest.mark.parametrize(
    "kind",
    [(torch.float32, torch.float32, 3, "mean_sq"), (torch.float32, torch.bfloat16, 8, "sq_mean"),
     (torch.bfloat16, torch.float32, 32, "mean_sq"), (torch.float16, torch.float32, 4, "sq_mean"),
     (torch.float16, torch.bfloat16, 2, "mean_sq"), (torch.float32, torch.float32, 1, "mean_sq"),
     (torch.bfloat16, torch.bfloat16, 4, "mean_sq", "stochastic"),
     (torch.bfloat16, torch.float32, 1, "sq_mean", "stochastic"),
     (torch.bfloat16, torch.float32, 3, "mean_sq", "stochastic")],
    ids=str,
)  # fmt: skip
def test_ready_check_passes_for_right_kernels_of_every_kind(kind):
    assert fused_triton._self_check_mismatch(torch.device("cpu"), kind) is None


def round_one_bf16_moment_to_its_neighbour(params, exp_avgs, exp_avg_sqs):
    # What stochastic rounding does now and then on a GPU, where the kernels' fp32 moment (no contracted
    # multiply-adds, their own order of sums) is an ulp or so from torch's: the neighbouring bf16 value.
    for m in exp_avgs:
        if m.dtype == torch.bfloat16 and m.dim() == 2:
            m.view(torch.int16).view(-1)[0] += 1  # one bf16 spacing further from zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ready_check_passes_a_moment_rounded_to_its_bf16_neighbour(monkeypatch, dtype):
    # The moment is within its tolerance; carried into the next step it would move the weight by ~lr * 2**-8,
    # beyond the fp32 weights' tolerance. Each step starts from the same inputs, so a right kernel passes.
    perturbed_kernels(monkeypatch, round_one_bf16_moment_to_its_neighbour)
    assert fused_triton._self_check_mismatch(torch.device("cpu"), (dtype, torch.bfloat16, 4, "mean_sq")) is None


def test_ready_check_accepts_differences_within_the_tolerance(monkeypatch):
    # A perturbation inside the tests' tolerance (1 part in 1e7 of a weight) is not a miscompiled kernel.
    perturbed_kernels(monkeypatch, lambda params, *_: params[0].mul_(1 + 1e-7))
    assert fused_triton.triton_ready(torch.device("cpu"))


STOCHASTIC_KIND = (torch.bfloat16, torch.bfloat16, 4, "mean_sq", "stochastic")


def dither_of_exp_avg(monkeypatch):
    monkeypatch.setattr(fused_triton, "_SALTS", (0, 1, 0))  # the weights drawn with exp_avg's salt: another dither


def rounded_to_nearest(monkeypatch):
    real = fused_triton._common_constexprs
    monkeypatch.setattr(fused_triton, "_common_constexprs", lambda *a: real(*a) | {"STOCHASTIC_WEIGHTS": False})


@pytest.mark.parametrize("wrong", [dither_of_exp_avg, rounded_to_nearest], ids=["another dither", "to nearest"])
def test_ready_check_catches_stochastic_weights_rounded_with_a_wrong_dither(monkeypatch, caplog, wrong):
    # Every weight then lies within a bf16 spacing of the readable path's, the weights' tolerance: only the share
    # rounded to the other neighbour (a third, or a quarter, of them; a right kernel ~1e-4) shows it. The kernels of
    # "nearest", which the option does not touch, stay ready.
    monkeypatch.setattr(fused_triton, "_ready", {})
    wrong(monkeypatch)
    with caplog.at_level("WARNING", logger=fused_triton.__name__):
        assert not fused_triton.triton_ready(torch.device("cpu"), [STOCHASTIC_KIND])
        assert fused_triton.triton_ready(torch.device("cpu"), [STOCHASTIC_KIND[:4]])
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "share of weights rounded to the other bf16 neighbour (" in warning
    assert "weight_rounding='stochastic'" in warning


def moment_dithers_swapped(monkeypatch):
    monkeypatch.setattr(fused_triton, "_SALTS", (1, 0, 2))  # exp_avg drawn with exp_avg_sq's dither, and back


@pytest.mark.parametrize(
    "kind", [(torch.bfloat16, torch.bfloat16, 4, "mean_sq"), (torch.float32, torch.bfloat16, 32, "sq_mean")]
)
def test_ready_check_catches_bf16_moments_rounded_with_a_wrong_dither(monkeypatch, caplog, kind):
    # Each moment then lies within a bf16 spacing of the readable path's, the moments' tolerance: only the share on
    # the other neighbour shows it. fp32 moments, which are not rounded, stay ready.
    monkeypatch.setattr(fused_triton, "_ready", {})
    moment_dithers_swapped(monkeypatch)
    with caplog.at_level("WARNING", logger=fused_triton.__name__):
        assert not fused_triton.triton_ready(torch.device("cpu"), [kind])
        assert fused_triton.triton_ready(torch.device("cpu"), [(kind[0], torch.float32, *kind[2:])])
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "share of moments rounded to the other bf16 neighbour (" in warning


def one_bf16_moment_on_its_other_neighbour(params, exp_avgs, exp_avg_sqs):
    exp_avg_sqs[0].view(torch.int16).view(-1)[0] += 1  # as a GPU's fp32 moment an ulp from torch's may round


def test_ready_check_passes_a_bf16_moment_rounded_to_its_other_neighbour(monkeypatch):
    perturbed_kernels(monkeypatch, one_bf16_moment_on_its_other_neighbour)
    assert fused_triton._self_check_mismatch(torch.device("cpu"), fused_triton.DEFAULT_CHECK_KINDS[1]) is None


def one_bf16_weight_on_its_other_neighbour(params, exp_avgs, exp_avg_sqs):
    # What stochastic rounding does now and then on a GPU, whose fp32 weight is an ulp or so from torch's.
    params[0].view(torch.int16).view(-1)[0] += 1


def test_ready_check_passes_a_stochastic_weight_rounded_to_its_other_neighbour(monkeypatch):
    perturbed_kernels(monkeypatch, one_bf16_weight_on_its_other_neighbour)
    assert fused_triton._self_check_mismatch(torch.device("cpu"), STOCHASTIC_KIND) is None


def test_ready_check_keys_kinds_by_the_kernels_they_compile(monkeypatch):
    # weight_rounding compiles kernels of its own for bf16 weights only, so only that kind is a fifth check: a kind
    # of four is "nearest", and other dtypes under "stochastic" step the kernels "nearest" does.
    checked = []
    monkeypatch.setattr(fused_triton, "_ready", {})
    monkeypatch.setattr(fused_triton, "_self_check_mismatch", lambda device, kind: checked.append(kind))
    fp32, bf16 = (torch.float32, torch.float32, 4, "mean_sq"), STOCHASTIC_KIND[:4]
    kinds = [(*fp32, "stochastic"), fp32, (*fp32, "nearest"), bf16, (*bf16, "nearest"), STOCHASTIC_KIND]
    assert fused_triton.triton_ready(torch.device("cpu"), kinds)
    assert checked == [fp32, bf16, STOCHASTIC_KIND]


KERNEL_NAMES = ("_foam_fold_kernel", "_foam_fold_list_kernel", "_adamw_kernel", "_adamw_list_kernel")


def unspecialized(kernel) -> set:
    """The parameters a kernel declares ``do_not_specialize`` (a compiled kernel keeps them as an attribute, an
    interpreted one among the decorator's arguments)."""
    declared = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize")
    return set(declared or ())


def test_the_rounding_keys_give_every_step_one_kernel_signature(monkeypatch, launch):
    """On a GPU Triton compiles a kernel once per specialization of its int arguments (i32 or i64, divisible by
    16, equal to 1): the per-step keys of the rounding hash must not move through them, or every kernel would
    recompile again and again over the first hundred steps. Their signature over steps 1..200 is computed with
    Triton's own specialization function, as its launcher computes it (only a GPU would show the recompilations)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    kernels = {name: getattr(fused_triton, name) for name in KERNEL_NAMES}
    launched = {name: [] for name in KERNEL_NAMES}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched[self.name].append(kwargs)

    for name in KERNEL_NAMES:
        monkeypatch.setattr(fused_triton, name, Recorder(name))
    params = [torch.zeros(4, 8), torch.zeros(7)]  # a folded and an unfolded tensor
    state = fresh_state(params, 4)
    for _ in range(200):
        fused_triton._fused_foam_triton(params, [torch.zeros_like(p) for p in params], *state, **step_kwargs(4))
    assert [s.item() for s in state[2]] == [200.0, 200.0]
    for name, calls in launched.items():
        if not calls:  # the kernels of the other kind of launch (the fixture runs both)
            continue
        assert len(calls) == 200
        dont = unspecialized(kernels[name])
        assert dont == {"key_m", "key_v", "key_w"}, name
        keys = [(call["key_m"], call["key_v"], call["key_w"]) for call in calls]
        assert all(-(2**31) <= k < 2**31 and type(k) is int for triple in keys for k in triple)
        assert len(set(keys)) == 200  # a key per step: they do change
        signatures = {
            tuple(native_specialize_impl(BaseBackend, call[key], False, key not in dont, True) for key in dont)
            for call in calls
        }
        assert signatures == {(("i32", None),) * 3}, name
    own = launch == "own launches"
    expected = {"_foam_fold_kernel", "_adamw_kernel"} if own else {"_foam_fold_list_kernel", "_adamw_list_kernel"}
    assert {name for name, calls in launched.items() if calls} == expected


def triton_launch_problems():
    """(case, lists for one call, the words of its error): a step the kernels would take wrongly, each refused."""

    def lists(param_shape=(4, 16), moment=None, moment_sq=None, grad=None, steps=1):
        param = torch.randn(param_shape, generator=torch.Generator().manual_seed(0))
        m = moment if moment is not None else torch.zeros(folded_shape(param_shape, 4))
        v = moment_sq if moment_sq is not None else torch.zeros(folded_shape(param_shape, 4))
        g = grad if grad is not None else torch.ones_like(param)
        return [param], [g], [m], [v], [torch.tensor(0.0) for _ in range(steps)]

    # moments built for B=8 (2 blocks a row), stepped at B=4 (4 a row): views into a longer buffer, whose tail a
    # kernel that wrote past the moments' end would change
    buffer = torch.full((4 * 2 + 8,), 7.0)
    return [
        (
            "moments for another block size",
            lists(moment=buffer[:8].view(4, 2)),
            r"exp_avg of shape \(4, 2\) holds 8 "
            r"entries; at block_size=4 the kernels read and write 16 \(folded shape \(4, 4\)\)\. Fix: step with the "
            r"block_size the moments were built for",
            buffer,
        ),
        (
            "transposed moment",
            lists(moment_sq=torch.zeros(4, 4).t()),
            r"exp_avg_sq \(shape \(4, 4\), strides "
            r"\(1, 4\), on cpu\) is not a contiguous tensor.*Fix: pass exp_avg_sq.contiguous\(\)",
            None,
        ),
        ("gradient of another shape", lists(grad=torch.ones(16, 4)), r"its gradient has shape \(16, 4\)", None),
        ("moment on another device", lists(moment=torch.zeros(4, 4, device="meta")), r"exp_avg .*on meta", None),
        ("a list too short", lists(steps=0), r"of one length; got \[1, 1, 1, 1, 0\]", None),
    ]


@pytest.mark.parametrize("case", range(5), ids=[case[0] for case in triton_launch_problems()])
def test_triton_refuses_tensors_it_would_step_wrongly_before_changing_anything(case):
    """The kernels index every tensor from its address in C order: moments of another size would be written past
    their end, transposed ones in the wrong layout, a gradient of another shape read as the parameter's. As the
    fused CPU kernel does, the launcher refuses them, naming the tensor and the fix, before any step count, weight
    or moment changes."""
    _, (params, grads, exp_avgs, exp_avg_sqs, steps), words, buffer = triton_launch_problems()[case]
    before = [t.clone() for t in params + exp_avgs + exp_avg_sqs + steps if t.device.type != "meta"]
    with pytest.raises(RuntimeError, match=r"FOAM: the Triton step .*" + words):
        fused_triton._fused_foam_triton(params, grads, exp_avgs, exp_avg_sqs, steps, **step_kwargs(4))
    after = [t for t in params + exp_avgs + exp_avg_sqs + steps if t.device.type != "meta"]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    if buffer is not None:
        assert torch.equal(buffer[8:], torch.full((8,), 7.0))  # nothing written past the moments


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_block_size_far_above_the_rows_steps_a_tile_of_the_row(dtype):
    """A block never holds more than its row's n entries, so B = 2**21 on rows of 10 takes a 16-lane tile (not a
    2**21-lane one, which Triton refuses), and steps as the readable path does."""
    block_size = 2**21
    gen = torch.Generator().manual_seed(4)
    shapes = [(2, 10), (3, 5), (2, 40)]  # three widths: three tile widths (16, 8, 64), and three shared launches
    reference = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    triton = [p.clone() for p in reference]
    state_ref, state_triton = fresh_state(reference, block_size), fresh_state(triton, block_size)
    assert [
        fused_triton._fold_constexprs(p, m, step_kwargs(block_size))["BP"] for p, m in zip(triton, state_triton[0])
    ] == [16, 8, 64]
    for _ in range(2):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        _single_tensor_foam(reference, grads, *state_ref, **step_kwargs(block_size))
        fused_triton._fused_foam_triton(triton, grads, *state_triton, **step_kwargs(block_size))
    atol, rtol = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-6, 2**-7)}[dtype]
    for p, q in zip(reference, triton):
        torch.testing.assert_close(q.float(), p.float(), atol=atol, rtol=rtol)


# 16-bit parameters with fp32 gradients (FSDP2's MixedPrecisionPolicy(reduce_dtype=torch.float32) over bf16
# parameters): (dtype, weight rtol), one spacing of the parameter's dtype.
FP32_GRAD_CASES = [(torch.bfloat16, 2**-7), (torch.float16, 2**-9)]


@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("dtype, rtol", FP32_GRAD_CASES, ids=["bf16", "fp16"])
def test_fp32_gradients_of_16_bit_parameters_step_unrounded(block_size, dtype, rtol):
    """The kernels read an fp32 gradient of a bf16 or fp16 parameter as it is, as the readable path does, not
    rounded to the parameter's dtype first: the moments agree to fp32 rounding. Every other tensor's gradient is in
    the parameter's dtype, so shared launches hold both kinds of gradient apart."""
    gen = torch.Generator().manual_seed(5)
    shapes = SHAPES + [(64, 64)]
    reference = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    triton = [p.clone() for p in reference]
    state_ref, state_triton = fresh_state(reference, block_size), fresh_state(triton, block_size)
    kwargs = step_kwargs(block_size, res_scale=0.5)
    for _ in range(STEPS):
        grads = [torch.randn(s, generator=gen).to(torch.float32 if i % 2 == 0 else dtype) for i, s in enumerate(shapes)]
        kept = [g.clone() for g in grads]
        _single_tensor_foam(reference, grads, *state_ref, **kwargs)
        fused_triton._fused_foam_triton(triton, grads, *state_triton, **kwargs)
        assert all(g.dtype == k.dtype and torch.equal(g, k) for g, k in zip(grads, kept))
    for p, q in zip(reference, triton):
        assert q.dtype == dtype
        torch.testing.assert_close(q.float(), p.float(), atol=1e-6, rtol=rtol)
    for expected, actual in zip(state_ref[0] + state_ref[1], state_triton[0] + state_triton[1]):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_gradients_are_launched_in_their_own_dtype_without_a_copy(monkeypatch):
    """A contiguous gradient reaches the kernels as it is, whatever its dtype (no full-size copy a step); a strided
    one is made contiguous in its own dtype, and one of a dtype the kernels do not load (fp64) becomes fp32, the
    dtype the readable path computes in. Launches are recorded, not run."""
    launched = []
    monkeypatch.setattr(fused_triton, "_launch_folded", lambda tensors, step, hyper: launched.append(tensors[0]))
    monkeypatch.setattr(fused_triton, "_launch_unfolded", lambda tensors, step, hyper: launched.append(tensors[0]))
    params = [torch.zeros(4, 8, dtype=torch.bfloat16) for _ in range(4)]
    grads = [
        torch.ones(4, 8),
        torch.ones(4, 8, dtype=torch.bfloat16),
        torch.ones(8, 4).t(),
        torch.ones(4, 8, dtype=torch.float64),
    ]
    fused_triton._fused_foam_triton(
        params, grads, *fresh_state(params, 4), shared_max_entries=0, **step_kwargs(4)
    )  # fmt: skip
    assert launched[0] is grads[0] and launched[1] is grads[1]
    assert all(g.is_contiguous() and g.dtype == torch.float32 for g in launched[2:])
    assert torch.equal(launched[2], grads[2]) and torch.equal(launched[3], grads[3].float())


def test_a_block_wider_than_the_kernels_step_is_refused_before_the_step_counts_change():
    wide = fused_triton.MAX_BLOCK_WIDTH + 1
    params = [torch.zeros(7), torch.zeros(1, wide)]  # the unfolded first tensor would launch first
    exp_avgs, exp_avg_sqs, steps = fresh_state(params, wide)
    with pytest.raises(
        RuntimeError,
        match=rf"params\[1\].*its blocks hold {wide} entries, and the kernels step "
        rf"blocks of at most {fused_triton.MAX_BLOCK_WIDTH}\. Fix: pass a smaller block_size",
    ):
        fused_triton._fused_foam_triton(
            params, [torch.ones_like(p) for p in params], exp_avgs, exp_avg_sqs, steps, **step_kwargs(wide)
        )
    assert [s.item() for s in steps] == [0.0, 0.0] and not params[0].any()


def test_torch_compile_runs_the_triton_launcher_eagerly():
    """Dynamo does not trace the launcher (Python scalars, a table built on the host, Triton's own launch): a
    compiled optimizer step runs it as it is, and steps the same bits as the eager call."""
    assert fused_triton._fused_foam_triton._torchdynamo_disable
    gen = torch.Generator().manual_seed(5)
    start = [torch.randn(s, generator=gen) for s in [(3, 8), (5,)]]
    grads = [torch.randn(p.shape, generator=gen) for p in start]

    def run(step):
        params = [p.clone() for p in start]
        state = fresh_state(params, 4)
        step(params, state)
        return params + state[0] + state[1] + state[2]

    def eager(params, state):
        fused_triton._fused_foam_triton(params, grads, *state, **step_kwargs(4))

    expected = run(eager)
    actual = run(torch.compile(eager, backend="eager"))
    assert all(torch.equal(bits(a), bits(e)) for a, e in zip(actual, expected))


def test_the_fast_launch_check_never_passes_what_the_full_check_refuses():
    # _launchable answers the common case before the full check (_tensor_problem); it may be stricter, never
    # looser: a tensor it passes that the rules refuse would be stepped out of bounds. Every combination of one
    # fault below, for folded and unfolded tensors and a block size above the kernels' widest.
    param_shapes = [(4, 16), (12,), (3, 5, 8)]
    faults = {
        "none": {},
        "fp64 param": dict(param_dtype=torch.float64),
        "fp16 moments": dict(moment_dtype=torch.float16),
        "mixed moment dtypes": dict(moment_sq_dtype=torch.bfloat16),
        "transposed param": dict(transpose="param"),
        "transposed moment": dict(transpose="moment"),
        "strided gradient": dict(transpose="grad"),
        "sparse gradient": dict(sparse_grad=True),
        "gradient of another shape": dict(grad_shape=True),
        "moment on meta": dict(moment_device="meta"),
        "moments for another block size": dict(moment_block=8),
        "two-entry step": dict(step_shape=(2,)),
    }
    for shape, block_size, (name, fault) in itertools.product(param_shapes, [1, 4, 2**17], faults.items()):
        param = torch.randn(shape).to(fault.get("param_dtype", torch.float32))
        moment_block = fault.get("moment_block", block_size)
        folded = is_foldable(param, moment_block)
        moment_shape = tuple(folded_shape(param.shape, moment_block)) if folded else tuple(param.shape)
        m = torch.zeros(moment_shape, dtype=fault.get("moment_dtype", torch.float32), device=fault.get("moment_device"))
        v = torch.zeros(moment_shape, dtype=fault.get("moment_sq_dtype", m.dtype))
        grad = torch.ones_like(param) if not fault.get("grad_shape") else torch.ones(param.numel() + 1)
        transpose = fault.get("transpose")
        if transpose and len(shape) == 2:
            param = param.t().contiguous().t() if transpose == "param" else param
            m = m.t().contiguous().t() if transpose == "moment" and m.dim() == 2 else m
            grad = grad.t().contiguous().t() if transpose == "grad" else grad
        if fault.get("sparse_grad"):
            grad = grad.to_sparse()
        step = torch.zeros(fault.get("step_shape", ()))
        lists = ([param], [grad], [m], [v], [step])
        refused = fused_triton._tensor_problem(param, grad, m, v, step, block_size) is not None
        if fused_triton._launchable(*lists, block_size):
            assert not refused, (shape, block_size, name)
        if name == "none" and block_size <= fused_triton.MAX_BLOCK_WIDTH:
            assert fused_triton._launchable(*lists, block_size), (shape, block_size)  # the common case: fast


def test_blocks_wider_than_a_tile_launch_more_warps_in_both_kinds_of_launch(monkeypatch):
    # At Triton's default 4 warps a tile of one block wider than 2048 entries gave each thread more entries, and
    # registers (254 at B=8192 on sm_90); the warps now grow with the tile. A tensor must step the same bits in a
    # launch of its own and in a shared one, so both take the same number.
    seen = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.setdefault(self.name, []).append((kwargs["BP"], kwargs["num_warps"]))

    for name in ("_foam_fold_kernel", "_foam_fold_list_kernel"):
        monkeypatch.setattr(fused_triton, name, Recorder(name))
    for block_size in (4, 2048, 4096, 8192, 2**16):
        param = torch.zeros(2, block_size)
        moments = [torch.zeros(folded_shape(param.shape, block_size)) for _ in range(2)]
        for shared in (0, sys.maxsize):
            fused_triton._fused_foam_triton(
                [param], [torch.zeros_like(param)], *[[m] for m in moments], [torch.tensor(0.0)],
                shared_max_entries=shared, **step_kwargs(block_size),
            )  # fmt: skip
    expected = [(4, 4), (2048, 4), (4096, 8), (8192, 16), (2**16, 32)]
    assert seen == {"_foam_fold_kernel": expected, "_foam_fold_list_kernel": expected}
