"""Stochastic rounding of bf16 weights (``weight_rounding="stochastic"``): every path stores exactly the rule's
rounding of the fp32 step, updates below half a bf16 spacing move the weights in expectation where
round-to-nearest freezes them, resume is exact, and the option is checked where it is given.

The rule is written out from its definition (a counter hash of entry index, step and salt 2, added to the fp32 bit
pattern before the low 16 bits are dropped), independently of foam_hf.precision: _helpers.stochastically_rounded."""

from __future__ import annotations

import pytest
import torch
from _helpers import (
    PATHS,
    clone_params,
    grad_sequence,
    make_params,
    path_names,
    peak_transient_bytes,
    reference_kwargs,
    run,
    saved_and_loaded,
    stochastically_rounded,
)

from foam_hf import FOAM, FoamConfig, FoamConfigError
from foam_hf.zero import ZeroFOAM

HPARAMS = reference_kwargs(dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1))
SHAPES = [(6, 32), (5, 33), (3, 2), (4, 1), (37,), (2, 3, 10), (9, 257), (2, 2100)]


def steps_against_an_fp32_twin(shapes: list[tuple[int, ...]], options: dict, steps: int, seed: int) -> int:
    """Step bf16 weights of ``shapes`` under ``weight_rounding="stochastic"`` and ``options`` beside an fp32 twin that
    starts every step from the same weights, moments and step count; assert that each step stores exactly the rule's
    rounding of the twin's fp32 result, and the moments exactly the twin's (fp32 ones, unlike the weights, no
    rounding hides: a path that computed other block sums for bf16 weights would pass the weights' check nearly
    always). Returns how many entries that rounding put elsewhere than to nearest."""
    params = make_params(shapes, dtype=torch.bfloat16)
    twins = [p.detach().float().requires_grad_() for p in params]
    optimizer = FOAM(params, **options, weight_rounding="stochastic")
    twin = FOAM(twins, **options)
    changed_by_rounding = 0
    for step, grads in enumerate(grad_sequence(params, steps, seed=seed), start=1):
        for p, t in zip(params, twins):
            t.data.copy_(p.detach().float())
            if step > 1:
                for key in ("exp_avg", "exp_avg_sq"):
                    twin.state[t][key].copy_(optimizer.state[p][key])
        run(optimizer, params, [grads])
        run(twin, twins, [[g.float() for g in grads]])
        for p, t in zip(params, twins):
            expected = stochastically_rounded(t.detach(), step)
            assert torch.equal(p.detach().view(torch.int16), expected.view(torch.int16)), (step, p.shape, options)
            for key in ("exp_avg", "exp_avg_sq"):  # bit for bit, fp32 or bf16
                got, want = optimizer.state[p][key], twin.state[t][key]
                assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (key, step, p.shape, options)
            changed_by_rounding += int((expected != t.detach().to(torch.bfloat16)).sum())
    return changed_by_rounding


@pytest.mark.parametrize("path", path_names("for-loop", "foreach", "fused"))
@pytest.mark.parametrize("state_dtype", [None, "bfloat16"])
def test_each_step_stores_the_rule_s_rounding_of_the_fp32_step(path, state_dtype):
    """From the same weights, moments and step count, the bf16 run's new weights are exactly the rule's rounding
    of what the same path computes on fp32 copies of the weights (its fp32 twin), at every step."""
    options = dict(**HPARAMS, **PATHS[path], state_dtype=state_dtype)
    assert steps_against_an_fp32_twin(SHAPES, options, steps=4, seed=3) > 0  # not round-to-nearest in disguise


