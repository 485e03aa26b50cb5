"""The single ways through the core: one option table, one implementation selector, one set of step scalars.

Each test holds one of them to something outside it: the options' errors to what FOAM and FoamConfig raise, the
selector to the path that actually ran, the step scalars to torch's AdamW and to the readable path.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from _helpers import _fused_cpu

from foam_hf import FOAM, FoamConfig, FoamConfigError, functional
from foam_hf.implementation import select_implementation
from foam_hf.options import GROUP_DEFAULTS, check_option
from foam_hf.step_scalars import step_constants

KERNEL = _fused_cpu.load_kernel() is not None


def test_foam_and_foam_config_take_their_defaults_from_the_one_table():
    foam_defaults = {
        name: p.default for name, p in inspect.signature(FOAM.__init__).parameters.items() if name in GROUP_DEFAULTS
    }
    assert foam_defaults == GROUP_DEFAULTS
    config_defaults = {f.name: f.default for f in dataclasses.fields(FoamConfig) if f.name in GROUP_DEFAULTS}
    assert config_defaults == {k: GROUP_DEFAULTS[k] for k in config_defaults} and len(config_defaults) == 6
    group = FOAM([torch.nn.Parameter(torch.zeros(2, 4))]).param_groups[0]
    assert {k: group[k] for k in GROUP_DEFAULTS} == GROUP_DEFAULTS


@pytest.mark.parametrize(
    "name, value",
    [("block_size", 0), ("block_size", 2.0), ("scale", 0.0), ("res_scale", float("nan")), ("second_moment", "x")]
    + [("state_dtype", "float16"), ("weight_rounding", "up")],
)
def test_foam_and_foam_config_reject_a_bad_option_with_the_same_words(name, value):
    with pytest.raises((TypeError, FoamConfigError)) as from_foam:
        FOAM([torch.nn.Parameter(torch.zeros(2, 4))], **{name: value})
    with pytest.raises((TypeError, FoamConfigError)) as from_config:
        FoamConfig(**{name: value})
    with pytest.raises((TypeError, FoamConfigError)) as from_check:
        check_option(name, value)
    assert type(from_foam.value) is type(from_config.value) is type(from_check.value)
    assert str(from_foam.value) == str(from_check.value)
    # FoamConfig says where the value came from; the rest of the message is the option's own.
    assert str(from_config.value) == str(from_check.value)[:-1] + " (in FoamConfig / optim_args)."


def test_training_arguments_fields_are_checked_by_the_option_rules(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(FoamConfigError) as info:
        TrainingArguments(output_dir=str(tmp_path), optim="foam", use_cpu=True, report_to=[], adam_beta2=1.0)
    with pytest.raises(FoamConfigError) as rule:
        check_option("betas", (0.9, 1.0))
    rule_text = str(rule.value).split(": it must be ")[1].split(".")[0]
    assert f"adam_beta2=1.0 is invalid for optim='foam': it must be {rule_text}." in str(info.value)


def _group(dtype=torch.float32, shapes=((6, 8), (7,))):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    return params, [torch.zeros_like(p, dtype=torch.float32) for p in params]


@pytest.mark.parametrize(
    "foreach, fused, expected",
    [(None, False, "single_tensor"), (False, None, "single_tensor"), (True, None, "foreach"), (None, True, "fused_cpu")]
    + ([(None, None, "fused_cpu")] if KERNEL else [(None, None, "single_tensor")]),
)
def test_select_implementation_names_the_path_that_runs(monkeypatch, foreach, fused, expected):
    params, moments = _group()
    assert select_implementation(params, moments, foreach=foreach, fused=fused) == expected
    if expected == "fused_cpu" and not KERNEL:  # asked for, and no kernel: refused at construction
        with pytest.raises(RuntimeError, match="fused CPU kernel could not be built"):
            FOAM([torch.nn.Parameter(p.clone()) for p in params], foreach=foreach, fused=fused)
        return
    ran = []
    for name in ("_single_tensor_foam", "_multi_tensor_foam"):
        original = getattr(functional, name)
        monkeypatch.setattr(functional, name, lambda *a, _n=name, _f=original, **k: ran.append(_n) or _f(*a, **k))
    original_fused = _fused_cpu._fused_foam
    monkeypatch.setattr(_fused_cpu, "_fused_foam", lambda *a, **k: ran.append("fused") or original_fused(*a, **k))
    weights = [torch.nn.Parameter(p.clone()) for p in params]
    opt = FOAM(weights, foreach=foreach, fused=fused)
    for w in weights:
        w.grad = torch.ones_like(w)
    opt.step()
    path = {"single_tensor": "_single_tensor_foam", "foreach": "_multi_tensor_foam", "fused_cpu": "fused"}
    assert ran == [path[expected]]


class _Subclass(torch.Tensor):
    """A tensor subclass, as DTensor and quantised wrappers are: the fused kernels do not step those."""


def _coverage_cases() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, moment) pairs over dtypes, moment dtypes, layouts, devices and types, covered or not."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32, torch.complex64):
        for moment_dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            moment = torch.zeros(4, 2, dtype=moment_dtype)
            dense = torch.zeros(4, 8, dtype=dtype)
            cases += [(dense, moment), (torch.zeros(8, 4, dtype=dtype).t(), moment)]  # contiguous, transposed
    cases.append((torch.zeros(4, 8).to_sparse(), torch.zeros(4, 2)))
    cases.append((torch.zeros(4, 8, device="meta"), torch.zeros(4, 2)))
    cases.append((torch.Tensor._make_subclass(_Subclass, torch.zeros(4, 8)), torch.zeros(4, 2)))
    cases.append((torch.nn.Parameter(torch.zeros(4, 8)), torch.zeros(4, 2)))
    return cases


def test_the_kernels_one_call_coverage_test_answers_as_the_per_tensor_rule(monkeypatch):
    # Once the kernel is loaded, fused=None asks it once per list (C++) instead of fused_supported per tensor;
    # both must give the same answer for every tensor, and a list is covered only if all of its tensors are.
    from foam_hf import implementation

    assert KERNEL, "the fused CPU kernel builds on every CI machine"
    cases = _coverage_cases()
    rule = [_fused_cpu.fused_supported(p, m.dtype) for p, m in cases]
    assert any(rule) and not all(rule)
    fast = [implementation._fused_default([p], [m], on_cuda=False) for p, m in cases]
    monkeypatch.setattr(_fused_cpu, "loaded_kernel", lambda: None)  # the per-tensor rule, as before the build
    slow = [implementation._fused_default([p], [m], on_cuda=False) for p, m in cases]
    assert fast == rule and slow == rule
    monkeypatch.undo()
    covered = [case for case, ok in zip(cases, rule) if ok]
    uncovered = next(case for case, ok in zip(cases, rule) if not ok)
    for listed, expected in ((covered, True), (covered + [uncovered], False), ([uncovered] + covered, False)):
        assert implementation._fused_default([p for p, _ in listed], [m for _, m in listed], on_cuda=False) is expected


def test_fused_default_on_cuda_asks_every_device_of_the_group_for_the_self_check(monkeypatch):
    # A group spanning GPUs (device_map="auto" in one process) takes the Triton path only where the self-check
    # passed on each of them, not on the first parameter's device alone. The Triton module's answers are
    # stubbed (no GPU here); CPU and meta tensors stand in for two devices.
    from foam_hf import _fused_triton, implementation

    asked, ready = [], {torch.device("cpu"): True, torch.device("meta"): False}
    triton = type("Triton", (), {})()
    triton.triton_supported = lambda param, block_size=None: True
    triton.moments_supported = lambda param, moment: True
    triton.DEFAULT_CHECK_KINDS = _fused_triton.DEFAULT_CHECK_KINDS
    triton.triton_ready = lambda device, kinds: asked.append((device, kinds)) or ready[device]
    monkeypatch.setattr(implementation, "_triton", lambda: triton)
    params = [torch.zeros(4, 8), torch.zeros(3, device="meta"), torch.zeros(5)]
    moments = [torch.zeros(4, 2), torch.zeros(3, device="meta"), torch.zeros(5)]
    assert not implementation._fused_default(params, moments, on_cuda=True)
    kinds = {(torch.float32, torch.float32, 4, "mean_sq")}  # the group's dtypes; the default check's B and moment
    assert asked == [(torch.device("cpu"), kinds), (torch.device("meta"), kinds)]  # each device once
    ready[torch.device("meta")] = True
    assert implementation._fused_default(params, moments, on_cuda=True)
    # the kinds are the group's own: its parameter and moment dtypes, at its block size
    asked.clear()
    params[0], moments[0] = torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(4, 1, dtype=torch.bfloat16)
    assert implementation._fused_default(params, moments, on_cuda=True, block_size=8, second_moment="sq_mean")
    kinds = {(torch.bfloat16, torch.bfloat16, 8, "sq_mean"), (torch.float32, torch.float32, 8, "sq_mean")}
    assert asked == [(torch.device("cpu"), kinds), (torch.device("meta"), kinds)]
    # the group's weight rounding is part of the kinds asked for (triton_ready tells which kinds compile other kernels)
    asked.clear()
    assert implementation._fused_default(
        params, moments, on_cuda=True, block_size=8, second_moment="sq_mean", weight_rounding="stochastic"
    )
    kinds = {
        (torch.bfloat16, torch.bfloat16, 8, "sq_mean", "stochastic"),
        (torch.float32, torch.float32, 8, "sq_mean", "stochastic"),
    }
    assert asked == [(torch.device("cpu"), kinds), (torch.device("meta"), kinds)]


def test_a_groups_weight_rounding_reaches_the_choice_of_implementation(monkeypatch):
    # The self-check must be asked of the kernels the group runs: FOAM's step passes its weight_rounding down.
    from foam_hf import FOAM, implementation

    seen = []
    real = implementation._fused_default
    monkeypatch.setattr(implementation, "_fused_default", lambda *a, **k: seen.append(a[6]) or real(*a, **k))
    weight = torch.zeros(4, 8, dtype=torch.bfloat16, requires_grad=True)
    weight.grad = torch.ones_like(weight)
    FOAM([weight], weight_rounding="stochastic").step()
    FOAM([weight]).step()
    assert seen == ["stochastic", "nearest"]


def test_fused_default_on_cuda_takes_the_foreach_path_for_moments_the_kernels_cannot_index(monkeypatch):
    # The Triton kernels read and write moments in place, in C order: fused=None must not pick them for moments
    # that are transposed (a state loaded from elsewhere), of another device or of fp16, but the foreach path.
    # CPU tensors stand in for CUDA ones: the parameter test and the self-check are stubbed, the moment test is
    # the real one.
    from foam_hf import _fused_triton, implementation

    monkeypatch.setattr(_fused_triton, "triton_supported", lambda param, block_size=None: True)
    monkeypatch.setattr(_fused_triton, "triton_ready", lambda device, kinds=None: True)
    params = [torch.zeros(4, 8), torch.zeros(5)]

    def moments():
        return [torch.zeros(4, 2), torch.zeros(5)]

    assert implementation._fused_default(params, moments(), on_cuda=True, exp_avg_sqs=moments())
    for which in ("exp_avgs", "exp_avg_sqs"):
        for bad in (torch.zeros(2, 4).t(), torch.zeros(4, 2, device="meta"), torch.zeros(4, 2, dtype=torch.float16)):
            lists = {"exp_avgs": moments(), "exp_avg_sqs": moments()}
            lists[which][0] = bad
            assert not implementation._fused_default(params, lists["exp_avgs"], True, lists["exp_avg_sqs"]), (
                which,
                bad,
            )


def test_functional_foam_passes_both_moments_to_the_selector(monkeypatch):
    seen = []
    real = functional.select_implementation

    def spy(params, exp_avgs, **kwargs):
        seen.append(kwargs.get("exp_avg_sqs"))
        return real(params, exp_avgs, **kwargs)

    monkeypatch.setattr(functional, "select_implementation", spy)
    weight, v = torch.zeros(4, 8), torch.zeros(4, 2)
    functional.foam(
        [weight], [torch.ones_like(weight)], [torch.zeros(4, 2)], [v], [torch.tensor(0.0)], lr=1e-3, beta1=0.9,
        beta2=0.999, eps=1e-8, weight_decay=0.0, block_size=4, scale=1.0, res_scale=1.0, second_moment="mean_sq",
    )  # fmt: skip
    assert len(seen) == 1 and seen[0][0] is v


class _SaysCuda(torch.Tensor):
    """A CPU tensor that reports itself on CUDA: enough for the selection rules, which read attributes only."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    @property
    def is_cuda(self):
        return True


