"""A catalogue of bad inputs: for each, either the error a user reads or the documented behaviour.

Errors are checked on key fragments of the message: the offending value, the rule it breaks and the fix
(R7/R8 of the style notes). Behaviours are checked against something independent of the case itself: the
same step on a contiguous copy, the parameter stepped on its own, torch.optim.AdamW, or the explicit-matrix
reference in :mod:`foam_hf.reference`. Errors raised by ``torch.optim.Optimizer`` itself (before FOAM sees
the parameters) are kept as torch words them and listed as such.
"""

from __future__ import annotations

import math

import pytest
import torch
from hf_fixtures import lm_dataset, tiny_llama
from transformers import Trainer, TrainingArguments

from foam_hf import FOAM, FoamConfig, FoamConfigError, NoMatchingModuleError, _fused_cpu, state_memory
from foam_hf.param_groups import resolve_block_sizes
from foam_hf.reference import FoamReference
from foam_hf.tools.cli import main as cli_main

nan, inf = math.nan, math.inf


def w(*shape, dtype=torch.float32):
    """A fresh leaf parameter."""
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def assert_fragments(message: str, fragments: list[str]) -> None:
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message lacks {missing}:\n{message}"


# The implementations a group can run on. The fused kernel is optional (it needs a C++ compiler);
# tests/test_fused.py fails loudly when a compiler is present and the kernel does not build.
FOR_LOOP = dict(foreach=False, fused=False)
FOREACH = dict(foreach=True, fused=False)
FUSED = dict(fused=True)
EXPLICIT_PATHS = [FOR_LOOP, FOREACH] + ([FUSED] if _fused_cpu.load_kernel() is not None else [])
EXPLICIT_IDS = ["for-loop", "foreach", "fused"][: len(EXPLICIT_PATHS)]


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)


def twin(p):
    return p.detach().clone().requires_grad_(p.requires_grad)


# ====================================================================== 1. optimizer hyper-parameters

# (id, kwargs, error type, fragments: value, rule, fix). Complements tests/test_errors.py (negative values,
# bad types of lr/betas/block_size): here the NaN/inf and wrong-type rows.
OPTIMIZER_ERRORS = [
    ("lr=None", dict(lr=None), TypeError, ["lr=None", "must be a real number", "Fix: pass e.g. lr=1e-3"]),
    (
        "lr=2-element tensor",
        dict(lr=torch.tensor([1e-3, 2e-3])),
        FoamConfigError,
        ["lr is a tensor of shape (2,)", "a number or a one-element tensor", "Fix:"],
    ),
    ("lr=-inf", dict(lr=-inf), FoamConfigError, ["lr=-inf", "finite and >= 0", "Fix:"]),
    ("eps=nan", dict(eps=nan), FoamConfigError, ["eps=nan", "finite and >= 0", "Fix: pass e.g. eps=1e-8"]),
    ("eps=inf", dict(eps=inf), FoamConfigError, ["eps=inf", "finite and >= 0", "Fix:"]),
    ("weight_decay=inf", dict(weight_decay=inf), FoamConfigError, ["weight_decay=inf", "finite and >= 0", "Fix:"]),
    ("betas=(nan, 0.999)", dict(betas=(nan, 0.999)), FoamConfigError, ["betas[0]=nan", "in [0, 1)", "Fix:"]),
    ("betas=(0.9, 1.0)", dict(betas=(0.9, 1.0)), FoamConfigError, ["betas[1]=1.0", "in [0, 1)", "Fix:"]),
    ("betas=(0.9,)", dict(betas=(0.9,)), TypeError, ["betas=(0.9,)", "must be a pair", "Fix: pass betas=(0.9, 0.999)"]),
    ("betas='ab'", dict(betas="ab"), TypeError, ["betas='ab'", "must be a pair", "Fix:"]),
    ("block_size='4'", dict(block_size="4"), TypeError, ["block_size='4'", "has type str", "Fix: pass block_size=4"]),
    ("block_size=inf", dict(block_size=inf), TypeError, ["block_size=inf", "has type float", "positive int", "Fix:"]),
    ("scale=inf", dict(scale=inf), FoamConfigError, ["scale=inf", "finite and > 0", "Fix: pass scale=1.0"]),
    ("scale=nan", dict(scale=nan), FoamConfigError, ["scale=nan", "finite and > 0", "Fix:"]),
    ("res_scale=nan", dict(res_scale=nan), FoamConfigError, ["res_scale=nan", "finite and >= 0", "Fix:"]),
    ("res_scale=inf", dict(res_scale=inf), FoamConfigError, ["res_scale=inf", "finite and >= 0", "Fix:"]),
    (
        "second_moment=None",
        dict(second_moment=None),
        FoamConfigError,
        ["second_moment=None", "one of ('mean_sq', 'sq_mean')", "Fix: pass second_moment='mean_sq'"],
    ),
    ("fused='yes'", dict(fused="yes"), TypeError, ["fused='yes'", "None, True or False", "Fix:"]),
    ("foreach=1.0", dict(foreach=1.5), TypeError, ["foreach=1.5", "None, True or False", "Fix:"]),
    (
        "state_dtype='float16'",
        dict(state_dtype="float16"),
        FoamConfigError,
        ["state_dtype='float16'", "underflow", "Fix:"],
    ),
]


