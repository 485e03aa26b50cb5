"""Benchmark: what the fused CPU step costs per parameter entry when memory is not the limit, per implementation.

One command prints a Markdown table, one column per implementation of the kernel this CPU runs (portable,
avx2, avx512; the same choice as ``FOAM_CPU_ISA``)::

    python benchmarks/bench_kernel_compute.py            # B = 2, 4, 8, 16, 32; fp32 and bf16 parameters
    python benchmarks/bench_kernel_compute.py --quick    # a smoke run

Each measurement calls the kernel's entry point (the one ``FOAM(fused=True)`` calls) on one tensor of
32 x 1024 listed many times in one call, on one thread, so that G, W and the moments stay in the core's L2
cache and the step pays for its instructions only: block sums, unfolds, the moment updates, the square root and
the division, the conversions of bf16 parameters and the rounding of bf16 states. It is the compute side of a
step; ``bench_kernel_floor.py`` gives the memory side, and ``bench_step.py`` what a real step takes.
The table gives the median over repetitions, in picoseconds per parameter entry, and how much of it
``torch._fused_adamw_`` (the op of ``torch.optim.AdamW(fused=True)``) takes on the same data.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import cpu_name, git_sha  # noqa: E402

from foam_hf import _fused_cpu  # noqa: E402

ROWS, COLS = 32, 1024  # 128 KiB of fp32 per tensor: G, W and the moments fit in a 1 MiB L2 together
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, scale=1.0, res_scale=1.0)


def median_seconds(step, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def foam_step(kernel, param_dtype: torch.dtype, block_size: int, state_dtype: torch.dtype, copies: int):
    """One kernel call over ``copies`` references to one cache-resident tensor, and its entry count."""
    w = torch.randn(ROWS, COLS).to(param_dtype)
    g = (torch.randn(ROWS, COLS) * 1e-3).to(param_dtype)
    folds = (COLS + block_size - 1) // block_size
    m = torch.zeros(ROWS, folds, dtype=state_dtype)
    v = torch.zeros(ROWS, folds, dtype=state_dtype)
    steps = [torch.zeros((), dtype=torch.float32) for _ in range(copies)]
    h = HYPER

    def step() -> None:
        kernel.fused_step(
            [w] * copies, [g] * copies, [m] * copies, [v] * copies, steps, h["lr"], h["beta1"], h["beta2"],
            h["eps"], h["weight_decay"], block_size, h["scale"], h["res_scale"], True,
        )  # fmt: skip

    return step, ROWS * COLS * copies


def adamw_step(param_dtype: torch.dtype, copies: int):
    w = torch.randn(ROWS, COLS).to(param_dtype)
    g = (torch.randn(ROWS, COLS) * 1e-3).to(param_dtype)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    steps = [torch.zeros((), dtype=torch.float32) for _ in range(copies)]

    def step() -> None:
        torch._fused_adamw_(
            [w] * copies, [g] * copies, [m] * copies, [v] * copies, [], steps, lr=HYPER["lr"],
            beta1=HYPER["beta1"], beta2=HYPER["beta2"], weight_decay=HYPER["weight_decay"], eps=HYPER["eps"],
            amsgrad=False, maximize=False,
        )  # fmt: skip

    return step, ROWS * COLS * copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--copies", type=int, default=256, help="references to the tensor per call")
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args()
    if args.quick:
        args.block_sizes, args.copies, args.reps = [4], 4, 3

    kernel = _fused_cpu.load_kernel()
    if kernel is None:
        sys.exit(f"the fused CPU kernel could not be built: {_fused_cpu.kernel_build_error()}")
    torch.set_num_threads(1)
    isas = list(kernel.available_isas())
    chosen = kernel.isa()

    configs = [(p, b, torch.float32) for p in (torch.float32, torch.bfloat16) for b in args.block_sizes]
    configs += [(p, 4, torch.bfloat16) for p in (torch.float32, torch.bfloat16) if 4 in args.block_sizes]
    results: dict[tuple, dict[str, float]] = {}
    for param_dtype, block_size, state_dtype in configs:
        for isa in isas:
            kernel.set_isa(isa)
            step, entries = foam_step(kernel, param_dtype, block_size, state_dtype, args.copies)
            results.setdefault((param_dtype, block_size, state_dtype), {})[isa] = (
                median_seconds(step, args.reps) / entries * 1e12
            )
    kernel.set_isa(chosen)
    adamw = {}
    for param_dtype in (torch.float32, torch.bfloat16):
        step, entries = adamw_step(param_dtype, args.copies)
        adamw[param_dtype] = median_seconds(step, args.reps) / entries * 1e12

    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    print(
        f"Date {datetime.date.today()}, {platform.machine()} {cpu_name()} (1 thread; implementations: "
        f"{', '.join(isas)}; the CPU's choice: {chosen}), torch {torch.__version__}, git {git_sha()}; one "
        f"{ROWS}x{COLS} tensor x {args.copies} per call, median of {args.reps}.\n"
    )
    header = " | ".join(f"{isa} (ps/entry)" for isa in isas)
    print(f"| step | params | states | {header} | torch AdamW fused (ps/entry) |")
    print("|---|---|---|" + "---:|" * (len(isas) + 1))
    for (param_dtype, block_size, state_dtype), by_isa in results.items():
        cells = " | ".join(f"{by_isa[isa]:.0f}" for isa in isas)
        print(
            f"| FOAM B={block_size} | {names[param_dtype]} | {names[state_dtype]} | {cells} | "
            f"{adamw[param_dtype]:.0f} |"
        )


if __name__ == "__main__":
    main()
