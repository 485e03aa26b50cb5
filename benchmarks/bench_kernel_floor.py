"""Benchmark: how close the fused CPU step is to what the machine can do at best (its traffic and arithmetic floors).

One command prints a Markdown table::

    python benchmarks/bench_kernel_floor.py                 # 8 weights of 1024x1024, as bench_step.py
    python benchmarks/bench_kernel_floor.py --quick         # a smoke run

Two floors, measured on the same tensor sizes and thread count as the optimizer steps they bound:

* **traffic**: a loop that only moves an optimizer's bytes (reads G, reads and writes W, reads and writes the
  moments) and computes nothing but an integer add per entry. AdamW moves G, W, m and v at every entry
  (fp32 parameters: 4 + 8 + 8 + 8 = 28 bytes per parameter entry; bf16 parameters, whose states torch keeps in
  bf16: 2 + 4 + 4 + 4 = 14). FOAM moves G and W at every entry and its moments at 1/B of them
  (fp32: 12 + 16/B bytes; bf16 parameters: 6 + 16/B; bf16 states: 8/B instead of 16/B).
* **arithmetic**: one exact square root and one exact division per parameter entry (both AdamW and FOAM need
  them, ``M / (sqrt(V) + eps)``), on a buffer that stays in L1, vectorised for the instruction set the kernel
  runs (``-march=native``; without AVX-512 when ``FOAM_CPU_ISA=avx2`` forces the AVX2 code, so that its floor
  has 8 lanes, not 16). On AMD Zen the two share one divide unit.

A step cannot take less than the larger of its two floors; it takes more where they do not overlap, and FOAM
also sums and unfolds its blocks. The **in-cache** column says which: the same step, on the same number of
entries, over one small tensor (64 x 256) listed many times, so that G, W and the moments stay in L2 and the
step pays for its arithmetic only (FOAM through the kernel's own entry point, AdamW through the
``torch._fused_adamw_`` op that ``AdamW(fused=True)`` calls). A step whose in-cache time is close to its
measured time is bounded by its compute, not by its bytes.

The floor loops are a few lines of C compiled at first use with the system C compiler (into a cache directory,
keyed by the source) and run on torch's own OpenMP threads, interleaved with ``torch.optim.AdamW(fused=True)``
and FOAM's fused steps, in rotating order, so that load hits all alike.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _arguments import parse_with_quick_defaults  # noqa: E402
from bench_step import cpu_name, git_sha  # noqa: E402

from foam_hf import FOAM, _fused_cpu  # noqa: E402

FLOOR_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <omp.h>

/* Rows of n entries of W (and G) and K entries of each moment: W += G, m += 1, v += 1, as raw integers. */
#define STREAM(NAME, TW, TM)                                                                                 \
  void NAME(const TW* g, TW* w, TM* m, TM* v, int64_t rows, int64_t n, int64_t k) {                        \
    _Pragma("omp parallel for schedule(static)")                                                            \
    for (int64_t r = 0; r < rows; ++r) {                                                                    \
      const TW* gr = g + r * n;                                                                             \
      TW* wr = w + r * n;                                                                                   \
      TM* mr = m + r * k;                                                                                   \
      TM* vr = v + r * k;                                                                                   \
      for (int64_t j = 0; j < n; ++j) wr[j] += gr[j];                                                       \
      for (int64_t j = 0; j < k; ++j) { mr[j] += 1; vr[j] += 1; }                                           \
    }                                                                                                       \
  }
STREAM(stream_w4_m4, int32_t, int32_t)
STREAM(stream_w4_m2, int32_t, int16_t)
STREAM(stream_w2_m4, int16_t, int32_t)
STREAM(stream_w2_m2, int16_t, int16_t)

/* `total` entries of y = x / (sqrt(x) + eps), split over the threads, on a buffer of 1024 floats per thread. */
void sqrt_div(int64_t total) {
  _Pragma("omp parallel")
  {
    float x[1024], y[1024];
    for (int j = 0; j < 1024; ++j) x[j] = 1.0f + (float)j;
    const int64_t passes = total / 1024 / omp_get_num_threads();
    for (int64_t p = 0; p < passes; ++p) {
      for (int j = 0; j < 1024; ++j) y[j] = x[j] / (sqrtf(x[j]) + 1e-8f);
      __asm__ volatile("" : : "r"(y), "r"(x) : "memory"); /* every pass is computed, none hoisted */
    }
  }
}
"""