def test_fused_default_on_cuda_takes_the_foreach_path_for_blocks_wider_than_the_kernels_step(monkeypatch):
    # A block holds min(block_size, n) entries: B = 2**21 on rows of 10 is a 10-wide block, which the kernels
    # step; on rows of 2**17, a 2**17-wide one, which they do not (fused=None: foreach; fused=True: refused).
    from foam_hf import _fused_triton
    from foam_hf.implementation import check_fused_tensors

    monkeypatch.setattr(_fused_triton, "PLAIN_TENSOR_TYPES", (torch.Tensor, _SaysCuda))
    monkeypatch.setattr(_fused_triton, "triton_ready", lambda device, kinds=None: True)

    def select(shape, block_size):
        param = torch.Tensor._make_subclass(_SaysCuda, torch.zeros(shape))
        return select_implementation([param], [param], foreach=None, fused=None, block_size=block_size)

    wide = _fused_triton.MAX_BLOCK_WIDTH * 2
    assert select((2, 10), 2**21) == select((2, wide), 4) == select((wide,), wide) == "fused_triton"
    assert select((2, wide), 2**21) == select((2, wide), wide) == "foreach"
    assert select((2, wide), _fused_triton.MAX_BLOCK_WIDTH) == "fused_triton"  # the widest the kernels step
    param = torch.Tensor._make_subclass(_SaysCuda, torch.zeros(2, wide))
    with pytest.raises(RuntimeError, match=rf"blocks hold {wide} entries at block_size={wide}: the Triton kernels "):
        check_fused_tensors([param], [torch.zeros(2, 1)], block_size=wide)


