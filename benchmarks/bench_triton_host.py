"""Benchmark: the host time of FOAM's CUDA (Triton) step, measured without a GPU.

    python benchmarks/bench_triton_host.py                       # Qwen2.5-0.5B's ~290 tensors, bf16
    python benchmarks/bench_triton_host.py --model llama-1b --dtype fp32

A GPU step costs the CPU the Python that checks the tensors, sorts them into launches and builds the shared
launches' tables, plus Triton's own launcher per launch. When that host time reaches the step's GPU time, the
step is bound by the host, not by memory traffic: a model of many small tensors shows it first. This script
times the first part on CPU tensors of a model's parameter shapes, with the four kernels replaced by stubs that
launch nothing (so Triton's launcher, and the GPU, are out of the figure: ``benchmarks/gpu_check.py`` measures
the whole host time on a GPU). It prints the median and minimum over ``--reps`` calls of
``_fused_foam_triton``, and how many launches a step makes.
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

from _provenance import git_sha  # noqa: E402
from bench_step import model_parameter_shapes  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KERNELS = ("_foam_fold_kernel", "_foam_fold_list_kernel", "_adamw_kernel", "_adamw_list_kernel")


class _CountingStub:
    """A kernel that launches nothing: ``kernel[grid](...)`` counts the launch and returns."""

    def __init__(self) -> None:
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1

        return launch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b", help="a `foam-hf memory` name or a config.json")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--state-dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args(argv)

    from foam_hf import _fused_triton
    from foam_hf.folding import folded_shape, is_foldable

    if not _fused_triton.triton_available():
        raise SystemExit(
            "bench_triton_host: Triton is not importable here (pip install triton, or torch's CUDA build)."
        )
    stubs = {name: _CountingStub() for name in KERNELS}
    for name, stub in stubs.items():
        setattr(_fused_triton, name, stub)
    shapes = model_parameter_shapes(args.model)
    block_size, dtype, state_dtype = args.block_size, DTYPES[args.dtype], DTYPES[args.state_dtype]
    params = [torch.zeros(shape, dtype=dtype) for shape in shapes]
    grads = [torch.zeros_like(p) for p in params]
    moment_shapes = [folded_shape(p.shape, block_size) if is_foldable(p, block_size) else p.shape for p in params]
    exp_avgs = [torch.zeros(shape, dtype=state_dtype) for shape in moment_shapes]
    exp_avg_sqs = [torch.zeros_like(m) for m in exp_avgs]
    steps = [torch.tensor(0.0) for _ in params]
    hyper = dict(
        lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, block_size=block_size, scale=1.0,
        res_scale=1.0, second_moment="mean_sq",
    )  # fmt: skip
    times = []
    for _ in range(args.reps + 3):
        start = time.perf_counter()
        _fused_triton._fused_foam_triton(params, grads, exp_avgs, exp_avg_sqs, steps, **hyper)
        times.append((time.perf_counter() - start) * 1e3)
    times = times[3:]  # the first calls warm Python's caches
    launches = sum(stub.launches for stub in stubs.values()) // (args.reps + 3)
    print(
        f"{datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, git {git_sha()}: {args.model}, {len(shapes)} tensors, {args.dtype} weights, "
        f"{args.state_dtype} states, B={block_size}\n"
    )
    print("| tensors | launches per step | host ms per step (median) | min | us per tensor |")
    print("|---:|---:|---:|---:|---:|")
    median = statistics.median(times)
    print(f"| {len(shapes)} | {launches} | {median:.3f} | {min(times):.3f} | {1e3 * median / len(shapes):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
