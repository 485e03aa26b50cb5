"""benchmarks/gpu_check.py keeps working on machines without a GPU: its arguments, its clean exit without CUDA,
and its parity harness, which runs the Triton kernels in Triton's interpreter at toy size (tests/conftest.py
sets TRITON_INTERPRET=1) and must report a wrong kernel as a failure. What it measures on a GPU is not tested
here (docs/benchmarks.md says whether it has run on one)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import _helpers
import pytest
import torch

from foam_hf.tools.model_shapes import KNOWN_MODELS

_fused_triton = _helpers._fused_triton  # imported only now: after tests/conftest.py set TRITON_INTERPRET

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str, interpret: bool, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_arguments_and_quick_sizes():
    gpu_check = load_script()
    args = gpu_check.parse_args(["--out", "x"])
    assert args.block_sizes == [1, 2, 3, 4, 8, 16, 32, 64] and args.dtypes == ["fp32", "bf16", "fp16"]
    assert args.state_dtypes == ["fp32", "bf16"] and (args.n_weights, args.size) == (8, 4096)
    quick = gpu_check.parse_args(["--quick", "--block-sizes", "3", "32"])
    assert quick.block_sizes == [3] and quick.size == 256 and quick.trainer_steps == 3
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--dtypes", "fp8"])
    # The step is timed on 8 x 4096² and on a real model's list of tensors (where a launch per tensor shows):
    # Qwen2.5-0.5B has tied embeddings, a final norm, and per layer 7 weights, q/k/v biases and 2 norms.
    (big_name, big), (model_name, shapes) = gpu_check.shape_sets(args)
    assert big == [(4096, 4096)] * 8 and big_name == "8 x 4096²"
    layers = KNOWN_MODELS["qwen2.5-0.5b"]["num_hidden_layers"]
    assert len(shapes) == 2 + 12 * layers and model_name == f"qwen2.5-0.5b ({len(shapes)} tensors)"
    assert sum(len(shape) == 1 for shape in shapes) == 1 + 5 * layers  # norms and biases: never folded
    assert [name for name, _ in gpu_check.shape_sets(quick)] == ["2 x 256²"]  # --quick: no model


def test_the_launch_policy_rows_step_with_their_threshold_and_put_the_default_back():
    gpu_check = load_script()
    default = _fused_triton._SHARED_MAX_ENTRIES
    seen = []

    class Recorder:
        def step(self):
            seen.append(_fused_triton._SHARED_MAX_ENTRIES)

    for entries in (0, sys.maxsize):
        gpu_check.with_shared_max_entries(lambda params: Recorder(), entries)([]).step()
    assert seen == [0, sys.maxsize] and _fused_triton._SHARED_MAX_ENTRIES == default > 0
    names = [name for name, _ in gpu_check.step_candidates()]
    assert {
        "FOAM Triton B=4",
        "FOAM Triton B=4, a launch per tensor",
        "FOAM Triton B=4, all in shared launches",
    } <= set(names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_exits_with_a_clear_message(tmp_path):
    proc = run("--out", str(tmp_path / "out"), interpret=False, cwd=tmp_path)
    assert proc.returncode == 1
    assert "no CUDA device here" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written that could pass for results


def test_interpreter_run_writes_parity_and_trainer_results(tmp_path):
    out = tmp_path / "out"
    proc = run(
        "--interpret", "--quick", "--block-sizes", "3", "--dtypes", "fp32", "bf16", "--out", str(out),
        "--trainer-steps", "2",
        interpret=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    # the interpreter is slow: 1 block size (3: a padded tile, ragged rows) x 2 parameter dtypes x 2 state dtypes,
    # then what that grid holds fixed, at B=4: the other second moment, scale and res_scale, fp32 gradients of
    # bf16 weights, stochastically rounded bf16 weights; and a block wider than a 2048-entry tile
    cases = {(r["block_size"], r["dtype"], r["state_dtype"], r["variant"]) for r in results["parity"]}
    pairs = [(d, s) for d in ("float32", "bfloat16") for s in ("float32", "bfloat16")]
    expected = {(3, d, s, "") for d, s in pairs}
    expected |= {(4, d, s, v) for d, s in pairs for v in ("second_moment=sq_mean", "scale=0.5, res_scale=0.5")}
    expected |= {(4, "bfloat16", s, "grad_dtype=float32") for s in ("float32", "bfloat16")}
    expected |= {(4, "bfloat16", s, "weight_rounding=stochastic") for s in ("float32", "bfloat16")}
    expected |= {(4096, "float32", s, "") for s in ("float32", "bfloat16")}
    assert cases == expected
    assert all(r["pass"] for r in results["parity"]), results["parity"]
    # a share of stochastically rounded entries on the other neighbour: bf16 weights under "stochastic", bf16 moments
    rounds = [r for r in results["parity"] if "weight_rounding" in r["variant"] or r["state_dtype"] == "bfloat16"]
    assert len(rounds) == 10 and all(0 <= r["max_rounded_otherwise"] <= 1 / 16 for r in rounds)
    assert {r["max_rounded_otherwise"] for r in results["parity"] if r not in rounds} == {None}
    assert results["steps"] == []  # step time and CUDA memory need a GPU
    trainer = results["trainer"]
    assert trainer["steps"] == 2 and trainer["all_finite"]
    # on CPU the C++ kernel steps (where a compiler builds it); on a GPU this would name the Triton path
    fused = bool(shutil.which("c++") or shutil.which("g++"))
    assert trainer["implementations"] == (["fused_cpu"] if fused else ["single_tensor"])
    assert results["errors"] == {}
    # what `foam-hf env` reports, recorded with the results: the same path the Trainer run took
    assert results["environment"]["default_paths"]["cpu, float32 parameters"] == (
        "fused_cpu" if fused else "single_tensor"
    )
    assert (out / "results.md").read_text() in proc.stdout


def test_parity_harness_reports_a_wrong_kernel(monkeypatch):
    gpu_check = load_script()
    real = _fused_triton._fused_foam_triton

    def wrong(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs):
        real(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)
        params[0].mul_(1.01)  # 1 % off: what a miscompiled kernel might do

    monkeypatch.setattr(_fused_triton, "_fused_foam_triton", wrong)
    row = gpu_check.parity_case(torch.device("cpu"), gpu_check.QUICK_SHAPES, 4, torch.float32, None, steps=1)
    assert not row["pass"] and row["max_weight_gap"] > 1e-3


def test_parity_harness_reports_stochastic_weights_rounded_with_another_dither(monkeypatch):
    # Within a bf16 spacing of the readable path's, every weight passes its tolerance: the share rounded to the other
    # neighbour (a third of them under an unrelated dither) is what fails the row.
    gpu_check = load_script()
    monkeypatch.setattr(_fused_triton, "_SALTS", (0, 1, 1))  # the weights drawn with exp_avg_sq's salt
    args = (torch.device("cpu"), gpu_check.QUICK_SHAPES, 4, torch.bfloat16, "bfloat16")
    row = gpu_check.parity_case(*args, steps=1, weight_rounding="stochastic")
    assert not row["pass"] and row["max_rounded_otherwise"] > 1 / 16 and row["max_weight_gap"] <= 2**-6
    assert row["variant"] == "weight_rounding=stochastic"
    monkeypatch.undo()
    assert gpu_check.parity_case(*args, steps=1, weight_rounding="stochastic")["pass"]


def test_parity_harness_passes_a_moment_rounded_to_its_bf16_neighbour(monkeypatch):
    # On a GPU the kernels' fp32 moments are an ulp or so from torch's, and stochastic rounding now and then lands
    # a bf16 moment on the neighbouring value: within tolerance, and each step starts from the same inputs, so the
    # next step's weights are too. Before, the neighbour moved the next weights beyond tolerance: a false failure.
    gpu_check = load_script()
    real = _fused_triton._fused_foam_triton

    def neighbour(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs):
        real(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)
        for m in exp_avgs:
            if m.dim() >= 2:
                m.view(torch.int16).view(-1)[0] += 1  # one entry one bf16 spacing further from zero

    monkeypatch.setattr(_fused_triton, "_fused_foam_triton", neighbour)
    row = gpu_check.parity_case(torch.device("cpu"), gpu_check.QUICK_SHAPES, 4, torch.float32, "bfloat16", steps=3)
    assert row["pass"] and 0 < row["max_moment_rel_gap"] <= 2**-7


def test_a_failing_section_is_recorded_and_the_others_still_run(monkeypatch, tmp_path):
    gpu_check = load_script()

    def broken(*args, **kwargs):
        raise RuntimeError("no such device function")

    monkeypatch.setattr(gpu_check, "trainer_run", broken)
    out = tmp_path / "out"
    argv = ["--interpret", "--quick", "--block-sizes", "4", "--dtypes", "fp32", "--state-dtypes", "fp32"]
    assert gpu_check.main([*argv, "--trainer-steps", "1", "--out", str(out)]) == 1
    results = json.loads((out / "results.json").read_text())
    assert (
        set(results["errors"]) == {"trainer"}
        and "RuntimeError: no such device function" in results["errors"]["trainer"]
    )
    assert results["parity"] and all(r["pass"] for r in results["parity"]) and "environment" in results
    assert "Section 'trainer' failed" in (out / "results.md").read_text()


def test_a_step_path_that_fails_gets_a_row_and_the_others_are_kept(monkeypatch):
    # The step section returned its rows only at the end: one failing path among 40 lost every row. CUDA's timing
    # and memory calls are faked on CPU here: the test is about the section's bookkeeping, not about a GPU.
    gpu_check = load_script()

    class Event:
        def __init__(self, **kwargs):
            self.t = 0.0

        def record(self):
            import time

            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    for name, fake in {
        "synchronize": lambda device=None: None,
        "memory_allocated": lambda device=None: 0,
        "max_memory_allocated": lambda device=None: 0,
        "reset_peak_memory_stats": lambda device=None: None,
        "empty_cache": lambda: None,
        "Event": Event,
    }.items():
        monkeypatch.setattr(torch.cuda, name, fake)

    def broken(params):
        raise RuntimeError("no kernel image is available")

    candidates = [("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, fused=True)), ("broken", broken)]
    monkeypatch.setattr(gpu_check, "step_candidates", lambda: candidates)
    args = gpu_check.parse_args(["--quick"])
    rows = []
    gpu_check.time_and_memory(args, torch.device("cpu"), rows)
    assert [(r["path"], r["dtype"]) for r in rows] == [
        (n, d) for d in ("bf16", "fp32") for n in ("torch AdamW fused", "broken")
    ]
    assert all(r["ratio_to_adamw_fused"] == 1.0 for r in rows if r["path"] == "torch AdamW fused")
    assert all("no kernel image is available" in r["error"] for r in rows if r["path"] == "broken")
    assert "**failed**: RuntimeError: no kernel image" in gpu_check.markdown(
        dict(date="d", device="x", torch="t", triton="t", git="g", parity=[], steps=rows, trainer=None)
    )
