"""Training quality: FOAM against AdamW and the memory-efficient peers, each at its own best learning rate.

A tiny Llama (``foam_hf.pretrain.MODEL_SIZES``) is pre-trained from scratch on the Python standard
library's ``.py`` files (byte-level; whole files held out for eval). For every optimizer configuration:
a learning-rate sweep at seed 0, then more seeds at the best lr; the table reports the held-out loss as
mean ± sample standard deviation (and min..max) over the seeds, the optimizer-state bytes and the wall time.
Every run sees the same initial weights and the same batches (same seed).

Run (prints a Markdown table, writes ``quality.png`` and ``quality.json`` to ``--output-dir``)::

    python benchmarks/bench_quality.py --steps 250 --batch-size 8 --lrs 1e-3 3e-3 1e-2 --extend-edges

With ``--extend-edges`` an optimizer whose best lr is at the edge of the grid gets one more lr beyond it,
so no optimizer is judged at a learning rate the sweep did not bracket. Every finished run is cached under
``--output-dir``/runs: rerunning the command trains only what is missing. Runs go to ``--workers`` spawned
processes with one thread each (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from foam_hf.pretrain import OptimizerSpec, RunResult, TrainConfig, train

# ----------------------------------------------------------------------------- third-party peers
# Module-level factories (model, lr) -> optimizer, so that spawned workers can unpickle them. Projection
# and scaling options follow each project's README for small models; ranks are hidden_size // 4.


def _linear_weights(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(weights of nn.Linear layers except the output head, every other parameter)."""
    chosen = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    ids = {id(p) for p in chosen}
    return chosen, [p for p in model.parameters() if id(p) not in ids]


