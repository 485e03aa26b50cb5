"""The demo's training run: a tiny Llama pre-trained on local text by ``transformers.Trainer``, one ``optim`` a run.

This is the product path, nothing else: FOAM is ``TrainingArguments(optim="foam", optim_args=...)``, built by
the same handler as in any user's Trainer (:func:`foam_hf.integration.optimizer_cls_and_kwargs`, hence the
grouping of :mod:`foam_hf.param_groups`), and AdamW is ``optim="adamw_torch_fused"`` (``"adamw_torch"``
where this torch has no fused AdamW for the device). ``foam-hf demo`` uses it, and so do the quality
benchmarks in ``benchmarks/``, so their FOAM numbers come from the grouping ``optim="foam"`` uses.

Everything runs offline. The corpus is the Python standard library's own ``.py`` sources (present on every
CPython install), tokenised byte by byte (vocabulary 256: nothing to train or download, and the loss is in
nats per byte); whole files are held out for evaluation. The model is a ``LlamaForCausalLM`` built from a
``LlamaConfig`` with random initial weights. For a given ``seed`` every run sees the same initial weights and
the same batches in the same order (windows at offsets drawn once from ``seed``, fed in order through
``train_sampling_strategy="sequential"``), under the same schedule: linear warm-up over the first 10% of the
steps, then cosine decay to 10% of the peak lr (``lr_scheduler_type="cosine_with_min_lr"``). Everything else
is the Trainer's default (weight decay 0, ``max_grad_norm=1.0``, eps 1e-8, betas (0.9, 0.999) unless given).
"""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import sysconfig
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import FoamConfigError
from ..memory import state_memory
from ..optim import FOAM

__all__ = [
    "MODEL_SIZES",
    "Corpus",
    "RunConfig",
    "RunResult",
    "adamw_optim_name",
    "build_model",
    "build_trainer",
    "load_corpus",
    "cpu_name",
    "optimizer_state_bytes",
    "run_environment",
    "train",
    "unwrap_optimizer",
]

#: Model shapes by name: ``LlamaConfig`` keyword arguments. Vocabulary is 256 (bytes) for all, and
#: input/output embeddings are untied, so most parameters sit in the linear layers FOAM folds.
MODEL_SIZES: dict[str, dict[str, int]] = {
    # ~0.86M parameters: 4 layers of width 128.
    "tiny": dict(hidden_size=128, num_hidden_layers=4, intermediate_size=344, num_attention_heads=4),
    # ~3.3M parameters: 4 layers of width 256.
    "small": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688, num_attention_heads=4),
    # ~12.7M parameters: 6 layers of width 384 (for a GPU or a patient CPU).
    "base": dict(hidden_size=384, num_hidden_layers=6, intermediate_size=1024, num_attention_heads=6),
}

VOCAB_SIZE = 256  # byte-level tokens

# One file in ~10 is held out (by a hash of its name, so the split does not depend on which other files
# exist on this Python version).
_EVAL_MODULUS = 10


