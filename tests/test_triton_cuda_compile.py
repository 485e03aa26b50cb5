"""FOAM's Triton kernels compile for CUDA GPUs as its CUDA step launches them, checked on a machine without one.

Triton's interpreter (tests/test_fused_triton.py) runs the kernels as NumPy code, so a kernel can pass there
that a GPU compiler refuses. tests/_scripts/compile_triton_for_cuda.py records every launch of a step over a mixed
list (folded and unfolded tensors, launches of their own and shared ones, every parameter and moment dtype,
fp32 gradients of bf16 parameters, B = 1, 3 and 4) and compiles each to a cubin for A100 (sm_80) and H100/H200
(sm_90) with the ptxas that ships with Triton, with the argument types and alignments Triton's launcher would
give it. It runs in a subprocess without ``TRITON_INTERPRET``, which the rest of the test session sets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "_scripts" / "compile_triton_for_cuda.py"
KERNELS = {"_foam_fold_kernel", "_foam_fold_list_kernel", "_adamw_kernel", "_adamw_list_kernel"}


def grad_and_weight_dtypes(entry: dict) -> tuple[str, str]:
    """The (gradient, weight) dtypes of a compiled launch: its pointer arguments' types (``*bf16``) for a launch of
    its own, the GRAD_DTYPE and PARAM_DTYPE constants (``bf16``) for a shared one."""
    signature, constexprs = entry["signature"], entry["constexprs"]
    if "g_ptr" in signature:
        return signature["g_ptr"].lstrip("*"), signature["w_ptr"].lstrip("*")
    return constexprs["GRAD_DTYPE"], constexprs["PARAM_DTYPE"]


def test_every_launch_compiles_for_sm80_and_sm90_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    out = tmp_path / "compiled.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = json.loads(out.read_text())
    for target in ("sm_80", "sm_90"):
        assert {entry["kernel"] for entry in compiled if entry["target"] == target} == KERNELS
        # fp32 gradients of bf16 parameters compile in both kinds of launch, not only gradients of the weight's dtype
        for kernel in KERNELS:
            assert any(
                entry["target"] == target
                and entry["kernel"] == kernel
                and grad_and_weight_dtypes(entry) == ("fp32", "bf16")
                for entry in compiled
            ), kernel
            # and bf16 weights with stochastic rounding (weight_rounding="stochastic"), in every kernel
            assert any(
                entry["target"] == target
                and entry["kernel"] == kernel
                and entry["constexprs"].get("STOCHASTIC_WEIGHTS") == "True"
                for entry in compiled
            ), kernel
    for entry in compiled:
        # every launch asks for no a·b + c contraction (as the interpreter computes), and got a cubin; the folded
        # kernels name their warps (4 for these tiles of at most 2048 entries: Triton's default)
        folded = entry["kernel"].startswith("_foam_fold")
        assert entry["options"] == {"enable_fp_fusion": False, **({"num_warps": 4} if folded else {})}
        assert entry["cubin_bytes"] > 0
        # the rounding hash's keys are int32 at every step (one compilation for all of them)
        assert entry["signature"]["key_m"] == entry["signature"]["key_v"] == entry["signature"]["key_w"] == "i32", entry
        # A tensor with a launch of its own (aligned, as torch allocates), and shared launches of tensors promised
        # aligned (rows or entries a multiple of 16) load 8 or 16 bytes at a time, but where B = 3 pads the tile.
        own = not entry["kernel"].endswith("_list_kernel")
        promised = entry["constexprs"].get("ALIGNED") == "True" and entry["constexprs"].get("B") != "3"
        vector_loads = any(".v2." in load or ".v4." in load for load in entry["loads"])
        assert vector_loads == (own or promised), entry
