"""Training quality: FOAM against AdamW and the memory-efficient peers, each at its own best learning rate.

Every run is a ``transformers.Trainer`` run, the product path: FOAM is ``optim="foam"`` (grouped exactly as
``optim="foam"`` groups any model, :mod:`foam_hf.param_groups`), AdamW is ``optim="adamw_torch_fused"`` (also
with ``adam_beta2=0.95``), Adafactor is ``optim="adafactor"``; third-party peers are built by their own
constructors with their own grouping and handed to the same Trainer (labelled "own grouping"). A Llama of
``foam_hf.tools.demo_training.MODEL_SIZES`` is pre-trained from scratch on the Python standard library's ``.py``
files (byte-level; whole files held out for eval) with the Trainer's defaults (weight decay 0,
``max_grad_norm=1.0``), 10% warm-up then cosine to 10% of the peak lr. For every optimizer configuration: a
learning-rate sweep at seed 0, then more seeds at the best lr; the table reports the held-out loss after the
last step as mean ± sample standard deviation (and min..max) over the seeds, its lead over AdamW's, the
optimizer-state bytes and the wall time. For a seed, every run sees the same initial weights and batches.

Run (prints a Markdown table, writes ``quality.png`` and ``quality.json`` to ``--output-dir``)::

    python benchmarks/bench_quality.py --model-size tiny --steps 1000 --batch-size 8 --seq-len 64 \\
        --lrs 1e-3 3e-3 1e-2 --extend-edges --only "AdamW" "AdamW b2=0.95" "FOAM B=4" "FOAM B=8" "FOAM B=32"

With ``--extend-edges`` an optimizer whose best lr is at the edge of its grid gets one more lr beyond it on the
half-decade ladder (and again, up to twice), so no optimizer is judged at a learning rate the sweep did not
bracket; the table marks a best lr still at an edge. Each optimizer moves from its sweep to its seeds as soon as
its own sweep is done. Every finished run
is cached under ``--output-dir``/runs: rerunning the command trains only what is missing. Runs go to
``--workers`` spawned processes with one thread each (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _engine import CONFIGS, OptimizerSpec, RunCache, RunConfig, RunResult, available_configs, run_spec  # noqa: E402
from _provenance import git_sha  # noqa: E402

from foam_hf.tools.demo_training import run_environment  # noqa: E402


def _one_thread() -> None:
    torch.set_num_threads(1)


def _run(spec: OptimizerSpec, lr: float, config: RunConfig) -> RunResult:
    result = run_spec(spec, lr, config)
    result.train_losses = result.train_losses[::10]  # keep the JSON small
    return result


def _rounds_weights(spec: OptimizerSpec) -> bool:
    return "weight_rounding=stochastic" in (spec.optim_args or "")


def next_lr(lr: float, direction: int) -> float:
    """The neighbour of ``lr`` on the half-decade ladder ..., 1e-3, 3e-3, 1e-2, ... (``direction`` -1 or +1)."""
    k = round(2 * math.log10(lr))
    return float(f"{10 ** ((k + direction) / 2):.0e}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", default="tiny")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument(
        "--grid",
        nargs="*",
        default=[],
        metavar="NAME=LR,LR,...",
        help="a configuration's own lr grid instead of --lrs, e.g. 'AdamW=3e-4,1e-3,3e-3'",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds at the best lr (the sweep's seed 0 included)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="subset of configuration names")
    parser.add_argument("--output-dir", default="bench-quality")
    parser.add_argument("--max-files", type=int, default=None, help="passed to load_corpus (smaller corpus)")
    parser.add_argument(
        "--weights-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16: the model trains in bf16, without an fp32 master copy (the stochastic-weights rows need it)",
    )
    parser.add_argument(
        "--extend-edges",
        action="store_true",
        help="when an optimizer's best lr is the smallest or largest of its grid, also run one lr beyond it",
    )
    args = parser.parse_args(argv)

    runnable, left_out = available_configs()
    if args.weights_dtype != "bfloat16":  # weight_rounding=stochastic is refused where no weight is bf16
        left_out += [f"{s.name}: needs --weights-dtype bfloat16" for s in runnable if _rounds_weights(s)]
        runnable = [s for s in runnable if not _rounds_weights(s)]
    known = {spec.name for spec in CONFIGS}
    unknown = set(args.only or []) - {s.name for s in runnable} - {line.split(":")[0] for line in left_out}
    if unknown:
        parser.error(f"unknown configuration names {sorted(unknown)}; known: {[s.name for s in runnable]}")
    specs = {s.name: s for s in runnable if not args.only or s.name in args.only}
    for line in left_out:
        print(f"left out: {line}", file=sys.stderr)
    base = RunConfig(
        model_size=args.model_size,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        eval_every=max(1, args.steps // 5),
        eval_batches=16,
        device="cpu",
        max_files=args.max_files,
        weights_dtype=args.weights_dtype,
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cache = RunCache(out / "runs", base)
    grids = {name: sorted(args.lrs) for name in specs}
    for item in args.grid:
        name, _, lrs = item.rpartition("=")
        if name not in known or not lrs:
            parser.error(f"--grid {item!r}: expected NAME=LR,LR,... with NAME one of {sorted(known)}")
        if name in specs:  # a grid for a configuration --only leaves out is ignored, so one command fits all
            grids[name] = sorted(float(lr) for lr in lrs.split(","))
    ctx = __import__("multiprocessing").get_context("spawn")
    extensions = dict.fromkeys(specs, 0)
    seeded: set[str] = set()
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_one_thread) as pool:
        futures: dict[Future, tuple[str, float, int]] = {}

        def submit(name: str, lr: float, seed: int) -> None:
            if cache.get(name, lr, seed) is None:
                futures[pool.submit(_run, specs[name], lr, replace(base, seed=seed))] = (name, lr, seed)

        def advance(name: str) -> None:
            """Once ``name``'s grid is finished: extend it past an edge best, or run the seeds at the best lr.
            Each optimizer moves on by itself, so no worker waits for the slowest optimizer's sweep."""
            grid = grids[name]
            if name in seeded or any(cache.get(name, lr, 0) is None for lr in grid):
                return
            best = min(grid, key=lambda lr: cache.get(name, lr, 0).eval_loss)
            if args.extend_edges and extensions[name] < 2 and best in (grid[0], grid[-1]):
                extensions[name] += 1
                beyond = next_lr(best, -1 if best == grid[0] else 1)
                grid.append(beyond)
                grid.sort()
                submit(name, beyond, 0)
                advance(name)  # already cached: decide again at once
                return
            seeded.add(name)
            for seed in range(1, args.seeds):
                submit(name, best, seed)

        for name in specs:
            for lr in grids[name]:
                submit(name, lr, 0)
        for name in specs:
            advance(name)
        while futures:
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for job in done:
                name, lr, seed = futures.pop(job)
                cache.put(name, lr, seed, job.result())
                print(f"done {name} lr={lr:g} seed={seed}", file=sys.stderr, flush=True)
                advance(name)
    sweep = {(name, lr): cache.get(name, lr, 0) for name in specs for lr in grids[name]}
    for (name, lr), r in sweep.items():
        print(f"sweep {name:>22} lr={lr:g}: eval {r.eval_loss:.4f}", file=sys.stderr, flush=True)
    best_lr = {name: min(grids[name], key=lambda lr, n=name: sweep[(n, lr)].eval_loss) for name in specs}
    seeds = {(name, seed): cache.get(name, best_lr[name], seed) for name in specs for seed in range(1, args.seeds)}
    total = time.perf_counter() - t0

    rows = []
    for name, spec in specs.items():
        runs = [sweep[(name, best_lr[name])]] + [seeds[(name, s)] for s in range(1, args.seeds)]
        losses = [r.eval_loss for r in runs]
        lr_grid = grids[name]
        rows.append(
            dict(
                name=name,
                path=spec.path(runs[0].optim),
                optim=runs[0].optim,
                optim_args=spec.optim_args,
                adam_beta2=spec.adam_beta2,
                best_lr=best_lr[name],
                bracketed=lr_grid[0] < best_lr[name] < lr_grid[-1],
                sweep={f"{lr:g}": sweep[(name, lr)].eval_loss for lr in lr_grid},
                losses=losses,
                mean=statistics.mean(losses),
                std=statistics.stdev(losses) if len(losses) > 1 else 0.0,
                min=min(losses),
                max=max(losses),
                seeds=len(losses),
                state_bytes=runs[0].state_bytes,
                adamw_state_bytes=runs[0].adamw_state_bytes,
                groups=runs[0].groups,
                wall_s=statistics.mean(r.wall_time_s for r in runs),
                step_ms=1e3 * statistics.mean(r.step_time_s for r in runs),
            )
        )
    adamw = next((r for r in rows if r["name"] == "AdamW"), None)

    all_lrs = sorted({lr for grid in grids.values() for lr in grid})
    lr_cols = " | ".join(f"lr {lr:g}" for lr in all_lrs)
    print(
        f"\n| optimizer | built by | {lr_cols} | best lr | eval loss @ best (mean ± std, n) | min..max | "
        "lead over AdamW | state bytes | vs AdamW | wall s/run | ms/step |"
    )
    print("|---|---|" + "---|" * len(all_lrs) + "---|---|---|---|---|---|---|---|")
    for r in rows:
        sweep_cells = " | ".join(f"{r['sweep'][f'{lr:g}']:.4f}" if f"{lr:g}" in r["sweep"] else "-" for lr in all_lrs)
        ratio = f"{r['state_bytes'] / adamw['state_bytes']:.2f}x" if adamw else "-"
        lead = f"{adamw['mean'] - r['mean']:+.4f}" if adamw else "-"
        edge = "" if r["bracketed"] else " (edge)"
        print(
            f"| {r['name']} | {r['path']} | {sweep_cells} | {r['best_lr']:g}{edge} | {r['mean']:.4f} ± {r['std']:.4f} "
            f"(n={r['seeds']}) | {r['min']:.4f}..{r['max']:.4f} | {lead} | {r['state_bytes']:,} | {ratio} | "
            f"{r['wall_s']:.1f} | {r['step_ms']:.1f} |"
        )
    meta = dict(
        **run_environment(),
        git_sha=git_sha(),
        command="python benchmarks/bench_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        path="transformers.Trainer; FOAM via optim='foam' (foam_hf.param_groups), AdamW via optim='adamw_torch_fused'",
        config=base.__dict__,
        lrs={name: grid for name, grid in grids.items()},
        total_wall_s=total,
    )
    print(
        f"\n{meta['date']}, {meta['machine']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"git {meta['git_sha']}, {args.steps} steps, {args.weights_dtype} weights, total {total / 60:.1f} min. "
        "Every run: transformers.Trainer; "
        'FOAM through optim="foam" (the grouping of foam_hf.param_groups), AdamW through '
        f'optim="{next((r["optim"] for r in rows if r["name"] == "AdamW"), "adamw_torch_fused")}".'
    )
    (out / "quality.json").write_text(
        json.dumps(dict(meta=meta, rows=rows, runs=[r.to_dict() for r in [*sweep.values(), *seeds.values()]]), indent=1)
    )
    title = f"lr sweep, {args.model_size} Llama, {args.steps} steps" + (
        ", bf16 weights" if args.weights_dtype == "bfloat16" else ""
    )
    _plot(rows, out / "quality.png", title, args.seeds)
    print(f"wrote {out / 'quality.png'} and {out / 'quality.json'}", file=sys.stderr)
    return rows


def _plot(rows: list[dict], path: Path, title: str, n_seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        ax1.plot([float(lr) for lr in r["sweep"]], list(r["sweep"].values()), marker="o", label=r["name"])
    ax1.set_xscale("log")
    ax1.set_xlabel("peak learning rate")
    ax1.set_ylabel("held-out loss (seed 0)")
    ax1.set_title(title)
    ax1.legend(fontsize=7)
    names = [r["name"] for r in rows]
    ax2.barh(names, [r["mean"] for r in rows], xerr=[r["std"] for r in rows], color="tab:blue")
    lo = min(r["min"] for r in rows)
    ax2.set_xlim(lo - 0.05, max(r["max"] for r in rows) + 0.02)
    ax2.set_xlabel(f"held-out loss at best lr (mean ± std, {n_seeds} seeds)")
    for i, r in enumerate(rows):
        ax2.text(lo - 0.045, i, f"{r['state_bytes'] / 2**20:.2f} MiB", va="center", fontsize=7, color="white")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
