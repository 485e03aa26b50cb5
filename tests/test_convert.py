"""AdamW ⇄ FOAM state conversion, held to the step computed by hand from explicit fold/unfold matrices."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import HPARAMS as HPARAM_SETS
from _helpers import grad_sequence, make_params
from hf_fixtures import unwrap_foam

from foam_hf import FOAM, FoamStateError, folded_shape
from foam_hf.convert import adamw_state_from_foam, foam_state_from_adamw
from foam_hf.reference import fold_matrix, unfold_matrix

HPARAMS = HPARAM_SETS["decay"]  # weight decay on: the conversion must carry the decoupled decay through


def random_grads(params, seed):
    (grads,) = grad_sequence(params, 1, seed)
    return grads


def adamw_after(params, steps):
    adamw = torch.optim.AdamW(params, foreach=False, **HPARAMS)
    for s in range(steps):
        for p, g in zip(params, random_grads(params, seed=100 + s)):
            p.grad = g
        adamw.step()
    return adamw


def hand_step(w, m, v, g, t, *, block_size, res_scale, scale, second_moment):
    """One FOAM step from AdamW's full moments (m, v), written with the matrices A (fold) and E (unfold)."""
    lr, (b1, b2), eps, wd = HPARAMS["lr"], HPARAMS["betas"], HPARAMS["eps"], HPARAMS["weight_decay"]
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    if block_size == 1 or w.ndim < 2:
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        return w * (1 - lr * wd) - lr * (m / bc1) / ((v / bc2).sqrt() + eps), m, v
    n = w.shape[-1]
    A, E = fold_matrix(n, block_size), unfold_matrix(n, block_size)
    G, m0, v0 = g.reshape(-1, n), m.reshape(-1, n) @ A, v.reshape(-1, n) @ A  # the conversion: m A, v A
    g_fold = G @ A
    g2_fold = (G * G) @ A if second_moment == "mean_sq" else g_fold * g_fold
    m1 = b1 * m0 + (1 - b1) * g_fold
    v1 = b2 * v0 + (1 - b2) * g2_fold
    R = G - g_fold @ E
    M, V = m1 @ E + res_scale * R, v1 @ E + res_scale**2 * R * R
    update = scale * (M / bc1) / ((V / bc2).sqrt() + eps)
    folded = (*w.shape[:-1], A.shape[1])
    return w * (1 - lr * wd) - lr * update.reshape(w.shape), m1.reshape(folded), v1.reshape(folded)


def numeric_steps(state_dict):
    """``state_dict`` with each ``step`` a plain int, as torch's optimizers also load it."""
    state_dict = copy.deepcopy(state_dict)
    for state in state_dict["state"].values():
        state["step"] = int(state["step"].item())
    return state_dict


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(block_size=4),
        dict(block_size=3, res_scale=0.5, scale=1.5),
        dict(block_size=4, second_moment="sq_mean"),
        dict(block_size=1),
    ],
    ids=["B=4", "B=3 ragged scaled", "B=4 sq_mean", "B=1"],
)
@pytest.mark.parametrize(
    "from_state_dict",
    [False, True, "numeric step"],
    ids=["optimizer", "state_dict", "state_dict with int steps"],
)
def test_first_step_after_conversion_matches_hand_computation(kwargs, from_state_dict):
    full = dict(block_size=4, res_scale=1.0, scale=1.0, second_moment="mean_sq") | kwargs
    params = make_params(dtype=torch.float64)
    adamw = adamw_after(params, steps=5)  # 5 AdamW steps: moments far from zero, bias corrections live
    adam_moments = [(adamw.state[p]["exp_avg"].clone(), adamw.state[p]["exp_avg_sq"].clone()) for p in params]
    weights = [p.detach().clone() for p in params]

    foam = FOAM(params, **HPARAMS, **kwargs)
    source = {False: adamw, True: copy.deepcopy(adamw.state_dict()), "numeric step": numeric_steps(adamw.state_dict())}
    foam_state_from_adamw(source[from_state_dict], foam)
    grads = random_grads(params, seed=7)
    for p, g in zip(params, grads):
        p.grad = g
    foam.step()

    for p, w, (m, v), g in zip(params, weights, adam_moments, grads):
        w_hand, m_hand, v_hand = hand_step(w, m, v, g, t=6, **full)
        torch.testing.assert_close(p.detach(), w_hand, atol=1e-12, rtol=0)
        torch.testing.assert_close(foam.state[p]["exp_avg"], m_hand, atol=1e-12, rtol=0)
        torch.testing.assert_close(foam.state[p]["exp_avg_sq"], v_hand, atol=1e-12, rtol=0)
        assert foam.state[p]["step"].item() == 6