@pytest.mark.parametrize(
    "kwargs, error, fragments", [r[1:] for r in OPTIMIZER_ERRORS], ids=[r[0] for r in OPTIMIZER_ERRORS]
)
def test_bad_hyperparameter_is_refused_at_construction(kwargs, error, fragments):
    with pytest.raises(error) as info:
        FOAM([w(2, 4)], **kwargs)
    assert_fragments(str(info.value), fragments)


def _same_parameter_in_two_groups():
    p = w(2, 4)
    return FOAM([{"params": [p]}, {"params": [p], "lr": 0.1}])


# (id, builder, error type, fragments). Rows marked "torch" are raised by torch.optim.Optimizer with torch's
# own words; FOAM keeps torch's contract there (the same inputs fail the same way for torch.optim.AdamW).
PARAM_ERRORS = [
    ("torch: empty parameter list", lambda: FOAM([]), ValueError, ["empty parameter list"]),
    ("torch: a bare tensor, not an iterable", lambda: FOAM(w(2, 4)), TypeError, ["iterable of Tensors", "FloatTensor"]),
    ("torch: a string among the params", lambda: FOAM([w(2, 4), "w"]), TypeError, ["can only optimize Tensors", "str"]),
    ("torch: a non-leaf tensor", lambda: FOAM([w(2, 4) * 2]), ValueError, ["non-leaf Tensor"]),
    (
        "same parameter in two groups",
        _same_parameter_in_two_groups,
        ValueError,
        ["more than one parameter group"],
    ),
    (
        "NaN lr in group 1 names the group",
        lambda: FOAM([{"params": [w(2, 4)]}, {"params": [w(2, 4)], "lr": nan}]),
        FoamConfigError,
        ["lr=nan", "finite and >= 0", "(in param group 1)"],
    ),
    (
        "misspelled group key 'rho'",
        lambda: FOAM([{"params": [w(2, 4)], "rho": 0.5}]),
        FoamConfigError,
        ["['rho']", "not FOAM options", "Valid options", "Fix:"],
    ),
    (
        "a param group that is a list",
        lambda: FOAM([w(2, 4)]).add_param_group([w(2, 4)]),
        TypeError,
        ["param group must be a dict", "list"],
    ),
    (
        "fused=True on a float64 parameter with bf16 states",
        lambda: FOAM([w(2, 4, dtype=torch.float64)], fused=True, state_dtype="bfloat16"),
        FoamConfigError,
        [
            "fused=True in param group 0",
            "torch.float64 parameters and torch.bfloat16 states",
            "keeps the states of float64 parameters in float64",
            "Fix: pass state_dtype=None",
        ],
    ),
    (
        "fused=True on a transposed parameter",
        lambda: FOAM([torch.randn(6, 4).t().requires_grad_()], fused=True),
        RuntimeError,
        ["shape (4, 6)", "contiguous=False", "Fix: pass fused=None or False"],
    ),
]


@pytest.mark.parametrize("build, error, fragments", [r[1:] for r in PARAM_ERRORS], ids=[r[0] for r in PARAM_ERRORS])
def test_bad_parameter_list_is_refused(build, error, fragments):
    if "fused=True" in str(fragments) and _fused_cpu.load_kernel() is None:
        error, fragments = RuntimeError, ["fused=True"]  # without a kernel the same call fails on the build
    with pytest.raises(error) as info:
        build()
    assert_fragments(str(info.value), fragments)


