"""bf16 optimizer states (``state_dtype="bfloat16"``): bytes, the step against the matrix reference,
unbiased (stochastic) rounding, exact resume, and the options' validation."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import HPARAMS as HPARAM_SETS
from _helpers import (
    PATHS,
    _fused_cpu,
    _store_moment,
    clone_params,
    grad_sequence,
    make_params,
    path_names,
    reference_kwargs,
    run,
    saved_and_loaded,
)

from foam_hf import FOAM, FoamConfig, FoamConfigError, folded_shape, state_memory
from foam_hf.reference import FoamReference

# Weight decay on, and every option explicit: the matrix reference takes the full set.
HPARAMS = reference_kwargs(HPARAM_SETS["decay"])
BF16_RELATIVE_ULP = 2.0**-7  # spacing of bf16 values relative to their magnitude, at most


def grads_for(params, seed):
    """One step's gradients."""
    (grads,) = grad_sequence(params, 1, seed)
    return grads


def step_with(optimizer, params, grads):
    run(optimizer, params, [grads])


def moment_bytes(optimizer):
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for key, t in state.items()
        if key in ("exp_avg", "exp_avg_sq")
    )


@pytest.mark.parametrize("state_dtype", ["bfloat16", torch.bfloat16])
def test_states_are_bf16_folded_and_half_the_bytes(state_dtype):
    params = make_params()
    fp32_params = [p.detach().clone().requires_grad_() for p in params]
    bf16 = FOAM(params, block_size=4, state_dtype=state_dtype)
    fp32 = FOAM(fp32_params, block_size=4)
    grads = grads_for(params, 1)
    step_with(bf16, params, grads)
    step_with(fp32, fp32_params, grads)

    assert bf16.param_groups[0]["state_dtype"] == "bfloat16"  # stored as plain data, whatever was passed
    for p in params:
        state = bf16.state[p]
        expected = folded_shape(p.shape, 4) if p.ndim >= 2 else p.shape
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        assert state["exp_avg"].shape == expected
    assert 2 * moment_bytes(bf16) == moment_bytes(fp32)
    steps = 4 * len(params)
    assert state_memory(bf16).foam_bytes == moment_bytes(bf16) + steps
    assert state_memory(bf16).adamw_bytes == state_memory(fp32).adamw_bytes  # the comparison stays fp32 AdamW


@pytest.mark.parametrize("path", path_names("for-loop", "foreach", "fused"))
@pytest.mark.parametrize("second_moment", ["mean_sq", "sq_mean"])
def test_each_step_is_the_math_on_the_stored_states_then_one_rounding(path, second_moment):
    """From the bf16 states it holds, one step equals the float64 matrix reference started from those same
    states; the new states are within one bf16 spacing of the reference's exact ones."""
    params = make_params()
    hparams = {**HPARAMS, "second_moment": second_moment}
    optimizer = FOAM(params, **hparams, **PATHS[path], state_dtype="bfloat16")
    reference = FoamReference(params, **hparams)
    for step in range(1, 8):
        reference.weights = [p.detach().double().clone() for p in params]
        if step > 1:
            reference.m = [optimizer.state[p]["exp_avg"].double() for p in params]
            reference.v = [optimizer.state[p]["exp_avg_sq"].double() for p in params]
        grads = grads_for(params, 100 + step)
        step_with(optimizer, params, grads)
        reference.step(grads)
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach().double(), reference.weights[i], rtol=1e-5, atol=1e-6)
            for stored, exact in (
                (optimizer.state[p]["exp_avg"], reference.m[i]),
                (optimizer.state[p]["exp_avg_sq"], reference.v[i]),
            ):
                error = (stored.double() - exact).abs()
                assert torch.all(error <= BF16_RELATIVE_ULP * exact.abs() + 1e-30), (step, i, error.max())


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64])
def test_stochastic_rounding_tracks_a_decay_that_round_to_nearest_freezes(param_dtype):
    """Zero gradients after a start at v = 1: the exact second moment decays as beta2**t. One step changes
    it by 0.1 %, under half a bf16 spacing, so round-to-nearest would keep 1.0 forever; the mean of the
    stochastically rounded states follows the exact decay. fp64 parameters (computed in fp64) too: their
    moments used to be copied to bf16 with round-to-nearest."""
    beta2, steps = 0.999, 200
    weight = torch.zeros(64, 4096, dtype=param_dtype, requires_grad=True)
    optimizer = FOAM([weight], lr=0.0, betas=(0.9, beta2), block_size=4, state_dtype="bfloat16")
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    optimizer.state[weight]["exp_avg_sq"].fill_(1.0)
    weight.grad = torch.zeros_like(weight)
    for _ in range(steps):
        optimizer.step()
    stored = optimizer.state[weight]["exp_avg_sq"].double()
    exact = beta2**steps
    assert abs(stored.mean().item() - exact) < 2e-3 * exact
    assert torch.bfloat16 == optimizer.state[weight]["exp_avg_sq"].dtype
    # What round-to-nearest would have kept: the decay rounds away at every step.
    assert torch.tensor(1.0 * beta2).to(torch.bfloat16).item() == 1.0


