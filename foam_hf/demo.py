"""``foam-hf demo``: pre-train a tiny Llama twice, AdamW then FOAM, and compare them.

Both runs use the same initial weights, the same batches and the same schedule (:mod:`foam_hf.pretrain`).
Each optimizer gets its own default learning rate, the best of a sweep in ``benchmarks/bench_quality.py``
on this model (see ``docs/benchmarks-quality.md``); ``--lr`` sets one value for both. Outputs: a Markdown
table on stdout, and ``loss.png``, ``results.json`` and ``results.csv`` in the output folder.
"""

from __future__ import annotations

import csv
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .pretrain import OptimizerSpec, RunResult, TrainConfig, load_corpus, run_isolated

__all__ = ["DEFAULT_LRS", "DemoOptions", "format_table", "run_demo"]

#: Per-optimizer default peak learning rates: each optimizer's best lr in the sweep of
#: ``benchmarks/bench_quality.py`` on the ``tiny`` model (see ``docs/benchmarks-quality.md``).
DEFAULT_LRS: dict[str, float] = {"adamw": 3e-3, "foam": 3e-3}

_CSV_FIELDS = (
    "name",
    "lr",
    "eval_loss",
    "state_bytes",
    "adamw_state_bytes",
    "peak_memory_bytes",
    "peak_memory_rise_bytes",
    "step_time_s",
    "optimizer_step_time_s",
    "wall_time_s",
    "params",
    "device",
    "memory_measure",
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


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def format_table(results: list[RunResult]) -> str:
    """The demo's Markdown table."""
    base = results[0].state_bytes
    lines = [
        "| optimizer | lr | eval loss | state MiB | state vs AdamW | peak memory MiB | rise MiB | ms/step | "
        "optimizer ms/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.lr:g} | {r.eval_loss:.4f} | {_mib(r.state_bytes)} | {r.state_bytes / base:.2f}x | "
            f"{_mib(r.peak_memory_bytes)} | {_mib(r.peak_memory_rise_bytes)} | {1e3 * r.step_time_s:.1f} | "
            f"{1e3 * r.optimizer_step_time_s:.1f} |"
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
    x = torch.arange(len(names)).tolist()
    ax2.bar([i - 0.2 for i in x], [r.state_bytes / 2**20 for r in results], 0.4, label="optimizer state")
    if all(r.peak_memory_rise_bytes is not None for r in results):
        ax2.bar(
            [i + 0.2 for i in x],
            [r.peak_memory_rise_bytes / 2**20 for r in results],
            0.4,
            label="peak memory rise",
        )
    ax2.set_xticks(x, names)
    ax2.set_ylabel("MiB")
    ax2.set_title("memory")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_demo(options: DemoOptions, *, progress: bool = True) -> list[RunResult]:
    """Train AdamW then FOAM under ``options``; print the table; write the PNG, JSON and CSV."""
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus()
    config = TrainConfig(
        model_size=options.model_size,
        steps=options.steps,
        batch_size=options.batch_size,
        seq_len=options.seq_len,
        seed=options.seed,
        eval_every=min(options.eval_every, options.steps),
        eval_batches=options.eval_batches,
        device=options.device,
    )
    device = config.resolved_device()
    specs = [
        OptimizerSpec("AdamW", "adamw", options.lr if options.lr is not None else DEFAULT_LRS["adamw"]),
        OptimizerSpec(
            f"FOAM B={options.block_size}",
            "foam",
            options.lr if options.lr is not None else DEFAULT_LRS["foam"],
            block_size=options.block_size,
        ),
    ]
    print(f"corpus: {corpus.describe()}; model: {options.model_size} Llama; device: {device}; {options.steps} steps")
    t0 = time.perf_counter()
    results = [run_isolated(spec, config, progress=progress) for spec in specs]
    total = time.perf_counter() - t0
    table = format_table(results)
    print(table)
    memory_note = results[0].memory_measure
    print(
        f"\nstate bytes are exact; peak memory: {memory_note}"
        + (", each optimizer in its own process" if device.type == "cpu" else "")
        + f"; total {total:.0f} s"
    )

    meta = dict(
        date=time.strftime("%Y-%m-%d %H:%M"),
        machine=f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=__import__("transformers").__version__,
        device=str(device),
        corpus=dict(source=corpus.source, train_files=corpus.train_files, eval_files=corpus.eval_files),
        options=options.__dict__,
        train_config=config.__dict__,
        memory_measure=memory_note,
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
