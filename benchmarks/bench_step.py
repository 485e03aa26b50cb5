"""Benchmark 1: optimizer step time, state bytes and transient bytes, FOAM against AdamW and peers.

One command prints a Markdown table and writes a plot::

    python benchmarks/bench_step.py                  # 8 weights of 1024x1024, fp32 and bf16, B in 2,4,8,32
    python benchmarks/bench_step.py --quick          # a smoke run (small weights, few repetitions)
    python benchmarks/bench_step.py --device cuda --rows 4096 --cols 4096 --dtypes bf16   # a GPU
    python benchmarks/bench_step.py --isa portable   # another implementation of the CPU kernel (or FOAM_CPU_ISA)

Timing: every optimizer owns its own copy of the weights and gradients; each repetition steps every
optimizer once, in a rotating order, in this one process, so machine load hits them all alike. The table
reports medians and the ratio to ``torch.optim.AdamW(fused=True)`` on the same dtype. State bytes are the
bytes of every tensor the optimizer holds in ``state`` after a step. Transient bytes are the peak, during
one ``step()`` after warm-up, of the bytes allocated through torch's CPU allocator minus those freed
(``torch.profiler`` with ``profile_memory=True``): the temporaries a step creates. Allocations outside
torch's allocator (e.g. the fused kernel's 16 KiB per-thread stack tile) are not seen.

Peers (transformers Adafactor, GaLore, APOLLO, Adam-mini, torchao AdamW8bit, bitsandbytes AdamW8bit) run
when installed and when they step on CPU; otherwise the table says why they were left out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from foam_hf import FOAM, _fused_cpu
from foam_hf.tools.demo_training import cpu_name
from foam_hf.tools.demo_training import optimizer_state_bytes as state_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _arguments import parse_with_quick_defaults  # noqa: E402
from _provenance import git_sha  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Candidate:
    name: str
    dtype: str
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    times: list[float] = field(default_factory=list)
    params: list[torch.nn.Parameter] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    state_bytes: int = 0
    transient_bytes: int = 0
    error: str | None = None


def transient_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of allocated-minus-freed bytes through torch's CPU allocator during ``step``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def cuda_transient_peak_bytes(step: Callable[[], None]) -> int:
    """CUDA: peak allocated bytes during ``step`` above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def model_parameter_shapes(model: str) -> list[tuple[int, ...]]:
    """The shape of every parameter of ``model`` (a ``foam-hf memory`` name or a config.json), built on the meta
    device, so nothing is downloaded or allocated."""
    from foam_hf.tools.memory_report import build_meta_model, load_config

    return [tuple(p.shape) for p in build_meta_model(load_config(model)[0]).parameters()]


def weight_shapes(args) -> list[tuple[int, ...]]:
    """The shapes stepped: ``--n-weights`` of ``--rows x --cols``, or with ``--model`` every parameter of that
    model."""
    return (
        model_parameter_shapes(args.model) if args.model else [(args.rows, args.cols, *args.trailing)] * args.n_weights
    )


def describe_shapes(args, shapes: list[tuple[int, ...]]) -> str:
    if not args.model:
        return f"{args.n_weights} weights of {'x'.join(map(str, shapes[0]))}"
    entries = sum(math.prod(shape) for shape in shapes)
    folded = sum(len(shape) >= 2 for shape in shapes)
    return f"the {len(shapes)} parameters of {args.model} ({entries / 1e6:.1f}M entries, {folded} of them 2-D)"


def make_weights(
    shapes: list[tuple[int, ...]], device: str, dtype: torch.dtype, seed: int = 0
) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    weights = []
    for shape in shapes:
        w = torch.nn.Parameter(torch.randn(*shape, generator=gen).to(device, dtype))
        w.grad = (torch.randn(*shape, generator=gen) * 1e-2).to(device, dtype)
        weights.append(w)
    return weights


