"""Every benchmark script still runs end to end, at a toy size, and reports what it claims to.

The figures in docs/benchmarks.md come from these scripts at full size; a script broken since would leave
them unreproducible. Timings and losses are never asserted; state bytes are, since they are exact.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    command = [sys.executable, str(REPO / "benchmarks" / script), *args]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def table(stdout: str) -> list[list[str]]:
    """The body rows of the Markdown table(s) in ``stdout``, as lists of cells."""
    rows = []
    for line in stdout.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if all(set(c) <= set("-: ") for c in cells):
            continue  # the separator line
        rows.append(cells)
    return rows[1:] if rows else rows


def by_name(rows: list[list[str]], key_columns: int = 1) -> dict[str, list[str]]:
    return {" / ".join(r[:key_columns]): r for r in rows}


def number(cell: str) -> float:
    return float(cell.split()[0].replace(",", "").rstrip("x"))


def test_bench_step(tmp_path):
    out = run("bench_step.py", "--quick", "--no-peers", "--plot", str(tmp_path / "step.png"), cwd=tmp_path)
    rows = by_name(table(out), 2)
    # 2 weights of 128 x 256: AdamW's fp32 moments are 2 x 2 x 32768 x 4 bytes = 0.5 MiB; FOAM B=4 folds them
    # to a quarter, bf16 states halve that again (the state column is in MiB, one decimal).
    assert number(rows["torch AdamW fused / fp32"][5]) == 0.5
    assert number(rows["FOAM fused B=4 / fp32"][5]) == 0.1  # 0.125 MiB
    assert number(rows["FOAM fused B=32 / fp32"][5]) == 0.0  # 0.016 MiB
    assert number(rows["FOAM default B=4, bf16 states / fp32"][5]) == 0.1  # 0.0625 MiB
    assert number(rows["FOAM fused B=4 / fp32"][6]) == 0.0  # the fused step allocates nothing of parameter size
    assert (tmp_path / "step.png").stat().st_size > 0


def test_bench_quality_caches_every_run(tmp_path):
    args = ["--model-size", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--lrs", "1e-3"]
    args += ["--seeds", "2", "--workers", "1", "--only", "AdamW", "FOAM B=4", "--output-dir", "out"]
    rows = by_name(table(run("bench_quality.py", *args, cwd=tmp_path)))
    assert set(rows) == {"AdamW", "FOAM B=4"}
    assert number(rows["AdamW"][-3]) == 1.0 and number(rows["FOAM B=4"][-3]) < 0.35  # state bytes vs AdamW
    runs = tmp_path / "out" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == [
        "AdamW_lr0.001_seed0.json",
        "AdamW_lr0.001_seed1.json",
        "FOAM_B_4_lr0.001_seed0.json",
        "FOAM_B_4_lr0.001_seed1.json",
    ]
    assert (tmp_path / "out" / "quality.json").exists() and (tmp_path / "out" / "quality.png").exists()
    # A rerun of the same command finds every run cached and trains nothing: the files stay as they were.
    stamps = {p.name: p.stat().st_mtime_ns for p in runs.iterdir()}
    run("bench_quality.py", *args, cwd=tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in runs.iterdir()} == stamps


def test_bench_trainer(tmp_path):
    args = ["--hidden", "64", "--layers", "1", "--vocab", "256", "--seq", "32", "--batch", "2", "--steps", "2"]
    rows = by_name(table(run("bench_trainer.py", *args, "--threads", "1", cwd=tmp_path)))
    assert set(rows) == {"adamw_torch", "foam", "foam_layerwise"}
    assert number(rows["foam"][1]) < number(rows["adamw_torch"][1])
    assert rows["foam"][1] == rows["foam_layerwise"][1]  # the same states, stepped inside backward


def test_bench_lora(tmp_path):
    args = ["--ranks", "4", "--seeds", "0", "--steps", "2", "--base-steps", "2", "--max-files", "5"]
    args += ["--variants", "adamw", "foam B=4", "foam B=4, lora_A only", "--eval-batches", "2"]
    args += ["--batch-size", "2", "--seq-len", "32", "--threads", "1"]
    rows = by_name(table(run("bench_lora.py", *args, cwd=tmp_path)), 2)
    adamw, both, lora_a = (number(rows[f"4 / {v}"][5]) for v in ("adamw", "foam B=4", "foam B=4, lora_A only"))
    assert both < lora_a < adamw
    assert number(rows["4 / foam B=4"][6]) < 0.26  # both adapter matrices folded by 4


def test_bench_zero_memory_predicts_fewer_bytes_per_rank_than_adamw(tmp_path):
    rows = table(run("bench_zero_memory.py", "--toy", cwd=tmp_path))
    assert [(r[0], r[1]) for r in rows] == [("2", "2"), ("2", "3")]
    for _, _, adamw, foam, _, all_ranks, one_process in rows:
        adamw, foam, all_ranks, one_process = (int(v.replace(",", "")) for v in (adamw, foam, all_ranks, one_process))
        assert foam < adamw
        # Over all ranks FOAM holds at least its one-process states: the split only adds copies and padding.
        assert one_process <= all_ranks <= 2 * foam
