"""Non-finite gradients: FOAM does what torch.optim.AdamW does by default (no skipping, no masking), and
FoamCallback reports the first optimizer step at which a folded tensor's gradient held a NaN or inf.

What "what AdamW does" means, precisely (docs/guarantees.md):

* unfolded tensors (1-D, or block_size 1): a NaN/inf at entry ``(i, j)`` makes that entry of ``exp_avg`` /
  ``exp_avg_sq`` and of the weight non-finite, and nothing else, exactly as AdamW (compared below);
* folded tensors: the entry is averaged into its block, so the poison covers that block: ``exp_avg[i, k]``
  and ``exp_avg_sq[i, k]`` with ``k = j // B``, and the ``B`` weights of row ``i`` in block ``k`` (``n mod B``
  for a ragged last block). Every other row and block is bit-identical to a run whose gradient had a finite
  value there;
* later finite steps do not heal or spread it (as AdamW: the moments stay non-finite).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from _helpers import FOR_LOOP, PATHS, path_names, zero_res_scale_step
from _helpers import HPARAMS as HPARAM_SETS
from hf_fixtures import lm_dataset, tiny_llama, training_args
from transformers import Trainer, TrainerCallback, TrainingArguments

from foam_hf import FOAM, FoamCallback

BAD_VALUES = [math.nan, math.inf, -math.inf]
HPARAMS = HPARAM_SETS["decay"]


def grads(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


def run(opt, param, sequence):
    for g in sequence:
        param.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("bad", BAD_VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("foreach", [False, True])
def test_unfolded_path_propagates_non_finite_values_as_adamw(bad, foreach):
    # block_size=1 is AdamW's maths; a bad entry at step 2 of 5 must poison exactly what AdamW's poisons.
    start = torch.randn(6, 16)
    ours, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()
    foam = FOAM([ours], block_size=1, foreach=foreach, fused=False, **HPARAMS)
    adamw = torch.optim.AdamW([theirs], foreach=foreach, **HPARAMS)
    sequence = grads((6, 16), steps=5)
    sequence[1][2, 5] = bad
    run(foam, ours, sequence)
    run(adamw, theirs, sequence)
    assert not torch.isfinite(theirs[2, 5])  # the premise: AdamW does propagate it
    for a, b in ((ours, theirs), *((foam.state[ours][k], adamw.state[theirs][k]) for k in ("exp_avg", "exp_avg_sq"))):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        # Finite entries agree within fp32 ulps (tests/test_optim.py::test_block_size_one_is_adamw).
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, equal_nan=True)


# (shape, block size, bad entry, the weight entries the bad value may reach)
FOLDED_CASES = [
    ((6, 16), 4, (2, 5), [(2, c) for c in range(4, 8)]),
    ((5, 10), 4, (3, 9), [(3, 8), (3, 9)]),  # the ragged last block holds n mod B = 2 entries
    ((2, 3, 8), 8, (1, 2, 0), [(1, 2, c) for c in range(8)]),  # one block per row; rows are leading dims
]


@pytest.mark.parametrize("second_moment", ["mean_sq", "sq_mean"])
@pytest.mark.parametrize("bad", BAD_VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("path", path_names("for-loop", "foreach", "fused"))
@pytest.mark.parametrize("shape, block_size, entry, poisoned", FOLDED_CASES, ids=["B=4", "ragged", "3-D B=n"])
def test_folded_path_poisons_exactly_the_block(shape, block_size, entry, poisoned, path, bad, second_moment):
    start = torch.randn(shape)
    hurt, clean = start.clone().requires_grad_(), start.clone().requires_grad_()
    kwargs = dict(block_size=block_size, second_moment=second_moment, res_scale=0.7, **HPARAMS, **PATHS[path])
    opt_hurt, opt_clean = FOAM([hurt], **kwargs), FOAM([clean], **kwargs)
    sequence = grads(shape, steps=4)
    clean_sequence = [g.clone() for g in sequence]
    sequence[1][entry] = bad
    clean_sequence[1][entry] = 0.0  # the same run with a finite value at the bad entry
    run(opt_hurt, hurt, sequence)
    run(opt_clean, clean, clean_sequence)

    expected = torch.zeros(shape, dtype=torch.bool)
    for index in poisoned:
        expected[index] = True
    assert torch.equal(~torch.isfinite(hurt.detach()), expected)  # the whole block, not one entry, and no more
    assert torch.equal(hurt.detach()[~expected], clean.detach()[~expected])  # everything else untouched, bitwise
    folded_entry = (*entry[:-1], entry[-1] // block_size)
    for key in ("exp_avg", "exp_avg_sq"):
        state_hurt, state_clean = opt_hurt.state[hurt][key], opt_clean.state[clean][key]
        bad_state = ~torch.isfinite(state_hurt)
        assert bad_state.nonzero().tolist() == [list(folded_entry)]
        assert torch.equal(state_hurt[~bad_state], state_clean[~bad_state])


@pytest.mark.parametrize("second_moment", ["mean_sq", "sq_mean"])
@pytest.mark.parametrize("path", path_names("for-loop", "foreach", "fused"))
def test_zero_res_scale_drops_a_residual_whose_square_overflows(path, second_moment):
    """res_scale=0 drops the residual: a finite gradient whose R⊙R overflows must not give NaN weights (the fused
    kernels once computed 0·inf there; tests/test_fused_kernel.py runs every implementation of the kernel)."""
    stepped, expected = zero_res_scale_step(path, second_moment)
    assert torch.isfinite(expected).all()  # the premise: the math gives finite weights
    torch.testing.assert_close(stepped, expected, atol=1e-6, rtol=1e-6)


def test_folded_group_keeps_one_dimensional_tensors_as_adamw():
    bias = torch.randn(7, requires_grad=True)
    bias_adamw = bias.detach().clone().requires_grad_()
    foam = FOAM([bias], block_size=4, **FOR_LOOP, **HPARAMS)
    adamw = torch.optim.AdamW([bias_adamw], foreach=False, **HPARAMS)
    sequence = grads((7,), steps=3)
    sequence[0][3] = math.nan
    run(foam, bias, sequence)
    run(adamw, bias_adamw, sequence)
    assert (~torch.isfinite(bias.detach())).nonzero().tolist() == [[3]]
    torch.testing.assert_close(bias, bias_adamw, atol=1e-6, rtol=0, equal_nan=True)


# ---------------------------------------------------------------------------- FoamCallback in a real Trainer

BAD_STEP = 3  # 1-based optimizer step whose backward gets the NaN; 5 steps leave finite steps on both sides


def train_with_nan_at(tmp_path, step, *, parameter, **overrides):
    """Train a tiny Llama 5 steps; during the backward of optimizer step ``step`` the gradient of
    ``parameter`` (a dotted name) gets a NaN at [0, 0] through a tensor hook. ``step=None``: no NaN."""
    model = tiny_llama()
    target = dict(model.named_parameters())[parameter]
    calls = []

    def poison(grad):
        calls.append(1)
        if len(calls) == step:  # one backward per optimizer step (no gradient accumulation)
            grad = grad.clone()
            grad[0, 0] = math.nan
        return grad

    target.register_hook(poison)
    before_train = overrides.pop("before_train", None)
    args = training_args(tmp_path / "out", max_steps=5, logging_steps=1, **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset())
    if before_train is not None:
        before_train(trainer)
    trainer.train()
    assert len(calls) == 5
    return trainer


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipping (NaN spreads to all grads)", "no clipping"])
def test_callback_reports_the_first_non_finite_step(tmp_path, caplog, max_grad_norm):
    with caplog.at_level(logging.WARNING, logger="foam_hf.integration.callback"):
        trainer = train_with_nan_at(
            tmp_path, BAD_STEP, parameter="model.layers.1.self_attn.q_proj.weight", max_grad_norm=max_grad_norm
        )
    reports = [
        (e["step"], e["foam/first_nonfinite_step"])
        for e in trainer.state.log_history
        if "foam/first_nonfinite_step" in e
    ]
    assert reports == [(BAD_STEP, BAD_STEP)]  # logged once, in the log entry of that very step
    warnings = [r.getMessage() for r in caplog.records if "non-finite gradients" in r.getMessage()]
    assert len(warnings) == 1 and f"optimizer step {BAD_STEP}" in warnings[0]
    # Independent evidence, from the Trainer's own gradient norm: finite before step BAD_STEP, NaN at it.
    norms = [float(e["grad_norm"]) for e in trainer.state.log_history if "grad_norm" in e]
    assert all(math.isfinite(v) for v in norms[: BAD_STEP - 1]) and math.isnan(norms[BAD_STEP - 1])
    assert not torch.isfinite(trainer.model.model.layers[1].self_attn.q_proj.weight).all()


def test_callback_reports_the_first_non_finite_step_under_layerwise_foam(tmp_path):
    # Layer-wise FOAM frees each gradient inside backward: the callback reads them in its hooks instead.
    kwargs = dict(parameter="model.layers.1.self_attn.q_proj.weight", optim="foam_layerwise", max_grad_norm=0.0)
    trainer = train_with_nan_at(tmp_path, BAD_STEP, **kwargs)
    reports = [
        (e["step"], e["foam/first_nonfinite_step"])
        for e in trainer.state.log_history
        if "foam/first_nonfinite_step" in e
    ]
    assert reports == [(BAD_STEP, BAD_STEP)]
    assert not torch.isfinite(trainer.model.model.layers[1].self_attn.q_proj.weight).all()


def test_callback_reports_nothing_on_a_finite_run(tmp_path):
    trainer = train_with_nan_at(tmp_path, None, parameter="model.layers.1.self_attn.q_proj.weight")
    assert not any("foam/first_nonfinite_step" in e for e in trainer.state.log_history)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


class FoldedGradientWatch(TrainerCallback):
    """Independent of FoamCallback: records, before each optimizer step, whether any gradient of a folded
    weight (the default targets: the decoder's ``*_proj`` linear weights) held a NaN or inf."""

    def __init__(self, model):
        self.folded = [p for name, p in model.named_parameters() if name.endswith("_proj.weight")]
        self.nonfinite_steps = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in self.folded):
            self.nonfinite_steps.append(state.global_step + 1)


