"""optim="foam" in every TRL trainer that builds its optimizer through Trainer, and with PEFT LoRA.

Each test runs the real trainer on a tiny Llama for a couple of steps and checks that the optimizer in
use is FOAM, that it folded what it should, and that the losses are finite.
"""

from __future__ import annotations

import math

import pytest
import torch
import trl
from hf_fixtures import (
    lm_dataset,
    preference_dataset,
    prompt_dataset,
    text_dataset,
    tiny_llama,
    tokenizer,
)

import foam_hf  # noqa: F401  (registers optim="foam")
from foam_hf import FOAM, NoMatchingModuleError

COMMON = dict(
    optim="foam",
    max_steps=2,
    per_device_train_batch_size=2,
    learning_rate=1e-3,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    seed=0,
    disable_tqdm=True,
)


def assert_trained_with_foam(trainer):
    optimizer = trainer.optimizer
    while not isinstance(optimizer, FOAM) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    assert isinstance(optimizer, FOAM), type(trainer.optimizer)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses)
    assert any(s.get("exp_avg") is not None for s in optimizer.state.values())
    return optimizer


def reward_len(completions, **kwargs):
    """A programmatic reward: longer completions score higher (enough to give GRPO/RLOO a signal)."""
    return [float(len(c)) / 10 for c in completions]


def test_sft(tmp_path):
    config = trl.SFTConfig(output_dir=str(tmp_path), max_length=32, **COMMON)
    trainer = trl.SFTTrainer(
        model=tiny_llama(), args=config, train_dataset=text_dataset(), processing_class=tokenizer()
    )
    trainer.train()
    assert_trained_with_foam(trainer)


def test_dpo(tmp_path):
    config = trl.DPOConfig(output_dir=str(tmp_path), max_length=48, **COMMON)
    trainer = trl.DPOTrainer(
        model=tiny_llama(),
        ref_model=tiny_llama(),  # given, so TRL does not look for the reference model on a hub
        args=config,
        train_dataset=preference_dataset(),
        processing_class=tokenizer(),
    )
    trainer.train()
    assert_trained_with_foam(trainer)


def test_reward(tmp_path):
    config = trl.RewardConfig(output_dir=str(tmp_path), max_length=48, **COMMON)
    model = tiny_llama(num_labels=1)
    trainer = trl.RewardTrainer(
        model=model, args=config, train_dataset=preference_dataset(), processing_class=tokenizer()
    )
    trainer.train()
    optimizer = assert_trained_with_foam(trainer)
    # The scalar reward head ("score", 1 x hidden) is a linear layer but the model's output head: unfolded.
    assert (
        next(g["block_size"] for g in optimizer.param_groups if any(p is model.score.weight for p in g["params"])) == 1
    )


def _online_config(cls, tmp_path):
    return cls(
        output_dir=str(tmp_path),
        beta=0.0,  # no KL term, so no reference model is built (it would be looked up on a hub)
        num_generations=2,
        max_completion_length=8,
        generation_batch_size=2,
        **{**COMMON, "per_device_train_batch_size": 2},
    )


def test_grpo(tmp_path):
    trainer = trl.GRPOTrainer(
        model=tiny_llama(),
        reward_funcs=reward_len,
        args=_online_config(trl.GRPOConfig, tmp_path),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer(),
    )
    trainer.train()
    assert_trained_with_foam(trainer)


def test_rloo(tmp_path):
    trainer = trl.RLOOTrainer(
        model=tiny_llama(),
        reward_funcs=reward_len,
        args=_online_config(trl.RLOOConfig, tmp_path),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer(),
    )
    trainer.train()
    assert_trained_with_foam(trainer)


def test_kto(tmp_path):
    from datasets import Dataset

    data = Dataset.from_dict(
        {
            "prompt": [f"Question {i}:" for i in range(8)],
            "completion": [f" answer {i}." for i in range(8)],
            "label": [i % 2 == 0 for i in range(8)],
        }
    )
    config = trl.KTOConfig(output_dir=str(tmp_path), max_length=32, **COMMON)
    trainer = trl.KTOTrainer(
        model=tiny_llama(), ref_model=tiny_llama(), args=config, train_dataset=data, processing_class=tokenizer()
    )
    trainer.train()
    assert_trained_with_foam(trainer)


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
    args = TrainingArguments(output_dir=str(tmp_path), optim_args="block_sizes=k_proj:8", **COMMON)
    with pytest.raises(NoMatchingModuleError, match="'k_proj' matches no trainable parameter"):
        Trainer(model=model, args=args, train_dataset=lm_dataset()).create_optimizer()


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


def test_distillation(tmp_path):
    config = trl.DistillationConfig(output_dir=str(tmp_path), max_completion_length=8, **COMMON)
    trainer = trl.DistillationTrainer(
        model=tiny_llama(),
        teacher_model=tiny_llama(seed=1),
        args=config,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer(),
    )
    trainer.train()
    assert_trained_with_foam(trainer)
