"""Tiny, offline building blocks for the Trainer/TRL/PEFT tests: a byte-level BPE tokenizer trained on a
few sentences, a two-layer Llama built from a config, and small text datasets. Nothing is downloaded."""

from __future__ import annotations

import functools

import torch

TEXT = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "import os\nprint(os.getcwd())\n",
    "Folded states keep one moment per block of weights.",
    "for i in range(10):\n    total += i\n",
    "Adam keeps two moments for every parameter.",
]


@functools.cache
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return fast


def tiny_llama(*, tie_word_embeddings: bool = False, seed: int = 0, num_labels: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    if num_labels is not None:
        config.num_labels = num_labels
        return LlamaForSequenceClassification(config)
    return LlamaForCausalLM(config)


def lm_dataset(n: int = 16, length: int = 24):
    """Fixed-length causal-LM examples (input_ids = labels) for the plain Trainer."""
    from datasets import Dataset

    tok = tokenizer()
    ids = tok("\n".join(TEXT * 8))["input_ids"]
    rows = [ids[i * 7 : i * 7 + length] for i in range(n)]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def text_dataset(n: int = 8):
    from datasets import Dataset

    return Dataset.from_dict({"text": [TEXT[i % len(TEXT)] for i in range(n)]})


def preference_dataset(n: int = 8):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [f"Question {i}: what is {i} + {i}?" for i in range(n)],
            "chosen": [f" The answer is {2 * i}." for i in range(n)],
            "rejected": [f" I do not know {i}." for i in range(n)],
        }
    )


def prompt_dataset(n: int = 8):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"Count to {i}:" for i in range(n)]})