def test_refused_param_group_leaves_the_optimizer_as_it_was():
    kept, bad = w(3, 8), w(3, 8)
    opt = FOAM([kept], lr=0.1)
    with pytest.raises(FoamConfigError, match=r"block_size=0 .*\(in param group 1\)"):
        opt.add_param_group({"params": [bad], "block_size": 0})
    assert len(opt.param_groups) == 1
    # The refused parameter is not half-registered: it can join a later, valid group.
    opt.add_param_group({"params": [bad], "block_size": 2})
    reference = FOAM([{"params": [twin(kept)]}, {"params": [twin(bad)], "block_size": 2}], lr=0.1)
    for o, params in ((opt, [kept, bad]), (reference, [p for g in reference.param_groups for p in g["params"]])):
        set_grads(params, seed=3)
        o.step()
    for a, b in zip([kept, bad], [p for g in reference.param_groups for p in g["params"]]):
        assert torch.equal(a, b)


def test_same_parameter_twice_in_one_group_warns_as_torch_does():
    p = w(2, 4)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        FOAM([p, p])


# ====================================================================== 2. parameters FOAM steps "as torch does"


@pytest.mark.parametrize("path", EXPLICIT_PATHS, ids=EXPLICIT_IDS)
@pytest.mark.parametrize("how", ["grad is None", "requires_grad=False (frozen)"])
def test_parameters_without_gradient_are_skipped(path, how):
    stepped, idle, also_stepped = (
        w(3, 8),
        w(4, 8),
        w(
            5,
        ),
    )
    if how == "requires_grad=False (frozen)":
        idle.requires_grad_(False)
    before = idle.detach().clone()
    opt = FOAM([stepped, idle, also_stepped], block_size=4, **path)
    alone = [twin(stepped), twin(also_stepped)]
    opt_alone = FOAM(alone, block_size=4, **path)
    for seed in range(3):
        set_grads([stepped, also_stepped], seed)
        set_grads(alone, seed)
        opt.step()
        opt_alone.step()
    assert torch.equal(idle, before) and len(opt.state[idle]) == 0  # untouched, no state: as torch.optim.AdamW
    for a, b in zip([stepped, also_stepped], alone):
        assert torch.equal(a, b)  # the skipped tensor changes nothing for the others
    if how == "requires_grad=False (frozen)":
        # state_memory skips frozen tensors, so its bytes equal what the optimizer holds.
        held = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
        assert state_memory(opt).foam_bytes == held


