"""Edge cases of FOAM's state and param groups that torch alone would let through or explain poorly: a row length
that folds to the same shape, a state without its step, a plain-number step, a tensor in two groups, a group without
params."""

from __future__ import annotations

import copy

import pytest
import torch

from foam_hf import FOAM, FoamStateError


def stepped(shape=(6, 8), **kwargs):
    p = torch.randn(shape, requires_grad=True)
    opt = FOAM([p], **kwargs)
    p.grad = torch.randn(shape)
    opt.step()
    return opt


def test_state_of_another_row_length_with_the_same_folded_shape_is_refused():
    """(6, 8) and (6, 7) both fold to (6, 2) at B=4: today the moments load silently onto a parameter of another
    shape. Fix: FOAM.state_dict() records each parameter's shape in its group (``"param_shapes": [[6, 8]]``, plain
    lists, weights_only-safe); load_state_dict compares it (when present) with the current parameters and raises
    FoamStateError naming the index, both shapes and the fix, before anything is loaded."""
    saved = stepped((6, 8)).state_dict()
    with pytest.raises(FoamStateError, match=r"\(6, 8\).*\(6, 7\)"):
        FOAM([torch.randn(6, 7, requires_grad=True)]).load_state_dict(saved)


def test_state_without_step_is_refused_at_load():
    """A saved parameter state without 'step' loads, then step() dies with KeyError: 'step'. Fix: in
    load_state_dict's per-parameter loop, require ``pstate.get("step")`` to be present (tensor or number) and raise
    FoamStateError("... has no 'step' ...; not a FOAM state") otherwise."""
    saved = copy.deepcopy(stepped().state_dict())
    del saved["state"][0]["step"]
    with pytest.raises(FoamStateError, match="'step'"):
        FOAM([torch.randn(6, 8, requires_grad=True)]).load_state_dict(saved)


def test_integer_step_is_accepted_as_torch_adam_accepts_it():
    """A state whose 'step' is a Python number (older torch checkpoints, hand-made states) loads, then the fused
    path fails with an unreadable pybind TypeError and the for-loop path with AttributeError. torch.optim.Adam
    converts it in __setstate__. Fix: in FOAM.__setstate__ (or after super().load_state_dict), replace a non-tensor
    ``state["step"]`` with ``torch.tensor(float(step), dtype=torch.float32)``."""
    opt = stepped()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["step"] = 1
    p = torch.randn(6, 8, requires_grad=True)
    resumed = FOAM([p])
    resumed.load_state_dict(saved)
    p.grad = torch.randn(6, 8)
    resumed.step()
    assert resumed.state[p]["step"].item() == 2.0


def test_same_parameter_in_two_groups_names_the_parameter_and_the_fix():
    """torch's 'some parameters appear in more than one parameter group' names neither the tensor nor the fix.
    Fix: in FOAM.add_param_group, before super().add_param_group, look for ``id(p)`` in the existing groups and
    raise FoamConfigError(ValueError) keeping torch's words: "FOAM: a parameter of shape (2, 4) in param group 1
    is already in param group 0; some parameters appear in more than one parameter group. Fix: put each tensor in
    exactly one group (build the groups from disjoint lists, e.g. by module name)"."""
    p = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"shape \(2, 4\).*param group 1.*param group 0.*Fix:"):
        FOAM([{"params": [p]}, {"params": [p], "lr": 0.1}])


def test_param_group_without_params_key_says_so():
    """``FOAM([{"lr": 0.1}])`` raises a bare KeyError: 'params'. Fix: at the top of FOAM.add_param_group, if
    "params" is missing raise TypeError("FOAM: param group {index} has no 'params' key (keys: [...]). Fix: pass
    {'params': [tensors], ...}")."""
    with pytest.raises(TypeError, match=r"no 'params'.*Fix:"):
        FOAM([{"lr": 0.1}])


@pytest.mark.parametrize("how", ["same optimizer", "resumed from a checkpoint"])
def test_a_channels_last_weight_that_turns_contiguous_steps_as_adamw(how):
    """Moments of an unfolded channels_last weight used to keep its strides; once the model turned contiguous
    (``model.to(memory_format=...)``, or a checkpoint loaded into a contiguous model) the default path picked the
    fused kernel for the now contiguous weight and it refused the strided moments. Held to torch's AdamW."""

    def run(make_optimizer):
        torch.manual_seed(0)
        model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model.parameters())
        x = torch.randn(2, 3, 5, 5)
        model(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        if how == "same optimizer":
            model.to(memory_format=torch.contiguous_format)
        else:
            saved = copy.deepcopy(optimizer.state_dict())
            model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
            optimizer = make_optimizer(model.parameters())
            optimizer.load_state_dict(saved)
        model(2 * x).sum().backward()
        optimizer.step()
        return list(model.parameters())

    expected = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01))
    stepped_by_foam = run(lambda ps: FOAM(ps, lr=1e-2, weight_decay=0.01, block_size=1))
    for got, want in zip(stepped_by_foam, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
