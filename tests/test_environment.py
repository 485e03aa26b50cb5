"""``foam-hf env`` reports what FOAM does on this machine: held to what a real FOAM step runs, to torch's and the
packages' own version numbers, and to the CPU kernel's own answers, not to the report's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import transformers
from _helpers import _fused_cpu

from foam_hf import FOAM, functional
from foam_hf.tools.cli import main


def env_json(capsys) -> dict:
    assert main(["env", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def implementation_a_foam_step_runs(monkeypatch, dtype: torch.dtype) -> str:
    """Step a default FOAM (fused=None) over one small CPU weight and say which implementation stepped it."""
    ran = []
    for name, key in (("_single_tensor_foam", "single_tensor"), ("_multi_tensor_foam", "foreach")):
        original = getattr(functional, name)
        monkeypatch.setattr(functional, name, lambda *a, _k=key, _f=original, **k: ran.append(_k) or _f(*a, **k))
    original_fused = _fused_cpu._fused_foam
    monkeypatch.setattr(_fused_cpu, "_fused_foam", lambda *a, **k: ran.append("fused_cpu") or original_fused(*a, **k))
    weight = torch.nn.Parameter(torch.randn(4, 8).to(dtype))
    weight.grad = torch.ones_like(weight)
    FOAM([weight]).step()
    monkeypatch.undo()
    assert len(ran) == 1
    return ran[0]


def test_the_report_says_which_implementation_a_default_foam_step_runs(capsys, monkeypatch):
    report = env_json(capsys)
    for dtype in (torch.float32, torch.bfloat16):
        claimed = report["default_paths"][f"cpu, {str(dtype).removeprefix('torch.')} parameters"]
        assert claimed == implementation_a_foam_step_runs(monkeypatch, dtype)


def test_the_report_names_the_versions_and_the_kernel_this_process_has(capsys):
    report = env_json(capsys)
    assert report["packages"]["torch"] == torch.__version__ and report["packages"]["transformers"] == (
        transformers.__version__
    )
    kernel = _fused_cpu.load_kernel()
    assert report["cpu_kernel"]["built"] == (kernel is not None)
    if kernel is not None:
        assert report["cpu_kernel"]["isa"] == kernel.isa()
        assert report["cpu_kernel"]["isas"] == list(kernel.available_isas())
    else:
        assert report["cpu_kernel"]["error"] == _fused_cpu.kernel_build_error()
    assert report["cpu_threads"] == torch.get_num_threads()
    if not torch.cuda.is_available():
        assert report["cuda_devices"] == [] and list(report["default_paths"]) == [
            "cpu, float32 parameters",
            "cpu, bfloat16 parameters",
        ]


def test_torchs_version_keeps_its_build_tag_where_the_wheel_metadata_drops_it(capsys, monkeypatch):
    # PyPI's CUDA wheels record "2.14.1" in their metadata while torch.__version__ says "2.14.1+cu130"; the build
    # is what a bug report needs. Here the metadata is made to drop the tag (and to name a version torch is not).
    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1" if name == "torch" else real_version(name))
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    report = env_json(capsys)
    assert report["packages"]["torch"] == "2.14.1+cu130"
    assert report["packages"]["transformers"] == transformers.__version__


def test_the_text_report_follows_foam_cpu_isa(tmp_path):
    # The variable that lowers the kernel's choice is what a user sets to compare paths; the report follows it.
    env = dict(os.environ, FOAM_CPU_ISA="portable")
    proc = subprocess.run(
        [sys.executable, "-m", "foam_hf", "env"], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Fused CPU kernel: built; runs portable" in proc.stdout and "FOAM_CPU_ISA=portable chose it" in proc.stdout
    assert "cpu, float32 parameters: fused C++ kernel (portable)" in proc.stdout
    assert f"torch {torch.__version__}" in proc.stdout


def test_a_foam_cpu_isa_the_kernel_refuses_is_reported_not_a_crash(tmp_path):
    # foam-hf env is what a bug report asks for: it must report a bad FOAM_CPU_ISA, not die of it.
    env = dict(os.environ, FOAM_CPU_ISA="avx3")
    proc = subprocess.run(
        [sys.executable, "-m", "foam_hf", "env"], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "Fused CPU kernel: FOAM: FOAM_CPU_ISA='avx3' is not an implementation" in proc.stdout
    assert "cpu, float32 parameters: refused (FOAM_CPU_ISA, see above)" in proc.stdout