def test_select_implementation_falls_back_where_no_kernel_covers_a_tensor():
    params, moments = _group()
    strided = [params[0].t(), params[1]]  # a transposed view is not contiguous
    assert select_implementation(strided, moments, foreach=None, fused=None) == "single_tensor"
    assert select_implementation([], [], foreach=None, fused=False) == "single_tensor"


def test_foreach_path_groups_tensors_by_dtype_and_matches_the_readable_path(monkeypatch):
    """One group of fp32, fp64 and bf16 tensors: each dtype is stepped in foreach batches of its own, and the
    result is the readable path's."""
    batch_dtypes = []
    original = functional._foreach_step_batch

    def record(batch, *args, **kwargs):
        batch_dtypes.append({piece.param.dtype for piece in batch})
        return original(batch, *args, **kwargs)

    monkeypatch.setattr(functional, "_foreach_step_batch", record)

    def run(foreach):
        gen = torch.Generator().manual_seed(3)
        specs = [((6, 8), torch.float32), ((5, 9), torch.float64), ((4, 12), torch.bfloat16), ((7,), torch.float32)]
        weights = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=d)) for s, d in specs]
        opt = FOAM(weights, lr=1e-2, weight_decay=0.1, foreach=foreach, fused=False)
        for _ in range(3):
            for w in weights:
                w.grad = torch.randn(w.shape, generator=gen, dtype=w.dtype)
            opt.step()
        return weights, opt

    readable, _ = run(False)
    batched, opt = run(True)
    for a, b in zip(readable, batched):
        tol = dict(rtol=1e-2, atol=1e-2) if a.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, b, **tol)
    assert {opt.state[w]["exp_avg"].dtype for w in batched} == {torch.float32, torch.float64}
    assert all(len(dtypes) == 1 for dtypes in batch_dtypes)
    assert set().union(*batch_dtypes) == {torch.float32, torch.float64, torch.bfloat16}