@pytest.mark.parametrize("path", path_names("for-loop", "foreach", "fused"))
def test_updates_below_half_a_spacing_move_the_weights_in_expectation(path):
    """lr 1e-4 with a constant gradient: every step moves each weight by lr (m̂/√v̂ = 1), under half the bf16
    spacing of weights in [0.5, 1) (2^-9). Round-to-nearest leaves every weight where it was; stochastic
    rounding moves their mean by steps·lr, as fp32 weights move."""
    lr, steps = 1e-4, 200
    start = torch.empty(64, 1024).uniform_(0.5, 0.999, generator=torch.Generator().manual_seed(0))
    moved = {}
    for rounding in ("nearest", "stochastic"):
        weight = start.to(torch.bfloat16).requires_grad_()
        optimizer = FOAM([weight], lr=lr, block_size=4, weight_rounding=rounding, **PATHS[path])
        for _ in range(steps):
            weight.grad = torch.ones_like(weight)
            optimizer.step()
        moved[rounding] = (weight.detach().float() - start.to(torch.bfloat16).float()).mean().item()
    assert moved["nearest"] == 0.0
    assert moved["stochastic"] == pytest.approx(-steps * lr, rel=0.02)


@pytest.mark.parametrize("path", path_names("for-loop", "foreach", "fused"))
def test_resume_rounds_as_the_uninterrupted_run(path):
    params = make_params(SHAPES, dtype=torch.bfloat16)
    copies = clone_params(params)
    grads = grad_sequence(params, 6, seed=5)
    options = dict(**HPARAMS, **PATHS[path], weight_rounding="stochastic")
    uninterrupted = FOAM(params, **options)
    run(uninterrupted, params, grads)

    first = FOAM(copies, **options)
    run(first, copies, grads[:3])
    saved = saved_and_loaded(first.state_dict())
    resumed_params = clone_params(copies)
    resumed = FOAM(resumed_params, **options)
    resumed.load_state_dict(saved)
    run(resumed, resumed_params, grads[3:])
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("state_dtype", [None, "bfloat16"])
def test_fused_kernel_threads_round_alike(isa, state_dtype):
    """The dither is a function of the entry's index, not of which thread steps it: a folded and an unfolded tensor,
    each large enough to be split between threads, give the same bits on 1 and 2 threads."""
    results = []
    threads = torch.get_num_threads()
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            weights = make_params([(64, 2048), (70_000,)], dtype=torch.bfloat16)
            options = dict(HPARAMS, fused=True, state_dtype=state_dtype, weight_rounding="stochastic")
            run(FOAM(weights, **options), weights, grad_sequence(weights, 3, seed=2))
            results.append([w.detach().clone() for w in weights])
        finally:
            torch.set_num_threads(threads)
    for one_thread, two_threads in zip(*results):
        assert torch.equal(one_thread.view(torch.int16), two_threads.view(torch.int16))


@pytest.mark.parametrize("state_dtype", [None, "bfloat16"])
def test_fused_kernel_each_isa_stores_the_rule_s_rounding(isa, state_dtype):
    """Each implementation of the C++ kernel (AVX-512, AVX2, portable; those this CPU runs) against its own fp32
    twin and the rule, at block sizes its SIMD code specialises and others (odd, a multiple of the vector width, wider
    than the 1024 columns its SIMD code stages, and 1024 itself), over two steps from the same weights and moments;
    with long rows (moment runs of 512 and more) and a long 1-D tensor (AdamW's runs past 256, 512 and 1024)."""
    for block_size in (2, 3, 4, 8, 16, 32, 48, 1024, 2048):
        options = dict(HPARAMS, block_size=block_size, fused=True, state_dtype=state_dtype)
        steps_against_an_fp32_twin([*SHAPES, (3, 5000), (5000,)], options, steps=2, seed=7)