def test_under_trainer_a_nan_in_the_head_is_reported_when_it_reaches_folded_gradients(tmp_path):
    # A NaN in an *unfolded* tensor (the output head) reaches the folded gradients either in the same step
    # (accelerate <= 1.15 multiplies every gradient by the clip scale max_norm/norm, NaN, even for
    # max_grad_norm=0) or one step later (accelerate >= 1.16 skips that multiplication; the head's weights
    # are NaN after the step, so the next loss and every gradient are). Whichever happens in this run, the
    # callback must report exactly the first step at which the folded gradients were non-finite.
    watch = {}

    def attach(trainer):
        watch["cb"] = FoldedGradientWatch(trainer.model)
        trainer.add_callback(watch["cb"])

    trainer = train_with_nan_at(tmp_path, BAD_STEP, parameter="lm_head.weight", max_grad_norm=0.0, before_train=attach)
    seen = watch["cb"].nonfinite_steps
    assert seen and seen[0] in (BAD_STEP, BAD_STEP + 1)  # the NaN did reach folded gradients, at one of those
    reports = [e["foam/first_nonfinite_step"] for e in trainer.state.log_history if "foam/first_nonfinite_step" in e]
    assert reports == [seen[0]]
    # Once the loss is NaN, every entry of every folded weight's gradient is: the weights end all non-finite.
    assert all(not torch.isfinite(p).any() for p in watch["cb"].folded)


