"""What the quality benchmarks share: the optimizer configurations, third-party peers, and a cache of runs.

Training itself is :func:`foam_hf.tools.demo_training.train`, the engine of ``foam-hf demo``: a
``transformers.Trainer`` run with ``TrainingArguments.optim`` set to ``"foam"`` (FOAM, grouped exactly as
``optim="foam"`` groups any model: :mod:`foam_hf.param_groups`), ``"adamw_torch_fused"`` or ``"adafactor"``.
Third-party peers (GaLore, APOLLO, Adam-mini, torchao's 8-bit AdamW) are built here by their own
constructors and handed to the same Trainer ready-made (``optimizers=(optimizer, None)``), so they share the
data, schedule, clipping and evaluation; their rows are labelled "(own grouping)" in the tables.

Also here, for ``bench_lora.py``: a plain PyTorch loop (:func:`training_batches`, :func:`lr_factor`,
:func:`evaluate`) over the same corpus, for runs that build their own model (a PEFT model over a base).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from foam_hf.tools.demo_training import (
    MODEL_SIZES,
    Corpus,
    RunConfig,
    RunResult,
    adamw_optim_name,
    build_model,
    eval_starts,
    load_corpus,
    optimizer_state_bytes,
    train,
    train_starts,
)

__all__ = [
    "CONFIGS",
    "MODEL_SIZES",
    "Corpus",
    "OptimizerSpec",
    "RunCache",
    "RunConfig",
    "RunResult",
    "available_configs",
    "build_model",
    "evaluate",
    "load_corpus",
    "lr_factor",
    "optimizer_state_bytes",
    "run_spec",
    "training_batches",
]


# ----------------------------------------------------------------------------- third-party peers
# Module-level factories (model, lr) -> optimizer, so that spawned workers can unpickle them. Projection
# and scaling options follow each project's README for small models; ranks are hidden_size // 4.


def _linear_weights(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(weights of nn.Linear layers except the output head, every other parameter): the peers' own choice."""
    chosen = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    ids = {id(p) for p in chosen}
    return chosen, [p for p in model.parameters() if id(p) not in ids]