@pytest.mark.parametrize("path", [FOR_LOOP, FOREACH, {}], ids=["for-loop", "foreach", "default"])
def test_mixed_dtypes_in_one_group_step_each_tensor_as_alone(path):
    # fp32, bf16 (fp32 states) and fp64 in one group: each steps as it would alone on the same path (the
    # default one fuses all three where the CPU kernel builds, else runs all three on the for-loop path).
    params = [w(3, 8), w(4, 8).bfloat16().detach().requires_grad_(), w(2, 9, dtype=torch.float64)]
    alone_path = path
    group = FOAM(params, block_size=4, weight_decay=0.1, **path)
    singles = [(q, FOAM([q], block_size=4, weight_decay=0.1, **alone_path)) for q in map(twin, params)]
    for seed in range(3):
        set_grads(params, seed)
        for p, (q, _) in zip(params, singles):
            q.grad = p.grad.clone()
        group.step()
        for _, opt in singles:
            opt.step()
    for p, (q, opt) in zip(params, singles):
        assert p.dtype == q.dtype and torch.equal(p, q)
        assert group.state[p]["exp_avg"].dtype == (torch.float64 if p.dtype == torch.float64 else torch.float32)
        assert torch.equal(group.state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("path", [FOR_LOOP, FOREACH, {}], ids=["for-loop", "foreach", "default"])
def test_mixed_devices_in_one_group_step_each_tensor_on_its_device(path):
    # Only CPU and meta exist on every machine; each tensor is stepped on its own device.
    cpu, meta = w(3, 8), torch.empty(5, 10, device="meta", requires_grad=True)
    opt = FOAM([cpu, meta], block_size=4, **path)
    cpu_alone = twin(cpu)
    opt_alone = FOAM([cpu_alone], block_size=4, **FOR_LOOP)
    for seed in range(2):
        set_grads([cpu], seed)
        cpu_alone.grad = cpu.grad.clone()
        meta.grad = torch.empty_like(meta)
        opt.step()
        opt_alone.step()
    assert torch.equal(cpu, cpu_alone)  # a device mix takes the for-loop path (or foreach), never fused
    assert opt.state[meta]["exp_avg"].device.type == "meta" and opt.state[meta]["exp_avg"].shape == (5, 3)
    assert opt.state[meta]["step"].item() == 2


@pytest.mark.parametrize("path", EXPLICIT_PATHS + [{}], ids=EXPLICIT_IDS + ["default"])
def test_zero_size_and_zero_dim_tensors(path):
    # Empty tensors never fold (nothing to average) and keep empty AdamW-shaped states; a 0-d tensor is a
    # scalar weight and steps exactly as AdamW steps it.
    empties = [w(0, 4), w(4, 0), w(0), w(2, 0, 8)]
    scalar, matrix = torch.tensor(1.5, requires_grad=True), w(3, 8)
    opt = FOAM([*empties, scalar, matrix], lr=0.1, block_size=4, **path)
    adamw_scalar = twin(scalar)
    adamw = torch.optim.AdamW([adamw_scalar], lr=0.1, weight_decay=0.0, foreach=False)
    for seed in range(3):
        set_grads([*empties, scalar, matrix], seed)
        adamw_scalar.grad = scalar.grad.clone()
        opt.step()
        adamw.step()
    for e in empties:
        assert e.numel() == 0 and opt.state[e]["exp_avg"].shape == e.shape and opt.state[e]["step"].item() == 3
    torch.testing.assert_close(scalar, adamw_scalar, atol=1e-6, rtol=0)  # fp32 ulps, as tests/test_optim.py
    torch.testing.assert_close(opt.state[scalar]["exp_avg_sq"], adamw.state[adamw_scalar]["exp_avg_sq"])
    assert opt.state[matrix]["exp_avg"].shape == (3, 2)


# Layouts whose memory is not the plain row-major one. Each makes a leaf from a fresh random tensor.
LAYOUTS = [
    ("transposed", lambda: torch.randn(10, 6).t()),
    ("strided slice", lambda: torch.randn(6, 20)[:, ::2]),
    ("3-D permuted", lambda: torch.randn(7, 2, 3).permute(1, 2, 0)),
    ("channels_last conv weight", lambda: torch.randn(4, 3, 5, 6).to(memory_format=torch.channels_last)),
]


@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("path", [FOR_LOOP, FOREACH, {}], ids=["for-loop", "foreach", "default"])
@pytest.mark.parametrize("make", [m for _, m in LAYOUTS], ids=[n for n, _ in LAYOUTS])
def test_non_contiguous_parameter_steps_as_its_contiguous_copy(make, path, block_size):
    # Folding is along the *logical* last dimension, whatever the strides. The default path sends a
    # non-contiguous tensor to the for-loop path (the fused kernel needs contiguous memory), so its expected
    # value is the contiguous copy on the for-loop path.
    param = make().requires_grad_()
    assert not param.is_contiguous()
    copy = param.detach().contiguous().requires_grad_()
    strides = param.stride()
    opt = FOAM([param], block_size=block_size, weight_decay=0.1, **path)
    opt_copy = FOAM([copy], block_size=block_size, weight_decay=0.1, **(FOR_LOOP if path == {} else path))
    for seed in range(3):
        set_grads([copy], seed)
        param.grad = copy.grad.clone()
        opt.step()
        opt_copy.step()
    assert torch.equal(param, copy)
    assert param.stride() == strides  # updated in place: the layout the user chose is kept
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[param][key], opt_copy.state[copy][key])


@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("path", EXPLICIT_PATHS, ids=EXPLICIT_IDS)
def test_non_contiguous_gradient_steps_as_its_contiguous_copy(path, block_size):
    param = w(6, 10)
    copy = twin(param)
    opt = FOAM([param], block_size=block_size, **path)
    opt_copy = FOAM([copy], block_size=block_size, **path)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        grad = torch.randn(10, 6, generator=gen).t()  # a transposed (non-contiguous) gradient
        assert not grad.is_contiguous()
        param.grad, copy.grad = grad, grad.contiguous()
        opt.step()
        opt_copy.step()
        assert not param.grad.is_contiguous()  # FOAM never rewrites p.grad
    assert torch.equal(param, copy)