def test_conversion_is_exact_for_mean_sq_foam_from_the_start():
    """Folding AdamW's m and v equals the state of a FOAM that saw the same gradients (module docstring)."""
    params = make_params(dtype=torch.float64)
    twins = [p.detach().clone().requires_grad_() for p in params]
    adamw = torch.optim.AdamW(twins, foreach=False, **HPARAMS)
    foam_direct = FOAM(params, block_size=3, **HPARAMS)
    for s in range(4):
        grads = random_grads(params, seed=200 + s)
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        adamw.step()
        foam_direct.step()
    converted = FOAM([p.detach().clone().requires_grad_() for p in params], block_size=3, **HPARAMS)
    foam_state_from_adamw(adamw.state_dict(), converted)  # other tensors, same order: by position
    for p, q in zip(params, converted.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(converted.state[q][key], foam_direct.state[p][key], atol=1e-14, rtol=0)


def test_round_trip_shapes_and_values():
    params = make_params(dtype=torch.float32)
    foam = FOAM(params, block_size=3, **HPARAMS)
    for s in range(3):
        for p, g in zip(params, random_grads(params, seed=300 + s)):
            p.grad = g
        foam.step()
    exported = adamw_state_from_foam(foam)
    for i, p in enumerate(params):
        assert exported["state"][i]["exp_avg"].shape == p.shape
        assert exported["state"][i]["exp_avg_sq"].shape == p.shape
        assert torch.equal(exported["state"][i]["step"], foam.state[p]["step"])
    # AdamW accepts it and the unfolded moment is constant within each block (a (6, 8) weight, B = 3).
    adamw = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params])
    adamw.load_state_dict(exported)
    q = adamw.param_groups[0]["params"][0]
    m = adamw.state[q]["exp_avg"]
    torch.testing.assert_close(m[:, 0:3], m[:, 0:1].expand(6, 3), atol=0, rtol=0)
    assert adamw.param_groups[0]["weight_decay"] == HPARAMS["weight_decay"]
    # Back to FOAM: folding the broadcast moments gives the folded states again.
    back = FOAM([p.detach().clone().requires_grad_() for p in params], block_size=3, **HPARAMS)
    foam_state_from_adamw(adamw.state_dict(), back)  # other tensors, same order: by position
    for p, q in zip(params, back.param_groups[0]["params"]):
        expected = folded_shape(p.shape, 3) if p.ndim >= 2 else p.shape
        assert back.state[q]["exp_avg"].shape == expected
        for key in ("exp_avg", "exp_avg_sq"):
            # block mean of B copies of x: a sum and a division, within an ulp or two of x.
            torch.testing.assert_close(back.state[q][key], foam.state[p][key], atol=0, rtol=3e-7)


def test_unstepped_parameters_stay_lazy():
    used, unused = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    adamw = torch.optim.AdamW([used, unused])
    used.grad = torch.ones(4, 8)
    adamw.step()
    foam = FOAM([used, unused], block_size=4)
    foam_state_from_adamw(adamw, foam)
    assert foam.state[used]["exp_avg"].shape == (4, 2)
    assert len(foam.state[unused]) == 0


def stepped_adamw(params, **kwargs):
    adamw = torch.optim.AdamW(params, **kwargs)
    for p in params:
        p.grad = torch.ones_like(p)
    adamw.step()
    return adamw


