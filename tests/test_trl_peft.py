"""optim="foam" in every TRL trainer that builds its optimizer through Trainer, and with PEFT LoRA.

Each TRL test runs the real trainer on a tiny Llama for a couple of steps and checks, against expectations
the test works out itself (tests/_helpers.py): the optimizer in use is FOAM; every trainable parameter has
moments of the folded shape ``(rows, ceil(n / B))`` for the targeted linear layers and of its own shape
otherwise; and the trained weights equal, bit for bit, those of a twin run of the same trainer given a
``FOAM(...)`` built by hand (param groups by module name) through ``optimizer_cls_and_kwargs``.
"""

from __future__ import annotations

import math

import pytest
import torch
import trl
from _helpers import expected_block_sizes, expected_moment_shape, hand_built_foam_groups
from hf_fixtures import (
    RUN_DEFAULTS,
    lm_dataset,
    preference_dataset,
    prompt_dataset,
    text_dataset,
    tiny_llama,
    tokenizer,
    unwrap_foam,
)

import foam_hf  # noqa: F401  (registers optim="foam")
from foam_hf import FOAM, NoMatchingModuleError

# The AdamW-style hyper-parameters, given explicitly so the hand-built twin can use the same numbers
# (TRL configs change some TrainingArguments defaults). Weight decay > 0 so the no-decay rule matters.
HPARAMS = dict(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8, weight_decay=0.1)

COMMON = {**RUN_DEFAULTS, "per_device_train_batch_size": 2, "logging_steps": 1, **HPARAMS}


def assert_trained_with_foam(trainer):
    optimizer = unwrap_foam(trainer.optimizer)
    assert isinstance(optimizer, FOAM), type(trainer.optimizer)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses)
    assert any(s.get("exp_avg") is not None for s in optimizer.state.values())
    return optimizer


def hand_built_foam(model):
    """``(FOAM, kwargs)`` as a user would write them for optim="foam" on ``model``, without foam_hf's grouping."""
    groups = hand_built_foam_groups(model, expected_block_sizes(model), HPARAMS["weight_decay"])
    kwargs = dict(
        params=groups,
        lr=HPARAMS["learning_rate"],
        betas=(HPARAMS["adam_beta1"], HPARAMS["adam_beta2"]),
        eps=HPARAMS["adam_epsilon"],
    )
    return FOAM, kwargs


def assert_foam_run_matches_hand_built_twin(make_model, make_trainer, *, as_argument=True):
    """Train with optim="foam", then check its optimizer state and its weights against a hand-built twin.

    ``make_trainer(model, optim, **trainer_kwargs)`` builds an untrained trainer. The twin runs under
    ``optim="adamw_torch"`` so nothing of optim="foam" is involved; its FOAM arrives through the
    ``optimizer_cls_and_kwargs`` argument, or, for the TRL trainers whose ``__init__`` does not take it,
    through the attribute of that name that ``Trainer.create_optimizer`` reads.
    """
    trainer = make_trainer(make_model(), "foam")
    trainer.train()
    optimizer = assert_trained_with_foam(trainer)
    model = trainer.model
    sizes = expected_block_sizes(model)
    assert any(b > 1 for b in sizes.values()) and any(b == 1 for b in sizes.values())
    params = dict(model.named_parameters())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(params[n]) for n in sizes}
    for name, block_size in sizes.items():
        state = optimizer.state[params[name]]
        expected = expected_moment_shape(tuple(params[name].shape), block_size)
        assert tuple(state["exp_avg"].shape) == tuple(state["exp_avg_sq"].shape) == expected, name

    twin_model = make_model()
    initial = {n: p.detach().clone() for n, p in twin_model.named_parameters()}
    if as_argument:
        twin = make_trainer(twin_model, "adamw_torch", optimizer_cls_and_kwargs=hand_built_foam(twin_model))
    else:
        twin = make_trainer(twin_model, "adamw_torch")
        twin.optimizer_cls_and_kwargs = hand_built_foam(twin.model)
    twin.train()
    assert type(unwrap_foam(twin.optimizer)) is FOAM
    twin_params = dict(twin.model.named_parameters())
    assert twin_params.keys() == params.keys()
    for name, p in params.items():
        assert torch.equal(p, twin_params[name]), name
    # Not vacuous: the runs trained every parameter the optimizer holds, away from the shared start.
    assert all(not torch.equal(initial[n], twin_params[n]) for n in sizes)


def reward_len(completions, **kwargs):
    """A programmatic reward: longer completions score higher (enough to give GRPO/RLOO a signal)."""
    return [float(len(c)) / 10 for c in completions]


