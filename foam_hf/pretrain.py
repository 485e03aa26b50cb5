"""Tiny-Llama pre-training on local text: the engine of ``foam-hf demo`` and ``benchmarks/bench_quality.py``.

Everything here runs offline. The corpus is the Python standard library's own ``.py`` sources (present on
every CPython install), tokenised byte by byte (vocabulary 256, nothing to train or download); whole files
are held out for evaluation. The model is a ``LlamaForCausalLM`` built from a ``LlamaConfig`` with random
initial weights. The loop is plain PyTorch: every optimizer sees the same initial weights and the same
batches in the same order (both drawn from ``seed``), under the same linear-warmup + cosine schedule.

Memory is reported honestly for the device at hand: on CUDA, ``torch.cuda.max_memory_allocated`` over the
run; on CPU, each run goes to its own spawned process (:func:`run_isolated`) and reports that process's
peak resident set size (``getrusage``), plus the rise of that peak above the RSS measured just before the
model was built. The RSS figures include the Python/torch runtime (hundreds of MB), so on a ~1M-parameter
model the optimizer-state difference (a few MB) is small against them; the exact state bytes are reported
separately.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import sys
import sysconfig
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import FoamConfigError
from .memory import state_memory
from .optim import FOAM

__all__ = [
    "MODEL_SIZES",
    "Corpus",
    "OptimizerSpec",
    "RunResult",
    "TrainConfig",
    "build_model",
    "build_optimizer",
    "evaluate",
    "foam_param_groups",
    "load_corpus",
    "optimizer_state_bytes",
    "run_isolated",
    "train",
    "training_batches",
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
            f"foam_hf.pretrain: no usable standard-library .py sources under {str(root)!r} (found {len(files)} "
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


# -------------------------------------------------------------------------------------------- optimizer


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer configuration of a run.

    Attributes:
        name: label in tables and plots.
        kind: ``"adamw"`` (``torch.optim.AdamW``), ``"foam"`` (:class:`foam_hf.FOAM`), ``"adafactor"``
            (``transformers.optimization.Adafactor`` with a fixed lr, as a factored-state peer) or
            ``"custom"`` (``factory(model, lr)`` builds it: how benchmarks add third-party peers).
        lr: peak learning rate.
        block_size: FOAM's ``B`` for the folded linear layers.
        second_moment: FOAM's second-moment rule.
        res_scale: FOAM's residual weight ``rho``.
        state_dtype: FOAM's moment storage dtype (``None`` or ``"bfloat16"``).
        factory: for ``kind="custom"``, a picklable ``(model, lr) -> optimizer`` (a module-level function).
    """

    name: str
    kind: str
    lr: float
    block_size: int = 4
    second_moment: str = "mean_sq"
    res_scale: float = 1.0
    state_dtype: str | None = None
    factory: Callable[[torch.nn.Module, float], torch.optim.Optimizer] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("adamw", "foam", "adafactor", "custom"):
            raise FoamConfigError(
                f"optimizer kind {self.kind!r} is unknown: it must be 'adamw', 'foam', 'adafactor' or 'custom'. "
                "Fix: pass one of those."
            )
        if (self.kind == "custom") != (self.factory is not None):
            raise FoamConfigError(
                f"optimizer {self.name!r}: kind='custom' needs factory=(model, lr) -> optimizer, and only it "
                f"takes one (got kind={self.kind!r}, factory={self.factory!r})."
            )


def foam_param_groups(model: torch.nn.Module, block_size: int) -> list[dict[str, Any]]:
    """FOAM's default grouping: weights of ``nn.Linear`` layers fold with ``block_size``, except the output
    head (``lm_head``); embeddings, norms and everything else keep AdamW states (``block_size=1``)."""
    folded, rest = [], []
    folded_ids = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            folded.append(module.weight)
            folded_ids.add(id(module.weight))
    rest = [p for p in model.parameters() if id(p) not in folded_ids]
    return [{"params": folded, "block_size": block_size}, {"params": rest, "block_size": 1}]