def test_mismatched_parameter_lists_are_refused_without_changing_state():
    params = make_params(dtype=torch.float32)
    adamw = stepped_adamw(params)
    foam_fewer = FOAM(params[:-1])
    with pytest.raises(FoamStateError, match=r"AdamW holds 6 parameters but FOAM holds 5, and AdamW has moments"):
        foam_state_from_adamw(adamw, foam_fewer)
    with pytest.raises(FoamStateError, match=r"AdamW holds 6 parameters but FOAM holds 5.*same order"):
        foam_state_from_adamw(adamw.state_dict(), foam_fewer)
    swapped = FOAM([params[1], params[0], *params[2:]])
    with pytest.raises(FoamStateError, match=r"has shape \(6, 8\) but FOAM's parameter 0 .* shape \(5, 9\)"):
        foam_state_from_adamw(adamw.state_dict(), swapped)  # a state dict numbers its parameters: by position
    assert len(swapped.state) == 0  # nothing half-converted


def test_the_adamw_optimizer_itself_is_matched_by_parameter_whatever_the_order_and_groups():
    # ZeroFOAM puts every folded tensor in a group of its own, ahead of the rest; a FOAM may list the parameters in
    # another order. Given the AdamW optimizer, each parameter's moments come from its own AdamW state.
    from foam_hf.zero import ZeroFOAM

    params = make_params(dtype=torch.float32)
    adamw = stepped_adamw(params)
    expected = FOAM(params, block_size=4)
    foam_state_from_adamw(adamw.state_dict(), expected)  # same order: by position
    for target in (ZeroFOAM(params, block_size=4), FOAM(params[::-1], block_size=4)):
        foam_state_from_adamw(adamw, target)
        assert set(target.state) == set(expected.state)
        for p in params:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(target.state[p][key], expected.state[p][key]), key


def test_an_adamw_optimizer_over_other_tensors_is_refused_not_matched_by_position():
    # Given the AdamW optimizer, FOAM's parameters were looked up by identity, and when one was missing (FOAM built
    # over a copied or reloaded model) the match fell back to position without a word: with AdamW's groups in
    # another order (per-layer learning rates, top layer first), layer 0 took layer 1's moments.
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    adamw = torch.optim.AdamW([{"params": [model[1].weight]}, {"params": [model[0].weight], "lr": 5e-4}])
    model(torch.randn(4, 8)).pow(2).sum().backward()
    adamw.step()
    copied = copy.deepcopy(model)
    foam = FOAM(copied.parameters(), block_size=4)
    with pytest.raises(FoamStateError, match=r"2 of FOAM's 2 parameters are not among the AdamW optimizer's.*copied"):
        foam_state_from_adamw(adamw, foam)
    assert len(foam.state) == 0
    # An AdamW over frozen parameters too (no state for them) still converts, by identity.
    frozen = torch.nn.Parameter(torch.zeros(8, 8), requires_grad=False)
    wider = torch.optim.AdamW([{"params": [model[1].weight, frozen]}, {"params": [model[0].weight]}])
    wider.step()  # on the gradients still held: moments for the two layers, none for the frozen tensor
    foam = FOAM(model.parameters(), block_size=4)
    foam_state_from_adamw(wider, foam)
    for layer in model:  # each layer's own moments, block means of 4 adjacent entries of a row
        expected = wider.state[layer.weight]["exp_avg"].reshape(8, 2, 4).mean(-1)
        torch.testing.assert_close(foam.state[layer.weight]["exp_avg"], expected, atol=1e-7, rtol=0)


def test_non_adam_states_are_refused():
    params = make_params(dtype=torch.float32)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    sgd.step()
    with pytest.raises(FoamStateError, match=r"lacks \['step', 'exp_avg', 'exp_avg_sq'\] as tensors"):
        foam_state_from_adamw(sgd, FOAM(params))
    with pytest.raises(FoamStateError, match=r"amsgrad=True"):
        foam_state_from_adamw(stepped_adamw(params, amsgrad=True), FOAM(params))
    with pytest.raises(TypeError, match=r"must be a foam_hf.FOAM optimizer, got AdamW"):
        foam_state_from_adamw(stepped_adamw(params), torch.optim.AdamW(params))
    with pytest.raises(FoamStateError, match=r"expected an AdamW optimizer or its state_dict"):
        foam_state_from_adamw([1, 2], FOAM(params))