# ----------------------------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """Byte-level token streams for training and evaluation, and where they came from.

    Attributes:
        train: 1-D ``torch.uint8`` tensor of the training files' bytes, concatenated.
        eval: 1-D ``torch.uint8`` tensor of the held-out files' bytes, concatenated.
        train_files: names of the training files (empty for generated text).
        eval_files: names of the held-out files (disjoint from ``train_files``).
        source: ``"stdlib"`` or ``"generated"``.
    """

    train: torch.Tensor
    eval: torch.Tensor
    train_files: list[str]
    eval_files: list[str]
    source: str

    def describe(self) -> str:
        return (
            f"{self.source}: {len(self.train_files)} train files ({self.train.numel():,} bytes), "
            f"{len(self.eval_files)} held-out files ({self.eval.numel():,} bytes)"
        )


def _is_eval_file(name: str) -> bool:
    return zlib.crc32(name.encode()) % _EVAL_MODULUS == 0


def _to_bytes(texts: list[str]) -> torch.Tensor:
    data = "\n".join(texts).encode("utf-8", errors="replace")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def _generated_text(seed: int, n_lines: int) -> list[str]:
    """Python-like text from a small grammar: a stand-in when the stdlib sources are missing."""
    rng = random.Random(seed)
    names = ["value", "index", "count", "result", "items", "key", "total", "buffer", "name", "path"]
    ops = ["+", "-", "*", "//", "%"]
    lines = []
    for _ in range(n_lines):
        a, b, c = rng.choice(names), rng.choice(names), rng.choice(names)
        kind = rng.randrange(4)
        if kind == 0:
            lines.append(f"def get_{a}({b}, {c}={rng.randrange(10)}):\n    return {b} {rng.choice(ops)} {c}\n")
        elif kind == 1:
            lines.append(f"for {a} in range(len({b})):\n    {c} += {b}[{a}]\n")
        elif kind == 2:
            lines.append(f"if {a} is None:\n    raise ValueError('{a} must not be None')\n")
        else:
            lines.append(f"{a} = {{'{b}': {rng.randrange(100)}, '{c}': [{b}, {c}]}}\n")
    return lines


def load_corpus(max_files: int | None = None, *, stdlib_dir: str | os.PathLike | None = None) -> Corpus:
    """The default corpus: the standard library's top-level ``.py`` files, whole files held out for eval.

    Files are taken in sorted order (``max_files`` keeps the first ones); a file goes to eval when the
    CRC-32 of its name is divisible by 10. When no sources are found (a stripped Python install), the
    corpus is Python-like text generated in-process from a fixed seed, with a ``RuntimeWarning`` saying so.
    """
    root = Path(stdlib_dir if stdlib_dir is not None else sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file()) if root.is_dir() else []
    if max_files is not None:
        files = files[:max_files]
    train_files = [p.name for p in files if not _is_eval_file(p.name)]
    eval_files = [p.name for p in files if _is_eval_file(p.name)]
    if not train_files or not eval_files:
        warnings.warn(
            f"foam_hf demo: no usable standard-library .py sources under {str(root)!r} (found {len(files)} "
            "files); training on Python-like text generated in-process instead. Loss values are not "
            "comparable with runs on the stdlib corpus.",
            RuntimeWarning,
            stacklevel=2,
        )
        return Corpus(
            train=_to_bytes(_generated_text(0, 40_000)),
            eval=_to_bytes(_generated_text(1, 4_000)),
            train_files=[],
            eval_files=[],
            source="generated",
        )

    def read(names: list[str]) -> list[str]:
        return [(root / n).read_text(encoding="utf-8", errors="replace") for n in names]

    return Corpus(_to_bytes(read(train_files)), _to_bytes(read(eval_files)), train_files, eval_files, "stdlib")


# ------------------------------------------------------------------------------------------------ model


def build_model(size: str, seed: int, *, seq_len: int = 128) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of the named size (see :data:`MODEL_SIZES`)."""
    if size not in MODEL_SIZES:
        raise FoamConfigError(
            f"model size {size!r} is unknown: it must be one of {sorted(MODEL_SIZES)}. Fix: pass e.g. 'tiny'."
        )
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = MODEL_SIZES[size]
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=max(seq_len, 128),
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **shape,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# ------------------------------------------------------------------------------------------------- data


