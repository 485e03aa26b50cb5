"""``foam-hf demo``: pre-train a tiny Llama twice through ``transformers.Trainer``, AdamW then FOAM, and compare.

Both runs are ordinary Trainer runs (:mod:`foam_hf.tools.demo_training`): AdamW is ``optim="adamw_torch_fused"``
(``"adamw_torch"`` where torch has no fused AdamW for the device) and FOAM is ``optim="foam"`` with
``optim_args="block_size=B"``, so FOAM's param groups are exactly those ``optim="foam"`` builds in any
user's Trainer (:mod:`foam_hf.param_groups`). Same initial weights, batches and schedule for both. Each
optimizer gets its own default learning rate (:data:`DEFAULT_LRS`); ``--lr`` sets one value for both.
Outputs: a Markdown table on stdout, and ``loss.png``, ``results.json`` and ``results.csv`` in the output
folder.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import FoamConfig
from .demo_training import RunConfig, RunResult, adamw_optim_name, load_corpus, run_environment, train

__all__ = ["DEFAULT_LRS", "DemoOptions", "format_table", "run_demo", "training_path"]

#: Per-optimizer default peak learning rates: each optimizer's best of 3e-4, 1e-3, 3e-3 and 1e-2 in ``foam-hf demo
#: --lr ...`` at the demo's own settings (docs/benchmarks.md, "The main job"), as in the sweeps of
#: ``benchmarks/bench_quality.py`` (AdamW 1e-3, FOAM 3e-3). Until 2026-12-07 AdamW ran at 3e-3, a worse lr for it.
DEFAULT_LRS: dict[str, float] = {"adamw": 1e-3, "foam": 3e-3}

_CSV_FIELDS = (
    "name",
    "optim",
    "optim_args",
    "lr",
    "eval_loss",
    "state_bytes",
    "adamw_state_bytes",
    "step_time_s",
    "wall_time_s",
    "params",
    "device",
)


@dataclass(frozen=True)
class DemoOptions:
    """Options of ``foam-hf demo`` (each is a command-line flag of the same name)."""

    steps: int = 300
    block_size: int = 4
    model_size: str = "tiny"
    output_dir: str = "foam-demo"
    lr: float | None = None
    seed: int = 0
    device: str = "auto"
    batch_size: int = 16
    seq_len: int = 128
    eval_every: int = 50
    eval_batches: int = 8

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> DemoOptions:
        """The options parsed by ``foam-hf demo``: each field the namespace holds, the default for the others."""
        given = vars(args)
        return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})

    def run_config(self) -> RunConfig:
        """The budget and data of each of the demo's runs (the fields both classes have, taken from here)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig) if hasattr(self, f.name)}
        return RunConfig(**{**shared, "eval_every": min(self.eval_every, self.steps)})


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def training_path(results: list[RunResult]) -> str:
    """One sentence saying how each run was built (printed by the demo and stored in results.json)."""
    parts = [
        f"{r.name}: optim={r.optim!r}" + (f", optim_args={r.optim_args!r}" if r.optim_args else "") for r in results
    ]
    return (
        "every run is a transformers.Trainer run; "
        + "; ".join(parts)
        + " (FOAM's param groups are those optim='foam' builds: foam_hf.param_groups)"
    )