def build_optimizer(spec: OptimizerSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``spec`` describes, over ``model``'s parameters, with weight decay 0."""
    if spec.kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    if spec.kind == "foam":
        return FOAM(
            foam_param_groups(model, spec.block_size),
            lr=spec.lr,
            weight_decay=0.0,
            second_moment=spec.second_moment,
            res_scale=spec.res_scale,
            state_dtype=spec.state_dtype,
        )
    if spec.kind == "custom":
        return spec.factory(model, spec.lr)
    from transformers.optimization import Adafactor

    return Adafactor(model.parameters(), lr=spec.lr, scale_parameter=False, relative_step=False, warmup_init=False)


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


# ------------------------------------------------------------------------------------------------ train


@dataclass(frozen=True)
class TrainConfig:
    """Budget and data of one run; identical for every optimizer being compared.

    Attributes:
        model_size: key of :data:`MODEL_SIZES`.
        steps: optimizer steps.
        batch_size: sequences per step.
        seq_len: bytes per sequence.
        warmup_fraction: share of ``steps`` with linear warm-up; then cosine decay to 10% of the peak lr.
        seed: seeds the initial weights and the batch order.
        eval_every: steps between evaluations on the held-out files (the last step is always evaluated).
        eval_batches: batches of held-out text per evaluation (fixed windows, the same every time).
        device: ``"cpu"``, ``"cuda"``, ... or ``"auto"`` (CUDA when available).
        threads: ``torch.set_num_threads`` for the run on CPU (``None`` leaves torch's default).
        max_files: passed to :func:`load_corpus`.
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
    threads: int | None = None
    max_files: int | None = None

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class RunResult:
    """What one run measured. Byte counts are exact; times are wall-clock on the machine that ran it."""

    name: str
    kind: str
    lr: float
    seed: int
    block_size: int | None
    second_moment: str | None
    res_scale: float | None
    eval_loss: float
    state_bytes: int
    adamw_state_bytes: int
    params: int
    step_time_s: float
    optimizer_step_time_s: float
    wall_time_s: float
    peak_memory_bytes: int | None
    peak_memory_rise_bytes: int | None
    memory_measure: str
    device: str
    train_losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_factor(step: int, steps: int, warmup_fraction: float) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warm-up, then cosine down to 0.1."""
    warmup = max(1, round(warmup_fraction * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _batches(data: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Start offsets of every training window, drawn once from ``seed``: shape ``(steps, batch_size)``."""
    gen = torch.Generator().manual_seed(config.seed)
    high = data.numel() - config.seq_len
    return torch.randint(0, high, (config.steps, config.batch_size), generator=gen)


def _eval_windows(data: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Evenly spaced, non-overlapping held-out windows: shape ``(eval_batches * batch_size, seq_len)``."""
    n = config.eval_batches * config.batch_size
    n = min(n, data.numel() // config.seq_len)
    starts = torch.linspace(0, data.numel() - config.seq_len, n).long()
    return torch.stack([data[s : s + config.seq_len] for s in starts.tolist()]).long()


def _window(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    idx = starts[:, None] + torch.arange(seq_len)[None, :]
    return data[idx].long()


@torch.no_grad()
def _evaluate(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i : i + batch_size].to(device)
        loss = model(input_ids=x, labels=x).loss
        total += loss.item() * x.shape[0]
        count += x.shape[0]
    model.train()
    return total / count


def training_batches(data: torch.Tensor, config: TrainConfig) -> Iterator[torch.Tensor]:
    """The token batches :func:`train` feeds, in order: ``config.steps`` tensors of shape
    ``(batch_size, seq_len)`` (``int64``), windows of ``data`` at offsets drawn once from ``config.seed``.

    For loops that build their own model and optimizer (LoRA fine-tuning in ``benchmarks/bench_lora.py``)
    and must see exactly the batches :func:`train` would.
    """
    starts = _batches(data, config)
    for step in range(config.steps):
        yield _window(data, starts[step], config.seq_len)


def evaluate(model: torch.nn.Module, data: torch.Tensor, config: TrainConfig) -> float:
    """Mean next-byte loss of ``model`` on the held-out windows :func:`train` evaluates on: ``config.eval_batches``
    batches of evenly spaced windows of ``data``, on ``config.resolved_device()``. The model is left in train mode.
    """
    return _evaluate(model, _eval_windows(data, config), config.batch_size, config.resolved_device())


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def train(
    spec: OptimizerSpec,
    config: TrainConfig,
    corpus: Corpus | None = None,
    *,
    progress: bool | Callable[[int], None] = False,
) -> RunResult:
    """Pre-train a fresh model of ``config.model_size`` with the optimizer of ``spec``; return measurements.

    ``progress=True`` shows a tqdm bar (on stderr); a callable is called with the step number instead.
    Peak memory here is CUDA's ``max_memory_allocated`` on CUDA and this process's peak RSS on CPU (which
    includes whatever the process did before; use :func:`run_isolated` for a clean figure).
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = config.resolved_device()
    corpus = corpus if corpus is not None else load_corpus(config.max_files)
    rss_before = _peak_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)

    model = build_model(config.model_size, config.seed, seq_len=config.seq_len).to(device)
    optimizer = build_optimizer(spec, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.steps, config.warmup_fraction)
    )
    starts = _batches(corpus.train, config)
    windows = _eval_windows(corpus.eval, config)

    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc=f"{spec.name} lr={spec.lr:g}", unit="step", leave=True)
    train_losses: list[float] = []
    eval_steps: list[int] = []
    eval_losses: list[float] = []
    step_times: list[float] = []
    opt_times: list[float] = []
    t_start = time.perf_counter()
    for step in range(config.steps):
        t0 = time.perf_counter()
        x = _window(corpus.train, starts[step], config.seq_len).to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step_times.append(t2 - t0)
        opt_times.append(t2 - t1)
        train_losses.append(loss.item())
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            eval_steps.append(step + 1)
            eval_losses.append(_evaluate(model, windows, config.batch_size, device))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{train_losses[-1]:.3f}", eval=f"{eval_losses[-1]:.3f}" if eval_losses else "-")
        elif callable(progress):
            progress(step + 1)
    wall = time.perf_counter() - t_start
    if bar is not None:
        bar.close()

    adamw_bytes = sum(2 * p.numel() * p.element_size() + 4 for p in model.parameters() if p.requires_grad)
    if spec.kind == "foam":
        mem = state_memory(optimizer)
        state_bytes, adamw_bytes = mem.foam_bytes, mem.adamw_bytes
    else:
        state_bytes = optimizer_state_bytes(optimizer)

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        rise = peak - cuda_before
        measure = "CUDA max_memory_allocated"
    else:
        peak = _peak_rss_bytes()
        rise = None if peak is None or rss_before is None else peak - rss_before
        measure = "peak RSS of the process (getrusage)" if peak is not None else "unavailable on this OS"

    # The first steps include one-time allocation and warm-up; time the steady state.
    skip = min(5, max(0, config.steps - 1))
    return RunResult(
        name=spec.name,
        kind=spec.kind,
        lr=spec.lr,
        seed=config.seed,
        block_size=spec.block_size if spec.kind == "foam" else None,
        second_moment=spec.second_moment if spec.kind == "foam" else None,
        res_scale=spec.res_scale if spec.kind == "foam" else None,
        eval_loss=eval_losses[-1],
        state_bytes=state_bytes,
        adamw_state_bytes=adamw_bytes,
        params=sum(p.numel() for p in model.parameters()),
        step_time_s=statistics.median(step_times[skip:]),
        optimizer_step_time_s=statistics.median(opt_times[skip:]),
        wall_time_s=wall,
        peak_memory_bytes=peak,
        peak_memory_rise_bytes=rise,
        memory_measure=measure,
        device=str(device),
        train_losses=train_losses,
        eval_steps=eval_steps,
        eval_losses=eval_losses,
    )


def _isolated_worker(spec: OptimizerSpec, config: TrainConfig, progress: bool) -> RunResult:
    return train(spec, config, progress=progress)


def run_isolated(spec: OptimizerSpec, config: TrainConfig, *, progress: bool = False) -> RunResult:
    """:func:`train` in a freshly spawned process, so that its peak RSS belongs to this run alone.

    On CUDA the run stays in this process (``max_memory_allocated`` is already per run).
    """
    if config.resolved_device().type == "cuda":
        return train(spec, config, progress=progress)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_isolated_worker, (spec, config, progress))
