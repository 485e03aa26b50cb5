"""Checkpoints: what is saved loads safely and continues bit-identically; what cannot continue exactly is
refused with FoamStateError and leaves the optimizer as it was; Trainer resume from a damaged optimizer file
fails before any step.

Independent expectations: an uninterrupted run (bitwise, on CPU), and the target optimizer's own state
before the refused load.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from _helpers import HPARAMS as HPARAM_SETS
from _helpers import SHAPES, assert_same_state, clone_params, fused_kernel_builds, make_params
from hf_fixtures import StopAt, lm_dataset, tiny_llama, training_args, unwrap_foam
from transformers import Trainer, TrainerCallback

from foam_hf import FOAM, FoamStateError

HPARAMS = HPARAM_SETS["decay"]  # weight decay on, so the no-decay group below differs from the others


def step(opt, params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    opt.step()


def clone_into(opt_builder, params):
    twins = clone_params(params)
    return opt_builder(twins), twins


# ---------------------------------------------------------------------------- save, load weights_only, continue

# (id, dtype of the parameters, optimizer builder over a parameter list). Every layout a run can have.
LAYOUTS = [
    ("one folded group", torch.float32, lambda ps: FOAM(ps, block_size=4, **HPARAMS)),
    (
        "groups with their own options",
        torch.float32,
        lambda ps: FOAM(
            [
                {"params": ps[:2], "block_size": 8, "second_moment": "sq_mean"},
                {"params": ps[2:3], "block_size": 1, "weight_decay": 0.0},
                {"params": ps[3:], "res_scale": 0.0, "scale": 0.5},
            ],
            block_size=3,
            **HPARAMS,
        ),
    ),
    ("bf16 params (fp32 states)", torch.bfloat16, lambda ps: FOAM(ps, block_size=4, **HPARAMS)),
    ("bf16 states", torch.float32, lambda ps: FOAM(ps, block_size=4, state_dtype="bfloat16", **HPARAMS)),
    ("foreach path", torch.float32, lambda ps: FOAM(ps, block_size=3, foreach=True, **HPARAMS)),
]
if fused_kernel_builds():
    LAYOUTS.append(("fused path", torch.float32, lambda ps: FOAM(ps, block_size=3, fused=True, **HPARAMS)))


@pytest.mark.parametrize("dtype, build", [r[1:] for r in LAYOUTS], ids=[r[0] for r in LAYOUTS])
def test_saved_state_loads_with_weights_only_and_continues_bitwise(tmp_path, dtype, build):
    params = make_params(SHAPES["awkward"], dtype=dtype)
    straight = build(params)
    for seed in range(3):
        step(straight, params, seed)
    torch.save(straight.state_dict(), tmp_path / "optimizer.pt")
    saved = torch.load(tmp_path / "optimizer.pt", weights_only=True)  # Trainer's safe loading

    resumed, twins = clone_into(build, params)
    resumed.load_state_dict(saved)
    assert resumed.state_dict()["param_groups"] == straight.state_dict()["param_groups"]
    assert_same_state(straight, resumed)
    for seed in range(3, 6):
        step(straight, params, seed)
        step(resumed, twins, seed)
    assert_same_state(straight, resumed)


def _foam_state(shapes=((6, 8), (7,)), **kwargs):
    params = make_params(shapes)
    opt = FOAM(params, **{**HPARAMS, "block_size": 4, **kwargs})
    step(opt, params, 0)
    return opt.state_dict()


def _adamw_state(shapes=((6, 8), (7,))):
    params = make_params(shapes)
    opt = torch.optim.AdamW(params, **HPARAMS)
    step(opt, params, 0)
    return opt.state_dict()


def _without_shapes(state):
    for group in state["param_groups"]:
        del group["param_shapes"]
    return state


def _without(key):
    state = copy.deepcopy(_foam_state())
    del state["state"][0][key]
    return state


# (id, the saved state, shapes and options of the optimizer that loads it, fragments of the error).
MISMATCHES = [
    (
        "other block_size",
        lambda: _foam_state(block_size=4),
        ((6, 8), (7,)),
        dict(block_size=8),
        ["param group 0 was saved with block_size=4", "has block_size=8", "Fix: build FOAM with block_size=4"],
    ),
    (
        "other second_moment",
        lambda: _foam_state(second_moment="sq_mean"),
        ((6, 8), (7,)),
        dict(second_moment="mean_sq"),
        ["second_moment='sq_mean'", "second_moment='mean_sq'", "cannot be continued exactly", "Fix:"],
    ),
    (
        "other res_scale (torch's load would put the saved one back silently)",
        lambda: _foam_state(res_scale=1.0),
        ((6, 8), (7,)),
        dict(res_scale=0.0),
        [
            "saved with res_scale=1.0",
            "built with res_scale=0.0",
            "Fix: build FOAM with res_scale=1.0",
            "param_groups[0]",
        ],
    ),
    (
        "other scale",
        lambda: _foam_state(scale=0.5),
        ((6, 8), (7,)),
        {},
        ["saved with scale=0.5", "built with scale=1.0", "Fix: build FOAM with scale=0.5"],
    ),
    (
        "other rows",
        lambda: _foam_state(),
        ((5, 8), (7,)),
        {},
        ["parameter 0 of param group 0 was saved with shape (6, 8)", "has shape (5, 8) here", "Fix:"],
    ),
    (
        "other rows, a state without param_shapes (written before they were recorded)",
        lambda: _without_shapes(_foam_state()),
        ((5, 8), (7,)),
        {},
        ["parameter of shape (5, 8)", "has shape (6, 2)", "keeps shape (5, 2)", "Fix:"],
    ),
    (
        "other row length",
        lambda: _foam_state(),
        ((6, 12), (7,)),
        {},
        ["saved with shape (6, 8)", "has shape (6, 12)"],
    ),
    (
        "other row length, same folded shape",
        lambda: _foam_state(),
        ((6, 7), (7,)),
        {},
        ["saved with shape (6, 8)", "has shape (6, 7)"],
    ),
    ("other 1-D length", lambda: _foam_state(), ((6, 8), (9,)), {}, ["saved with shape (7,)", "has shape (9,)"]),
    (
        "torch AdamW state, block_size > 1",
        _adamw_state,
        ((6, 8), (7,)),
        {},
        ["not written by FOAM", "AdamW checkpoint", "Fix: load it into the optimizer that wrote it"],
    ),
    ("torch AdamW state, block_size 1", _adamw_state, ((6, 8), (7,)), dict(block_size=1), ["not written by FOAM"]),
    (
        "fewer parameters",
        lambda: _foam_state(((6, 8), (7,), (3, 4))),
        ((6, 8), (7,)),
        {},
        ["holds 2 parameters but the saved group holds 3", "Fix:"],
    ),
    ("a moment missing", lambda: _without("exp_avg_sq"), ((6, 8), (7,)), {}, ["no tensor 'exp_avg_sq'", "not a FOAM"]),
    (
        "a model's state_dict",
        lambda: torch.nn.Linear(8, 6).state_dict(),
        ((6, 8), (7,)),
        {},
        ["expected a dict with 'state' and 'param_groups'", "got keys ['bias', 'weight']"],
    ),
    ("a list", lambda: [1, 2], ((6, 8), (7,)), {}, ["expected the dict optimizer.state_dict() returns, got list"]),
]


@pytest.mark.parametrize(
    "saved, shapes, kwargs, fragments", [r[1:] for r in MISMATCHES], ids=[r[0] for r in MISMATCHES]
)
def test_mismatched_state_is_refused_and_loses_nothing(saved, shapes, kwargs, fragments):
    params = make_params(shapes, seed=1)
    build = lambda ps: FOAM(ps, **{**HPARAMS, "block_size": 4, **kwargs})  # noqa: E731
    target = build(params)
    step(target, params, 7)  # the target already holds state of its own
    untouched, twins = clone_into(build, params)
    untouched.load_state_dict(copy.deepcopy(target.state_dict()))

    with pytest.raises(FoamStateError) as info:
        target.load_state_dict(saved())
    missing = [f for f in fragments if f not in str(info.value)]
    assert not missing, f"message lacks {missing}:\n{info.value}"
    # Refused means refused: groups, states and later steps are those of an optimizer never asked to load.
    assert target.state_dict()["param_groups"] == untouched.state_dict()["param_groups"]
    step(target, params, 8)
    step(untouched, twins, 8)
    assert_same_state(target, untouched)


@pytest.mark.parametrize(
    "saved_dtype, built_dtype", [(None, "bfloat16"), ("bfloat16", None)], ids=["fp32 -> bf16", "bf16 -> fp32"]
)
def test_a_checkpoint_loads_into_the_state_dtype_the_optimizer_was_built_with(saved_dtype, built_dtype):
    """state_dtype is storage, not the run: loading keeps this optimizer's (torch would put the saved one back and
    the memory saving asked for would be dropped silently), converting the saved moments with a warning: to
    nearest when narrowed, exactly when widened; the next steps run with the new dtype."""
    params = make_params(((6, 8), (7,)), seed=1)
    saver = FOAM(params, block_size=4, state_dtype=saved_dtype, **HPARAMS)
    step(saver, params, 3)
    saved = copy.deepcopy(saver.state_dict())
    loader, twins = clone_into(lambda ps: FOAM(ps, block_size=4, state_dtype=built_dtype, **HPARAMS), params)
    with pytest.warns(UserWarning, match=r"4 saved moment\(s\) were in another dtype"):
        loader.load_state_dict(saved)
    target = torch.bfloat16 if built_dtype == "bfloat16" else torch.float32
    assert [g["state_dtype"] for g in loader.param_groups] == [built_dtype]
    for p, q in zip(params, twins):
        for key in ("exp_avg", "exp_avg_sq"):
            moment = loader.state[q][key]
            assert moment.dtype == target
            assert torch.equal(moment, saver.state[p][key].to(target))
    step(loader, twins, 4)
    assert all(loader.state[q]["exp_avg"].dtype == target for q in twins)


@pytest.mark.skipif(not fused_kernel_builds(), reason="saves from the fused CPU kernel, which needs a C++ compiler")
@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
def test_a_checkpoint_of_a_fused_run_resumes_on_the_implementation_this_optimizer_was_built_with(foreach):
    """fused and foreach choose how a run computes the step, not what: loading keeps this optimizer's. torch put the
    saved fused=True back, and a run resumed with fused=False over a non-contiguous weight (which the kernel
    refuses) failed at its next step, telling to pass fused=False. The resumed run equals the uninterrupted one."""
    saved_params = make_params(((6, 8),), seed=3)
    saver = FOAM(saved_params, block_size=4, fused=True, **HPARAMS)
    step(saver, saved_params, 3)
    twins = [torch.empty(8, 6).t().copy_(saved_params[0].detach()).requires_grad_()]  # the same values, transposed
    assert not twins[0].is_contiguous()
    loader = FOAM(twins, block_size=4, fused=False, foreach=foreach, **HPARAMS)
    loader.load_state_dict(copy.deepcopy(saver.state_dict()))
    assert [(g["fused"], g["foreach"]) for g in loader.param_groups] == [(False, foreach)]
    step(loader, twins, 4)
    step(saver, saved_params, 4)  # uninterrupted
    torch.testing.assert_close(twins[0], saved_params[0], rtol=1e-6, atol=1e-7)


def test_group_count_mismatch_is_refused():
    params = make_params(((6, 8), (7,)))
    opt = FOAM([{"params": params[:1]}, {"params": params[1:], "block_size": 1}], **HPARAMS)
    step(opt, params, 0)
    with pytest.raises(FoamStateError, match=r"saved state has 2 param groups, this optimizer has 1.*Fix"):
        FOAM(make_params(((6, 8), (7,))), **HPARAMS).load_state_dict(opt.state_dict())


def _named_foam(order):
    """FOAM over named parameters (torch's ``param_names``) of two (6, 8) weights and a bias, in ``order``."""
    gen = torch.Generator().manual_seed(0)
    named = {name: torch.nn.Parameter(torch.randn(shape, generator=gen)) for name, shape in NAMED_SHAPES.items()}
    return FOAM([(name, named[name]) for name in order], **HPARAMS), [named[name] for name in order]


NAMED_SHAPES = {"a.weight": (6, 8), "b.weight": (6, 8), "a.bias": (6,)}


def test_a_state_whose_names_sit_elsewhere_is_refused_though_every_shape_agrees():
    saver, params = _named_foam(["a.weight", "b.weight", "a.bias"])
    step(saver, params, 0)
    loader, _ = _named_foam(["b.weight", "a.weight", "a.bias"])  # the weights swapped: same shapes by position
    with pytest.raises(FoamStateError, match=r"saved state of 'a.weight' .* would load onto 'b.weight'.*Fix"):
        loader.load_state_dict(saver.state_dict())
    assert not loader.state and loader.param_groups[0]["param_names"] == ["b.weight", "a.weight", "a.bias"]


def test_names_that_are_all_new_load_by_position_as_torch_does():
    saver, params = _named_foam(["a.weight", "b.weight", "a.bias"])
    step(saver, params, 0)
    state = saver.state_dict()
    state["param_groups"][0]["param_names"] = ["old.0", "old.1", "old.2"]  # a renamed model: no order to check
    loader, twins = _named_foam(["a.weight", "b.weight", "a.bias"])
    loader.load_state_dict(state)
    for p, q in zip(params, twins):
        assert torch.equal(loader.state[q]["exp_avg"], saver.state[p]["exp_avg"])
    # and the optimizer keeps naming its own parameters (torch's load would put the saved names over them)
    assert loader.param_groups[0]["param_names"] == ["a.weight", "b.weight", "a.bias"]


def test_a_parameter_replaced_by_another_where_other_names_match_is_refused():
    # One model shares 'a.bias' with the saved state, but where 'a.weight' was saved 'b.weight' sits now: not a
    # renamed model (its names would all be new), another parameter, whose moments those are not.
    saver, params = _named_foam(["a.weight", "a.bias"])
    step(saver, params, 0)
    loader, _ = _named_foam(["b.weight", "a.bias"])
    with pytest.raises(FoamStateError, match=r"saved state of 'a.weight' .* would load onto 'b.weight': 'a.weight' "):
        loader.load_state_dict(saver.state_dict())


def test_a_flattened_zero_group_is_checked_by_its_names():
    # Under ZeRO a group's tensors become one flat partition (more names than tensors): a name that moved into or
    # out of it, or another order of its names, would restore moments and master weights onto other parameters.
    def flat_foam(names):
        flat = torch.nn.Parameter(torch.zeros(24))
        return FOAM([{"params": [flat], "param_names": list(names)}], **HPARAMS), [flat]

    saver, flat = flat_foam(["x.weight", "y.weight"])
    step(saver, flat, 0)
    same, _ = flat_foam(["x.weight", "y.weight"])
    same.load_state_dict(saver.state_dict())  # the same partition: loads
    swapped, _ = flat_foam(["y.weight", "x.weight"])
    with pytest.raises(FoamStateError, match=r"flattened ZeRO partition .* order \['x.weight', 'y.weight'\]"):
        swapped.load_state_dict(saver.state_dict())


# ---------------------------------------------------------------------------- Trainer: LoRA resume, damaged file


STEPS = 6  # 2N with N = 3: the checkpoint is written at step 3


def lora_model():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    return get_peft_model(tiny_llama(seed=0), config)


def train(tmp_path, name, model_fn, *, resume=None, stop_at=None, **overrides):
    kwargs = dict(
        optim_args="block_size=4,block_sizes=lora_A:4;lora_B:2",
        max_steps=STEPS,
        learning_rate=1e-3,
        weight_decay=0.1,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        logging_steps=1,
        save_strategy="steps",
        save_steps=STEPS // 2,
    )
    args = training_args(tmp_path / name / "out", **{**kwargs, **overrides})
    callbacks = [StopAt(stop_at)] if stop_at else []
    trainer = Trainer(model=model_fn(), args=args, train_dataset=lm_dataset(24), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_lora_resume_after_n_of_2n_steps_is_bitwise_exact(tmp_path):
    straight = train(tmp_path, "straight", lora_model)
    interrupted = train(tmp_path, "interrupted", lora_model, stop_at=STEPS // 2)
    assert interrupted.state.global_step == STEPS // 2
    checkpoint = tmp_path / "interrupted" / "out" / f"checkpoint-{STEPS // 2}"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    # The adapters fold by override (B=4 for lora_A, B=2 for lora_B); only adapters have state.
    assert sorted(g["block_size"] for g in saved["param_groups"]) == [2, 4]
    resumed = train(tmp_path, "interrupted", lora_model, resume=str(checkpoint))
    assert resumed.state.global_step == STEPS

    trained = [(n, p) for n, p in straight.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, _ in trained)
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    opt_a, opt_b = unwrap_foam(straight.optimizer), unwrap_foam(resumed.optimizer)
    assert_same_state(opt_a, opt_b)
    lora_b = dict(straight.model.named_parameters())[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    ]
    assert opt_a.state[lora_b]["exp_avg"].shape == (32, 2)  # (out, r=4) folded with B=2
    # A different run from the same start would differ: the equality above is not vacuous.
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(trained, lora_model().named_parameters()))


def test_resume_from_a_truncated_optimizer_file_fails_before_training(tmp_path):
    train(tmp_path, "run", tiny_llama, max_steps=2, save_steps=2, optim_args=None)
    checkpoint = tmp_path / "run" / "out" / "checkpoint-2"
    data = (checkpoint / "optimizer.pt").read_bytes()
    (checkpoint / "optimizer.pt").write_bytes(data[: len(data) // 2])
    stepped = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stepped.append(state.global_step)

    args = training_args(tmp_path / "again", max_steps=4)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(24), callbacks=[Count()])
    with pytest.raises((RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError)):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert stepped == []


def test_numpy_numbers_as_options_are_saved_as_python_numbers_and_load_with_weights_only(tmp_path):
    # Options given as NumPy scalars (read from a config by NumPy code) were kept as NumPy objects: the state then
    # pickled NumPy types, and torch.load(weights_only=True), the Trainer's way, refused the checkpoint at resume.
    np = pytest.importorskip("numpy")
    params = make_params(((6, 8), (7,)))
    numbers = dict(lr=np.float32(0.01), betas=(np.float64(0.9), 0.99), eps=np.float64(1e-8), scale=np.float32(0.5))
    opt = FOAM(params, block_size=np.int64(4), weight_decay=np.float64(0.1), res_scale=np.float64(1.0), **numbers)
    step(opt, params, 0)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    loaded = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    group = loaded["param_groups"][0]
    assert type(group["block_size"]) is int and group["block_size"] == 4
    assert all(type(group[k]) is float for k in ("lr", "eps", "weight_decay", "scale", "res_scale"))
    assert [type(b) for b in group["betas"]] == [float, float] and group["lr"] == float(np.float32(0.01))
    FOAM(make_params(((6, 8), (7,))), block_size=4, scale=0.5).load_state_dict(loaded)
    # FoamConfig's per-module sizes take NumPy ints as block_size does (they were refused as "not an int")
    from foam_hf import FoamConfig

    sizes = FoamConfig(block_sizes={"q_proj": np.int64(8)}).block_sizes
    assert sizes == {"q_proj": 8} and type(sizes["q_proj"]) is int


def test_a_saved_group_without_scale_or_res_scale_keeps_the_values_foam_was_built_with():
    # A state from before these options existed (or edited by hand) has no value to compare: torch's load then
    # filled them from the defaults, silently turning scale=0.5, res_scale=0 into 1.0 and 1.0.
    params = make_params(((6, 8), (7,)))
    saver = FOAM(params, block_size=4, scale=0.5, res_scale=0.0)
    step(saver, params, 0)
    state = saver.state_dict()
    for group in state["param_groups"]:
        del group["scale"], group["res_scale"]
    loader = FOAM(clone_params(params), block_size=4, scale=0.5, res_scale=0.0)
    loader.load_state_dict(state)
    assert [(g["scale"], g["res_scale"]) for g in loader.param_groups] == [(0.5, 0.0)]


def test_a_state_of_lazy_parameters_saves_and_loads_as_torch_adamws_does():
    # nn.LazyLinear's parameters have no shape before the first forward: state_dict() raised on them.
    def lazy_optimizer():
        model = torch.nn.LazyLinear(8)
        return model, FOAM(model.parameters(), block_size=4)

    model, saver = lazy_optimizer()
    state = saver.state_dict()
    assert state["param_groups"][0]["param_shapes"] == [None, None] and not state["state"]
    twin, loader = lazy_optimizer()
    loader.load_state_dict(state)
    twin(torch.randn(2, 16)).sum().backward()  # materialised (8, 16): now it steps and saves its shape
    loader.step()
    assert loader.state_dict()["param_groups"][0]["param_shapes"] == [[8, 16], [8]]