@pytest.mark.parametrize("state_dtype", ["bfloat16", torch.bfloat16, "float32"])
def test_conversion_into_foam_with_a_state_dtype_stores_moments_in_it(state_dtype):
    params = make_params(dtype=torch.float32)
    adamw = adamw_after(params, steps=2)
    foam = FOAM(params, block_size=4, state_dtype=state_dtype, **HPARAMS)
    foam_state_from_adamw(adamw, foam)
    expected_dtype = torch.bfloat16 if state_dtype in ("bfloat16", torch.bfloat16) else torch.float32
    for p in params:
        state = foam.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == expected_dtype
        # The fold of AdamW's first moment (block means along the last dimension), rounded to the state dtype.
        m = adamw.state[p]["exp_avg"]
        if p.dim() >= 2 and p.shape[-1] > 1:
            folded = m @ fold_matrix(p.shape[-1], 4).to(m.dtype)
        else:
            folded = m
        torch.testing.assert_close(
            state["exp_avg"].float(), folded, rtol=1e-2 if expected_dtype != torch.float32 else 1e-6, atol=1e-6
        )


def test_an_adamw_trainer_checkpoint_resumes_under_foam_with_its_moments_and_schedule(tmp_path):
    # The Trainer orders AdamW's groups decay / no-decay and FOAM's by block size, so the checkpoint's state dict
    # does not line up with FOAM by position; convert_trainer_checkpoint converts by identity and lays the
    # scheduler out for FOAM's groups. Independent expectations: each moment is the fold of the same parameter's
    # AdamW moment, and the resumed run's learning rates are those of an uninterrupted AdamW run.
    from hf_fixtures import StopAt, lm_dataset, tiny_llama, training_args
    from transformers import Trainer

    from foam_hf.convert import convert_trainer_checkpoint
    from foam_hf.folding import block_mean, is_foldable

    def args(name, optim, **extra):
        return training_args(
            tmp_path / name, optim=optim, max_steps=6, save_strategy="steps", save_steps=3, weight_decay=0.1,
            lr_scheduler_type="cosine", warmup_steps=2, logging_steps=1, **extra,
        )  # fmt: skip

    def trainer(name, optim, model=None, **extra):
        model = model if model is not None else tiny_llama()
        return Trainer(model=model, args=args(name, optim, **extra), train_dataset=lm_dataset(24))

    straight = trainer("straight", "adamw_torch")
    straight.train()
    adamw_run = trainer("run", "adamw_torch")
    adamw_run.add_callback(StopAt(3))
    adamw_run.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    foam_trainer = trainer("run", "foam", adamw_run.model, optim_args="block_size=4")
    foam_trainer.create_optimizer()
    with pytest.raises(FoamStateError, match=r"parameter lists do not line up.*docs/scale-out.md"):
        foam_state_from_adamw(saved, foam_trainer.optimizer)  # by position: the orders differ

    adamw_trainer = trainer("run", "adamw_torch", adamw_run.model)
    convert_trainer_checkpoint(checkpoint, adamw_trainer, foam_trainer)
    assert (checkpoint / "optimizer.adamw.pt").is_file() and (checkpoint / "scheduler.adamw.pt").is_file()
    # Converting it again is refused by name (it was torch's bare "different number of parameter groups", or a
    # FOAM state loaded into the AdamW optimizer), and changes no file.
    files = {f.name: f.read_bytes() for f in checkpoint.glob("*.pt")}
    with pytest.raises(FoamStateError, match=r"already holds FOAM state.*optimizer\.adamw\.pt"):
        convert_trainer_checkpoint(checkpoint, trainer("run", "adamw_torch", adamw_run.model), foam_trainer)
    assert {f.name: f.read_bytes() for f in checkpoint.glob("*.pt")} == files
    # The next step's learning rate, as the schedule left it (not the initial one): the first resumed step takes it.
    scheduled = {g["lr"] for g in saved["param_groups"]}
    assert len(scheduled) == 1 and scheduled != {adamw_run.args.learning_rate}
    written = torch.load(checkpoint / "optimizer.pt", weights_only=True)["param_groups"]
    assert len(written) > len(saved["param_groups"]) and {g["lr"] for g in written} == scheduled
    group_of = {p: g for g in foam_trainer.optimizer.param_groups for p in g["params"]}
    for name, p in adamw_run.model.named_parameters():  # the parameter's own AdamW moments, folded
        block_size = group_of[p]["block_size"]
        for key in ("exp_avg", "exp_avg_sq"):
            adamw_moment = adamw_trainer.optimizer.state[p][key]
            expected = block_mean(adamw_moment, block_size) if is_foldable(p, block_size) else adamw_moment
            assert torch.equal(foam_trainer.optimizer.state[p][key], expected), name

    resumed = trainer("run", "foam", optim_args="block_size=4")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6 and type(unwrap_foam(resumed.optimizer)).__name__ == "FOAM"
    assert unwrap_foam(resumed.optimizer).state_dict()["state"][0]["step"].item() == 6

    def learning_rates(run):
        return [(e["step"], e["learning_rate"]) for e in run.state.log_history if "learning_rate" in e]

    assert learning_rates(resumed)[-3:] == learning_rates(straight)[-3:]
    assert [step for step, _ in learning_rates(straight)[-3:]] == [4, 5, 6]