def galore(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    from galore_torch import GaLoreAdamW

    low_rank, rest = _linear_weights(model)
    rank = model.config.hidden_size // 4
    groups = [{"params": rest}, {"params": low_rank, "rank": rank, "update_proj_gap": 50, "scale": 0.25}]
    return GaLoreAdamW([{**g, "proj_type": "std"} if "rank" in g else g for g in groups], lr=lr, weight_decay=0.0)


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
    optimizer = Adam_mini(
        named_parameters=model.named_parameters(),
        lr=lr,
        weight_decay=0.0,
        dim=config.hidden_size,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
    )
    return optimizer


def torchao_adamw8bit(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    from torchao.optim import AdamW8bit

    return AdamW8bit(model.parameters(), lr=lr, weight_decay=0.0)


# (name, kind, options): B in {4, 8, 32}, both second-moment rules, the res_scale=0 ablation, bf16 states,
# and the peers that run on CPU (checked by import below).
CONFIGS: list[tuple[str, str, dict]] = [
    ("AdamW", "adamw", {}),
    ("Adafactor", "adafactor", {}),
    ("FOAM B=4", "foam", {"block_size": 4}),
    ("FOAM B=8", "foam", {"block_size": 8}),
    ("FOAM B=32", "foam", {"block_size": 32}),
    ("FOAM B=4 sq_mean", "foam", {"block_size": 4, "second_moment": "sq_mean"}),
    ("FOAM B=4 res_scale=0", "foam", {"block_size": 4, "res_scale": 0.0}),
    ("FOAM B=4 bf16 states", "foam", {"block_size": 4, "state_dtype": "bfloat16"}),
    ("FOAM B=32 bf16 states", "foam", {"block_size": 32, "state_dtype": "bfloat16"}),
    ("GaLore r=h/4", "custom", {"factory": galore}),
    ("APOLLO r=h/4", "custom", {"factory": apollo}),
    ("Adam-mini", "custom", {"factory": adam_mini}),
    ("torchao AdamW8bit", "custom", {"factory": torchao_adamw8bit}),
]
_PEER_MODULES = {"GaLore r=h/4": "galore_torch", "APOLLO r=h/4": "apollo_torch", "Adam-mini": "adam_mini"}
_PEER_MODULES["torchao AdamW8bit"] = "torchao.optim"


def available_configs() -> tuple[list[tuple[str, str, dict]], list[str]]:
    """The configurations whose optimizer imports here, and a line for each one left out."""
    import importlib

    kept, left_out = [], []
    for name, kind, opts in CONFIGS:
        module = _PEER_MODULES.get(name)
        if module is not None:
            try:
                importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - any import failure means "does not run here"
                left_out.append(f"{name}: not importable ({type(exc).__name__}: {exc})")
                continue
        kept.append((name, kind, opts))
    return kept, left_out


class RunCache:
    """Finished runs as JSON files (``runs/<name>_lr<lr>_seed<seed>.json``), keyed also by the budget: a
    rerun of the same command only trains what is missing (and an interrupted one loses nothing)."""

    def __init__(self, folder: Path, config: TrainConfig) -> None:
        self.folder = folder
        self.budget = {k: v for k, v in config.__dict__.items() if k != "seed"}
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


def _run(spec: OptimizerSpec, config: TrainConfig) -> RunResult:
    result = train(spec, config)
    result.train_losses = result.train_losses[::10]  # keep the JSON small
    return result


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", default="tiny")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--seeds", type=int, default=3, help="seeds at the best lr (the sweep's seed 0 included)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="subset of configuration names")
    parser.add_argument("--output-dir", default="bench-quality")
    parser.add_argument(
        "--extend-edges",
        action="store_true",
        help="when an optimizer's best lr is the smallest or largest of the grid, also run one lr beyond it",
    )
    args = parser.parse_args(argv)

    runnable, left_out = available_configs()
    configs = [c for c in runnable if not args.only or c[0] in args.only]
    for line in left_out:
        print(f"left out: {line}", file=sys.stderr)
    base = TrainConfig(
        model_size=args.model_size,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        eval_every=max(1, args.steps // 5),
        eval_batches=16,
        device="cpu",
        threads=1,
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cache = RunCache(out / "runs", base)
    specs = {name: (kind, opts) for name, kind, opts in configs}
    grids = {name: sorted(args.lrs) for name in specs}
    ctx = __import__("multiprocessing").get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:

        def run_all(keys: list[tuple[str, float, int]]) -> dict[tuple[str, float, int], RunResult]:
            jobs = {}
            for name, lr, seed in keys:
                if cache.get(name, lr, seed) is None:
                    kind, opts = specs[name]
                    spec = OptimizerSpec(name, kind, lr, **opts)
                    jobs[(name, lr, seed)] = pool.submit(_run, spec, replace(base, seed=seed))
            for (name, lr, seed), job in jobs.items():
                cache.put(name, lr, seed, job.result())
            return {key: cache.get(*key) for key in keys}

        # The sweep at seed 0; a best lr on the edge of the grid gets one more point beyond it (x or / sqrt 10).
        sweep = run_all([(name, lr, 0) for name in specs for lr in grids[name]])
        if args.extend_edges:
            for name, grid in grids.items():
                best = min(grid, key=lambda lr, n=name: sweep[(n, lr, 0)].eval_loss)
                if best == grid[0]:
                    grid.insert(0, float(f"{best / 10**0.5:.0e}"))
                elif best == grid[-1]:
                    grid.append(float(f"{best * 10**0.5:.0e}"))
            sweep = run_all([(name, lr, 0) for name in specs for lr in grids[name]])
        sweep = {(name, lr): r for (name, lr, _), r in sweep.items()}
        for (name, lr), r in sweep.items():
            print(f"sweep {name:>22} lr={lr:g}: eval {r.eval_loss:.4f}", file=sys.stderr, flush=True)
        best_lr = {name: min(grids[name], key=lambda lr, n=name: sweep[(n, lr)].eval_loss) for name in specs}
        seeds = run_all([(name, best_lr[name], seed) for name in specs for seed in range(1, args.seeds)])
        seeds = {(name, seed): r for (name, _, seed), r in seeds.items()}
    total = time.perf_counter() - t0

    rows = []
    for name, _, _ in configs:
        runs = [sweep[(name, best_lr[name])]] + [seeds[(name, s)] for s in range(1, args.seeds)]
        losses = [r.eval_loss for r in runs]
        rows.append(
            dict(
                name=name,
                best_lr=best_lr[name],
                sweep={f"{lr:g}": sweep[(name, lr)].eval_loss for lr in grids[name]},
                mean=statistics.mean(losses),
                std=statistics.stdev(losses) if len(losses) > 1 else 0.0,
                min=min(losses),
                max=max(losses),
                seeds=len(losses),
                state_bytes=runs[0].state_bytes,
                adamw_state_bytes=runs[0].adamw_state_bytes,
                wall_s=statistics.mean(r.wall_time_s for r in runs),
                opt_step_ms=1e3 * statistics.mean(r.optimizer_step_time_s for r in runs),
            )
        )
    adamw = next((r for r in rows if r["name"] == "AdamW"), None)

    all_lrs = sorted({lr for grid in grids.values() for lr in grid})
    lr_cols = " | ".join(f"lr {lr:g}" for lr in all_lrs)
    print(
        f"\n| optimizer | {lr_cols} | best lr | eval loss @ best (mean ± std, n) | min..max | "
        "state bytes | vs AdamW | wall s/run | opt step ms |"
    )
    print("|---|" + "---|" * len(all_lrs) + "---|---|---|---|---|---|---|")
    for r in rows:
        sweep_cells = " | ".join(f"{r['sweep'][f'{lr:g}']:.4f}" if f"{lr:g}" in r["sweep"] else "-" for lr in all_lrs)
        ratio = f"{r['state_bytes'] / adamw['state_bytes']:.2f}x" if adamw else "-"
        print(
            f"| {r['name']} | {sweep_cells} | {r['best_lr']:g} | {r['mean']:.4f} ± {r['std']:.4f} (n={r['seeds']}) | "
            f"{r['min']:.4f}..{r['max']:.4f} | {r['state_bytes']:,} | {ratio} | {r['wall_s']:.1f} | "
            f"{r['opt_step_ms']:.1f} |"
        )
    meta = dict(
        date=time.strftime("%Y-%m-%d"),
        machine=f"{platform.machine()} {platform.processor() or ''}, {__import__('os').cpu_count()} CPUs".strip(),
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=__import__("transformers").__version__,
        git_sha=_git_sha(),
        command="python benchmarks/bench_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        config=base.__dict__,
        lrs={name: grid for name, grid in grids.items()},
        total_wall_s=total,
    )
    print(
        f"\n{meta['date']}, {meta['machine']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"git {meta['git_sha']}, total {total / 60:.1f} min"
    )
    (out / "quality.json").write_text(
        json.dumps(dict(meta=meta, rows=rows, runs=[r.to_dict() for r in [*sweep.values(), *seeds.values()]]), indent=1)
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        ax1.plot([float(lr) for lr in r["sweep"]], list(r["sweep"].values()), marker="o", label=r["name"])
    ax1.set_xscale("log")
    ax1.set_xlabel("peak learning rate")
    ax1.set_ylabel("held-out loss (seed 0)")
    ax1.set_title(f"lr sweep, {args.model_size} Llama, {args.steps} steps")
    ax1.legend(fontsize=7)
    names = [r["name"] for r in rows]
    ax2.barh(names, [r["mean"] for r in rows], xerr=[r["std"] for r in rows], color="tab:blue")
    lo = min(r["min"] for r in rows)
    ax2.set_xlim(lo - 0.05, max(r["max"] for r in rows) + 0.02)
    ax2.set_xlabel(f"held-out loss at best lr (mean ± std, {args.seeds} seeds)")
    for i, r in enumerate(rows):
        ax2.text(lo - 0.045, i, f"{r['state_bytes'] / 2**20:.2f} MiB", va="center", fontsize=7, color="white")
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=90)
    print(f"wrote {out / 'quality.png'} and {out / 'quality.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