def peer_factories(args) -> list[tuple[str, Callable | None, str]]:
    """(name, factory or None, why-not) for each peer optimizer."""
    peers: list[tuple[str, Callable | None, str]] = []
    lr = 1e-3

    from transformers.optimization import Adafactor

    peers.append(
        (
            "transformers Adafactor",
            lambda ps: Adafactor(ps, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False),
            "",
        )
    )
    try:
        from galore_torch import GaLoreAdamW

        rank = max(1, args.rows // 4)
        peers.append(
            (
                f"GaLore AdamW (rank {rank}, proj every 200)",
                lambda ps: GaLoreAdamW(
                    [{"params": ps, "rank": rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}], lr=lr
                ),
                "",
            )
        )
    except ImportError as exc:
        peers.append(("GaLore AdamW", None, f"not installed (`pip install galore-torch`): {exc}"))
    try:
        from apollo_torch import APOLLOAdamW

        rank = max(1, args.rows // 4)
        peers.append(
            (
                f"APOLLO AdamW (rank {rank}, channel)",
                lambda ps: APOLLOAdamW(
                    [
                        {
                            "params": ps,
                            "rank": rank,
                            "proj": "random",
                            "scale_type": "channel",
                            "scale": 1,
                            "update_proj_gap": 200,
                            "proj_type": "std",
                        }
                    ],
                    lr=lr,
                ),
                "",
            )
        )
    except ImportError as exc:
        peers.append(("APOLLO AdamW", None, f"not installed (`pip install apollo-torch`): {exc}"))
    try:
        from adam_mini import Adam_mini

        def make_adam_mini(ps):
            named = [(f"layers.{i}.mlp.weight", p) for i, p in enumerate(ps)]
            return Adam_mini(named_parameters=named, lr=lr, dim=args.cols, n_heads=max(1, args.cols // 128))

        peers.append(("Adam-mini", make_adam_mini, ""))
    except ImportError as exc:
        peers.append(("Adam-mini", None, f"not installed (`pip install adam-mini`): {exc}"))
    try:
        from torchao.optim import AdamW8bit as AoAdamW8bit

        peers.append(("torchao AdamW8bit", lambda ps: AoAdamW8bit(ps, lr=lr), ""))
    except ImportError as exc:
        peers.append(("torchao AdamW8bit", None, f"not installed (`pip install torchao`): {exc}"))
    try:
        import bitsandbytes as bnb

        peers.append(("bitsandbytes AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps, lr=lr), ""))
    except Exception as exc:  # bnb raises more than ImportError when its native library is missing
        peers.append(("bitsandbytes AdamW8bit", None, f"not importable: {type(exc).__name__}: {exc}"))
    return peers


def build_candidates(args) -> tuple[list[Candidate], list[tuple[str, str]]]:
    candidates: list[Candidate] = []
    left_out: list[tuple[str, str]] = []
    for dname in args.dtypes:
        candidates.append(Candidate("torch AdamW fused", dname, lambda ps: torch.optim.AdamW(ps, fused=True)))
        candidates.append(Candidate("torch AdamW foreach", dname, lambda ps: torch.optim.AdamW(ps, foreach=True)))
        for b in args.block_sizes:
            candidates.append(Candidate(f"FOAM fused B={b}", dname, lambda ps, b=b: FOAM(ps, block_size=b, fused=True)))
        candidates.append(
            Candidate("FOAM foreach B=4", dname, lambda ps: FOAM(ps, block_size=4, foreach=True, fused=False))
        )
        candidates.append(
            Candidate(
                "FOAM foreach B=4, bf16 states",
                dname,
                lambda ps: FOAM(ps, block_size=4, foreach=True, fused=False, state_dtype="bfloat16"),
            )
        )
        if args.reference:
            candidates.append(
                Candidate(
                    "FOAM reference (for-loop) B=4",
                    dname,
                    lambda ps: FOAM(ps, block_size=4, foreach=False, fused=False),
                )
            )
        candidates.append(Candidate("FOAM default (fused=None) B=4", dname, lambda ps: FOAM(ps, block_size=4)))
        if dname == "bf16":  # weight_rounding="stochastic" rounds bf16 weights only
            for b in args.block_sizes:
                candidates.append(
                    Candidate(
                        f"FOAM fused B={b}, stochastic weights",
                        dname,
                        lambda ps, b=b: FOAM(ps, block_size=b, fused=True, weight_rounding="stochastic"),
                    )
                )
            candidates.append(
                Candidate(
                    "FOAM foreach B=4, stochastic weights",
                    dname,
                    lambda ps: FOAM(ps, block_size=4, foreach=True, fused=False, weight_rounding="stochastic"),
                )
            )
        candidates.append(
            Candidate(
                "FOAM default B=4, bf16 states",
                dname,
                lambda ps: FOAM(ps, block_size=4, state_dtype="bfloat16"),
            )
        )
    if args.peers and (args.model or args.trailing):
        left_out.append(("peers", "not run with --model or --trailing (their ranks follow --rows and --cols)"))
    elif args.peers:
        if "fp32" not in args.dtypes:  # the peers run on fp32 weights: their ratio needs fp32 AdamW beside them
            candidates.append(Candidate("torch AdamW fused", "fp32", lambda ps: torch.optim.AdamW(ps, fused=True)))
        for name, factory, why in peer_factories(args):
            if factory is None:
                left_out.append((name, why))
            else:
                candidates.append(Candidate(name, "fp32", factory))
    return candidates, left_out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-weights", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument(
        "--trailing",
        type=int,
        nargs="*",
        default=[],
        help="more dimensions after --cols (a convolution's kernel, e.g. --rows 256 --cols 256 --trailing 3 3): "
        "FOAM folds along the last one",
    )
    parser.add_argument(
        "--model",
        default="",
        help="step every parameter of this built-in model (e.g. llama-60m; `foam-hf memory --help` lists them) "
        "instead of --n-weights x --rows x --cols; peers are left out",
    )
    parser.add_argument("--reps", type=int, default=40, help="timed repetitions per optimizer (interleaved)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[2, 4, 8, 32])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--no-peers", dest="peers", action="store_false")
    parser.add_argument("--no-reference", dest="reference", action="store_false")
    parser.add_argument(
        "--plot",
        default=None,
        help="where to write the plot ('' for none; default: the repository's docs/benchmarks-step.png, or none "
        "with --quick, so that a smoke run never replaces the published figure)",
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--json", default="", help="also write every row to this JSON file (byte counts exact)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for every optimizer (default: torch's; 1 measures the per-core cost, which a "
        "loaded machine distorts least)",
    )
    parser.add_argument(
        "--isa",
        default=None,
        help="CPU kernel implementation: portable, avx2 or avx512 (default: the best this CPU runs)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu, or cuda: the fused rows then use the Triton kernels (peers run where they can)",
    )
    return parse_with_quick_defaults(parser, argv, n_weights=2, rows=128, cols=256, reps=3, warmup=1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.plot is None:  # the published figure, wherever the script is started from
        args.plot = "" if args.quick else str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks-step.png")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    on_cuda = torch.device(args.device).type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)

    start = time.perf_counter()
    if on_cuda:  # compile the Triton kernels once, outside the timed steps
        from foam_hf import _fused_triton

        ready = _fused_triton.triton_ready(torch.device(args.device))
        compile_s = time.perf_counter() - start
        if not ready:
            raise SystemExit("the Triton kernels cannot run here (see the warning above)")
    else:
        kernel = _fused_cpu.load_kernel()
        compile_s = time.perf_counter() - start
        if kernel is None:
            raise SystemExit(f"the fused kernel could not be built: {_fused_cpu.kernel_build_error()}")
        if args.isa is not None:
            if args.isa not in kernel.available_isas():
                raise SystemExit(f"--isa {args.isa}: this CPU runs {', '.join(kernel.available_isas())}")
            kernel.set_isa(args.isa)
    peak_bytes = cuda_transient_peak_bytes if on_cuda else transient_peak_bytes

    shapes = weight_shapes(args)
    candidates, left_out = build_candidates(args)
    runnable: list[Candidate] = []
    for c in candidates:
        c.params = make_weights(shapes, args.device, DTYPES[c.dtype])
        try:
            c.optimizer = c.make(c.params)
            for _ in range(args.warmup):
                c.optimizer.step()
            c.state_bytes = state_bytes(c.optimizer)
            c.transient_bytes = peak_bytes(c.optimizer.step)
            runnable.append(c)
        except Exception as exc:  # a peer that does not step on CPU: report why, keep going
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            left_out.append((c.name, f"fails on CPU: {type(exc).__name__}: {first[:160]}"))
            c.params, c.optimizer = [], None

    for rep in range(args.reps):
        shift = rep % len(runnable)
        for c in runnable[shift:] + runnable[:shift]:
            sync()
            t0 = time.perf_counter()
            c.optimizer.step()
            sync()
            c.times.append(time.perf_counter() - t0)

    entries = sum(math.prod(shape) for shape in shapes)
    param_bytes = {d: entries * torch.empty((), dtype=DTYPES[d]).element_size() for d in {c.dtype for c in runnable}}
    baseline = {c.dtype: statistics.median(c.times) for c in runnable if c.name == "torch AdamW fused"}
    where = (
        torch.cuda.get_device_name(torch.device(args.device))
        if on_cuda
        else f"{platform.machine()} {cpu_name()} ({torch.get_num_threads()} threads, "
        f"fused kernel: {_fused_cpu.load_kernel().isa()})"
    )
    print(
        f"Date {datetime.date.today()}, {where}, torch {torch.__version__}, git {git_sha()}; "
        f"{describe_shapes(args, shapes)}, {args.reps} interleaved reps; "
        f"fused kernel ready in {compile_s:.1f} s in this process."
    )
    print()
    print(
        "| optimizer | params | median step (ms) | IQR (ms) | / AdamW fused | state (MiB) "
        "| transient peak (MiB) | transient / param bytes |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for c in runnable:
        med = statistics.median(c.times)
        q = statistics.quantiles(c.times, n=4) if len(c.times) >= 4 else [med, med, med]
        ratio = med / baseline[c.dtype] if c.dtype in baseline else float("nan")
        rows.append((c, med, ratio))
        print(
            f"| {c.name} | {c.dtype} | {med * 1e3:.2f} | {(q[2] - q[0]) * 1e3:.2f} | {ratio:.2f} | "
            f"{c.state_bytes / 2**20:.1f} | {c.transient_bytes / 2**20:.2f} | "
            f"{c.transient_bytes / param_bytes[c.dtype]:.1%} |"
        )
    if args.json:
        records = [
            dict(name=c.name, dtype=c.dtype, state_bytes=c.state_bytes, transient_bytes=c.transient_bytes, median_s=med)
            for c, med, _ in rows
        ]
        shape = dict(
            n_weights=len(shapes),
            rows=None if args.model else args.rows,
            cols=None if args.model else args.cols,
            trailing=None if args.model else args.trailing,
            model=args.model or None,
            shapes=shapes,
            param_bytes=param_bytes,
        )
        Path(args.json).write_text(json.dumps(dict(shape=shape, rows=records), indent=1))
    if left_out:
        print()
        print("Not in the table:")
        for name, why in left_out:
            print(f"- {name}: {why}")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
        labels = [f"{c.name} [{c.dtype}]" for c, _, _ in rows]
        ratios = [r for _, _, r in rows]
        colors = ["tab:orange" if c.name.startswith("FOAM") else "tab:gray" for c, _, _ in rows]
        ax.barh(labels, ratios, color=colors)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.axvline(0.7, color="tab:red", lw=0.8, ls="--", label="target 0.7x")
        ax.set_xscale("log")
        ax.set_xlabel("median step time / torch AdamW(fused=True), same dtype (log)")
        ax.invert_yaxis()
        ax.legend(loc="lower right")
        ax.set_title(f"{describe_shapes(args, shapes)}\n{where}", fontsize=9)  # two lines: it fits
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"\nplot written to {args.plot}")


if __name__ == "__main__":
    main()