def test_sft(tmp_path):
    def make(model, optim, **kwargs):
        config = trl.SFTConfig(output_dir=str(tmp_path / optim), max_length=32, **{**COMMON, "optim": optim})
        return trl.SFTTrainer(
            model=model, args=config, train_dataset=text_dataset(), processing_class=tokenizer(), **kwargs
        )

    assert_foam_run_matches_hand_built_twin(tiny_llama, make)


def test_dpo(tmp_path):
    def make(model, optim):
        config = trl.DPOConfig(output_dir=str(tmp_path / optim), max_length=48, **{**COMMON, "optim": optim})
        return trl.DPOTrainer(
            model=model,
            ref_model=tiny_llama(),  # given, so TRL does not look for the reference model on a hub
            args=config,
            train_dataset=preference_dataset(),
            processing_class=tokenizer(),
        )

    assert_foam_run_matches_hand_built_twin(tiny_llama, make, as_argument=False)


def test_reward(tmp_path):
    def make(model, optim, **kwargs):
        config = trl.RewardConfig(output_dir=str(tmp_path / optim), max_length=48, **{**COMMON, "optim": optim})
        return trl.RewardTrainer(
            model=model, args=config, train_dataset=preference_dataset(), processing_class=tokenizer(), **kwargs
        )

    # The scalar reward head ("score", 1 x hidden) is a linear layer but the model's output head: unfolded.
    make_model = lambda: tiny_llama(num_labels=1)  # noqa: E731
    assert expected_block_sizes(make_model())["score.weight"] == 1
    assert_foam_run_matches_hand_built_twin(make_model, make)


@pytest.mark.parametrize("trainer_cls, config_cls", [("GRPOTrainer", "GRPOConfig"), ("RLOOTrainer", "RLOOConfig")])
def test_online_trainers(tmp_path, trainer_cls, config_cls):
    """GRPO and RLOO: generate completions, score them with ``reward_len``, train."""

    def make(model, optim):
        config = getattr(trl, config_cls)(
            output_dir=str(tmp_path / optim),
            beta=0.0,  # no KL term, so no reference model is built (it would be looked up on a hub)
            num_generations=2,
            max_completion_length=8,
            generation_batch_size=2,
            **{**COMMON, "optim": optim},
        )
        return getattr(trl, trainer_cls)(
            model=model,
            reward_funcs=reward_len,
            args=config,
            train_dataset=prompt_dataset(),
            processing_class=tokenizer(),
        )

    assert_foam_run_matches_hand_built_twin(tiny_llama, make, as_argument=False)


def test_kto(tmp_path):
    from datasets import Dataset

    data = Dataset.from_dict(
        {
            "prompt": [f"Question {i}:" for i in range(8)],
            "completion": [f" answer {i}." for i in range(8)],
            "label": [i % 2 == 0 for i in range(8)],
        }
    )

    def make(model, optim):
        config = trl.KTOConfig(output_dir=str(tmp_path / optim), max_length=32, **{**COMMON, "optim": optim})
        return trl.KTOTrainer(
            model=model, ref_model=tiny_llama(), args=config, train_dataset=data, processing_class=tokenizer()
        )

    assert_foam_run_matches_hand_built_twin(tiny_llama, make, as_argument=False)


def test_lora_under_trainer_gives_states_to_adapters_only_unfolded_by_default(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_alpha=16))
    args = TrainingArguments(output_dir=str(tmp_path), **COMMON)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset())
    trainer.train()
    optimizer = assert_trained_with_foam(trainer)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in in_optimizer} == trainable  # frozen base weights get no state
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p not in optimizer.state
            continue
        # Adapters keep AdamW states unless an override folds them (docs/benchmarks.md, "LoRA adapters").
        assert "lora_" in name and optimizer.state[p]["exp_avg"].shape == p.shape, name
    assert {g["block_size"] for g in optimizer.param_groups} == {1}


def test_fold_options_on_a_model_where_nothing_folds_warn_once(tmp_path, recwarn):
    # block_size=8 on a LoRA model changes nothing (adapters keep AdamW states by default): said, not ignored.
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_alpha=16))
    args = TrainingArguments(output_dir=str(tmp_path), optim_args="block_size=8,res_scale=0.5", **COMMON)
    recwarn.clear()
    Trainer(model=model, args=args, train_dataset=lm_dataset()).create_optimizer()
    said = [str(w.message) for w in recwarn if "no trainable parameter" in str(w.message)]
    assert len(said) == 1 and "optim_args sets ['block_size', 'res_scale'], but no trainable parameter" in said[0]
    # block_size=1 asks for AdamW states, and gets them: heard, not warned about.
    args = TrainingArguments(output_dir=str(tmp_path), optim_args="block_size=1", **COMMON)
    recwarn.clear()
    Trainer(model=model, args=args, train_dataset=lm_dataset()).create_optimizer()
    assert not [w for w in recwarn if "no trainable parameter" in str(w.message)]
    # level=0 (block size 1) with an option that acts on folded tensors: the warning names block size 1 as the cause,
    # not the default targets' leaving out the adapters.
    args = TrainingArguments(output_dir=str(tmp_path), optim_args="level=0,scale=2", **COMMON)
    recwarn.clear()
    Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset()).create_optimizer()
    said = [str(w.message) for w in recwarn if "no trainable parameter" in str(w.message)]
    assert len(said) == 1 and "optim_args sets ['scale']" in said[0]
    assert "block_size is 1 (level=0 too)" in said[0] and "PEFT adapters" not in said[0]
    # Folding an adapter by name makes the same options act: no warning.
    args = TrainingArguments(output_dir=str(tmp_path), optim_args="block_size=8,block_sizes=lora_A:4", **COMMON)
    recwarn.clear()
    Trainer(model=model, args=args, train_dataset=lm_dataset()).create_optimizer()
    assert not [w for w in recwarn if "no trainable parameter" in str(w.message)]