@pytest.mark.parametrize("step", [1, 2, 10, 1000])
def test_step_constants_are_torch_adamw_scalars(step):
    """At B = 1 FOAM is AdamW; its scalars are the ones torch's AdamW update implies: one step of AdamW from
    known moments m, v gives W(1 − γλ) − step_size · m / (√v / bc2 + ε) with these values."""
    lr, beta1, beta2, eps, wd = 3e-3, 0.9, 0.95, 1e-8, 0.1
    c = step_constants(step, lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd)
    weight = torch.nn.Parameter(torch.tensor([1.5, -2.0], dtype=torch.float64))
    opt = torch.optim.AdamW([weight], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, foreach=False)
    grad = torch.tensor([0.3, -0.7], dtype=torch.float64)
    weight.grad = grad
    opt.step()  # creates the state at step 1
    state = opt.state[weight]
    state["step"].fill_(step - 1)
    m0, v0 = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    before = weight.detach().clone()
    opt.step()
    m = m0.lerp(grad, 1 - beta1)
    v = v0 * beta2 + (1 - beta2) * grad * grad
    expected = before * c.decay - c.step_size * m / (v.sqrt() / c.bias_correction2_sqrt + eps)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-14, atol=0)
    eps_inside, step_scale = c.fused(eps, 1.0)
    fused_form = before * c.decay + step_scale * m / (v.sqrt() + eps_inside)
    torch.testing.assert_close(fused_form, expected, rtol=1e-12, atol=0)


