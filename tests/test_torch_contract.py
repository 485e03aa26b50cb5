"""FOAM keeps the generic contract of ``torch.optim.Optimizer`` that torch's own optimizer test suite
checks (the OptimizerInfo tests): param groups from generators, load_state_dict pre-hooks that shape what
loads, ValueError for a bad tensor lr, fused=True over parameters that are materialised after construction.
Each behaviour is compared with torch.optim.AdamW doing the same thing, or with FOAM given the same input
in its plain form."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import HPARAMS as HPARAM_SETS
from _helpers import fused_kernel_builds

from foam_hf import FOAM, FoamConfigError

HPARAMS = dict(HPARAM_SETS["decay"], block_size=4)


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6))


def train(model, opt, steps=3):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 8, generator=gen)).pow(2).sum().backward()
        opt.step()


@pytest.mark.parametrize("how", ["constructor", "add_param_group"])
def test_a_param_group_given_as_a_generator_trains_like_one_given_as_a_list(how):
    as_gen, as_list = small_model(), small_model()
    if how == "constructor":
        opt_gen = FOAM([{"params": as_gen.parameters(), "lr": 1e-2}], **{k: v for k, v in HPARAMS.items() if k != "lr"})
        opt_list = FOAM([{"params": list(as_list.parameters()), "lr": 1e-2}], **HPARAMS)
    else:
        opt_gen = FOAM([as_gen[0].weight], **HPARAMS)
        opt_gen.add_param_group({"params": (p for p in [as_gen[0].bias, *as_gen[2].parameters()])})
        opt_list = FOAM([as_list[0].weight], **HPARAMS)
        opt_list.add_param_group({"params": [as_list[0].bias, *as_list[2].parameters()]})
    # torch's AdamW keeps every parameter of a generator group; so must FOAM.
    adamw = torch.optim.AdamW([{"params": small_model().parameters()}])
    assert sum(len(g["params"]) for g in opt_gen.param_groups) == sum(len(g["params"]) for g in adamw.param_groups) == 4
    before = [p.detach().clone() for p in as_gen.parameters()]
    train(as_gen, opt_gen)
    train(as_list, opt_list)
    for p, q, p0 in zip(as_gen.parameters(), as_list.parameters(), before):
        assert not torch.equal(p, p0)  # it trained
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_duplicate_inside_a_generator_group_is_still_refused():
    model = small_model()
    opt = FOAM([model[0].weight], **HPARAMS)
    with pytest.raises(FoamConfigError, match="already in param group 0"):
        opt.add_param_group({"params": (p for p in model[0].parameters())})


def test_load_state_dict_pre_hooks_see_and_shape_what_loads():
    model = small_model()
    opt = FOAM(model.parameters(), **HPARAMS)
    train(model, opt)
    saved = copy.deepcopy(opt.state_dict())

    seen = []

    def halve_moments(optimizer, state_dict):
        seen.append(state_dict)
        state_dict = copy.deepcopy(state_dict)
        for pstate in state_dict["state"].values():
            pstate["exp_avg"] = pstate["exp_avg"] * 0.5
            pstate["exp_avg_sq"] = pstate["exp_avg_sq"] * 0.25
        return state_dict

    fresh_model = small_model()
    fresh = FOAM(fresh_model.parameters(), **HPARAMS)
    fresh.register_load_state_dict_pre_hook(halve_moments)
    fresh.load_state_dict(saved)
    assert len(seen) == 1  # the hook ran once, on what the caller passed
    for pid, p in enumerate(fresh_model.parameters()):
        torch.testing.assert_close(fresh.state[p]["exp_avg"], saved["state"][pid]["exp_avg"] * 0.5, rtol=0, atol=0)
        torch.testing.assert_close(
            fresh.state[p]["exp_avg_sq"], saved["state"][pid]["exp_avg_sq"] * 0.25, rtol=0, atol=0
        )

    # The same hook on torch's AdamW does the same to AdamW's moments: FOAM honours the contract as AdamW does.
    adamw_model = small_model()
    adamw = torch.optim.AdamW(adamw_model.parameters())
    train(adamw_model, adamw)
    adamw_saved = copy.deepcopy(adamw.state_dict())
    other = torch.optim.AdamW(small_model().parameters())
    other.register_load_state_dict_pre_hook(halve_moments)
    other.load_state_dict(adamw_saved)
    first = next(iter(other.state.values()))
    torch.testing.assert_close(first["exp_avg"], adamw_saved["state"][0]["exp_avg"] * 0.5)


def test_post_hooks_see_the_state_as_foam_holds_it_and_what_they_change_stays():
    # torch runs both post-hooks inside its own state_dict()/load_state_dict(); FOAM adds param_shapes and puts
    # the moments back in their own dtype (fp32 for bf16 parameters) after those calls, so it runs them last.
    model = small_model().to(torch.bfloat16)
    opt = FOAM(model.parameters(), **HPARAMS)
    train_bf16 = [torch.randn(5, 8, generator=torch.Generator().manual_seed(s)).bfloat16() for s in range(2)]
    for x in train_bf16:
        opt.zero_grad()
        model(x).float().pow(2).sum().backward()
        opt.step()

    saved_seen = []
    opt.register_state_dict_post_hook(lambda optimizer, state: saved_seen.append(copy.deepcopy(state)))
    saved = opt.state_dict()
    assert [g["param_shapes"] for g in saved_seen[0]["param_groups"]] == [[list(p.shape) for p in model.parameters()]]

    fresh_model = small_model().to(torch.bfloat16)
    fresh = FOAM(fresh_model.parameters(), **HPARAMS)
    loaded_seen = []

    def zero_first_moment(optimizer):
        loaded_seen.append(
            {k: (v["exp_avg"].dtype, v["exp_avg_sq"].dtype) for k, v in enumerate(optimizer.state.values())}
        )
        loaded_seen.append([sorted(g) for g in optimizer.param_groups])
        for pstate in optimizer.state.values():
            pstate["exp_avg"].zero_()

    fresh.register_load_state_dict_post_hook(zero_first_moment)
    fresh.load_state_dict(saved)
    reloaded = FOAM(small_model().to(torch.bfloat16).parameters(), **HPARAMS)
    reloaded.load_state_dict(saved)  # no hook: what the load leaves
    held = {k: (v["exp_avg"].dtype, v["exp_avg_sq"].dtype) for k, v in enumerate(reloaded.state.values())}
    assert loaded_seen[0] == held and set(held.values()) == {(torch.float32, torch.float32)}
    assert loaded_seen[1] == [sorted(g) for g in reloaded.param_groups]  # no param_shapes left in the groups
    assert all(not pstate["exp_avg"].any() for pstate in fresh.state.values())  # the hook's change stayed
    assert any(pstate["exp_avg"].any() for pstate in reloaded.state.values())


def test_a_pre_hook_whose_state_does_not_fit_is_refused_without_loading():
    model = small_model()
    opt = FOAM(model.parameters(), **HPARAMS)
    train(model, opt)
    saved = opt.state_dict()

    def break_shapes(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0]["exp_avg"] = torch.zeros(3, 3)
        return state_dict

    fresh = FOAM(small_model().parameters(), **HPARAMS)
    fresh.register_load_state_dict_pre_hook(break_shapes)
    with pytest.raises(ValueError, match=r"has shape \(3, 3\)"):
        fresh.load_state_dict(saved)
    assert len(fresh.state) == 0


@pytest.mark.parametrize("lr", [torch.tensor([1e-3, 1e-3]), torch.tensor([])])
def test_a_tensor_lr_that_is_not_one_element_is_a_value_error(lr):
    with pytest.raises(ValueError, match=r"lr is a tensor of shape .* one-element tensor") as info:
        FOAM(small_model().parameters(), lr=lr)
    assert isinstance(info.value, FoamConfigError)
    # torch's AdamW also calls it a ValueError.
    with pytest.raises(ValueError):
        torch.optim.AdamW(small_model().parameters(), lr=lr)


def test_a_one_element_tensor_lr_trains_like_the_number():
    a, b = small_model(), small_model()
    train(a, FOAM(a.parameters(), **{**HPARAMS, "lr": torch.tensor(1e-2)}))
    # the number the fp32 tensor holds (1e-2 is not exact in fp32)
    train(b, FOAM(b.parameters(), **{**HPARAMS, "lr": torch.tensor(1e-2).item()}))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


needs_kernel = pytest.mark.skipif(not fused_kernel_builds(), reason="fused CPU kernel unavailable")


@needs_kernel
def test_fused_over_meta_parameters_is_checked_at_step_after_materialising():
    # Deferred initialisation: build on meta, build the optimizer, then materialise in place (swap keeps the
    # Parameter objects the optimizer holds). torch's fused AdamW accepts this flow; FOAM must too.
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6))
    opt = FOAM(model.parameters(), fused=True, **HPARAMS)
    torch.optim.AdamW(model.parameters(), fused=True)  # torch accepts it at construction too
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    reference = small_model()
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters()):
            p.copy_(q)
    assert all(p is q for p, q in zip(model.parameters(), opt.param_groups[0]["params"]))
    train(model, opt)
    expected_model = small_model()
    train(expected_model, FOAM(expected_model.parameters(), fused=False, foreach=False, **HPARAMS))
    for p, q in zip(model.parameters(), expected_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_fused_over_parameters_still_on_meta_fails_at_step_with_the_fix():
    with torch.device("meta"):
        layer = torch.nn.Linear(8, 12)
    opt = FOAM(layer.parameters(), fused=True, **HPARAMS)
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="still on the meta device at step.*to_empty"):
        opt.step()


def test_complex_parameters_are_refused_with_a_fix_that_keeps_real_and_imaginary_parts_apart():
    with pytest.raises(TypeError, match="complex parameter") as info:
        FOAM([torch.zeros(3, 5, dtype=torch.complex64, requires_grad=True)])
    message = str(info.value)
    assert "view_as_real would not help" in message and "torch.optim.AdamW" in message
    # The claim behind the message: view_as_real's last dimension pairs real and imaginary parts, so folding
    # along it would average them together.
    assert torch.view_as_real(torch.zeros(3, 5, dtype=torch.complex64)).shape == (3, 5, 2)


@pytest.mark.parametrize("fused", [None, True])
def test_a_lazy_module_trains_as_its_materialised_twin(fused):
    # torch's optimizers accept nn.LazyLinear's uninitialised parameters (they become real at the first forward);
    # FOAM used to fail at construction on torch.is_complex. fused=True is checked at the first step instead.
    if fused and not fused_kernel_builds():
        fused = None
    torch.manual_seed(0)
    lazy = torch.nn.Sequential(torch.nn.LazyLinear(12), torch.nn.ReLU(), torch.nn.Linear(12, 6))
    opt = FOAM(lazy.parameters(), fused=fused, **HPARAMS)
    lazy(torch.randn(5, 8))  # materialises the first layer's weight and bias
    twin = copy.deepcopy(lazy)
    twin_opt = FOAM(twin.parameters(), fused=fused, **HPARAMS)
    train(lazy, opt)
    train(twin, twin_opt)
    assert opt.state[lazy[0].weight]["exp_avg"].shape == (12, 2)  # folded at B=4 like any weight
    for p, q in zip(lazy.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_fused_group_the_kernel_cannot_step_is_refused_when_added():
    model = small_model()
    opt = FOAM(model.parameters(), **HPARAMS)
    with pytest.raises(RuntimeError, match="fused=True in param group 1"):
        opt.add_param_group({"params": [torch.randn(6, 4).t().requires_grad_()], "fused": True})
    assert len(opt.param_groups) == 1
    reference_model = small_model()
    train(model, opt)
    train(reference_model, FOAM(reference_model.parameters(), **HPARAMS))
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