@pytest.mark.parametrize(
    "engine, written", [("DeepSpeed", "global_step6/"), ("FSDP", "optimizer_0/"), ("FSDP", "optimizer.bin")]
)
def test_a_checkpoint_of_a_sharding_engine_is_refused_by_name(tmp_path, engine, written):
    # There is no optimizer.pt in them: the refusal used to say "pass a checkpoint-N folder the Trainer wrote",
    # which is what the user had passed.
    from foam_hf.convert import convert_trainer_checkpoint

    (tmp_path / "scheduler.pt").write_bytes(b"")
    if written.endswith("/"):
        (tmp_path / written).mkdir()
    else:
        (tmp_path / written).write_bytes(b"")
    with pytest.raises(FoamStateError, match=rf"written under {engine}.*one-process and DDP runs\. Fix: "):
        convert_trainer_checkpoint(tmp_path, None, None)
    (tmp_path / written).rename(tmp_path / "other")  # a folder without them: the missing file, by name
    with pytest.raises(FileNotFoundError, match=r"optimizer\.pt does not exist"):
        convert_trainer_checkpoint(tmp_path, None, None)


def test_a_maximize_adamw_state_continues_as_foam_minimizing_the_negated_objective():
    # FOAM has no maximize: the run goes on minimizing -objective, whose gradients are the negated ones AdamW's
    # moments already hold (convert.py). With block size 1, FOAM is AdamW: both continuations must agree.
    params = make_params(dtype=torch.float64)
    twins = [p.detach().clone().requires_grad_() for p in params]
    adamw = torch.optim.AdamW(params, foreach=False, maximize=True, **HPARAMS)
    for s in range(3):
        for p, g in zip(params, random_grads(params, seed=300 + s)):
            p.grad = g  # the gradients of the objective
        adamw.step()
    with torch.no_grad():
        for twin, p in zip(twins, params):
            twin.copy_(p)
    foam = FOAM(twins, block_size=1, **HPARAMS)
    foam_state_from_adamw(adamw.state_dict(), foam)
    for s in range(3, 6):
        grads = random_grads(params, seed=300 + s)
        for p, twin, g in zip(params, twins, grads):
            p.grad, twin.grad = g.clone(), -g  # FOAM minimizes the negated objective
        adamw.step()
        foam.step()
    moved = [(p - twin).abs().max().item() for p, twin in zip(params, twins)]
    assert max(moved) < 1e-12, moved
    assert any(not torch.equal(p, w) for p, w in zip(params, make_params(dtype=torch.float64)))  # they trained
