"""Every benchmark script still runs end to end, at a toy size, and reports what it claims to.

The figures in docs/benchmarks.md come from these scripts at full size; a script broken since would leave
them unreproducible. Timings and losses are never asserted; state bytes are, byte for byte, against counts
computed here from the parameter shapes.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    command = [sys.executable, str(REPO / "benchmarks" / script), *args]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def load_script(script: str):
    """A benchmark script as a module (its main() not run), to call its parse_args in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), REPO / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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


def foam_state_bytes_from_shapes(shapes: list[tuple[int, ...]], block_size: int, entry_bytes: int = 4) -> int:
    """Two moments of ``rows * ceil(cols / B)`` entries per 2-D weight plus a 4-byte step, from the maths."""
    return sum(2 * math.prod(s[:-1]) * math.ceil(s[-1] / block_size) * entry_bytes + 4 for s in shapes)


def test_bench_step(tmp_path):
    out = run(
        "bench_step.py",
        "--quick",
        "--no-peers",
        "--plot",
        str(tmp_path / "step.png"),
        "--json",
        "step.json",
        cwd=tmp_path,
    )
    assert "| FOAM fused B=4 | fp32 |" in out
    report = json.loads((tmp_path / "step.json").read_text())
    shape = report["shape"]
    assert (shape["n_weights"], shape["rows"], shape["cols"]) == (2, 128, 256)  # what --quick promises
    shapes = [(128, 256)] * 2
    rows = {(r["name"], r["dtype"]): r for r in report["rows"]}
    for dtype, param_bytes in (("fp32", 2 * 128 * 256 * 4), ("bf16", 2 * 128 * 256 * 2)):
        for b in (2, 4, 8, 32):
            row = rows[(f"FOAM fused B={b}", dtype)]
            assert row["state_bytes"] == foam_state_bytes_from_shapes(shapes, b)  # fp32 moments whatever the weights
            assert row["transient_bytes"] == 0  # the fused step allocates nothing through torch's allocator
        assert rows[("FOAM default B=4, bf16 states", dtype)]["state_bytes"] == foam_state_bytes_from_shapes(
            shapes, 4, entry_bytes=2
        )
        for path in ("FOAM foreach B=4", "FOAM reference (for-loop) B=4", "FOAM default (fused=None) B=4"):
            assert rows[(path, dtype)]["state_bytes"] == foam_state_bytes_from_shapes(shapes, 4)
        # AdamW: two unfolded moments in the weights' dtype (plus whatever torch keeps for the step count).
        adamw = rows[("torch AdamW fused", dtype)]["state_bytes"]
        assert 2 * param_bytes <= adamw <= 2 * param_bytes + 64 * len(shapes)
    for b in (2, 4, 8, 32):  # the fused stochastic rows follow --block-sizes, as the fused ones do
        row = rows[(f"FOAM fused B={b}, stochastic weights", "bf16")]
        assert row["state_bytes"] == foam_state_bytes_from_shapes(shapes, b)
        assert row["transient_bytes"] == 0
    for path in ("FOAM fused B=4, stochastic weights", "FOAM foreach B=4, stochastic weights"):
        assert rows[(path, "bf16")]["state_bytes"] == foam_state_bytes_from_shapes(shapes, 4)
        assert (path, "fp32") not in rows  # nothing to round: the option is refused for fp32 weights
    assert (tmp_path / "step.png").stat().st_size > 0


def test_bench_step_with_peers_on_bf16_weights_only(tmp_path):
    # The GPU command in docs/benchmarks.md (--dtypes bf16, peers on) raised KeyError 'fp32' after every timing:
    # the peers run on fp32 weights, whose bytes and AdamW baseline were not measured.
    out = run(
        "bench_step.py",
        "--quick",
        "--dtypes",
        "bf16",
        "--block-sizes",
        "4",
        "--no-reference",
        "--json",
        "s.json",
        cwd=tmp_path,
    )
    rows = {(r["name"], r["dtype"]) for r in json.loads((tmp_path / "s.json").read_text())["rows"]}
    assert ("torch AdamW fused", "fp32") in rows and ("FOAM fused B=4", "bf16") in rows
    assert ("transformers Adafactor", "fp32") in rows, rows
    assert "| transformers Adafactor | fp32 |" in out