class _Windows(torch.utils.data.Dataset):
    """``data[start : start + seq_len]`` for each start, as ``{"input_ids", "labels"}`` (int64)."""

    def __init__(self, data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> None:
        self.data, self.starts, self.seq_len = data, starts, seq_len

    def __len__(self) -> int:
        return self.starts.numel()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = int(self.starts[i])
        ids = self.data[start : start + self.seq_len].long()
        return {"input_ids": ids, "labels": ids}


def train_starts(data: torch.Tensor, steps: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """Start offsets of every training window, in the order they are fed: ``steps * batch_size`` of them."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, data.numel() - seq_len, (steps * batch_size,), generator=gen)


def eval_starts(data: torch.Tensor, n_windows: int, seq_len: int) -> torch.Tensor:
    """Evenly spaced held-out windows (at most as many as fit without overlap): the same for every run."""
    n = min(n_windows, data.numel() // seq_len)
    return torch.linspace(0, data.numel() - seq_len, n).long()


# ------------------------------------------------------------------------------------------------ train


@dataclass(frozen=True)
class RunConfig:
    """Budget and data of one run; identical for every optimizer being compared.

    Attributes:
        model_size: key of :data:`MODEL_SIZES`.
        steps: optimizer steps (``max_steps``).
        batch_size: sequences per step (``per_device_train_batch_size``).
        seq_len: bytes per sequence.
        warmup_fraction: share of ``steps`` with linear warm-up; then cosine decay to 10% of the peak lr.
        seed: seeds the initial weights and the batch order.
        eval_every: steps between evaluations on the held-out files (the last step is always evaluated).
        eval_batches: batches of held-out text per evaluation (fixed windows, the same every time).
        device: ``"cpu"``, ``"cuda"``, ... or ``"auto"`` (CUDA when available).
        max_files: passed to :func:`load_corpus`.
        weights_dtype: ``"float32"``, or ``"bfloat16"`` for a model trained in bf16 (no fp32 master copy).
    """

    model_size: str = "tiny"
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    warmup_fraction: float = 0.1
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 8
    device: str = "auto"
    max_files: int | None = None
    weights_dtype: str = "float32"

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class RunResult:
    """What one run measured. Byte counts are exact; times are wall-clock on the machine that ran it.

    ``optim`` is the ``TrainingArguments.optim`` of the run, or ``"custom"`` for an optimizer handed to the
    Trainer ready-made (``optimizers=(optimizer, None)``); ``groups`` lists each param group's
    ``block_size`` (FOAM) and parameter count, so a reader can see which grouping trained.
    """

    name: str
    optim: str
    lr: float
    seed: int
    optim_args: str | None
    adam_beta2: float
    eval_loss: float
    state_bytes: int
    adamw_state_bytes: int
    params: int
    step_time_s: float
    wall_time_s: float
    device: str
    groups: list[dict[str, Any]] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def adamw_optim_name(device: torch.device) -> str:
    """``"adamw_torch_fused"`` where this torch has a fused AdamW for ``device`` (CPU: torch >= 2.4), else
    ``"adamw_torch"``."""
    try:
        probe = torch.zeros(1, device=device, requires_grad=True)
        probe.grad = torch.zeros_like(probe)
        torch.optim.AdamW([probe], fused=True).step()
    except (RuntimeError, ValueError):
        return "adamw_torch"
    return "adamw_torch_fused"


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer under accelerate's wrapper(s)."""
    while not isinstance(optimizer, FOAM) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _tensor_bytes(value: torch.Tensor) -> int:
    # Tensor subclasses (e.g. torchao's quantised states) hold their storage in inner tensors.
    if type(value) not in (torch.Tensor, torch.nn.Parameter) and hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(value, name)) for name in names)
    return value.numel() * value.element_size()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor held in ``optimizer.state`` (what the optimizer actually allocated)."""
    return sum(
        _tensor_bytes(v) for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)
    )


def build_trainer(
    model: torch.nn.Module,
    corpus: Corpus,
    config: RunConfig,
    *,
    optim: str,
    lr: float,
    optim_args: str | None = None,
    adam_beta2: float = 0.999,
    optimizer: torch.optim.Optimizer | None = None,
    output_dir: str | None = None,
):
    """The ``transformers.Trainer`` of one run (not yet trained).

    ``optim`` is any ``TrainingArguments.optim`` name (``"foam"``, ``"adamw_torch_fused"``, ``"adafactor"``,
    ...) with ``optim_args``; or pass a ready ``optimizer`` (a third-party peer) and the Trainer builds only
    the schedule (``optim`` is then a label only).
    """
    # optim="foam" is registered: importing this module ran foam_hf/__init__.py.
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

    device = config.resolved_device()
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="foam-demo-run-"),
        optim=optim if optimizer is None else "adamw_torch",
        optim_args=optim_args,
        learning_rate=lr,
        adam_beta2=adam_beta2,
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=max(1, round(config.warmup_fraction * config.steps)),
        train_sampling_strategy="sequential",  # the windows are already in the seed's random order
        eval_strategy="steps",
        eval_steps=config.eval_every,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        use_cpu=device.type == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    starts = train_starts(corpus.train, config.steps, config.batch_size, config.seq_len, config.seed)
    train_data = _Windows(corpus.train, starts, config.seq_len)
    eval_data = _Windows(
        corpus.eval, eval_starts(corpus.eval, config.eval_batches * config.batch_size, config.seq_len), config.seq_len
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        optimizers=(optimizer, None),
    )
    # The run's own progress goes through `progress`; the Trainer's printed log lines would be one a step.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _timing_callback(step_times: list[float], progress: Callable[[int, dict], None] | None):
    from transformers import TrainerCallback

    class _StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if progress is not None and logs:
                progress(state.global_step, logs)

    return _StepTimer()


def train(
    name: str,
    optim: str,
    lr: float,
    config: RunConfig,
    corpus: Corpus | None = None,
    *,
    optim_args: str | None = None,
    adam_beta2: float = 0.999,
    optimizer_factory: Callable[[torch.nn.Module, float], torch.optim.Optimizer] | None = None,
    progress: Callable[[int, dict], None] | None = None,
) -> RunResult:
    """Pre-train a fresh model of ``config.model_size`` through ``Trainer`` with ``optim``; return measurements.

    ``optimizer_factory(model, lr)`` builds a third-party optimizer instead (``optim`` is then its label).
    ``progress(step, logs)`` is called on every Trainer log (each step, and each evaluation).
    """
    device = config.resolved_device()
    corpus = corpus if corpus is not None else load_corpus(config.max_files)
    if config.weights_dtype not in ("float32", "bfloat16"):
        raise FoamConfigError(
            f"weights_dtype={config.weights_dtype!r} is invalid: it must be 'float32' or 'bfloat16'. "
            "Fix: pass 'bfloat16' to train the model in bf16, else 'float32'."
        )
    model = build_model(config.model_size, config.seed, seq_len=config.seq_len)
    model = model.to(device=device, dtype=getattr(torch, config.weights_dtype))
    optimizer = optimizer_factory(model, lr) if optimizer_factory is not None else None
    with tempfile.TemporaryDirectory(prefix="foam-demo-run-") as tmp:
        trainer = build_trainer(
            model,
            corpus,
            config,
            optim=optim,
            lr=lr,
            optim_args=optim_args,
            adam_beta2=adam_beta2,
            optimizer=optimizer,
            output_dir=tmp,
        )
        step_times: list[float] = []
        trainer.add_callback(_timing_callback(step_times, progress))
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        history = trainer.state.log_history
        evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
        if not evals or evals[-1][0] != config.steps:
            evals.append((config.steps, trainer.evaluate()["eval_loss"]))
        inner = unwrap_optimizer(trainer.optimizer)

    adamw_bytes = sum(2 * p.numel() * p.element_size() + 4 for p in model.parameters() if p.requires_grad)
    if isinstance(inner, FOAM):
        mem = state_memory(inner)
        state_bytes, adamw_bytes = mem.foam_bytes, mem.adamw_bytes
    else:
        state_bytes = optimizer_state_bytes(inner)
    groups = [
        {"params": sum(p.numel() for p in g["params"]), "tensors": len(g["params"]), "block_size": g.get("block_size")}
        for g in inner.param_groups
    ]
    # The first steps include one-time allocation and warm-up; time the steady state.
    skip = min(5, max(0, len(step_times) - 1))
    return RunResult(
        name=name,
        optim="custom" if optimizer_factory is not None else optim,
        lr=lr,
        seed=config.seed,
        optim_args=optim_args,
        adam_beta2=adam_beta2,
        eval_loss=evals[-1][1],
        state_bytes=state_bytes,
        adamw_state_bytes=adamw_bytes,
        params=sum(p.numel() for p in model.parameters()),
        step_time_s=statistics.median(step_times[skip:]) if step_times else math.nan,
        wall_time_s=wall,
        device=str(device),
        groups=groups,
        train_losses=[e["loss"] for e in history if "loss" in e],
        eval_steps=[s for s, _ in evals],
        eval_losses=[v for _, v in evals],
    )


# ------------------------------------------------------------------------------------------ environment


def cpu_name() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux) with its family and model numbers, which tell apart
    CPUs that virtual machines all call "AMD EPYC" (family 23 is Zen 1/2, 25 Zen 3/4, 26 Zen 5); else what
    :mod:`platform` knows."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:  # the first processor's block is enough
                    break
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
    return fields["model name"]


def run_environment() -> dict[str, str]:
    """Where and with what a run ran: date, machine (architecture, CPU, CPU count), Python, torch and
    transformers versions. The demo's ``results.json`` and the quality benchmark both record it."""
    import transformers

    return dict(
        date=time.strftime("%Y-%m-%d %H:%M"),
        machine=f"{platform.machine()} {cpu_name()}, {os.cpu_count()} CPUs",
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
    )
