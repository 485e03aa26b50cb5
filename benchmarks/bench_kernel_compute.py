"""Benchmark: what the fused CPU step costs per parameter entry when memory is not the limit, per implementation.

One command prints a Markdown table, one column per implementation of the kernel this CPU runs (portable,
avx2, avx512; the same choice as ``FOAM_CPU_ISA``)::

    python benchmarks/bench_kernel_compute.py            # B = 2, 4, 8, 16, 32; fp32 and bf16 parameters
    python benchmarks/bench_kernel_compute.py --fp64     # and fp64 parameters (the portable code's build per ISA)
    python benchmarks/bench_kernel_compute.py --quick    # a smoke run

Each measurement is ``bench_kernel_floor.py``'s in-cache step (the kernel's entry point, the one
``FOAM(fused=True)`` calls, with FOAM's default second moment) on one tensor of 32 x 1024 listed 256 times in
one call, on one thread, so that G, W and the moments stay in the core's L2
cache and the step pays for its instructions only: block sums, unfolds, the moment updates, the square root and
the division, the conversions of bf16 parameters and the rounding of bf16 states. It is the compute side of a
step; ``bench_kernel_floor.py`` gives the memory side, and ``bench_step.py`` what a real step takes.
The table gives the median over repetitions (every case once per repetition, in rotation), in picoseconds per
parameter entry, and how much of it ``torch._fused_adamw_`` (the op of ``torch.optim.AdamW(fused=True)``) takes
on the same data.
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
from _arguments import parse_with_quick_defaults  # noqa: E402
from bench_kernel_floor import in_cache_runner  # noqa: E402
from bench_step import cpu_name, git_sha  # noqa: E402

from foam_hf import _fused_cpu  # noqa: E402

SHAPE = (32, 1024)  # 128 KiB of fp32 per tensor: G, W and the moments fit in a 1 MiB L2 together


def interleaved_ps_per_entry(kernel, cases: dict, copies: int, reps: int, warmup: int = 3) -> dict:
    """Median picoseconds per parameter entry of each case, timed in rotation (each repetition runs every case
    once, so that changes in the machine's load hit them alike).

    ``cases`` maps a key to ``(isa, param_dtype, state_dtype, block_size)``: bench_kernel_floor's in-cache step
    (FOAM's with its default second moment; block_size None: fused AdamW, whose op is torch's whatever the isa),
    one call over ``copies`` references to one tensor.
    """
    entries = SHAPE[0] * SHAPE[1] * copies
    runners = {
        key: (isa, in_cache_runner(kernel, entries, p, s, b, shape=SHAPE, copies=copies, mean_sq=True))
        for key, (isa, p, s, b) in cases.items()
    }
    times: dict = {key: [] for key in cases}
    for rep in range(warmup + reps):
        for key, (isa, step) in runners.items():
            kernel.set_isa(isa)
            start = time.perf_counter()
            step()
            if rep >= warmup:
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) / entries * 1e12 for key, t in times.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--copies", type=int, default=256, help="references to the tensor per call")
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument(
        "--fp64",
        action="store_true",
        help="also fp64 parameters (fp64 states), which every implementation steps with its build of the portable code",
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    return parse_with_quick_defaults(parser, argv, block_sizes=[4], copies=4, reps=3)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    kernel = _fused_cpu.load_kernel()
    if kernel is None:
        sys.exit(f"the fused CPU kernel could not be built: {_fused_cpu.kernel_build_error()}")
    torch.set_num_threads(1)
    isas = list(kernel.available_isas())
    chosen = kernel.isa()

    configs = [(p, b, torch.float32) for p in (torch.float32, torch.bfloat16) for b in args.block_sizes]
    configs += [(p, 4, torch.bfloat16) for p in (torch.float32, torch.bfloat16) if 4 in args.block_sizes]
    param_dtypes = [torch.float32, torch.bfloat16]
    if args.fp64:
        configs += [(torch.float64, b, torch.float64) for b in args.block_sizes]
        param_dtypes.append(torch.float64)
    cases = {(config, isa): (isa, config[0], config[2], config[1]) for config in configs for isa in isas}
    cases |= {("AdamW", p): (chosen, p, p, None) for p in param_dtypes}
    measured = interleaved_ps_per_entry(kernel, cases, args.copies, args.reps)
    kernel.set_isa(chosen)
    results = {config: {isa: measured[(config, isa)] for isa in isas} for config in configs}
    adamw = {p: measured[("AdamW", p)] for p in param_dtypes}

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}
    print(
        f"Date {datetime.date.today()}, {platform.machine()} {cpu_name()} (1 thread; implementations: "
        f"{', '.join(isas)}; the CPU's choice: {chosen}), torch {torch.__version__}, git {git_sha()}; one "
        f"{SHAPE[0]}x{SHAPE[1]} tensor x {args.copies} per call, median of {args.reps} interleaved repetitions.\n"
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
