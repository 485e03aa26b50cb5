"""Benchmark: what the fused CPU step costs per parameter entry when memory is not the limit, per implementation.

One command prints a Markdown table, one column per implementation of the kernel this CPU runs (portable,
avx2, avx512; the same choice as ``FOAM_CPU_ISA``)::

    python benchmarks/bench_kernel_compute.py            # B = 2, 4, 8, 16, 32; fp32 and bf16 parameters
    python benchmarks/bench_kernel_compute.py --quick    # a smoke run

Each measurement is ``bench_kernel_floor.py``'s in-cache step (the kernel's entry point, the one
``FOAM(fused=True)`` calls, with FOAM's default second moment) on one tensor of 32 x 1024 listed 256 times in
one call, on one thread, so that G, W and the moments stay in the core's L2
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
from bench_kernel_floor import in_cache_runner  # noqa: E402
from bench_step import cpu_name, git_sha  # noqa: E402

from foam_hf import _fused_cpu  # noqa: E402

SHAPE = (32, 1024)  # 128 KiB of fp32 per tensor: G, W and the moments fit in a 1 MiB L2 together


def median_seconds(step, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ps_per_entry(kernel, param_dtype, state_dtype, block_size, copies: int, reps: int) -> float:
    """bench_kernel_floor's in-cache step (FOAM's with its default second moment; block_size None: fused AdamW),
    one call over ``copies`` references to one tensor, in picoseconds per parameter entry."""
    entries = SHAPE[0] * SHAPE[1] * copies
    step = in_cache_runner(
        kernel, entries, param_dtype, state_dtype, block_size, shape=SHAPE, copies=copies, mean_sq=True
    )
    return median_seconds(step, reps) / entries * 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--copies", type=int, default=256, help="references to the tensor per call")
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args()
    if args.quick:  # smaller defaults; sizes given on the command line still win
        parser.set_defaults(block_sizes=[4], copies=4, reps=3)
        args = parser.parse_args()

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
            results.setdefault((param_dtype, block_size, state_dtype), {})[isa] = ps_per_entry(
                kernel, param_dtype, state_dtype, block_size, args.copies, args.reps
            )
    kernel.set_isa(chosen)
    adamw = {p: ps_per_entry(kernel, p, p, None, args.copies, args.reps) for p in (torch.float32, torch.bfloat16)}

    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    print(
        f"Date {datetime.date.today()}, {platform.machine()} {cpu_name()} (1 thread; implementations: "
        f"{', '.join(isas)}; the CPU's choice: {chosen}), torch {torch.__version__}, git {git_sha()}; one "
        f"{SHAPE[0]}x{SHAPE[1]} tensor x {args.copies} per call, median of {args.reps}.\n"
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