def test_fused_kernel_rounds_exactly_as_the_python_paths():
    """The C++ stochastic rounding is _store_moment's arithmetic, bit for bit, for every class of value."""
    kernel = _fused_cpu.load_kernel()
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(40_003, generator=gen) * torch.logspace(-42, 38, 40_003)  # denormals to near-max
    values[::97], values[::89], values[::83] = math.inf, -math.inf, math.nan
    values[1:5] = torch.tensor([0.0, -0.0, 3.4e38, -3.4e38])
    for step, salt in [(1, 0), (1, 1), (7, 0), (2**33 + 5, 1)]:  # a step past 2**32 wraps the same way
        expected, actual = (
            torch.empty(values.shape, dtype=torch.bfloat16),
            torch.empty(values.shape, dtype=torch.bfloat16),
        )
        _store_moment(expected, values.clone(), step, salt)
        kernel.stochastic_round_bf16(values, actual, step, salt)
        nan = values.isnan()
        assert torch.equal(actual.isnan(), nan)  # a NaN's payload is the converter's business, not ours
        assert torch.equal(actual[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def test_fused_default_matches_the_for_loop_path():
    """bf16 states take the fused kernel by default (moments staged in fp32, rounded back as above): the same
    steps as the for-loop path, within the fused tolerances (weights) and one bf16 spacing (states)."""
    params = make_params()
    other = [p.detach().clone().requires_grad_() for p in params]
    default = FOAM(params, **HPARAMS, state_dtype="bfloat16")  # fused=None, foreach=None
    loop = FOAM(other, **HPARAMS, state_dtype="bfloat16", foreach=False, fused=False)
    for step in range(5):
        grads = grads_for(params, step)
        step_with(default, params, grads)
        step_with(loop, other, grads)
    for p, q in zip(params, other):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
        for key in ("exp_avg", "exp_avg_sq"):
            fused_state, loop_state = default.state[p][key], loop.state[q][key]
            assert fused_state.dtype == torch.bfloat16
            spacing = BF16_RELATIVE_ULP * loop_state.float().abs()
            assert torch.all((fused_state.float() - loop_state.float()).abs() <= spacing), key


def test_state_dict_round_trip_continues_bitwise():
    params = make_params()
    optimizer = FOAM(params, **HPARAMS, state_dtype="bfloat16")
    for step in range(3):
        step_with(optimizer, params, grads_for(params, step))
    saved = saved_and_loaded(optimizer.state_dict())
    copies = clone_params(params)
    resumed = FOAM(copies, **HPARAMS, state_dtype="bfloat16")
    resumed.load_state_dict(saved)
    for step in range(3, 6):
        grads = grads_for(params, step)
        step_with(optimizer, params, grads)
        step_with(resumed, copies, grads)
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
        assert resumed.state[q]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(optimizer.state[p]["exp_avg"], resumed.state[q]["exp_avg"])


def test_half_precision_params_with_bf16_states():
    weight = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    optimizer = FOAM([weight], block_size=4, state_dtype="bfloat16")
    weight.grad = torch.randn(8, 16, dtype=torch.bfloat16)
    optimizer.step()
    assert weight.dtype == torch.bfloat16 and optimizer.state[weight]["exp_avg"].dtype == torch.bfloat16


def test_optim_args_carry_state_dtype():
    config = FoamConfig.from_optim_args("block_size=8,state_dtype=bfloat16")
    assert config.state_dtype == "bfloat16"
    assert FoamConfig.from_optim_args(config.to_optim_args()) == config
    with pytest.raises(FoamConfigError, match="state_dtype='float16'"):
        FoamConfig.from_optim_args("state_dtype=float16")


def test_trainer_builds_bf16_states_from_optim_args(tmp_path):
    from hf_fixtures import lm_dataset, tiny_llama, training_args
    from transformers import Trainer

    from foam_hf.memory import foam_state_bytes

    model = tiny_llama()
    args = training_args(tmp_path / "out", optim_args="block_size=4,state_dtype=bfloat16")
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset())
    trainer.train()
    states = trainer.optimizer.state
    assert all(states[p]["exp_avg_sq"].dtype == torch.bfloat16 for p in model.parameters())
    logged = next(e["foam/state_bytes"] for e in trainer.state.log_history if "foam/state_bytes" in e)
    expected = sum(
        foam_state_bytes(p, 4 if n.endswith("proj.weight") else 1, "bfloat16") for n, p in model.named_parameters()
    )
    assert logged == expected == moment_bytes(trainer.optimizer) + 4 * len(list(model.parameters()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_foamconfig_takes_the_torch_dtypes_as_foam_does(dtype):
    """FoamConfig(state_dtype=torch.bfloat16) was refused by an error saying the torch dtypes are accepted; it now
    holds what FOAM's own groups hold for that dtype, and reads back from its optim_args string."""
    from foam_hf import FoamConfig

    config = FoamConfig(state_dtype=dtype)
    assert config.state_dtype == FOAM(make_params(), state_dtype=dtype).param_groups[0]["state_dtype"]
    assert FoamConfig.from_optim_args(config.to_optim_args()) == config