def test_nearest_and_wider_weights_are_untouched_by_the_option():
    """fp32 weights in a group with "stochastic" step as under "nearest" (bit for bit), beside a bf16 weight."""
    wide = make_params([(6, 32), (7,)], dtype=torch.float32)
    narrow = make_params([(4, 16)], dtype=torch.bfloat16)
    wide_twins = clone_params(wide)
    grads = grad_sequence(wide, 3, seed=1)
    stochastic = FOAM([*wide, *narrow], **HPARAMS, weight_rounding="stochastic")
    nearest = FOAM(wide_twins, **HPARAMS)
    narrow_grads = grad_sequence(narrow, 3, seed=2)
    run(stochastic, [*wide, *narrow], [g + h for g, h in zip(grads, narrow_grads)])
    run(nearest, wide_twins, grads)
    for p, q in zip(wide, wide_twins):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------------------------- the option


def test_an_unknown_value_is_refused_naming_the_choices():
    with pytest.raises(FoamConfigError, match=r"weight_rounding='stochastc'.*\('nearest', 'stochastic'\).*Fix"):
        FOAM(make_params([(4, 8)], dtype=torch.bfloat16), weight_rounding="stochastc")


def test_fp16_weights_are_refused_at_construction():
    fp16 = torch.zeros(4, 8, dtype=torch.float16, requires_grad=True)
    bf16 = torch.zeros(4, 8, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(FoamConfigError, match=r"float16 parameter of shape \(4, 8\).*bf16 weights only.*Fix"):
        FOAM([bf16, fp16], weight_rounding="stochastic")
    FOAM([{"params": [bf16], "weight_rounding": "stochastic"}, {"params": [fp16]}])  # per group: fine


def test_an_optimizer_without_bf16_weights_is_refused():
    """Mixed precision keeps fp32 weights: "stochastic" would round nothing, silently."""
    refusal = r"holds no bf16 parameter \(dtypes: float32\).*Fix: drop weight_rounding"
    with pytest.raises(FoamConfigError, match=refusal):
        FOAM(make_params([(4, 8), (3,)]), weight_rounding="stochastic")


def test_optim_args_carry_it_and_round_trip():
    config = FoamConfig.from_optim_args("block_size=8,weight_rounding=stochastic")
    assert config.weight_rounding == "stochastic"
    assert FoamConfig.from_optim_args(config.to_optim_args()) == config
    assert FoamConfig.from_optim_args({"weight_rounding": "stochastic"}) == FoamConfig(weight_rounding="stochastic")
    with pytest.raises(FoamConfigError, match="weight_rounding='up'"):
        FoamConfig.from_optim_args("weight_rounding=up")


def test_loading_keeps_the_rounding_the_optimizer_was_built_with():
    """Like state_dtype, a storage choice: a checkpoint saved under "nearest" resumes under "stochastic" when
    the resuming optimizer asks for it (torch's load would put the saved value back silently)."""
    params = make_params([(4, 8)], dtype=torch.bfloat16)
    saved = FOAM(params, **HPARAMS)
    run(saved, params, grad_sequence(params, 1))
    resumed = FOAM(clone_params(params), **HPARAMS, weight_rounding="stochastic")
    resumed.load_state_dict(saved_and_loaded(saved.state_dict()))
    assert resumed.param_groups[0]["weight_rounding"] == "stochastic"


def test_trainer_builds_it_from_optim_args(tmp_path):
    """A bf16 model through the real Trainer with optim_args="weight_rounding=stochastic": at lr 5e-6, below half
    the bf16 spacing of every weight of magnitude >= 0.01 (3e-5), round-to-nearest leaves all of them as they
    were; stochastic rounding moves some."""
    from hf_fixtures import lm_dataset, tiny_llama, training_args
    from transformers import Trainer

    changed = {}
    for rounding in ("nearest", "stochastic"):
        model = tiny_llama().to(torch.bfloat16)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = training_args(tmp_path / rounding, learning_rate=5e-6, optim_args=f"weight_rounding={rounding}")
        trainer = Trainer(model=model, args=args, train_dataset=lm_dataset())
        trainer.train()
        assert {g["weight_rounding"] for g in trainer.optimizer.param_groups} == {rounding}
        large = [(p.detach() != before[n]) & (before[n].abs() >= 0.01) for n, p in model.named_parameters()]
        changed[rounding] = sum(int(mask.sum()) for mask in large)
    assert changed["nearest"] == 0
    assert changed["stochastic"] > 100


def test_trainer_refuses_it_for_fp32_weights(tmp_path):
    from hf_fixtures import lm_dataset, tiny_llama, training_args
    from transformers import Trainer

    args = training_args(tmp_path / "out", optim_args="weight_rounding=stochastic")
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset())
    with pytest.raises(FoamConfigError, match="holds no bf16 parameter"):
        trainer.train()