def galore(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    from galore_torch import GaLoreAdamW

    low_rank, rest = _linear_weights(model)
    rank = model.config.hidden_size // 4
    group = {"params": low_rank, "rank": rank, "update_proj_gap": 50, "scale": 0.25, "proj_type": "std"}
    return GaLoreAdamW([{"params": rest}, group], lr=lr, weight_decay=0.0)


def apollo(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    from apollo_torch import APOLLOAdamW

    low_rank, rest = _linear_weights(model)
    group = dict(
        params=low_rank,
        rank=model.config.hidden_size // 4,
        proj="random",
        scale_type="channel",
        scale=1,
        update_proj_gap=50,
        proj_type="std",
    )
    return APOLLOAdamW([{"params": rest}, group], lr=lr, weight_decay=0.0)


def adam_mini(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    from adam_mini import Adam_mini

    config = model.config
    return Adam_mini(
        named_parameters=model.named_parameters(),
        lr=lr,
        weight_decay=0.0,
        dim=config.hidden_size,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
    )


def torchao_adamw8bit(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    from torchao.optim import AdamW8bit

    return AdamW8bit(model.parameters(), lr=lr, weight_decay=0.0)


# --------------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer configuration of the quality benchmark.

    Attributes:
        name: label in tables and plots.
        optim: ``TrainingArguments.optim`` (``"adamw"`` stands for ``adamw_torch_fused`` where this torch has
            it for the device, else ``adamw_torch``); ``"custom"`` for a third-party ``factory``.
        optim_args: ``TrainingArguments.optim_args`` (FOAM's options, e.g. ``"block_size=4"``).
        adam_beta2: ``TrainingArguments.adam_beta2``.
        factory: for ``optim="custom"``, a picklable ``(model, lr) -> optimizer`` (a module-level function).
        module: the module a ``factory`` needs (the configuration is left out where it does not import).
    """

    name: str
    optim: str
    optim_args: str | None = None
    adam_beta2: float = 0.999
    factory: Callable[[torch.nn.Module, float], torch.optim.Optimizer] | None = None
    module: str | None = None

    def path(self, optim: str) -> str:
        """How this configuration was built, in words (for tables and JSON), given the run's resolved ``optim``."""
        if self.factory is not None:
            return "own grouping"
        return f'optim="{optim}"'


# B in {4, 8, 32}, both second-moment rules, the res_scale=0 ablation, bf16 states, stochastically rounded bf16
# weights, AdamW with beta2 0.999 and 0.95, and the peers (each left out where it does not import).
CONFIGS: list[OptimizerSpec] = [
    OptimizerSpec("AdamW", "adamw"),
    OptimizerSpec("AdamW b2=0.95", "adamw", adam_beta2=0.95),
    OptimizerSpec("Adafactor", "adafactor"),
    OptimizerSpec("FOAM B=4", "foam", "block_size=4"),
    OptimizerSpec("FOAM B=8", "foam", "block_size=8"),
    OptimizerSpec("FOAM B=32", "foam", "block_size=32"),
    OptimizerSpec("FOAM B=4 sq_mean", "foam", "block_size=4,second_moment=sq_mean"),
    OptimizerSpec("FOAM B=4 res_scale=0", "foam", "block_size=4,res_scale=0"),
    OptimizerSpec("FOAM B=4 bf16 states", "foam", "block_size=4,state_dtype=bfloat16"),
    OptimizerSpec("FOAM B=32 bf16 states", "foam", "block_size=32,state_dtype=bfloat16"),
    # For bf16 weights (bench_quality.py --weights-dtype bfloat16): their new values stochastically rounded.
    OptimizerSpec("FOAM B=4 stochastic weights", "foam", "block_size=4,weight_rounding=stochastic"),
    OptimizerSpec("FOAM B=32 stochastic weights", "foam", "block_size=32,weight_rounding=stochastic"),
    OptimizerSpec("GaLore r=h/4", "custom", factory=galore, module="galore_torch"),
    OptimizerSpec("APOLLO r=h/4", "custom", factory=apollo, module="apollo_torch"),
    OptimizerSpec("Adam-mini", "custom", factory=adam_mini, module="adam_mini"),
    OptimizerSpec("torchao AdamW8bit", "custom", factory=torchao_adamw8bit, module="torchao.optim"),
]


def available_configs() -> tuple[list[OptimizerSpec], list[str]]:
    """The configurations whose optimizer imports here, and a line for each one left out."""
    kept, left_out = [], []
    for spec in CONFIGS:
        if spec.module is not None:
            try:
                importlib.import_module(spec.module)
            except Exception as exc:  # noqa: BLE001 - any import failure means "does not run here"
                left_out.append(f"{spec.name}: not importable ({type(exc).__name__}: {exc})")
                continue
        kept.append(spec)
    return kept, left_out


def run_spec(spec: OptimizerSpec, lr: float, config: RunConfig, corpus: Corpus | None = None) -> RunResult:
    """One Trainer run of ``spec`` at peak lr ``lr`` under ``config`` (one thread: the caller sets it)."""
    optim = adamw_optim_name(config.resolved_device()) if spec.optim == "adamw" else spec.optim
    return train(
        spec.name,
        optim,
        lr,
        config,
        corpus,
        optim_args=spec.optim_args,
        adam_beta2=spec.adam_beta2,
        optimizer_factory=spec.factory,
    )


class RunCache:
    """Finished runs as JSON files (``runs/<name>_lr<lr>_seed<seed>.json``), keyed also by the budget and the
    training path: a rerun of the same command only trains what is missing (an interrupted one loses nothing)."""

    #: Bumped when the way a run trains changes, so that older cached runs are not mixed in.
    PATH = "transformers.Trainer v1"

    def __init__(self, folder: Path, config: RunConfig) -> None:
        self.folder = folder
        self.budget = {k: v for k, v in config.__dict__.items() if k != "seed"} | {"path": self.PATH}
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str, lr: float, seed: int) -> Path:
        safe = "".join(ch if ch.isalnum() else "_" for ch in name)
        return self.folder / f"{safe}_lr{lr:g}_seed{seed}.json"

    def get(self, name: str, lr: float, seed: int) -> RunResult | None:
        path = self._path(name, lr, seed)
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        if data.get("budget") != self.budget:
            return None
        return RunResult(**data["result"])

    def put(self, name: str, lr: float, seed: int, result: RunResult) -> None:
        data = dict(budget=self.budget, result=result.to_dict())
        self._path(name, lr, seed).write_text(json.dumps(data))


# ----------------------------------------------------------------------- plain loop (bench_lora.py)


def lr_factor(step: int, steps: int, warmup_fraction: float) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warm-up, then cosine down to 0.1. Close to the
    Trainer runs' ``cosine_with_min_lr`` (``min_lr_rate=0.1``) but not equal: transformers' warm-up starts at 0
    (0, 1/w, ...), this one at 1/w (1/w, 2/w, ...), at most 1/w apart. Every variant of a benchmark that uses it
    shares it, so their comparisons hold; its figures are not those of a Trainer run."""
    warmup = max(1, round(warmup_fraction * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def training_batches(data: torch.Tensor, config: RunConfig) -> Iterator[torch.Tensor]:
    """``config.steps`` token batches of shape ``(batch_size, seq_len)`` (``int64``): the windows a Trainer run
    of the same ``config`` feeds, in the same order."""
    starts = train_starts(data, config.steps, config.batch_size, config.seq_len, config.seed)
    idx = torch.arange(config.seq_len)
    for step in range(config.steps):
        chunk = starts[step * config.batch_size : (step + 1) * config.batch_size]
        yield data[chunk[:, None] + idx[None, :]].long()


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: torch.Tensor, config: RunConfig) -> float:
    """Mean next-byte loss of ``model`` on the held-out windows a Trainer run evaluates on (``eval_batches``
    batches of evenly spaced windows of ``data``). The model is left in train mode."""
    device = config.resolved_device()
    starts = eval_starts(data, config.eval_batches * config.batch_size, config.seq_len)
    windows = torch.stack([data[s : s + config.seq_len] for s in starts.tolist()]).long()
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], config.batch_size):
        x = windows[i : i + config.batch_size].to(device)
        total += model(input_ids=x, labels=x).loss.item() * x.shape[0]
        count += x.shape[0]
    model.train()
    return total / count