def test_callback_checks_the_folded_gradients_only():
    # Outside the Trainer (no norm computation spreading it), the callback's documented scope: folded
    # tensors, where a NaN poisons a whole block. A NaN in an unfolded tensor is AdamW's behaviour: not reported.
    from transformers import TrainerControl, TrainerState

    folded, unfolded = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    opt = FOAM([{"params": [folded]}, {"params": [unfolded], "block_size": 1}], block_size=4)
    args = TrainingArguments(output_dir="unused", report_to=[], logging_steps=1000, use_cpu=True)
    callback, state = FoamCallback(), TrainerState(max_steps=10)
    for step, (bad_folded, bad_unfolded) in enumerate([(False, True), (False, False), (True, False), (True, True)]):
        state.global_step = step
        folded.grad, unfolded.grad = torch.randn(4, 8), torch.randn(4, 8)
        folded.grad[1, 2] = math.nan if bad_folded else 0.0
        unfolded.grad[0, 0] = math.inf if bad_unfolded else 0.0
        callback.on_pre_optimizer_step(args, state, TrainerControl(), optimizer=opt)
        callback.on_optimizer_step(args, state, TrainerControl(), optimizer=opt)  # as the Trainer calls them
    logs = {"loss": 1.0}  # a training log: the callback's figures go into those only
    callback.on_log(args, state, TrainerControl(), logs=logs)
    assert logs == {"loss": 1.0, "foam/first_nonfinite_step": 3}  # the 1-based step of the first folded NaN, once


def test_a_second_train_reports_its_own_first_non_finite_step():
    # The callback remembered the first report across train() calls (a second train() on one Trainer, the trials
    # of a hyper-parameter search), and never reported again.
    from types import SimpleNamespace

    from foam_hf import FOAM, FoamCallback

    callback = FoamCallback()
    callback._first_nonfinite_step = 3  # as a first train() that hit a NaN at step 3 leaves it
    optimizer = FOAM([torch.nn.Parameter(torch.randn(4, 8))], block_size=4)
    fresh = SimpleNamespace(log_history=[])  # a new train()'s state
    callback.on_train_begin(SimpleNamespace(optim="foam"), fresh, None, optimizer=optimizer)
    assert callback._first_nonfinite_step is None


