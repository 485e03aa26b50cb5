"""Tiny, offline building blocks of a Hugging Face run, for the Trainer/TRL/PEFT tests and the workers in
tests/_dist_workers: a byte-level BPE tokenizer trained on a few sentences, a two-layer Llama built from a
config, small datasets, the ``TrainingArguments`` of a short CPU run, and a callback that interrupts training.
Nothing is downloaded.

This is the one place for what builds a run; the tables of shapes, hyper-parameters and implementation paths,
the error catalogue and foam_hf's private names are in tests/_helpers.py.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

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


def save_tiny_llama_and_text(model_dir: Path, text_file: Path, rows: int = 16) -> dict[str, list[int]]:
    """Save ``tiny_llama()`` and the tokenizer to ``model_dir`` and ``rows`` lines of ``{"text": ...}`` JSON to
    ``text_file``, as a command-line tool reads them; return the model's parameter shapes by name."""
    model = tiny_llama()
    model.save_pretrained(model_dir)
    tokenizer().save_pretrained(model_dir)
    text_file.parent.mkdir(parents=True, exist_ok=True)
    with open(text_file, "w") as handle:
        for i in range(rows):
            handle.write(json.dumps({"text": TEXT[i % len(TEXT)]}) + "\n")
    return {n: list(p.shape) for n, p in model.named_parameters()}


#: The multi-process runs (tests/_dist_workers): rows of random tokens of this vocabulary and length, and a
#: global batch of 2 ranks x 4 rows or 1 process x 8 rows, so every configuration sees the same rows each step.
RANK_VOCAB, RANK_SEQ, RANK_ROWS, GLOBAL_BATCH = 64, 16, 64, 8


class TokenRows(torch.utils.data.Dataset):
    """Fixed-length random token rows (input_ids = labels): no padding, so every rank's loss averages the same
    token count, and the same rows in every process."""

    def __init__(self, vocab_size: int = RANK_VOCAB, length: int = RANK_SEQ, rows: int = RANK_ROWS) -> None:
        self.ids = torch.randint(0, vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def rank_training_args(output_dir, *, save_steps: int = 0, **overrides):
    """``TrainingArguments`` of one rank of a multi-process run, the same for every launcher and world size:
    ``optim="foam"`` at B=4, lr 1e-2 constant, weight decay 0.1, 4 steps, each global batch the same
    ``GLOBAL_BATCH`` rows in order whatever the number of ranks, a loss logged every step, seed 0; a checkpoint
    every ``save_steps`` steps if that is not 0. ``overrides`` replace or add fields."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        optim="foam",
        optim_args="block_size=4",
        learning_rate=1e-2,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        max_steps=4,
        per_device_train_batch_size=GLOBAL_BATCH // int(os.environ.get("WORLD_SIZE", "1")),
        train_sampling_strategy="sequential",  # the same rows in each global batch, however many ranks
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 1,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    return TrainingArguments(**{**kwargs, **overrides})


#: The fields of a short, deterministic CPU run with ``optim="foam"``: 2 steps of 4 rows, seeded, no saving, no
#: reporting, no progress bar, no data-loader workers. TRL's configs take them too (they subclass
#: ``TrainingArguments``).
RUN_DEFAULTS = dict(
    optim="foam",
    max_steps=2,
    per_device_train_batch_size=4,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    seed=0,
    data_seed=0,
    dataloader_num_workers=0,
    disable_tqdm=True,
)


def training_args(output_dir, **overrides):
    """``TrainingArguments(output_dir, **RUN_DEFAULTS)``; ``overrides`` replace or add fields."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(output_dir), **{**RUN_DEFAULTS, **overrides})


class StopAt(TrainerCallback):
    """Interrupts training after ``step`` optimizer steps, as a crash or a preempted job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def unwrap_foam(optimizer):
    """The FOAM inside the wrappers accelerate and DeepSpeed put around a Trainer's optimizer."""
    from foam_hf import FOAM

    while not isinstance(optimizer, FOAM) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def end_rank() -> None:
    """End a worker rank of a multi-process test after its work is done and saved: tear the process group down
    and leave without Python's finalization.

    destroy_process_group() alone was not enough. ProcessGroupGloo's worker threads can outlive it (the group is
    still referenced, e.g. by FSDP2's device mesh) and destroy their last Work while the interpreter finalizes;
    that Work's tensors need the GIL, a finalizing interpreter ends the thread instead, and the forced unwind
    through a noexcept destructor aborts the rank ("terminate called without an active exception", SIGABRT), so
    the launcher fails a run whose results are already on disk. Seen here in about 1 of 10-16 launches of
    trainer_fsdp2.py on a 2-core AMD Zen 5, with this code and with the code before it; the core dump has
    ~AsyncAllgatherCoalescedWork in ProcessGroupGloo::runLoop on the aborting thread and Py_FinalizeEx on the
    main thread. os._exit skips finalization; what the rank printed is flushed first.
    """
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