def test_lora_overrides_address_adapters_by_name(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_alpha=16))
    args = TrainingArguments(output_dir=str(tmp_path), optim_args="block_sizes=lora_A:4;v_proj.lora_A:8", **COMMON)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset())
    trainer.create_optimizer()
    sizes = {
        n: g["block_size"]
        for g in trainer.optimizer.param_groups
        for n, p in model.named_parameters()
        if any(p is q for q in g["params"])
    }
    assert all(b == 1 for n, b in sizes.items() if "lora_B" in n)  # not overridden: the adapter default
    assert all(b == 8 for n, b in sizes.items() if "v_proj.lora_A" in n)  # the more specific pattern wins
    assert all(b == 4 for n, b in sizes.items() if "q_proj.lora_A" in n)
    trainer.train()
    for name, p in model.named_parameters():
        if "q_proj.lora_A" in name:  # r x in_features = 8 x 32 folds to 8 x 8
            assert trainer.optimizer.state[p]["exp_avg"].shape == (8, 8), name
    # A pattern that only matches frozen weights (the base layer) is an error, not a silent no-op.
    # The message says so, naming the frozen modules (not k_proj as the "closest name" to k_proj).
    args = TrainingArguments(output_dir=str(tmp_path), optim_args="block_sizes=k_proj:8", **COMMON)
    with pytest.raises(NoMatchingModuleError, match=r"'k_proj' matches modules .* no parameter there is trainable"):
        Trainer(model=model, args=args, train_dataset=lm_dataset()).create_optimizer()


@pytest.mark.parametrize("targets", ["lora_A", "q_proj;v_proj", r".*\.lora_A"])
def test_lora_target_modules_name_adapters_as_overrides_do(tmp_path, targets):
    # target_modules reach the linear layers inside the modules they name, as block_sizes patterns do: the
    # adapters' own layers are lora_A.default / lora_B.default, and neither "lora_A" nor "q_proj" names them.
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_alpha=16))
    args = TrainingArguments(output_dir=str(tmp_path), optim_args=f"target_modules={targets}", **COMMON)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset())
    trainer.create_optimizer()
    folded = {
        n for g in trainer.optimizer.param_groups if g["block_size"] > 1 for n, p in model.named_parameters()
        if any(p is q for q in g["params"])
    }  # fmt: skip
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n in trainable if "lora_A" in n} if "lora_A" in targets else trainable
    assert folded == expected and expected


def test_lora_with_sft_trainer(tmp_path):
    from peft import LoraConfig

    config = trl.SFTConfig(output_dir=str(tmp_path), max_length=32, **COMMON)
    trainer = trl.SFTTrainer(
        model=tiny_llama(),
        args=config,
        train_dataset=text_dataset(),
        processing_class=tokenizer(),
        peft_config=LoraConfig(r=8, target_modules="all-linear", lora_alpha=16),
    )
    trainer.train()
    optimizer = assert_trained_with_foam(trainer)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    in_optimizer = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    assert in_optimizer and all("lora_" in n for n in in_optimizer)
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


def test_lora_with_sft_trainer_through_optimizer_cls_and_kwargs(tmp_path):
    # The registration-free form, called on the base model before SFTTrainer injects the adapters (peft_config=)
    # and freezes the base: the groups are resolved when the optimizer is built, so it holds the adapters only
    # (it once held the frozen base weights, and nothing trained).
    from peft import LoraConfig

    from foam_hf.integration import optimizer_cls_and_kwargs

    config = trl.SFTConfig(output_dir=str(tmp_path), max_length=32, **{**COMMON, "optim": "adamw_torch"})
    model = tiny_llama()
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=text_dataset(),
        processing_class=tokenizer(),
        peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_alpha=16),
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(config, model),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    optimizer = unwrap_foam(trainer.optimizer)
    assert isinstance(optimizer, FOAM)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert in_optimizer == {id(p) for p in trainable.values()} and all("lora_" in n for n in trainable)
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items() if "lora_B" in n)  # B starts at 0