@pytest.mark.parametrize("block_size", [4, 8, 1000])
@pytest.mark.parametrize("path", EXPLICIT_PATHS, ids=EXPLICIT_IDS)
def test_block_size_larger_than_the_row_is_one_block_per_row(path, block_size):
    # n < B: each row is a single ragged block of n entries; compare with the explicit-matrix reference.
    shapes = [(5, 3), (2, 3, 2), (4, 1), (6,)]
    params = [w(*s) for s in shapes]
    hparams = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, scale=1.5, res_scale=0.5)
    opt = FOAM(params, block_size=block_size, second_moment="mean_sq", **hparams, **path)
    reference = FoamReference(params, block_size=block_size, second_moment="mean_sq", **hparams)
    for seed in range(5):
        set_grads(params, seed)
        grads = [p.grad.clone() for p in params]
        opt.step()
        reference.step(grads)
    for p, w_ref, m_ref in zip(params, reference.weights, reference.m):
        expected_state = (*p.shape[:-1], 1) if p.ndim >= 2 else p.shape
        assert opt.state[p]["exp_avg"].shape == expected_state
        # fp32 against the float64 reference over 5 steps: see tests/test_optim.py for the budget.
        torch.testing.assert_close(p.detach().double(), w_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg"].double(), m_ref, atol=1e-7, rtol=1e-6)


# ====================================================================== 3. optim_args and FoamConfig

# (optim_args string, error type, fragments).
OPTIM_ARGS_ERRORS = [
    ("block_size=4,block_size=8", FoamConfigError, ["'block_size' is given twice", "block_size=4", "Fix: keep one"]),
    ("=4", FoamConfigError, ["'=4' is not of the form key=value", "Example:"]),
    ("block_size=4=5", FoamConfigError, ["'block_size=4=5' is not of the form key=value", "Example:"]),
    ("lr=1e-3", FoamConfigError, ["unknown key(s) ['lr']", "Valid keys", "block_size:", "Example:"]),
    ("block_size=", FoamConfigError, ["block_size=''", "is not an integer", "Example: block_size=4"]),
    ("block_size=2.5", FoamConfigError, ["block_size='2.5'", "is not an integer", "Example:"]),
    ("level=20", FoamConfigError, ["level=20", "an int in [0, 16]", "Fix: e.g. level=2"]),
    ("level=-1", FoamConfigError, ["level=-1", "an int in [0, 16]", "Fix:"]),
    ("scale=nan", FoamConfigError, ["scale=nan", "finite and > 0", "Fix: pass scale=1.0", "optim_args"]),
    ("scale=1e400", FoamConfigError, ["scale=inf", "finite and > 0", "Fix:"]),
    ("res_scale=abc", FoamConfigError, ["res_scale='abc'", "is not a number", "Example: res_scale=1.0"]),
    ("second_moment=", FoamConfigError, ["second_moment=''", "one of ('mean_sq', 'sq_mean')", "Fix:"]),
    ("target_modules=;", FoamConfigError, ["target_modules= is empty", "Fix: e.g. target_modules=q_proj;v_proj"]),
    ("block_sizes=:4", FoamConfigError, ["':4' is not pattern:size", "Example: block_sizes=q_proj:8"]),
    ("block_sizes=q_proj:abc", FoamConfigError, ["'q_proj:abc'", "size 'abc' is not an int >= 1", "Fix: e.g."]),
    ("block_sizes=q_proj:-2", FoamConfigError, ["'q_proj:-2'", "an int >= 1", "Fix: e.g. block_sizes=q_proj:4"]),
    ("block_sizes=q_proj:4;q_proj:8", FoamConfigError, ["'q_proj' is given twice", "q_proj:4", "q_proj:8", "Fix:"]),
    ("block_sizes=q_proj:4,8", FoamConfigError, ["'8' follows block_sizes=", "separated by ';', not ','", "Fix:"]),
    ("block_sizes=q_proj(:4", FoamConfigError, ["'q_proj('", "not a valid regex", "Fix:"]),
    ("callback=maybe", FoamConfigError, ["callback='maybe'", "not a boolean", "callback=true"]),
]


@pytest.mark.parametrize("optim_args, error, fragments", OPTIM_ARGS_ERRORS, ids=[r[0] for r in OPTIM_ARGS_ERRORS])
def test_bad_optim_args_string(optim_args, error, fragments):
    with pytest.raises(error) as info:
        FoamConfig.from_optim_args(optim_args)
    assert_fragments(str(info.value), fragments)


# (id, builder, error type, fragments): the typed config, as Python users write it.
CONFIG_ERRORS = [
    ("optim_args=123", lambda: FoamConfig.from_optim_args(123), TypeError, ["optim_args=123", "has type int", "Fix:"]),
    (
        "block_sizes as a string",
        lambda: FoamConfig(block_sizes="q_proj:4"),
        TypeError,
        ["block_sizes='q_proj:4'", "must be a dict", "e.g. {'q_proj': 8"],
    ),
    (
        "empty pattern",
        lambda: FoamConfig(block_sizes={"": 4}),
        FoamConfigError,
        ["pattern ''", "non-empty string", "Fix:"],
    ),
    (
        "float block size in block_sizes",
        lambda: FoamConfig(block_sizes={"q_proj": 4.0}),
        FoamConfigError,
        ["block_sizes['q_proj']=4.0", "an int >= 1", "Fix:"],
    ),
    (
        "empty target_modules list",
        lambda: FoamConfig(target_modules=[]),
        TypeError,
        ["target_modules=[]", "non-empty list", "Fix: e.g. target_modules=['q_proj', 'v_proj']"],
    ),
    ("callback='yes'", lambda: FoamConfig(callback="yes"), TypeError, ["callback='yes'", "True or False", "Fix:"]),
    (
        "pattern the optim_args string cannot carry",
        lambda: FoamConfig(block_sizes={"a:b": 4}).to_optim_args(),
        FoamConfigError,
        ["'a:b'", "contains one of ',=;:'", "Fix: pass the FoamConfig object"],
    ),
]


@pytest.mark.parametrize("build, error, fragments", [r[1:] for r in CONFIG_ERRORS], ids=[r[0] for r in CONFIG_ERRORS])
def test_bad_typed_config(build, error, fragments):
    with pytest.raises(error) as info:
        build()
    assert_fragments(str(info.value), fragments)


def test_empty_entries_in_optim_args_are_ignored():
    # Documented leniency: a doubled or trailing ',' (easy to type on a command line) is not an error.
    assert FoamConfig.from_optim_args("block_size=8,,scale=2.0,") == FoamConfig(block_size=8, scale=2.0)


# ====================================================================== 4. override syntax (block_sizes patterns)


def freeze(*names):
    def apply(model):
        for name, p in model.named_parameters():
            if any(name.startswith(n) for n in names) or names == ("*",):
                p.requires_grad_(False)
        return model

    return apply


# (id, how to change the tiny Llama, config, optim_target_modules, error type, fragments)
OVERRIDE_ERRORS = [
    (
        "pattern matches nothing",
        None,
        FoamConfig(block_sizes={"q_prj": 8}),
        None,
        NoMatchingModuleError,
        ["'q_prj' matches no trainable parameter", "Closest module names", "'q_proj'", "named_modules()"],
    ),
    (
        "regex matches nothing",
        None,
        FoamConfig(block_sizes={r"layers\.7\..*": 8}),
        None,
        NoMatchingModuleError,
        [r"'layers\\.7\\..*' matches no trainable parameter", "full regex", "named_modules()"],
    ),
    (
        "target module matches nothing",
        None,
        FoamConfig(target_modules=["gate"]),
        None,
        NoMatchingModuleError,
        ["target module 'gate' matches no trainable parameter", "'gate_proj'"],
    ),
    (
        "pattern matches only frozen parameters",
        freeze("model.embed_tokens"),
        FoamConfig(block_sizes={"embed_tokens": 4}),
        None,
        NoMatchingModuleError,
        ["'embed_tokens' matches no trainable parameter", "frozen parameters"],
    ),
    (
        "every parameter frozen",
        freeze("*"),
        FoamConfig(),
        None,
        FoamConfigError,
        ["no trainable parameter", "requires_grad is False", "Fix: unfreeze"],
    ),
    (
        "two equally specific patterns disagree",
        None,
        FoamConfig(block_sizes={"q_proj": 8, "q_pro.": 4}),
        None,
        FoamConfigError,
        ["equally specifically", "'q_pro.'", "'q_proj'", "[4, 8]", "Fix: make one pattern more specific"],
    ),
    (
        "targets given twice",
        None,
        FoamConfig(target_modules=["q_proj"]),
        ["v_proj"],
        FoamConfigError,
        ["target modules are given twice", "'q_proj'", "'v_proj'", "Fix: keep one"],
    ),
]


@pytest.mark.parametrize(
    "change, config, targets, error, fragments", [r[1:] for r in OVERRIDE_ERRORS], ids=[r[0] for r in OVERRIDE_ERRORS]
)
def test_bad_override(change, config, targets, error, fragments):
    model = tiny_llama()
    if change is not None:
        change(model)
    with pytest.raises(error) as info:
        resolve_block_sizes(model, config, targets)
    assert_fragments(str(info.value), fragments)


def test_shadowed_override_is_not_an_error_and_the_specific_one_wins():
    # 'down_proj' is shadowed in layer 1 by a deeper pattern but still matches layer 0: not "matches nothing".
    model = tiny_llama()
    plan = resolve_block_sizes(model, FoamConfig(block_sizes={"down_proj": 4, "layers.1.mlp.down_proj": 2}))
    assert plan.block_sizes["model.layers.0.mlp.down_proj.weight"] == 4
    assert plan.block_sizes["model.layers.1.mlp.down_proj.weight"] == 2


# ====================================================================== 5. the command line


def run_cli(argv, capsys):
    """(exit code, stderr) of ``foam-hf ARGV``: argparse errors exit 2, handled errors return 2."""
    try:
        code = cli_main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


_CUDA_99 = "CUDA device(s)" if torch.cuda.is_available() else "CUDA is not available"

# (argv, fragments of stderr). Every row exits with status 2 before any training starts. "{file}" is
# replaced by the path of an existing regular file, "{bad_json}" by a file holding invalid JSON.
CLI_ERRORS = [
    ([], ["the following arguments are required: COMMAND"]),
    (["train"], ["invalid choice: 'train'", "'demo', 'memory'"]),
    (["demo", "--steps", "abc"], ["argument --steps", "'abc' is not an integer", "int >= 1"]),
    (["demo", "--steps", "0"], ["argument --steps", "0 is invalid", "int >= 1"]),
    (["demo", "--block-size", "-4"], ["argument --block-size", "-4 is invalid", "int >= 1"]),
    (["demo", "--lr", "inf"], ["argument --lr", "inf is invalid", "finite number > 0"]),
    (["demo", "--lr", "nan"], ["argument --lr", "nan is invalid", "finite number > 0"]),
    (["demo", "--lr", "fast"], ["argument --lr", "'fast' is not a number"]),
    (["demo", "--model-size", "huge"], ["argument --model-size", "invalid choice: 'huge'", "'tiny'"]),
    (["demo", "--device", "tpu"], ["argument --device", "'tpu' is not a torch device", "cpu"]),
    (["demo", "--device", "cuda:99"], ["argument --device", "'cuda:99'", _CUDA_99]),
    (["demo", "--output-dir", "{file}"], ["argument --output-dir", "is a file", "pass another --output-dir"]),
    (["demo", "--output-dir", "{file}/sub"], ["argument --output-dir", "is a file"]),
    (["memory"], ["the following arguments are required: MODEL"]),
    (["memory", "no-such-model"], ["MODEL='no-such-model'", "Built-in names: llama-60m", "Fix:"]),
    (["memory", "{bad_json}"], ["could not be read as a JSON config", "Fix: pass the path of a model's config.json"]),
    (["memory", "llama-60m", "--block-sizes", "0,4"], ["'0,4'", "block sizes are ints >= 1", "Example:"]),
    (["memory", "llama-60m", "--rank", "0"], ["'0' is not an int >= 1", "Example: --rank 256"]),
    (["memory", "llama-60m", "--optim-args", "blocksize=4"], ["unknown key(s) ['blocksize']", "Valid keys"]),
    (["memory", "llama-60m", "--optim-args", "block_sizes=q_prj:8"], ["'q_prj' matches no trainable", "'q_proj'"]),
]


@pytest.mark.parametrize("argv, fragments", CLI_ERRORS, ids=[" ".join(a) or "(no arguments)" for a, _ in CLI_ERRORS])
def test_bad_command_line(argv, fragments, tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    bad_json = tmp_path / "config.json"
    bad_json.write_text("{not json")
    argv = [a.replace("{file}", str(a_file)).replace("{bad_json}", str(bad_json)) for a in argv]
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_fragments(err, fragments)
    assert a_file.read_text() == "not a folder"  # nothing the user had was touched


# ====================================================================== 6. the Trainer integration


def make_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        optim="foam",
        max_steps=2,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# (id, TrainingArguments overrides, error type, fragments): refused when the arguments are built.
ARGS_ERRORS = [
    ("optim_args=123", dict(optim_args=123), TypeError, ["optim_args=123", "has type int", "Fix:"]),
    (
        "',' inside block_sizes",
        dict(optim_args="block_sizes=q_proj:8,lm_head:1"),
        FoamConfigError,
        ["'lm_head:1' follows block_sizes=", "separated by ';'"],
    ),
    ("scale=0", dict(optim_args="scale=0"), FoamConfigError, ["scale=0.0", "finite and > 0", "Fix:"]),
]


@pytest.mark.parametrize("overrides, error, fragments", [r[1:] for r in ARGS_ERRORS], ids=[r[0] for r in ARGS_ERRORS])
def test_bad_training_arguments_fail_when_built(tmp_path, overrides, error, fragments):
    with pytest.raises(error) as info:
        make_args(tmp_path, **overrides)
    assert_fragments(str(info.value), fragments)


# (id, TrainingArguments overrides, model change, error type, fragments): refused when the Trainer builds the
# optimizer, before any step. The Adam-style fields reach FOAM under its own names (lr, betas, eps).
TRAINER_ERRORS = [
    (
        "optim_target_modules matches nothing",
        dict(optim_target_modules=["q_prj"]),
        None,
        NoMatchingModuleError,
        ["'q_prj' matches no trainable parameter", "'q_proj'"],
    ),
    ("all weights frozen", {}, freeze("*"), FoamConfigError, ["no trainable parameter", "Fix: unfreeze"]),
]


@pytest.mark.parametrize(
    "overrides, change, error, fragments", [r[1:] for r in TRAINER_ERRORS], ids=[r[0] for r in TRAINER_ERRORS]
)
def test_bad_trainer_setup_fails_before_the_first_step(tmp_path, overrides, change, error, fragments):
    model = tiny_llama()
    if change is not None:
        change(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=make_args(tmp_path, **overrides), train_dataset=lm_dataset())
    with pytest.raises(error) as info:
        trainer.train()
    assert_fragments(str(info.value), fragments)
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_trainer_leaves_frozen_parameters_out_of_the_optimizer(tmp_path):
    model = tiny_llama()
    freeze("model.layers.0.self_attn", "model.embed_tokens")(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=lm_dataset())
    trainer.train()
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert optimized == trainable and len(frozen) == 5  # q, k, v, o of layer 0 and the embedding
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]) and p not in trainer.optimizer.optimizer.state


