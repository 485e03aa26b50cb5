"""Compile FOAM's Triton kernels for CUDA GPUs, exactly as its CUDA step launches them, on a machine without one.

    python compile_triton_for_cuda.py out.json [--table]

Triton's interpreter (where the other tests run the kernels) executes them as NumPy code, so a kernel can pass
there and still fail to compile for a GPU. Here every launch that ``_fused_foam_triton`` makes over a mixed list
(folded and unfolded tensors, launches of their own and shared ones; fp32, bf16 and fp16 parameters; fp32 and
bf16 moments; gradients in the parameter's dtype and fp32 gradients of bf16 parameters; B = 1, 3 and 4; bf16
weights rounded to nearest and stochastically) is
recorded instead of run, then compiled down to PTX and a cubin (Triton's own ``ptxas``) for sm_80 (A100) and
sm_90 (H100, H200), with the argument types and 16-byte alignments that Triton's launcher would give it, and the
launch's options (``enable_fp_fusion``). ``out.json`` gets one entry per distinct compilation: the kernel, the
target, the compile-time constants, and the widths of its global loads and stores.

Where Triton's wheel bundles ``cuobjdump`` (3.8 and 3.9 do), each entry also gets the cubin's registers per thread and
local-memory bytes (register spills), and ``--table`` prints them as a Markdown table: a GPU's occupancy and
spills, read without one (informational; the test does not depend on that tool).

Must run without ``TRITON_INTERPRET`` (which turns the kernels into interpreted functions).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_triton_for_cuda.py must run without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton import compile as triton_compile  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from foam_hf import _fused_triton  # noqa: E402
from foam_hf.folding import folded_shape, is_foldable  # noqa: E402

KERNELS = ("_foam_fold_kernel", "_foam_fold_list_kernel", "_adamw_kernel", "_adamw_list_kernel")
TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}
# (parameter dtype, moment dtype, gradient dtype): every pair of parameter and moment dtypes FOAM's CUDA step can be
# asked for, with gradients in the parameter's dtype, and bf16 parameters with fp32 gradients (FSDP2's
# reduce_dtype=torch.float32), whose loads are twice as wide as the weights'.
DTYPES = [
    (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.float32),  # state_dtype="bfloat16" with fp32 master weights
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float16, torch.float32, torch.float16),
    (torch.float16, torch.bfloat16, torch.float16),
    (torch.bfloat16, torch.float32, torch.float32),
]
BLOCK_SIZES = (1, 3, 4)
# Under SHARED_MAX_ENTRIES (64 x 48 = 3072 and 2000 are not): folded and 1-D tensors in both kinds of launch;
# the shared ones with rows or entries a multiple of 16 (ALIGNED launches) and not.
SHAPES = [(64, 48), (5, 7), (8, 32), (2000,), (33,), (48,)]
SHARED_MAX_ENTRIES = 1000


def record_launches() -> list[tuple[str, tuple, dict]]:
    """Every (kernel name, positional arguments, keyword arguments) that one step over SHAPES launches, for each
    of DTYPES and BLOCK_SIZES; nothing runs."""
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, args, kwargs))

    for name in KERNELS:
        setattr(_fused_triton, name, Recorder(name))
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, scale=1.0, res_scale=1.0)
    for dtype, state_dtype, grad_dtype in DTYPES:
        # bf16 weights also under weight_rounding="stochastic", which compiles kernels of their own
        for block_size, weight_rounding in [
            (b, rounding)
            for b in BLOCK_SIZES
            for rounding in (("nearest", "stochastic") if dtype == torch.bfloat16 else ("nearest",))
        ]:
            params = [torch.zeros(s, dtype=dtype) for s in SHAPES]
            states = [folded_shape(p.shape, block_size) if is_foldable(p, block_size) else p.shape for p in params]
            _fused_triton._fused_foam_triton(
                params,
                [torch.zeros_like(p, dtype=grad_dtype) for p in params],
                [torch.zeros(s, dtype=state_dtype) for s in states],
                [torch.zeros(s, dtype=state_dtype) for s in states],
                [torch.tensor(0.0) for _ in params],
                block_size=block_size,
                second_moment="mean_sq",
                weight_rounding=weight_rounding,
                shared_max_entries=SHARED_MAX_ENTRIES,
                **hyper,
            )
    return launches


def compile_spec(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """What Triton's launcher would compile for this launch: (signature, constexprs, attributes, options).
    Tensors are pointers to their dtype, aligned to 16 bytes where their address is (torch's allocations are);
    integers divisible by 16 are marked so, except those the kernel declares ``do_not_specialize`` (the per-step
    keys of the rounding hash), which Triton's launcher passes as plain ints."""
    names = kernel.arg_names
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    signature, constexprs, attrs = {}, {}, {}
    for index, arg_name in enumerate(names):
        value = values[arg_name]
        if arg_name in constexpr_names:
            signature[arg_name] = "constexpr"
            constexprs[(index,)] = value
        else:
            signature[arg_name] = mangle_type(value)
            if kernel.params[index].do_not_specialize:
                continue
            if isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0 or type(value) is int and value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(cubin: bytes) -> dict[str, int | None]:
    """Registers per thread and local-memory bytes (spills) of a cubin's one function, read by the cuobjdump that
    Triton's wheel bundles; ``None`` for both where it is absent or says nothing we can read."""
    unknown = {"registers": None, "local_bytes": None}
    if not CUOBJDUMP.exists():
        return unknown
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        report = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", str(path)], capture_output=True, text=True)
    found = re.search(r"REG:(\d+).*?LOCAL:(\d+)", report.stdout)
    return {"registers": int(found[1]), "local_bytes": int(found[2])} if found else unknown


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| kernel | target | B | params | moments | aligned | registers | local (spill) bytes |",
        "|---|---|---|---|---|---|---:|---:|",
    ]
    for e in results:
        c = e["constexprs"]
        params = "bf16" if c.get("OUT_BF16") == "True" else e["signature"].get("w_ptr", c.get("PARAM_DTYPE", "?"))
        moments = "bf16" if c.get("STATE_BF16") == "True" else "fp32"
        lines.append(
            f"| {e['kernel']} | {e['target']} | {c.get('B', '1')} | {str(params).lstrip('*')} | {moments} "
            f"| {c.get('ALIGNED', 'own launch')} | {e['registers']} | {e['local_bytes']} |"
        )
    return "\n".join(lines)