def test_bench_step_steps_every_parameter_of_a_model(tmp_path):
    """--model: the parameters of a model config (a built-in name, or here a config.json written from a
    LlamaConfig), built on the meta device; the state bytes follow its shapes, 1-D tensors unfolded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2
    )
    config.save_pretrained(tmp_path / "tiny-llama")
    args = ["--quick", "--model", str(tmp_path / "tiny-llama"), "--dtypes", "fp32", "--block-sizes", "4"]
    out = run("bench_step.py", *args, "--no-reference", "--plot", "", "--json", "step.json", cwd=tmp_path)
    shapes = [tuple(p.shape) for p in LlamaForCausalLM(config).parameters()]
    assert f"the {len(shapes)} parameters of {tmp_path / 'tiny-llama'}" in out
    assert "peers: not run with --model" in out
    report = json.loads((tmp_path / "step.json").read_text())
    assert [tuple(s) for s in report["shape"]["shapes"]] == shapes
    rows = {r["name"]: r for r in report["rows"]}
    # Written from the rule: a tensor of >= 2 dims keeps rows x ceil(n / 4) entries per moment, others n.
    entries = sum(math.prod(s[:-1]) * -(-s[-1] // 4) if len(s) >= 2 else s[0] for s in shapes)
    assert rows["FOAM fused B=4"]["state_bytes"] == 8 * entries + 4 * len(shapes)  # two fp32 moments, the steps
    assert rows["FOAM fused B=4"]["transient_bytes"] == 0


def test_bench_quality_trains_through_optim_foam_and_caches_every_run(tmp_path):
    from transformers import TrainingArguments

    from foam_hf.integration import optimizer_cls_and_kwargs
    from foam_hf.tools.demo_training import build_model

    args = ["--model-size", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--lrs", "1e-3"]
    args += ["--seeds", "2", "--workers", "1", "--only", "AdamW", "FOAM B=4", "--output-dir", "out"]
    stdout = run("bench_quality.py", *args, cwd=tmp_path)
    rows = by_name(table(stdout))
    assert set(rows) == {"AdamW", "FOAM B=4"}
    assert rows["FOAM B=4"][1] == 'optim="foam"' and rows["AdamW"][1].startswith('optim="adamw_torch')
    assert 'FOAM through optim="foam"' in stdout

    report = json.loads((tmp_path / "out" / "quality.json").read_text())
    by_row = {r["name"]: r for r in report["rows"]}
    model = build_model("tiny", seed=0, seq_len=32)
    # Written here from the rule, not with foam_hf: the weights of linear layers other than the output head fold.
    folded = {
        f"{name}.weight": m.weight
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"
    }
    adamw_bytes = sum(8 * p.numel() + 4 for p in model.parameters())
    foam_bytes = foam_state_bytes_from_shapes([tuple(p.shape) for p in folded.values()], 4) + sum(
        8 * p.numel() + 4 for n, p in model.named_parameters() if n not in folded
    )
    assert by_row["AdamW"]["state_bytes"] == adamw_bytes
    assert by_row["FOAM B=4"]["state_bytes"] == foam_bytes
    assert by_row["FOAM B=4"]["adamw_state_bytes"] == adamw_bytes
    # One folding rule: the benchmark's FOAM groups are those TrainingArguments(optim="foam") builds.
    user = TrainingArguments(output_dir=str(tmp_path / "u"), optim="foam", optim_args="block_size=4", report_to=[])
    _, kwargs = optimizer_cls_and_kwargs(user, model)
    expected_groups = [
        {"params": sum(p.numel() for p in g["params"]), "tensors": len(g["params"]), "block_size": g["block_size"]}
        for g in kwargs["params"]
    ]
    assert by_row["FOAM B=4"]["groups"] == expected_groups
    assert sum(g["params"] for g in expected_groups if g["block_size"] == 4) == sum(p.numel() for p in folded.values())

    runs = tmp_path / "out" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == [
        "AdamW_lr0.001_seed0.json",
        "AdamW_lr0.001_seed1.json",
        "FOAM_B_4_lr0.001_seed0.json",
        "FOAM_B_4_lr0.001_seed1.json",
    ]
    assert (tmp_path / "out" / "quality.png").exists()
    # A rerun of the same command finds every run cached and trains nothing: the files stay as they were.
    stamps = {p.name: p.stat().st_mtime_ns for p in runs.iterdir()}
    run("bench_quality.py", *args, cwd=tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in runs.iterdir()} == stamps


def test_bench_quality_trains_bf16_weights_and_rounds_them_stochastically_only_there(tmp_path):
    from foam_hf.tools.demo_training import build_model

    args = ["--model-size", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--lrs", "1e-3"]
    args += ["--seeds", "1", "--workers", "1", "--output-dir", "out", "--weights-dtype", "bfloat16"]
    args += ["--only", "AdamW", "FOAM B=4 stochastic weights"]
    stdout = run("bench_quality.py", *args, cwd=tmp_path)
    assert set(by_name(table(stdout))) == {"AdamW", "FOAM B=4 stochastic weights"}
    assert "bfloat16 weights" in stdout
    report = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert report["meta"]["config"]["weights_dtype"] == "bfloat16"
    by_row = {r["name"]: r for r in report["rows"]}
    model = build_model("tiny", seed=0, seq_len=32)
    # torch's AdamW keeps bf16 moments for bf16 weights (2 + 2 bytes an entry); FOAM fp32 ones, folded in the
    # linear layers but the output head (written here from the rule, as above).
    folded = {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"
    }
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert by_row["AdamW"]["state_bytes"] == sum(4 * math.prod(s) + 4 for s in shapes.values())
    assert by_row["FOAM B=4 stochastic weights"]["state_bytes"] == foam_state_bytes_from_shapes(
        [shapes[n] for n in folded], 4
    ) + sum(8 * math.prod(s) + 4 for n, s in shapes.items() if n not in folded)

    # With fp32 weights there is nothing to round: the configuration is left out, saying why.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    fp32 = [arg for arg in args if arg not in ("--weights-dtype", "bfloat16")]
    fp32[fp32.index("out")] = "out32"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_quality.py"), *fp32],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(by_name(table(proc.stdout))) == {"AdamW"}
    assert "FOAM B=4 stochastic weights: needs --weights-dtype bfloat16" in proc.stderr


def test_bench_trainer(tmp_path):
    args = ["--hidden", "64", "--layers", "1", "--vocab", "256", "--seq", "32", "--batch", "2", "--steps", "2"]
    out = run("bench_trainer.py", *args, "--threads", "1", cwd=tmp_path)
    rows = by_name(table(out))
    assert set(rows) == {"adamw_torch_fused", "foam", "foam_layerwise"}  # the baseline is the fused AdamW
    assert number(rows["foam"][1]) < number(rows["adamw_torch_fused"][1])
    assert rows["foam"][1] == rows["foam_layerwise"][1]  # the same states, stepped inside backward
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    assert f"Date {datetime.date.today()}, " in out and f"git {sha.strip()};" in out and "1 threads" in out


def test_bench_lora(tmp_path):
    from peft import LoraConfig, get_peft_model

    from foam_hf.tools.demo_training import build_model

    args = ["--ranks", "4", "--seeds", "0", "--steps", "2", "--base-steps", "2", "--max-files", "5"]
    args += ["--variants", "adamw", "foam B=4", "foam B=4, lora_A only", "--eval-batches", "2"]
    args += ["--batch-size", "2", "--seq-len", "32", "--threads", "1"]
    out = run("bench_lora.py", *args, cwd=tmp_path)
    # Started outside the repository, it still names the commit it ran (it printed "git n/a" before).
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    assert sha.strip() and f"git {sha.strip()} " in out
    rows = by_name(table(out), 2)
    adamw, both, lora_a = (int(number(rows[f"4 / {v}"][5])) for v in ("adamw", "foam B=4", "foam B=4, lora_A only"))

    # The adapters' shapes, from the same PEFT model built here: lora_A is r x in, lora_B is out x r.
    model = get_peft_model(build_model("tiny", seed=0, seq_len=32), LoraConfig(r=4, target_modules="all-linear"))
    adapters = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    a_shapes = [s for n, s in adapters.items() if "lora_A" in n]
    b_shapes = [s for n, s in adapters.items() if "lora_B" in n]
    assert a_shapes and len(a_shapes) == len(b_shapes) == len(adapters) // 2
    assert both == foam_state_bytes_from_shapes(a_shapes + b_shapes, 4)
    assert lora_a == foam_state_bytes_from_shapes(a_shapes, 4) + foam_state_bytes_from_shapes(b_shapes, 1)
    unfolded = foam_state_bytes_from_shapes(a_shapes + b_shapes, 1)
    assert unfolded <= adamw <= unfolded + 64 * len(adapters)  # AdamW: two full moments per adapter matrix


def test_bench_zero_memory_predicts_fewer_bytes_per_rank_than_adamw(tmp_path):
    rows = table(run("bench_zero_memory.py", "--toy", cwd=tmp_path))
    assert [(r[0], r[1]) for r in rows] == [("2", "2"), ("2", "3")]
    for _, _, adamw, foam, _, all_ranks, one_process in rows:
        adamw, foam, all_ranks, one_process = (int(v.replace(",", "")) for v in (adamw, foam, all_ranks, one_process))
        assert foam < adamw
        # Over all ranks FOAM holds at least its one-process states: the split only adds copies and padding.
        assert one_process <= all_ranks <= 2 * foam


def test_bench_kernel_floor_counts_each_steps_bytes(tmp_path):
    out = run("bench_kernel_floor.py", "--quick", cwd=tmp_path)
    rows = by_name(table(out))
    # Bytes per parameter entry, from what each step reads and writes: G, W twice, and the two moments twice
    # each, at every entry (AdamW, states in the parameters' dtype) or at 1/B of them (FOAM).
    expected = {
        "AdamW fused, fp32 params": 4 + 2 * 4 + 4 * 4,
        "AdamW fused, bf16 params": 2 + 2 * 2 + 4 * 2,
        "FOAM B=4, fp32 params": 4 + 2 * 4 + 4 * 4 / 4,
        "FOAM B=8, fp32 params": 4 + 2 * 4 + 4 * 4 / 8,
        "FOAM B=4, bf16 params": 2 + 2 * 2 + 4 * 4 / 4,
        "FOAM B=8, bf16 params": 2 + 2 * 2 + 4 * 4 / 8,
        "FOAM B=4, fp32 params, bf16 states": 4 + 2 * 4 + 4 * 2 / 4,
        "FOAM B=4, bf16 params, bf16 states": 2 + 2 * 2 + 4 * 2 / 4,
    }
    assert {name: number(row[1]) for name, row in rows.items()} == expected
    assert "Arithmetic floor" in out and "fused kernel:" in out


def test_bench_kernel_compute_has_a_column_per_implementation_this_cpu_runs(tmp_path):
    from _helpers import _fused_cpu

    kernel = _fused_cpu.load_kernel()
    assert kernel is not None, _fused_cpu.kernel_build_error()
    # --quick makes the run small, but a size given on the command line wins (it used to be overridden)
    out = run("bench_kernel_compute.py", "--quick", "--block-sizes", "4", "8", cwd=tmp_path)
    header = next(line for line in out.splitlines() if line.startswith("| step |"))
    isas = list(kernel.available_isas())
    assert header == "| step | params | states | " + "".join(f"{i} (ps/entry) | " for i in isas) + (
        "torch AdamW fused (ps/entry) |"
    )
    rows = table(out)
    assert [r[:3] for r in rows] == [
        ["FOAM B=4", "fp32", "fp32"],
        ["FOAM B=8", "fp32", "fp32"],
        ["FOAM B=4", "bf16", "fp32"],
        ["FOAM B=8", "bf16", "fp32"],
        ["FOAM B=4", "fp32", "bf16"],  # bf16 states at B=4 only
        ["FOAM B=4", "bf16", "bf16"],
    ]
    assert all(len(r) == 3 + len(isas) + 1 for r in rows)
    chosen = os.environ.get("FOAM_CPU_ISA", "").strip().lower() or isas[-1]  # the best this CPU runs, unless set
    assert f"the CPU's choice: {chosen}" in out


def test_bench_kernel_compute_times_fp64_on_request(tmp_path):
    out = run("bench_kernel_compute.py", "--quick", "--block-sizes", "2", "--fp64", cwd=tmp_path)
    rows = table(out)
    assert [r[:3] for r in rows if r[1] == "fp64"] == [["FOAM B=2", "fp64", "fp64"]]
    assert all(float(cell) > 0 for r in rows for cell in r[3:])
    assert "fp64" not in run("bench_kernel_compute.py", "--quick", "--block-sizes", "2", cwd=tmp_path)


@pytest.mark.parametrize(
    "script, given, quick_default",
    [
        ("bench_step.py", ["--rows", "64", "--reps", "2"], ("cols", 256)),
        ("bench_kernel_floor.py", ["--rows", "64", "--reps", "2"], ("cols", 256)),
        ("bench_kernel_compute.py", ["--copies", "64", "--reps", "2"], ("block_sizes", [4])),
    ],
)
def test_sizes_given_with_quick_win_over_its_smaller_defaults(script, given, quick_default):
    # --quick used to overwrite --rows/--reps given beside it, so a smoke run at a chosen size was impossible.
    module = load_script(script)
    args = vars(module.parse_args(["--quick", *given]))
    for flag, value in zip(given[::2], given[1::2]):
        assert args[flag.removeprefix("--")] == int(value)
    name, value = quick_default  # what --quick still lowers
    assert args[name] == value and module.parse_args([]).__dict__[name] != value


def test_a_quick_bench_step_started_anywhere_leaves_the_published_plot_alone(tmp_path):
    # --plot used to default to docs/benchmarks-step.png relative to the current folder: outside the repository
    # the run ended in FileNotFoundError, and inside it a smoke run replaced the published figure.
    published = REPO / "docs" / "benchmarks-step.png"
    before = published.read_bytes()
    out = run("bench_step.py", "--quick", "--no-peers", "--no-reference", cwd=tmp_path)
    assert "plot written" not in out and table(out)
    assert published.read_bytes() == before and list(tmp_path.iterdir()) == []


def test_bench_startup(tmp_path):
    # Times are not asserted (benchmarks, not timed tests): that both states ran, and the import line.
    out = run("bench_startup.py", "--runs", "2", cwd=tmp_path)
    rows = by_name(table(out))
    assert set(rows) == {"off", "on"} and all(row[-1] == "2" for row in rows.values())
    assert "import foam_hf" in out


def test_bench_step_steps_weights_with_trailing_dimensions(tmp_path):
    # 3x3 kernels fold along their last dimension of 3: at B=8 each row is one block, so FOAM's states are a
    # third of AdamW's (state bytes from the shapes, not from the script).
    out = run("bench_step.py", "--quick", "--no-reference", "--trailing", "3", "3", "--block-sizes", "8",
              "--dtypes", "fp32", "--json", "step.json", cwd=tmp_path)  # fmt: skip
    shapes = [(128, 256, 3, 3)] * 2
    assert "2 weights of 128x256x3x3" in out
    records = {r["name"]: r for r in json.loads((tmp_path / "step.json").read_text())["rows"]}
    assert records["FOAM fused B=8"]["state_bytes"] == foam_state_bytes_from_shapes(shapes, 8)
    assert "peers: not run with --model or --trailing" in out


def test_bench_triton_host_times_the_launchers_python_over_every_parameter(tmp_path):
    # Times are not asserted: that every parameter of the model went through one call, in fewer launches than
    # tensors (shared launches), at least one per tensor of 2**20 entries or more (launches of their own).
    from foam_hf.tools.memory_report import build_meta_model, load_config

    shapes = [tuple(p.shape) for p in build_meta_model(load_config("llama-60m")[0]).parameters()]
    out = run("bench_triton_host.py", "--model", "llama-60m", "--reps", "2", cwd=tmp_path)
    ((tensors, launches, *_),) = table(out)
    assert int(tensors) == len(shapes)
    assert sum(math.prod(s) >= 2**20 for s in shapes) <= int(launches) < len(shapes)