@pytest.mark.parametrize(
    "field, value, fragments",
    [
        ("learning_rate", float("nan"), ["learning_rate=nan", "finite and >= 0", "Fix: pass e.g. learning_rate="]),
        ("adam_beta1", -0.1, ["adam_beta1=-0.1", "in [0, 1)"]),
        ("adam_beta2", 1.0, ["adam_beta2=1.0", "in [0, 1)", "Fix: pass e.g. adam_beta2=0.999"]),
        ("adam_epsilon", float("inf"), ["adam_epsilon=inf", "finite"]),
        ("weight_decay", -0.01, ["weight_decay=-0.01", ">= 0"]),
        ("optim_target_modules", [], ["optim_target_modules=[] would fold nothing", "Fix:"]),
        ("optim_target_modules", "(q", ["optim_target_modules='(q' is not a valid regex", "Fix:"]),
    ],
)
def test_training_arguments_fields_fail_when_built_under_their_own_names(tmp_path, field, value, fragments):
    from transformers import TrainingArguments

    with pytest.raises(FoamConfigError) as info:
        TrainingArguments(output_dir=str(tmp_path), optim="foam", use_cpu=True, report_to=[], **{field: value})
    missing = [f for f in fragments if f not in str(info.value)]
    assert not missing, f"message lacks {missing}:\n{info.value}"
