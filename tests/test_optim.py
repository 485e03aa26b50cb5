"""FOAM against its two anchors: torch.optim.AdamW at block_size=1, and the explicit-matrix reference."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import (
    HPARAMS,
    PATHS,
    assert_same_state,
    clone_params,
    grad_sequence,
    make_params,
    path_names,
    reference_kwargs,
    run,
    saved_and_loaded,
)

from foam_hf import FOAM, FoamConfigError, FoamStateError, folded_shape, state_memory
from foam_hf.reference import FoamReference

# (kwargs, description): every generic test runs over this table, on SHAPES["awkward"].
FOAM_CONFIGS = [
    (dict(block_size=2), "B=2"),
    (dict(block_size=3), "B=3 ragged"),
    (dict(block_size=4, weight_decay=0.1), "B=4 with weight decay"),
    (dict(block_size=8, scale=0.5), "B=8 > some n, scale 0.5"),
    (dict(block_size=4, res_scale=0.0), "B=4 no residual"),
    (dict(block_size=4, res_scale=0.5, second_moment="sq_mean"), "B=4 sq_mean"),
    (dict(block_size=3, scale=1.7, second_moment="sq_mean", weight_decay=0.05), "B=3 sq_mean scaled"),
]
CONFIG_IDS = [desc for _, desc in FOAM_CONFIGS]

# Adam's terms only: the tests below set weight decay themselves.
ADAM = HPARAMS["adam"]


def step_both(foam, reference, params, grads):
    """Step ``foam`` and the matrix reference on the same gradients."""
    for step_grads in grads:
        run(foam, params, [step_grads])
        reference.step(step_grads)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("path", ["readable", "foreach", "fused"])
def test_block_size_one_is_adamw(weight_decay, path):
    # The readable and foreach paths compute AdamW's ops in torch's order: bit for bit torch.optim.AdamW's
    # for-loop step. The fused kernel computes the same formula in another order (ε inside one division), as
    # torch's own fused AdamW does: equal to rounding.
    params = make_params()
    ours, theirs = clone_params(params), clone_params(params)
    options = {"readable": dict(foreach=False, fused=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    foam = FOAM(ours, block_size=1, weight_decay=weight_decay, **options[path], **ADAM)
    adamw = torch.optim.AdamW(theirs, weight_decay=weight_decay, foreach=False, **ADAM)
    grads = grad_sequence(params, steps=25)  # >= 20 steps, so bias corrections have decayed
    run(foam, ours, grads)
    run(adamw, theirs, grads)
    atol = 1e-6 if path == "fused" else 0.0
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(foam.state[a][key], adamw.state[b][key], atol=atol, rtol=0)
        assert foam.state[a]["step"].item() == adamw.state[b]["step"].item() == 25


@pytest.mark.parametrize("kwargs", [c for c, _ in FOAM_CONFIGS], ids=CONFIG_IDS)
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_matrix_reference_float64(kwargs, foreach):
    params = make_params(dtype=torch.float64)
    foam = FOAM(params, foreach=foreach, **ADAM, **kwargs)
    reference = FoamReference(params, **reference_kwargs(ADAM, kwargs))
    step_both(foam, reference, params, grad_sequence(params, steps=12))
    for p, w_ref, m_ref, v_ref in zip(params, reference.weights, reference.m, reference.v):
        torch.testing.assert_close(p.detach(), w_ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(foam.state[p]["exp_avg"], m_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(foam.state[p]["exp_avg_sq"], v_ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kwargs", [c for c, _ in FOAM_CONFIGS], ids=CONFIG_IDS)
def test_matches_matrix_reference_float32(kwargs):
    params = make_params(dtype=torch.float32)
    foam = FOAM(params, **ADAM, **kwargs)
    reference = FoamReference(params, **reference_kwargs(ADAM, kwargs))
    step_both(foam, reference, params, grad_sequence(params, steps=20))
    for p, w_ref in zip(params, reference.weights):
        # fp32 arithmetic against a float64 reference: 20 steps of fp32 rounding (~1.2e-7 relative each)
        # on weights up to |w| ~ 3 stay within 1e-6 absolute + 1e-6 relative.
        torch.testing.assert_close(p.detach().double(), w_ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs", [c for c, _ in FOAM_CONFIGS], ids=CONFIG_IDS)
def test_foreach_equals_single_tensor(kwargs):
    params = make_params()
    a, b = clone_params(params), clone_params(params)
    opt_a = FOAM(a, foreach=False, **ADAM, **kwargs)
    opt_b = FOAM(b, foreach=True, **ADAM, **kwargs)
    grads = grad_sequence(params, steps=10)
    run(opt_a, a, grads)
    run(opt_b, b, grads)
    for x, y in zip(a, b):
        # Same operations in the same order; foreach kernels may vectorise differently: 1 ulp-level slack.
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(opt_a.state[x]["exp_avg_sq"], opt_b.state[y]["exp_avg_sq"], atol=1e-7, rtol=1e-6)


def test_state_shapes_and_bytes():
    params = make_params()
    opt = FOAM(params, block_size=4)
    predicted = state_memory(opt)
    run(opt, params, grad_sequence(params, steps=1))
    held = 0
    for p in params:
        expected = folded_shape(p.shape, 4) if p.ndim >= 2 else p.shape
        assert opt.state[p]["exp_avg"].shape == expected
        assert opt.state[p]["exp_avg_sq"].shape == expected
        held += sum(t.numel() * t.element_size() for t in opt.state[p].values())
    assert predicted.foam_bytes == held
    # AdamW's figure from its own states, not from our formula.
    twins = clone_params(params)
    adamw = torch.optim.AdamW(twins)
    run(adamw, twins, grad_sequence(params, steps=1))
    adamw_held = sum(t.numel() * t.element_size() for s in adamw.state.values() for t in s.values())
    assert predicted.adamw_bytes == adamw_held
    assert predicted.folded_params == 5 and predicted.unfolded_params == 1  # only (7,) is 1-D


def test_state_bytes_count_a_layer_frozen_during_training():
    # Its moments stay in opt.state (torch never drops them); the report follows what is held.
    params = make_params()
    opt = FOAM(params, block_size=4)
    run(opt, params, grad_sequence(params, steps=1))
    params[0].requires_grad_(False)
    held = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert state_memory(opt).foam_bytes == held


def test_memory_formula_of_a_large_layer():
    weight = torch.nn.Parameter(torch.empty(4096, 4096, device="meta"))
    mem = state_memory(FOAM([weight], block_size=32))
    assert mem.foam_bytes == 8 * 4096 * 128 + 4
    assert mem.adamw_bytes == 8 * 4096 * 4096 + 4
    assert 31 < mem.ratio < 32


def test_one_dimensional_and_block_larger_than_row():
    bias = torch.randn(10, requires_grad=True)
    narrow = torch.randn(5, 3, requires_grad=True)
    opt = FOAM([bias, narrow], block_size=16)
    run(opt, [bias, narrow], grad_sequence([bias, narrow], steps=1))
    assert opt.state[bias]["exp_avg"].shape == (10,)
    assert opt.state[narrow]["exp_avg"].shape == (5, 1)  # the whole row is one ragged block


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_params_keep_fp32_states(dtype):
    half = [p.detach().to(dtype).requires_grad_() for p in make_params()]
    # Independent expectation: the same step on an fp32 copy of the half weights, rounded once at the end.
    full = [p.detach().float().requires_grad_() for p in half]
    opt_half = FOAM(half, block_size=3, weight_decay=0.1, **ADAM)
    opt_full = FOAM(full, block_size=3, weight_decay=0.1, **ADAM)
    grads = grad_sequence(half, steps=1)
    run(opt_half, half, grads)
    run(opt_full, full, [[g.float() for g in grads[0]]])
    for h, f in zip(half, full):
        assert h.dtype == dtype
        assert opt_half.state[h]["exp_avg"].dtype == torch.float32
        assert torch.equal(h.detach(), f.detach().to(dtype))
        torch.testing.assert_close(opt_half.state[h]["exp_avg_sq"], opt_full.state[f]["exp_avg_sq"], atol=0, rtol=0)


def test_params_without_grad_are_left_alone():
    used, unused = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    before = unused.detach().clone()
    opt = FOAM([used, unused])
    used.grad = torch.ones(4, 4)
    opt.step()
    assert torch.equal(unused.detach(), before)
    assert len(opt.state[unused]) == 0


def test_closure_is_evaluated_with_grad():
    w = torch.randn(3, 8, requires_grad=True)
    opt = FOAM([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss0 = opt.step(closure)
    assert torch.is_tensor(loss0) and loss0.item() > 0
    assert opt.step(closure).item() < loss0.item()


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_continues_bit_identically(foreach):
    params = make_params()
    opt = FOAM(params, block_size=3, weight_decay=0.1, foreach=foreach, **ADAM)
    grads = grad_sequence(params, steps=10)
    run(opt, params, grads[:5])

    saved = saved_and_loaded(opt.state_dict())

    resumed_params = clone_params(params)
    resumed = FOAM(resumed_params, block_size=3, weight_decay=0.1, foreach=foreach, **ADAM)
    resumed.load_state_dict(saved)
    run(opt, params, grads[5:])
    run(resumed, resumed_params, grads[5:])
    assert_same_state(opt, resumed)


def test_load_keeps_fp32_states_for_bf16_params():
    params = [p.detach().bfloat16().requires_grad_() for p in make_params()]
    opt = FOAM(params, block_size=2)
    run(opt, params, grad_sequence(params, steps=2))
    twin = FOAM(clone_params(params), block_size=2)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p_state, q_state in zip(opt.state.values(), twin.state.values()):
        assert q_state["exp_avg"].dtype == torch.float32
        assert torch.equal(p_state["exp_avg"], q_state["exp_avg"])


@pytest.mark.parametrize(
    "saved_kwargs, loading_kwargs, error_regex",
    [
        (dict(block_size=4), dict(block_size=8), r"saved with block_size=4 .* has block_size=8"),
        (dict(second_moment="sq_mean"), dict(second_moment="mean_sq"), r"second_moment='sq_mean'"),
    ],
)
def test_load_refuses_other_folding(saved_kwargs, loading_kwargs, error_regex):
    params = make_params()
    opt = FOAM(params, **saved_kwargs)
    run(opt, params, grad_sequence(params, steps=1))
    with pytest.raises(FoamStateError, match=error_regex):
        FOAM(clone_params(params), **loading_kwargs).load_state_dict(opt.state_dict())


def test_load_refuses_adamw_state_and_reshaped_state():
    params = make_params()
    adamw = torch.optim.AdamW(params)
    run(adamw, params, grad_sequence(params, steps=1))
    with pytest.raises(FoamStateError, match="not written by FOAM"):
        FOAM(clone_params(params)).load_state_dict(adamw.state_dict())

    opt = FOAM(params, block_size=4)
    run(opt, params, grad_sequence(params, steps=1))
    tampered = copy.deepcopy(opt.state_dict())
    tampered["state"][0]["exp_avg"] = torch.zeros(6, 8)  # an unfolded moment on a folded (6, 8) weight
    with pytest.raises(FoamStateError, match=r"has shape \(6, 8\), but with block_size=4 FOAM keeps shape \(6, 2\)"):
        FOAM(clone_params(params), block_size=4).load_state_dict(tampered)


def test_param_groups_carry_their_own_block_size():
    folded, plain = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    opt = FOAM([{"params": [folded], "block_size": 8}, {"params": [plain], "block_size": 1}], block_size=4)
    run(opt, [folded, plain], grad_sequence([folded, plain], steps=1))
    assert opt.state[folded]["exp_avg"].shape == (4, 2)
    assert opt.state[plain]["exp_avg"].shape == (4, 16)
    assert [g["block_size"] for g in opt.state_dict()["param_groups"]] == [8, 1]


def test_groups_copied_from_adamw_with_its_flags_off_train_as_foam():
    # torch's Adam flags are refused only when on (tests/_helpers.py): AdamW's own groups carry them off.
    model = torch.nn.Linear(8, 4)
    adamw_groups = torch.optim.AdamW(model.parameters(), lr=1e-3).param_groups
    opt = FOAM([dict(group) for group in adamw_groups], block_size=4)
    assert [opt.param_groups[0][k] for k in ("maximize", "amsgrad", "capturable")] == [False, False, False]
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert opt.state[model.weight]["exp_avg"].shape == (4, 2)


@pytest.mark.parametrize(
    "key, value", [("block_size", 5), ("block_size", 16), ("second_moment", "sq_mean"), ("state_dtype", "bfloat16")]
)
def test_a_structural_option_changed_after_the_first_step_is_refused(key, value):
    # block_size 5 folds a row of 16 into 4 blocks too, and 16 broadcasts into the (8, 4) moments on the foreach
    # path: both stepped silently on the moments of blocks of 4. Refused by name, as a checkpoint refuses them.
    model = torch.nn.Linear(16, 8, bias=False)
    opt = FOAM(model.parameters(), block_size=4)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    before = model.weight.detach().clone()
    opt.param_groups[0][key] = value
    with pytest.raises(FoamConfigError, match=rf"param group 0 changed {key} from .* to {value!r} after its moments"):
        opt.step()
    assert torch.equal(model.weight, before)
    opt.param_groups[0][key] = {"block_size": 4, "second_moment": "mean_sq", "state_dtype": None}[key]
    opt.step()  # the old value back: steps again
    assert not torch.equal(model.weight, before)


def test_an_invalid_option_set_on_a_group_is_refused_at_the_next_step():
    model = torch.nn.Linear(16, 8, bias=False)
    opt = FOAM(model.parameters())
    opt.param_groups[0]["second_moment"] = "meansq"  # a typo: it ran the sq_mean rule
    model(torch.randn(2, 16)).sum().backward()
    with pytest.raises(FoamConfigError, match=r"second_moment='meansq' is invalid.*\(in param group 0\)"):
        opt.step()


@pytest.mark.parametrize("path", path_names("for-loop", "foreach", "fused"))
@pytest.mark.parametrize(
    "key, value, refused",
    [
        ("lr", float("nan"), r"lr=nan is invalid: it must be finite and >= 0"),  # every weight turned NaN, silently
        ("lr", "1e-3", r"lr='1e-3' has type str"),
        ("scale", -1.0, r"scale=-1.0 is invalid: it must be finite and > 0"),
        ("betas", (0.9, 1.0), r"betas\[1\]=1.0 is invalid"),
        ("fused", "yes", r"fused='yes' must be None, True or False"),
    ],
)
def test_a_value_set_on_a_group_after_its_first_step_is_checked_as_the_constructor_checks_it(path, key, value, refused):
    model = torch.nn.Linear(16, 8, bias=False)
    opt = FOAM(model.parameters(), block_size=4, **PATHS[path])
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    with pytest.raises((FoamConfigError, TypeError), match=refused):  # what the constructor says
        FOAM(model.parameters(), **{key: value})
    before = model.weight.detach().clone()
    opt.param_groups[0][key] = value
    with pytest.raises((FoamConfigError, TypeError), match=rf"{refused}.*\(in param group 0\)"):
        opt.step()
    assert torch.equal(model.weight, before)
    opt.param_groups[0][key] = {"lr": 1e-3, "scale": 1.0, "betas": (0.9, 0.999), "fused": PATHS[path].get("fused")}[key]
    for lr in (5e-4, 2.5e-4):  # a scheduler's changes are taken
        opt.param_groups[0]["lr"] = lr
        opt.step()
    assert not torch.equal(model.weight, before)


def test_a_loaded_state_does_not_share_the_step_counter_of_the_optimizer_it_came_from():
    model = torch.nn.Linear(16, 8, bias=False)
    opt = FOAM(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    twin = FOAM(model.parameters())
    twin.load_state_dict(opt.state_dict())
    opt.step()
    assert (opt.state[model.weight]["step"].item(), twin.state[model.weight]["step"].item()) == (2.0, 1.0)


def test_a_group_list_reused_for_a_second_optimizer_keeps_each_ones_options():
    # torch fills the group dicts it is given with its defaults: reusing them for a second FOAM would carry the
    # first one's block_size and lr into it. FOAM keeps copies (edit optimizer.param_groups instead).
    groups = [{"params": [torch.nn.Parameter(torch.randn(4, 8))], "weight_decay": 0.1}]
    first = FOAM(groups, lr=1e-3, block_size=4)
    second = FOAM(groups, lr=5e-4, block_size=8, state_dtype="bfloat16")
    assert [first.param_groups[0][k] for k in ("lr", "block_size", "state_dtype")] == [1e-3, 4, None]
    assert [second.param_groups[0][k] for k in ("lr", "block_size", "state_dtype")] == [5e-4, 8, "bfloat16"]
    assert groups == [{"params": groups[0]["params"], "weight_decay": 0.1}]


def test_a_structural_option_changed_after_a_load_is_refused_too():
    model = torch.nn.Linear(16, 8, bias=False)
    opt = FOAM(model.parameters(), block_size=4)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    twin = FOAM(model.parameters(), block_size=4)
    twin.load_state_dict(opt.state_dict())
    twin.param_groups[0]["block_size"] = 5  # rows of 16: 4 blocks either way
    with pytest.raises(FoamConfigError, match="changed block_size from 4 to 5 after its moments were built"):
        twin.step()


def test_structural_changes_no_moment_depends_on_are_taken():
    model = torch.nn.Linear(16, 8)
    opt = FOAM(model.parameters(), block_size=4)
    opt.param_groups[0]["block_size"] = 8  # before any state: the moments are built with 8
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    assert opt.state[model.weight]["exp_avg"].shape == (8, 2)
    opt.param_groups[0]["state_dtype"] = "float32"  # None means float32 for fp32 weights: the same moments
    opt.param_groups[0]["state_dtype"] = torch.float32
    opt.step()
    bias_only = FOAM([model.bias], block_size=4)  # a 1-D tensor never folds: its block size changes nothing
    bias_only.step()
    bias_only.param_groups[0]["block_size"] = 16
    bias_only.step()
    assert bias_only.state[model.bias]["step"].item() == 2


def test_a_named_parameter_in_two_groups_is_named_by_our_check():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(FoamConfigError, match=r"shape \(4, 4\) in param group 1 is already in param group 0.*Fix:"):
        FOAM([{"params": [("a", w)]}, {"params": [("b", w)]}])