def test_functional_foam_with_fused_true_says_why_a_tensor_cannot_be_fused():
    """The functional API checks what the fused kernels cover with the words FOAM uses at construction."""
    weight = torch.randn(6, 4).t()  # not contiguous
    state = [torch.zeros(4, 2)], [torch.zeros(4, 2)], [torch.tensor(0.0)]
    with pytest.raises(RuntimeError) as direct:
        functional.foam(
            [weight],
            [torch.ones_like(weight)],
            *state,
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            block_size=4,
            scale=1.0,
            res_scale=1.0,
            second_moment="mean_sq",
            fused=True,
        )
    with pytest.raises(RuntimeError) as constructed:
        FOAM([weight.requires_grad_()], fused=True)
    reason = str(constructed.value).split(" with ", 1)[1].split(". Fix:")[0]
    assert "shape (4, 6)" in reason and "contiguous=False" in reason
    assert f"with {reason}. Fix: pass fused=None or False" in str(direct.value)
    assert torch.equal(state[2][0], torch.tensor(0.0))  # refused before anything was stepped


def _step(params, fused):
    state = [
        [torch.zeros(2, 2) for _ in params],
        [torch.zeros(2, 2) for _ in params],
        [torch.tensor(0.0) for _ in params],
    ]
    functional.foam(
        params, [torch.ones_like(p) for p in params], *state, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
        weight_decay=0.0, block_size=4, scale=1.0, res_scale=1.0, second_moment="mean_sq", fused=fused,
    )  # fmt: skip
    return state


@pytest.mark.parametrize("fused", [True, None, False])
def test_a_cuda_step_under_cuda_graph_capture_is_refused_before_anything_changes(monkeypatch, fused):
    # Bias corrections and rounding keys are host numbers baked into each launch: a replayed graph would repeat
    # the captured step. CPU tensors reporting CUDA stand in for a GPU, and the capture state is stubbed.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    param = torch.Tensor._make_subclass(_SaysCuda, torch.zeros(2, 8))
    with pytest.raises(RuntimeError, match=r"captured into a CUDA graph.*Fix: capture the forward and backward"):
        _step([param], fused)
    assert not param.any()


def test_a_cpu_step_never_asks_about_cuda_graph_capture(monkeypatch):
    # CPU work is not captured (and a CPU step must not touch CUDA): the question is asked for CUDA tensors only.
    asked = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: asked.append(1) or True)
    param = torch.zeros(2, 8)
    state = _step([param], None)
    assert not asked and param.any() and state[2][0].item() == 1.0