def test_distillation(tmp_path):
    def make(model, optim):
        config = trl.DistillationConfig(
            output_dir=str(tmp_path / optim), max_completion_length=8, **{**COMMON, "optim": optim}
        )
        return trl.DistillationTrainer(
            model=model,
            teacher_model=tiny_llama(seed=1),
            args=config,
            train_dataset=prompt_dataset(),
            processing_class=tokenizer(),
        )

    assert_foam_run_matches_hand_built_twin(tiny_llama, make, as_argument=False)


def linear_weights(model, skip=()):
    """Names of the weights of every nn.Linear in ``model`` whose module name has no component in ``skip``."""
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not set(name.split(".")) & set(skip)
    }


@pytest.mark.parametrize(
    "make_model, head, task_type",
    [(lambda: tiny_llama(), "lm_head", "CAUSAL_LM"), (lambda: tiny_llama(num_labels=1), "score", "SEQ_CLS")],
    ids=["lm_head in modules_to_save", "score (PEFT adds it for SEQ_CLS)"],
)
def test_peft_modules_to_save_heads_keep_adamw_states(make_model, head, task_type):
    """A head PEFT trains as a full copy (modules_to_save) is a head: it keeps AdamW states, as without PEFT. Its
    trainable copy sits at `<head>.modules_to_save.default`, whose last name component is no head name."""
    from peft import LoraConfig, get_peft_model

    from foam_hf import FoamConfig
    from foam_hf.param_groups import resolve_block_sizes

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=[head], task_type=task_type)
    model = get_peft_model(make_model(), config)
    sizes = resolve_block_sizes(model, FoamConfig()).size_by_parameter
    copies = [n for n in sizes if f"{head}.modules_to_save." in n]
    assert copies, sorted(sizes)  # the premise: PEFT made the head's copy trainable
    assert {n: sizes[n] for n in copies} == {n: 1 for n in copies}
    assert set(sizes.values()) == {1}  # adapters keep AdamW states too, by default


@pytest.mark.parametrize("method", ["p_tuning", "prefix_tuning"])
def test_prompt_learning_encoders_keep_adamw_states_like_other_adapters(method):
    """P-tuning's MLP and prefix tuning's projection are adapters (modules of PEFT's tuners): they keep AdamW states
    by default, as LoRA's do, and block_sizes folds them on request."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model

    from foam_hf import FoamConfig
    from foam_hf.param_groups import resolve_block_sizes

    config = {
        "p_tuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32),
        "prefix_tuning": PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=32
        ),
    }[method]
    model = get_peft_model(tiny_llama(), config)
    sizes = resolve_block_sizes(model, FoamConfig()).size_by_parameter
    encoder_weights = [
        n for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2 and "embedding" not in n
    ]
    assert encoder_weights and all(n.startswith("prompt_encoder.") for n in encoder_weights)  # the premise
    assert set(sizes.values()) == {1}
    layer = "mlp_head" if method == "p_tuning" else "transform"
    folded = resolve_block_sizes(model, FoamConfig(block_sizes={layer: 4})).size_by_parameter
    assert all(folded[n] == 4 for n in encoder_weights)
    assert all(n.startswith(f"prompt_encoder.default.{layer}.") for n, b in folded.items() if b == 4)


def test_modules_to_save_of_a_hidden_layer_folds_as_without_peft():
    """A hidden layer PEFT trains as a full copy (modules_to_save) is no adapter: its copy folds, as the layer would
    without PEFT."""
    from peft import LoraConfig, get_peft_model

    from foam_hf import FoamConfig
    from foam_hf.param_groups import resolve_block_sizes

    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["down_proj"])
    model = get_peft_model(tiny_llama(), config)
    sizes = resolve_block_sizes(model, FoamConfig()).size_by_parameter
    copies = {n: b for n, b in sizes.items() if "down_proj.modules_to_save." in n}
    assert copies and set(copies.values()) == {4}
    assert {b for n, b in sizes.items() if "lora_" in n} == {1}


def test_all_linear_leaves_task_heads_out():
    """optim_target_modules="all-linear" folds every linear layer but the output head, also where the head is a
    task head (score) that get_output_embeddings() does not return."""
    from foam_hf import FoamConfig
    from foam_hf.param_groups import resolve_block_sizes

    model = tiny_llama(num_labels=1)
    assert model.get_output_embeddings() is None  # the premise: only the name says score is the head
    sizes = resolve_block_sizes(model, FoamConfig(), "all-linear").size_by_parameter
    assert {n for n, b in sizes.items() if b > 1} == linear_weights(model, skip=("score",))
    assert sizes["score.weight"] == 1
