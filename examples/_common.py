"""Shared helpers of the examples: command-line flags, a tiny Llama or a local model, a tokenizer, local data.

Nothing here downloads anything. Without ``--model-name-or-path`` the model is a ``LlamaForCausalLM`` built
from a small ``LlamaConfig`` with random weights, and the tokenizer is a byte-level BPE trained in a second
on the text at hand. The text is the Python standard library's own ``.py`` sources (present on every CPython
install; Python-like text generated from a fixed seed stands in when they are missing). With
``--model-name-or-path DIR`` the model and tokenizer come from ``DIR`` (a model you have on disk, or any
name ``from_pretrained`` accepts), and the same script runs at real scale; on a GPU the Trainer uses it
automatically, in bf16 where supported.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import random
import sys
import sysconfig
from pathlib import Path
from typing import Any

import torch

import foam_hf
from foam_hf import FOAM, FoamConfig

#: Shapes of the built-in models (``LlamaConfig`` keyword arguments).
TINY_SIZES: dict[str, dict[str, int]] = {
    # For tests: a few seconds per example.
    "test": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    # The default on a CPU: minutes.
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4),
}


# ------------------------------------------------------------------------------------------- arguments

#: ``--max-steps`` under ``--short`` when it is not given: a run of seconds on a CPU.
SHORT_MAX_STEPS = 20


class ExampleParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose ``--max-steps`` default depends on ``--short``: the example's own default for
    a full run, :data:`SHORT_MAX_STEPS` under ``--short``; an explicit ``--max-steps N`` wins either way."""

    def __init__(self, *args: Any, max_steps: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.full_max_steps = max_steps

    def parse_known_args(self, args=None, namespace=None):  # parse_args calls this too
        namespace, extras = super().parse_known_args(args, namespace)
        if getattr(namespace, "max_steps", 0) is None:
            namespace.max_steps = SHORT_MAX_STEPS if namespace.short else self.full_max_steps
        return namespace, extras


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a step count, a batch size, a length of zero or less trains nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def add_common_args(parser: ExampleParser, *, learning_rate: float, trainer: bool = True) -> None:
    """The flags every example shares (``--short`` switches to the test-sized model, data and step count).

    ``trainer=False`` (the examples with a hand-written loop) leaves out ``--output-dir`` and ``--report-to``,
    which only a Trainer uses."""
    parser.add_argument(
        "--model-name-or-path",
        default=None,
        help="a model directory (or name) for from_pretrained; default: a tiny Llama built from a config",
    )
    parser.add_argument(
        "--max-steps",
        type=positive_int,
        default=None,
        help=f"optimizer steps (default: {parser.full_max_steps}; {SHORT_MAX_STEPS} with --short)",
    )
    if trainer:
        parser.add_argument("--output-dir", default=None, help="default: outputs/<example name>")
    parser.add_argument(
        "--block-size", type=positive_int, default=None, help="FOAM's block size B (default 4; 1 = AdamW states)"
    )
    parser.add_argument(
        "--optim-args",
        default="",
        help="more FOAM options in optim_args form, e.g. 'block_sizes=q_proj:8;down_proj:16,res_scale=0.5'",
    )
    parser.add_argument("--learning-rate", type=float, default=learning_rate)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    if trainer:
        parser.add_argument("--report-to", default="none", help="Trainer report_to (e.g. tensorboard, wandb)")
    parser.add_argument(
        "--short", action="store_true", help=f"test-sized model and data, {SHORT_MAX_STEPS} steps: seconds on a CPU"
    )


def example_parser(doc: str, *, max_steps: int, learning_rate: float, trainer: bool = True) -> ExampleParser:
    """An argument parser described by the first line of ``doc``, with the flags every example shares."""
    parser = ExampleParser(description=doc.splitlines()[0], max_steps=max_steps)
    add_common_args(parser, learning_rate=learning_rate, trainer=trainer)
    return parser


def foam_optim_args(args: argparse.Namespace) -> str:
    """The ``optim_args`` string of ``--block-size`` and ``--optim-args``, validated by :class:`FoamConfig`."""
    given = {item.partition("=")[0].strip() for item in args.optim_args.split(",")} & {"block_size", "level"}
    if args.block_size is not None and given:
        raise SystemExit(
            f"--block-size {args.block_size} and {sorted(given)} in --optim-args {args.optim_args!r} both set the "
            "block size. Fix: keep one."
        )
    text = ",".join(x for x in (f"block_size={args.block_size}" if args.block_size else "", args.optim_args) if x)
    return FoamConfig.from_optim_args(text).to_optim_args()


def foam_param_groups(model: torch.nn.Module, args: argparse.Namespace, weight_decay: float) -> list[dict]:
    """FOAM's param groups for ``model`` under ``--block-size`` and ``--optim-args``, for a hand-written loop:
    what ``optim="foam"`` folds (linear layers, not the embeddings or the head), per-module ``block_sizes``
    included, with transformers' weight-decay rule (none on biases and norm weights)."""
    return foam_hf.foam_param_groups(model, foam_optim_args(args), weight_decay=weight_decay)


def adamw_param_groups(foam_groups: list[dict]) -> list[dict]:
    """The same parameters and weight decay for ``torch.optim.AdamW``: a like-for-like baseline."""
    return [{"params": group["params"], "weight_decay": group["weight_decay"]} for group in foam_groups]


def training_kwargs(args: argparse.Namespace, name: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``TrainingArguments`` or a TRL config: ``optim="foam"`` plus the common flags."""
    kwargs: dict[str, Any] = dict(
        output_dir=args.output_dir or str(Path("outputs") / name),
        optim="foam",
        optim_args=foam_optim_args(args),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 10),
        logging_steps=max(1, min(10, args.max_steps // 4)),
        save_strategy="no",
        report_to=args.report_to,
        seed=args.seed,
        data_seed=args.seed,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        disable_tqdm=args.short,
    )
    kwargs.update(overrides)
    return kwargs


# ---------------------------------------------------------------------------------- torchrun examples


def torchrun_args(doc: str, script: str, argv: list[str] | None) -> argparse.Namespace:
    """The arguments of a torchrun example (``--seq-len`` besides the shared flags), checked before any process
    group or model: bad ``--optim-args``, and a launch without torchrun, stop here."""
    parser = example_parser(doc, max_steps=100, learning_rate=3e-3, trainer=False)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    args = parser.parse_args(argv)
    if args.short:
        args.seq_len = min(args.seq_len, 32)
    foam_optim_args(args)
    if "RANK" not in os.environ:
        raise SystemExit(
            f"{script} runs one process per rank, started by torchrun. Fix: torchrun --nproc_per_node=2 "
            f"examples/{script} ..."
        )
    return args


def say(line: str) -> None:
    """Print ``line`` in one write, so that the lines of the ranks, which share stdout, never interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def moment_shapes(name: str, param: torch.Tensor, exp_avg: torch.Tensor) -> dict[str, Any]:
    """A parameter's shape and its first moment's: the global one and the piece this rank holds (a DTensor's local
    tensor; a plain tensor is its own), for the torchrun examples' reports."""
    local = exp_avg.to_local() if hasattr(exp_avg, "to_local") else exp_avg
    return dict(name=name, param=tuple(param.shape), exp_avg=tuple(exp_avg.shape), exp_avg_local=tuple(local.shape))


def leave_without_finalization() -> None:
    """End a torchrun example's process. On CPU the ranks talk through gloo, whose worker threads can outlive
    destroy_process_group (a device mesh still holds the group) and abort the process while Python finalizes
    ("terminate called without an active exception"), about 1 run in 10-16 here, after all the work is done:
    leave without that finalization, everything printed flushed first. On GPUs, return as usual."""
    if not torch.cuda.is_available():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# ------------------------------------------------------------------------------------------------ text


def stdlib_texts(max_files: int = 60, max_chars: int = 40_000) -> list[str]:
    """The first ``max_files`` top-level ``.py`` files of the standard library, each cut to ``max_chars``.

    Falls back to Python-like text generated from a fixed seed when no sources are found.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())[:max_files] if root.is_dir() else []
    texts = [p.read_text(encoding="utf-8", errors="replace")[:max_chars] for p in files]
    return texts or _generated_texts(max_files)


def _generated_texts(n: int) -> list[str]:
    rng = random.Random(0)
    names = ["value", "index", "count", "result", "items", "key", "total", "name"]
    texts = []
    for i in range(n):
        lines = []
        for _ in range(40):
            a, b, c = rng.sample(names, 3)
            lines.append(f'def get_{a}_{i}({b}, {c}=1):\n    """Return {b} and {c}."""\n    return {b} + {c}\n')
        texts.append("\n".join(lines))
    return texts


def function_snippets(texts: list[str], n: int, max_chars: int = 240) -> list[tuple[str, str]]:
    """Up to ``n`` (signature line, body) pairs of top-level functions found in ``texts``. The line break after
    the signature starts the body: byte-level BPE merges a newline with the indent after it, so a prompt ending in
    one would not be a token prefix of prompt + completion (TRL warns, and trains on another context)."""
    snippets = []
    for text in texts:
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if not (line.startswith("def ") and line.rstrip().endswith(":")):
                continue
            body = []
            for nxt in lines[i + 1 :]:
                if nxt and not nxt[0].isspace():
                    break
                body.append(nxt)
            body_text = "\n".join(body).strip("\n")
            if len(body_text) >= 20:
                snippets.append((line, "\n" + body_text[:max_chars] + "\n"))
            if len(snippets) >= n:
                return snippets
    return snippets


def function_pairs(short: bool) -> list[tuple[str, str]]:
    """(first line, body) pairs of standard-library functions: up to 64 from its first 20 files with ``--short``,
    else up to 2000 from its first 200."""
    return function_snippets(stdlib_texts(max_files=20 if short else 200), n=64 if short else 2000)


def block_dataset(tokenizer, texts: list[str], seq_len: int, max_rows: int):
    """Concatenate the token ids of ``texts`` and cut them into ``seq_len`` blocks (labels = input_ids)."""
    from datasets import Dataset

    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
        if len(ids) >= seq_len * max_rows:
            break
    rows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:max_rows]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


# ------------------------------------------------------------------------------- tokenizer and model


@functools.cache
def build_tokenizer(vocab_size: int = 512, max_files: int = 20):
    """A byte-level BPE tokenizer trained on a few stdlib files (about a second), as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_texts(max_files, max_chars=10_000), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return fast


def tiny_llama(tokenizer, size: str = "tiny", seed: int = 0, max_position_embeddings: int = 512):
    """A randomly initialised ``LlamaForCausalLM`` of the named :data:`TINY_SIZES` shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = TINY_SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=shape["num_attention_heads"] // 2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_model_and_tokenizer(args: argparse.Namespace):
    """``--model-name-or-path`` when given, else a tiny Llama (the ``test`` size under ``--short``)."""
    if args.model_name_or_path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype)
        return model, tokenizer
    tokenizer = build_tokenizer()
    return tiny_llama(tokenizer, "test" if args.short else "tiny", seed=args.seed), tokenizer


# -------------------------------------------------------------------------------------------- results


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer under accelerate's wrapper(s)."""
    while not isinstance(optimizer, FOAM) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def save_final_model(trainer: Any, args: argparse.Namespace) -> None:
    """With ``--output-dir`` given, save the trained model (adapters only, for PEFT) and tokenizer there: the
    runs save no checkpoints on the way (``save_strategy="no"``), so this is what a real-scale run keeps."""
    if args.output_dir:
        trainer.save_model(args.output_dir)
        print(f"trained model saved to {args.output_dir}")


def summarize(trainer: Any, loss_key: str = "loss") -> dict[str, Any]:
    """What every example returns and prints: the optimizer class, the logged losses, FOAM's state bytes."""
    history = trainer.state.log_history
    foam_logs = next((e for e in history if "foam/state_bytes" in e), {})
    summary = dict(
        optimizer=type(unwrap_optimizer(trainer.optimizer)).__name__,
        losses=[e[loss_key] for e in history if loss_key in e],
        state_bytes=foam_logs.get("foam/state_bytes"),
        adamw_state_bytes=foam_logs.get("foam/adamw_state_bytes"),
        global_step=trainer.state.global_step,
    )
    losses = summary["losses"]
    finite = all(math.isfinite(x) for x in losses)
    print(
        f"optimizer {summary['optimizer']} (foam_hf {foam_hf.__version__}), {summary['global_step']} steps, "
        f"{loss_key} {losses[0]:.4f} -> {losses[-1]:.4f}{'' if finite else ' (NOT FINITE)'}"
        if losses
        else f"optimizer {summary['optimizer']}, no {loss_key} logged"
    )
    if summary["state_bytes"] is not None:
        print(
            f"optimizer state {summary['state_bytes']:,} bytes; AdamW would hold {summary['adamw_state_bytes']:,} "
            f"({summary['adamw_state_bytes'] / summary['state_bytes']:.2f}x)"
        )
    return summary