def main() -> None:
    kernels = {name: getattr(_fused_triton, name) for name in KERNELS}
    launches = record_launches()
    specs = {}
    for name, args, kwargs in launches:
        spec = compile_spec(kernels[name], args, kwargs)
        specs.setdefault(repr((name, spec)), (name, spec))
    results = []
    for name, (signature, constexprs, attrs, options) in specs.values():
        for target_name, target in TARGETS.items():
            source = ASTSource(kernels[name], signature, constexprs, attrs)
            compiled = triton_compile(source, target=target, options=options)
            ptx = compiled.asm["ptx"]
            results.append(
                dict(
                    kernel=name,
                    target=target_name,
                    signature={k: v for k, v in signature.items() if v != "constexpr"},
                    constexprs={kernels[name].arg_names[i[0]]: str(v) for i, v in constexprs.items()},
                    options=options,
                    loads=sorted(set(re.findall(r"ld\.global[.\w]*", ptx))),
                    stores=sorted(set(re.findall(r"st\.global[.\w]*", ptx))),
                    cubin_bytes=len(compiled.asm["cubin"]),
                    **resource_usage(compiled.asm["cubin"]),
                )
            )
    with open(sys.argv[1], "w") as handle:
        json.dump(results, handle, indent=1)
    print(f"{len(launches)} launches recorded, {len(specs)} distinct kernels, {len(results)} compilations")
    if "--table" in sys.argv[2:]:
        print(markdown_table(results))


if __name__ == "__main__":
    main()