def test_a_resumed_run_does_not_report_the_first_non_finite_step_again(tmp_path):
    # A NaN at step 2, a checkpoint at step 2, a resume: the resumed run reported its step 3 as a second "first".
    def poison_q_proj(trainer):
        class Poison(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, **kwargs):
                if state.global_step == 1:
                    with torch.no_grad():
                        model.model.layers[0].self_attn.q_proj.weight[0, 0] = math.nan

        trainer.add_callback(Poison())

    def reports(trainer):
        history = trainer.state.log_history
        return [(e["step"], e["foam/first_nonfinite_step"]) for e in history if "foam/first_nonfinite_step" in e]

    settings = dict(max_steps=4, save_steps=2, save_strategy="steps", logging_steps=1, max_grad_norm=0.0)
    first = Trainer(model=tiny_llama(), args=training_args(tmp_path / "out", **settings), train_dataset=lm_dataset())
    poison_q_proj(first)
    first.train()
    assert reports(first) == [(2, 2)]
    again = Trainer(model=tiny_llama(), args=training_args(tmp_path / "out", **settings), train_dataset=lm_dataset())
    again.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert reports(again) == [(2, 2)]  # the checkpoint's own report, and no second one


@pytest.mark.parametrize("dtype, value", [(torch.float16, 200.0), (torch.float32, 1e19)])
@pytest.mark.parametrize("layerwise", [False, True], ids=["foam", "foam_layerwise"])
def test_finite_gradients_whose_2_norm_overflows_are_not_reported(dtype, value, layerwise):
    # The check took each gradient's 2-norm in its own dtype: 512 x 512 fp16 entries of 200 (or fp32 ones of 1e19)
    # have a norm past the dtype's range, so finite gradients were reported as non-finite. A NaN still is.
    from transformers import TrainerControl, TrainerState

    param = torch.zeros(512, 512, dtype=dtype, requires_grad=True)
    opt = FOAM([param], block_size=4)
    args = TrainingArguments(output_dir="unused", report_to=[], logging_steps=1000, use_cpu=True)
    callback, state = FoamCallback(), TrainerState(max_steps=10)
    for step, bad in enumerate([False, True]):
        state.global_step = step
        param.grad = torch.full((512, 512), value, dtype=dtype)
        if bad:
            param.grad[7, 9] = math.nan
        if layerwise:  # what the layer-wise hooks hand the callback, then its end of step
            callback._observing = True
            callback._observe_layerwise(param, param.grad, opt.param_groups[0])
            callback._finish_layerwise_step(args, state)
        else:
            callback.on_pre_optimizer_step(args, state, TrainerControl(), optimizer=opt)
            callback.on_optimizer_step(args, state, TrainerControl(), optimizer=opt)
    logs = {"loss": 1.0}
    callback.on_log(args, state, TrainerControl(), logs=logs)
    assert logs == {"loss": 1.0, "foam/first_nonfinite_step": 2}  # the NaN's step, not the finite first one


def test_a_step_the_loss_scaler_skipped_is_not_reported_as_non_finite():
    # fp16 mixed precision: the loss scaler skips a step whose gradients overflowed (often the first few, while
    # it calibrates), so nothing propagates into FOAM's states. Those steps were reported as the first non-finite
    # step, with the warning that NaN/inf propagates. accelerate's optimizer wrapper says whether it skipped.
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    param = torch.zeros(4, 8, requires_grad=True)
    foam = FOAM([param], block_size=4)
    args = TrainingArguments(output_dir="unused", report_to=[], logging_steps=1000, use_cpu=True)
    callback, state = FoamCallback(), TrainerState(max_steps=10)
    for step, skipped in enumerate([True, True, False]):  # inf gradients at all three; the scaler skips two
        state.global_step = step
        param.grad = torch.full((4, 8), math.inf)
        wrapper = SimpleNamespace(optimizer=foam, step_was_skipped=skipped)
        callback.on_pre_optimizer_step(args, state, TrainerControl(), optimizer=wrapper)
        callback.on_optimizer_step(args, state, TrainerControl(), optimizer=wrapper)
    logs = {"loss": 1.0}
    callback.on_log(args, state, TrainerControl(), logs=logs)
    assert logs == {"loss": 1.0, "foam/first_nonfinite_step": 3}  # the first step that was taken with them