@pytest.mark.parametrize("optimizer_class", [FOAM, ZeroFOAM])
def test_weights_swapped_for_fp32_after_construction_are_refused_at_the_first_step(optimizer_class):
    """DeepSpeed builds the optimizer over the model's bf16 weights, then puts its fp32 master partitions in the
    groups: the first step finds nothing left to round and says so, before anything changes."""
    weight = torch.zeros(32, dtype=torch.bfloat16, requires_grad=True)  # 1-D: ZeRO's partitions fold otherwise
    optimizer = optimizer_class([weight], weight_rounding="stochastic")
    master = torch.zeros(32, requires_grad=True)
    master.grad = torch.ones(32)
    optimizer.param_groups[0]["params"] = [master]
    with pytest.raises(FoamConfigError, match=r"holds no bf16 parameter now \(its tensors were replaced"):
        optimizer.step()
    assert torch.equal(master, torch.zeros(32)) and not optimizer.state


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_large_tensors_round_by_the_rule_across_the_runs_they_are_rounded_in(layout):
    """store_weight rounds a few tens of thousands of entries at a time (bounded temporaries): the runs' offsets
    keep every entry's dither that of its index in the whole tensor, in C order whatever the storage."""
    from foam_hf.precision import store_weight

    values = torch.randn(300, 701, generator=torch.Generator().manual_seed(0))  # 210,300 entries: several runs
    stored = torch.empty(300, 701, dtype=torch.bfloat16)
    if layout == "transposed":
        stored = torch.empty(701, 300, dtype=torch.bfloat16).t()
    store_weight(stored, values, 9, "stochastic")
    assert torch.equal(stored.contiguous().view(torch.int16), stochastically_rounded(values, 9).view(torch.int16))


def test_the_readable_path_rounds_in_bounded_temporaries():
    """Stochastic rounding adds no full-size temporaries to the for-loop path's step (it rounds in runs)."""
    peaks = {}
    for rounding in ("nearest", "stochastic"):
        weight = torch.randn(1024, 2048, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        weight.requires_grad_()
        optimizer = FOAM([weight], block_size=4, weight_rounding=rounding, **PATHS["for-loop"])
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        peaks[rounding] = peak_transient_bytes(optimizer.step)
    assert peaks["stochastic"] <= peaks["nearest"] + 4 * 2**20, peaks  # one run's hash: ~2 MiB


def test_a_value_set_on_a_group_later_is_checked_at_the_next_step():
    bf16 = torch.zeros(4, 8, dtype=torch.bfloat16, requires_grad=True)
    fp16 = torch.zeros(4, 8, dtype=torch.float16, requires_grad=True)
    optimizer = FOAM([{"params": [bf16]}, {"params": [fp16]}])
    for p in (bf16, fp16):
        p.grad = torch.ones_like(p)
    optimizer.param_groups[0]["weight_rounding"] = "stochastik"
    with pytest.raises(FoamConfigError, match=r"weight_rounding='stochastik' is invalid.*param group 0"):
        optimizer.step()
    optimizer.param_groups[0]["weight_rounding"] = "stochastic"  # taken: a bf16 group
    optimizer.param_groups[1]["weight_rounding"] = "stochastic"
    with pytest.raises(FoamConfigError, match=r"param group 1 sets weight_rounding='stochastic' and holds a float16"):
        optimizer.step()


def test_the_functional_api_refuses_fp16_weights_too():
    from foam_hf import foam

    weight = torch.zeros(4, 8, dtype=torch.float16)
    moments = [torch.zeros(4, 2), torch.zeros(4, 2)]
    options = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, block_size=4, scale=1.0, res_scale=1.0)
    options |= dict(second_moment="mean_sq", weight_rounding="stochastic")
    with pytest.raises(FoamConfigError, match=r"foam_hf.foam sets weight_rounding='stochastic'.*float16"):
        foam([weight], [torch.ones_like(weight)], *moments, [torch.tensor(0.0)], **options)