def format_table(results: list[RunResult]) -> str:
    """The demo's Markdown table."""
    base = results[0].state_bytes
    lines = [
        "| optimizer | TrainingArguments | lr | held-out loss | state MiB | state vs AdamW | ms/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        built = f"optim={r.optim}" + (f", optim_args={r.optim_args}" if r.optim_args else "")
        lines.append(
            f"| {r.name} | {built} | {r.lr:g} | {r.eval_loss:.4f} | {_mib(r.state_bytes)} | "
            f"{r.state_bytes / base:.2f}x | {1e3 * r.step_time_s:.1f} |"
        )
    return "\n".join(lines)


def _plot(results: list[RunResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for r in results:
        losses = torch.tensor(r.train_losses)
        window = max(1, len(losses) // 30)
        smooth = losses.unfold(0, window, 1).mean(-1) if len(losses) >= window else losses
        (line,) = ax1.plot(range(window, window + len(smooth)), smooth.tolist(), label=f"{r.name} train", alpha=0.7)
        ax1.plot(r.eval_steps, r.eval_losses, "o--", color=line.get_color(), label=f"{r.name} held-out")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/byte)")
    ax1.set_title(title)
    ax1.legend(fontsize=8)
    names = [r.name for r in results]
    ax2.bar(names, [r.state_bytes / 2**20 for r in results], 0.5)
    ax2.set_ylabel("MiB")
    ax2.set_title("optimizer state")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _progress_bar(name: str, steps: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=name, unit="step", leave=True)

    def update(step: int, logs: dict) -> None:
        if "loss" in logs:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{logs['loss']:.3f}")
        if "eval_loss" in logs:
            bar.set_postfix(eval=f"{logs['eval_loss']:.3f}")

    return bar, update


#: What the demo needs beyond foam-hf's own requirements (its ``demo`` extra): the Trainer's accelerate, and
#: matplotlib for the plot, which is drawn only after both training runs.
DEMO_PACKAGES: tuple[str, ...] = ("accelerate", "matplotlib")


class MissingDemoPackages(ImportError):
    """What of :data:`DEMO_PACKAGES` is not installed, found before any training (``foam-hf demo`` prints it and
    exits with code 2)."""


def check_demo_packages() -> None:
    """Raise :class:`MissingDemoPackages` naming what of :data:`DEMO_PACKAGES` is not installed."""
    missing = [name for name in DEMO_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDemoPackages(
            f"foam-hf demo needs {' and '.join(missing)} (its 'demo' extra), not installed in this environment; "
            'without it the demo would fail after both training runs. Fix: pip install "foam-hf[demo]" (in a '
            'checkout: pip install -e ".[demo]").'
        )


def run_demo(options: DemoOptions, *, progress: bool = True) -> list[RunResult]:
    """Train AdamW then FOAM under ``options``; print the table; write the PNG, JSON and CSV."""
    check_demo_packages()
    foam_args = f"block_size={options.block_size}"
    FoamConfig.from_optim_args(foam_args)  # a bad block size is refused here, not after the AdamW run
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus()
    config = options.run_config()
    device = config.resolved_device()
    runs = [
        ("AdamW", adamw_optim_name(device), None, options.lr or DEFAULT_LRS["adamw"]),
        (f"FOAM B={options.block_size}", "foam", foam_args, options.lr or DEFAULT_LRS["foam"]),
    ]
    print(
        f"corpus: {corpus.describe()}; model: {options.model_size} Llama; device: {device}; {options.steps} steps; "
        "each run is a transformers.Trainer run (AdamW: optim='" + runs[0][1] + "', FOAM: optim='foam')"
    )
    t0 = time.perf_counter()
    results = []
    for name, optim, optim_args, lr in runs:
        bar, update = _progress_bar(name, options.steps) if progress else (None, None)
        results.append(train(name, optim, lr, config, corpus, optim_args=optim_args, progress=update))
        if bar is not None:
            bar.close()
    total = time.perf_counter() - t0
    path = training_path(results)
    print(format_table(results))
    print(f"\n{path}.\nstate bytes are exact (the optimizer's state tensors); total {total:.0f} s")

    meta = dict(
        **run_environment(),
        device=str(device),
        training_path=path,
        corpus=dict(source=corpus.source, train_files=corpus.train_files, eval_files=corpus.eval_files),
        options=options.__dict__,
        run_config=config.__dict__,
        total_wall_s=total,
    )
    (out / "results.json").write_text(json.dumps(dict(meta=meta, runs=[r.to_dict() for r in results]), indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for r in results:
            d = r.to_dict()
            writer.writerow({k: d[k] for k in _CSV_FIELDS})
    _plot(results, out / "loss.png", f"{options.model_size} Llama on stdlib sources, {options.steps} steps")
    print(f"wrote {out / 'loss.png'}, {out / 'results.json'}, {out / 'results.csv'}")
    return results