#: Extra compiler flags per implementation of the kernel: the floor loops use the vector width it uses.
ISA_FLAGS: dict[str, list[str]] = {"avx2": ["-mno-avx512f"]}


def build_floor_library(isa: str) -> ctypes.CDLL:
    """Compile FLOOR_SOURCE for the kernel's implementation ``isa`` into a shared library (once per source and
    compiler flags) and load it. Loaded after torch, it shares torch's OpenMP runtime (the same libgomp), hence
    torch's threads and thread count."""
    flags = ["-O3", "-march=native", *ISA_FLAGS.get(isa, []), "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256((FLOOR_SOURCE + " ".join([compiler, *flags])).encode()).hexdigest()[:12]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(tempfile.gettempdir()) / "foam_hf_bench")
    library = root / f"kernel_floor_{key}.so"
    if not library.exists():
        root.mkdir(parents=True, exist_ok=True)
        source = root / f"kernel_floor_{key}.c"
        source.write_text(FLOOR_SOURCE)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([compiler, *flags, str(source), "-o", str(partial)], check=True)
        partial.replace(library)
    lib = ctypes.CDLL(str(library))
    for bits_w in (4, 2):
        for bits_m in (4, 2):
            fn = getattr(lib, f"stream_w{bits_w}_m{bits_m}")
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
            fn.restype = None
    lib.sqrt_div.argtypes = [ctypes.c_int64]
    lib.sqrt_div.restype = None
    return lib


@dataclass
class Config:
    """One row of the table: FOAM's fused step at one block size and dtype pair, against fused AdamW."""

    name: str
    param_dtype: torch.dtype
    state_dtype: torch.dtype
    block_size: int
    target: float | None  # issue 13's target ratio, where it set one

    def bytes_per_entry(self) -> float:
        p = torch.empty((), dtype=self.param_dtype).element_size()
        s = torch.empty((), dtype=self.state_dtype).element_size()
        return 3 * p + 4 * s / self.block_size  # G read, W read and written; m and v read and written


def adamw_bytes_per_entry(param_dtype: torch.dtype) -> float:
    p = torch.empty((), dtype=param_dtype).element_size()
    return 3 * p + 4 * p  # torch keeps AdamW's states in the parameters' dtype


CONFIGS = [
    Config("FOAM B=4, fp32 params", torch.float32, torch.float32, 4, 0.55),
    Config("FOAM B=8, fp32 params", torch.float32, torch.float32, 8, None),
    Config("FOAM B=4, bf16 params", torch.bfloat16, torch.float32, 4, 0.6),
    Config("FOAM B=8, bf16 params", torch.bfloat16, torch.float32, 8, None),
    Config("FOAM B=4, fp32 params, bf16 states", torch.float32, torch.bfloat16, 4, 0.7),
    Config("FOAM B=4, bf16 params, bf16 states", torch.bfloat16, torch.bfloat16, 4, 0.7),
]


@dataclass
class Timed:
    name: str
    run: Callable[[], None]
    times: list[float] = field(default_factory=list)

    def median(self) -> float:
        return statistics.median(self.times)


def stream_runner(
    lib: ctypes.CDLL, rows: int, cols: int, param_dtype: torch.dtype, state_dtype: torch.dtype, block_size: int
) -> Callable[[], None]:
    """The traffic loop over fresh tensors of the optimizer's sizes (one flat set: the bytes are what counts)."""
    k = -(-cols // block_size)
    ints = {2: torch.int16, 4: torch.int32}
    wbytes = torch.empty((), dtype=param_dtype).element_size()
    mbytes = torch.empty((), dtype=state_dtype).element_size()
    g = torch.zeros(rows, cols, dtype=ints[wbytes])
    w = torch.zeros(rows, cols, dtype=ints[wbytes])
    m = torch.zeros(rows, k, dtype=ints[mbytes])
    v = torch.zeros(rows, k, dtype=ints[mbytes])
    fn = getattr(lib, f"stream_w{wbytes}_m{mbytes}")
    return lambda: fn(g.data_ptr(), w.data_ptr(), m.data_ptr(), v.data_ptr(), rows, cols, k)


def optimizer_runner(
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], args, dtype: torch.dtype
) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in range(args.n_weights):
        p = torch.nn.Parameter(torch.randn(args.rows, args.cols, generator=gen).to(dtype))
        p.grad = (torch.randn(args.rows, args.cols, generator=gen) * 1e-2).to(dtype)
        params.append(p)
    optimizer = make(params)
    for _ in range(args.warmup):
        optimizer.step()
    return optimizer.step


IN_CACHE_SHAPE = (64, 256)  # 16K entries: G and W of fp32 take 128 KiB, within any L2
IN_CACHE_COPIES = 64  # list entries per call: the per-call overhead is spread over ~1M entries


def in_cache_runner(
    kernel,
    entries: int,
    param_dtype: torch.dtype,
    state_dtype: torch.dtype,
    block_size: int | None,
    *,
    shape: tuple[int, int] = IN_CACHE_SHAPE,
    copies: int = IN_CACHE_COPIES,
    mean_sq: bool = False,
) -> Callable[[], None] | None:
    """``entries`` entries of the step on small tensors of ``shape``, listed up to ``copies`` times per call;
    block_size None is fused AdamW (states in the parameters' dtype, as torch keeps them). None where torch lacks
    the op. ``mean_sq`` picks FOAM's second moment (``second_moment="mean_sq"``, the default, or ``sq_mean``).

    Each of torch's threads gets its own tensor: the list alternates between ``torch.get_num_threads()`` sets,
    since the kernel hands list entry ``j`` of a size under its grain to thread ``j mod threads``. Listing one
    tensor for all threads had them write the same cache lines at once, and the "in cache" step came out slower
    than the real one."""
    rows, cols = shape
    gen = torch.Generator().manual_seed(0)
    k = cols if block_size is None else -(-cols // block_size)
    sets = []
    for _ in range(max(1, torch.get_num_threads())):
        p = torch.randn(rows, cols, generator=gen).to(param_dtype)
        g = (torch.randn(rows, cols, generator=gen) * 1e-2).to(param_dtype)
        m = torch.zeros(rows, k, dtype=param_dtype if block_size is None else state_dtype)
        sets.append((p, g, m, torch.zeros_like(m)))
    n = max(1, min(copies, entries // (rows * cols)))
    ps, gs, ms, vs = (list(column) for column in zip(*(sets[j % len(sets)] for j in range(n))))
    steps = [torch.zeros((), dtype=torch.float32) for _ in range(n)]
    calls = max(1, entries // (rows * cols * n))
    if block_size is None:
        op = getattr(torch, "_fused_adamw_", None)
        if op is None:
            return None
        hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)

        def adamw() -> None:
            for _ in range(calls):
                op(ps, gs, ms, vs, [], steps, **hyper)

        return adamw

    foam_hyper = (1e-3, 0.9, 0.999, 1e-8, 0.01, block_size, 1.0, 1.0, mean_sq, False)  # weights to nearest

    def foam() -> None:
        for _ in range(calls):
            kernel.fused_step(ps, gs, ms, vs, steps, *foam_hyper)

    return foam


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-weights", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions of each measurement (interleaved)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    return parse_with_quick_defaults(parser, argv, n_weights=2, rows=128, cols=256, reps=3, warmup=1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kernel = _fused_cpu.load_kernel()
    if kernel is None:
        raise SystemExit(f"the fused kernel could not be built: {_fused_cpu.kernel_build_error()}")
    lib = build_floor_library(kernel.isa())
    entries = args.n_weights * args.rows * args.cols
    flat_rows = args.n_weights * args.rows

    timed: dict[str, Timed] = {}

    def add(name: str, run: Callable[[], None]) -> None:
        timed[name] = Timed(name, run)

    add("arithmetic", lambda: lib.sqrt_div(entries))
    for dtype in (torch.float32, torch.bfloat16):
        add(f"AdamW traffic {dtype}", stream_runner(lib, flat_rows, args.cols, dtype, dtype, 1))
        add(f"AdamW fused {dtype}", optimizer_runner(lambda ps: torch.optim.AdamW(ps, fused=True), args, dtype))
        adamw_in_cache = in_cache_runner(kernel, entries, dtype, dtype, None)
        if adamw_in_cache is not None:
            add(f"AdamW fused {dtype} in cache", adamw_in_cache)
    for c in CONFIGS:
        add(f"{c.name} traffic", stream_runner(lib, flat_rows, args.cols, c.param_dtype, c.state_dtype, c.block_size))
        state = "bfloat16" if c.state_dtype == torch.bfloat16 else "float32"
        add(
            c.name,
            optimizer_runner(
                lambda ps, c=c, state=state: FOAM(ps, block_size=c.block_size, fused=True, state_dtype=state),
                args,
                c.param_dtype,
            ),
        )
        # FOAM's default second moment, as the measured step beside it runs (sq_mean is ~9% cheaper in cache).
        add(
            f"{c.name} in cache",
            in_cache_runner(kernel, entries, c.param_dtype, c.state_dtype, c.block_size, mean_sq=True),
        )

    order = list(timed.values())
    for item in order:  # warm-up of the floor loops (the optimizers warmed up when built)
        item.run()
    for rep in range(args.reps):
        shift = rep % len(order)
        for item in order[shift:] + order[:shift]:
            t0 = time.perf_counter()
            item.run()
            item.times.append(time.perf_counter() - t0)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"Date {datetime.date.today()}, {platform.machine()} {cpu_name()} ({torch.get_num_threads()} threads, "
        f"fused kernel: {kernel.isa()}), torch {torch.__version__}, git {git_sha()}; "
        f"{args.n_weights} weights of {args.rows}x{args.cols}, {args.reps} interleaved reps; "
        f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}."
    )
    arith = timed["arithmetic"].median()

    def in_cache(name: str) -> str:
        return f"{timed[name].median() * 1e3:.2f}" if name in timed else "n/a"

    print()
    print(
        f"Arithmetic floor (one exact sqrt and one division per entry, compiled for {kernel.isa()}): "
        f"{arith * 1e3:.2f} ms, {arith * torch.get_num_threads() / entries * 1e12:.0f} ps per entry per thread."
    )
    print()
    print(
        "| step | bytes / entry | traffic floor (ms) | floor ratio: traffic / AdamW's traffic "
        "| lowest reachable ratio: max(traffic, arithmetic) / AdamW measured | in cache (ms) | measured (ms) "
        "| measured ratio / AdamW fused | issue 13 target |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        floor = timed[f"AdamW traffic {dtype}"].median()
        measured = timed[f"AdamW fused {dtype}"].median()
        print(
            f"| AdamW fused, {label} params | {adamw_bytes_per_entry(dtype):g} | {floor * 1e3:.2f} | 1.00 "
            f"| {max(floor, arith) / measured:.2f} | {in_cache(f'AdamW fused {dtype} in cache')} "
            f"| {measured * 1e3:.2f} | 1.00 | |"
        )
    for c in CONFIGS:
        adamw_floor = timed[f"AdamW traffic {c.param_dtype}"].median()
        adamw = timed[f"AdamW fused {c.param_dtype}"].median()
        floor = timed[f"{c.name} traffic"].median()
        measured = timed[c.name].median()
        target = f"{c.target:.2f}" if c.target is not None else ""
        print(
            f"| {c.name} | {c.bytes_per_entry():g} | {floor * 1e3:.2f} | {floor / adamw_floor:.2f} "
            f"| {max(floor, arith) / adamw:.2f} | {in_cache(f'{c.name} in cache')} | {measured * 1e3:.2f} "
            f"| {measured / adamw:.2f} | {target} |"
        )


if __name__ == "__main__":
    main()