def test_peft_adapters_of_a_bf16_model_are_rounded_only_when_kept_in_bf16(tmp_path):
    """PEFT casts LoRA adapters to fp32 on a bf16 model by default: nothing to round, refused with the PEFT fix;
    with autocast_adapter_dtype=False the adapters stay bf16, and the real Trainer steps them stochastically."""
    from hf_fixtures import lm_dataset, tiny_llama, training_args
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    for autocast in (True, False):
        model = get_peft_model(
            tiny_llama().to(torch.bfloat16),
            LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
            autocast_adapter_dtype=autocast,
        )
        args = training_args(tmp_path / str(autocast), optim_args="weight_rounding=stochastic")
        trainer = Trainer(model=model, args=args, train_dataset=lm_dataset())
        if autocast:
            with pytest.raises(FoamConfigError, match=r"\(dtypes: float32\).*autocast_adapter_dtype=False"):
                trainer.train()
        else:
            trainer.train()
            groups = trainer.optimizer.param_groups
            assert {p.dtype for g in groups for p in g["params"]} == {torch.bfloat16}
            assert {g["weight_rounding"] for g in groups} == {"stochastic"}


def poisoned_block_run(options: dict, bad: float) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 weights (6, 70), block 4, stepped twice under ``weight_rounding="stochastic"``: once with a gradient holding
    ``bad`` at (2, 9) at the first step, once with a finite value there. Returns both runs' weights."""
    results = []
    for value in (bad, 0.5):
        weight = make_params([(6, 70)], dtype=torch.bfloat16, seed=4)[0]
        grads = grad_sequence([weight], 2, seed=5)
        grads[0][0][2, 9] = value
        optimizer = FOAM([weight], **options, weight_rounding="stochastic")
        run(optimizer, [weight], grads)
        results.append(weight.detach().clone())
    return results[0], results[1]


def check_only_the_block_is_poisoned(poisoned: torch.Tensor, clean: torch.Tensor) -> None:
    """The block of entry (2, 9), columns 8..11 of row 2, holds NaN, and every other weight is bit for bit the clean
    run's: the same dither, entry by entry."""
    block = torch.zeros_like(poisoned, dtype=torch.bool)
    block[2, 8:12] = True
    assert torch.isnan(poisoned[block]).all()
    assert torch.equal(poisoned[~block].view(torch.int16), clean[~block].view(torch.int16))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("path", path_names("for-loop", "foreach", "fused"))
def test_a_non_finite_gradient_poisons_only_its_block(path, bad):
    """As with round-to-nearest (test_nonfinite.py): a NaN or inf gradient entry makes its block's new weights NaN
    (inf/inf in the update), stochastic rounding stores them as NaN, and nothing else changes."""
    check_only_the_block_is_poisoned(*poisoned_block_run(dict(HPARAMS, **PATHS[path]), bad))


@pytest.mark.parametrize("state_dtype", [None, "bfloat16"])
def test_the_fused_kernel_of_each_isa_poisons_only_the_block(isa, state_dtype):
    """The same through each implementation of the C++ kernel: 70 columns take its vectors or pairs and a tail."""
    for bad in (float("nan"), float("inf")):
        options = dict(HPARAMS, fused=True, state_dtype=state_dtype)
        check_only_the_block_is_poisoned(*poisoned_block_run(options, bad))
