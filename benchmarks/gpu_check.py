"""The GPU check: everything about FOAM's CUDA path that only a GPU can tell, in one command.

    python benchmarks/gpu_check.py --out gpu-check     # one H100/H200; sized for well under 8 minutes (not yet timed)
    python benchmarks/gpu_check.py --out gpu-check --commit abc1234   # a checkout without .git: name the commit

It prints Markdown tables and writes ``results.json`` and ``results.md`` into ``--out`` after every section (a
failing section is recorded with its traceback and the next one runs; the exit status is 1 if any failed or any
parity case is out of tolerance). First the self-check that ``fused=None`` runs (``triton_ready``), last what
``foam-hf env`` reports (it builds the CPU kernel). ``--device cuda:N`` becomes the current device for the
timings; the Trainer runs on the device it picks (``CUDA_VISIBLE_DEVICES`` chooses it):

1. **parity**: the Triton kernels against the readable path (``_single_tensor_foam``, run on the same GPU)
   over shapes (ragged rows, 1-D, 3-D, n < B), block sizes, parameter dtypes and both state dtypes, 3 steps,
   each from the same inputs on both sides, within the tolerances of tests/test_fused_triton.py (bf16 moments may
   round to the neighbouring bf16 value: ``foam_hf._fused_triton.parity_checks``, what the self-check runs); bf16
   weights under ``weight_rounding="stochastic"`` too, whose share rounded to the other neighbour than the readable
   path's must stay small (a wrong dither puts a third there);
2. **step time**: median CUDA-event time of one ``step()`` on 8 x 4096² weights and on the ~290 parameters of
   Qwen2.5-0.5B (``--model``; where the cost of each launch shows), bf16 and fp32, as a ratio to
   ``torch.optim.AdamW(fused=True)``, for FOAM's Triton path (fp32 and bf16 states; and with a launch per
   tensor, none shared, to say what shared launches save) and its foreach path;
3. **peak transient memory** of every path: ``torch.cuda.max_memory_allocated`` during one step above what was
   allocated before it, in bytes and as a share of the parameter bytes;
4. **Trainer**: a short ``bf16=True`` run of ``transformers.Trainer`` with ``optim="foam"`` on a small Llama
   built from a config (no download), with the losses and which FOAM implementation stepped.

Without CUDA it exits at once with a message saying so. ``--interpret`` runs the parity harness on CPU tensors
in Triton's interpreter instead (set ``TRITON_INTERPRET=1``; toy sizes with ``--quick``), which is how
tests/test_gpu_check.py keeps this script from rotting; it measures nothing of a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's foam_hf, installed or not

from _provenance import git_sha  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_DTYPES = {"fp32": None, "bf16": "bfloat16"}
# Ragged rows (1000, 130 at most B), 1-D (AdamW kernel), 3-D (leading dims as rows), n < B, one long row.
FULL_SHAPES = [(7,), (64, 64), (33, 1000), (3, 5, 130), (2, 3), (1, 70000), (1024, 4096)]
QUICK_SHAPES = [(7,), (6, 8), (5, 9), (2, 3, 10)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check", help="folder for results.json and results.md")
    parser.add_argument("--device", default="cuda", help="the CUDA device to check (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="toy sizes everywhere (a smoke run)")
    parser.add_argument(
        "--interpret", action="store_true", help="parity on CPU in Triton's interpreter (TRITON_INTERPRET=1)"
    )
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16, 32, 64])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"], choices=sorted(DTYPES))
    parser.add_argument("--state-dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(STATE_DTYPES))
    parser.add_argument("--steps", type=int, default=3, help="steps per parity case")
    parser.add_argument("--n-weights", type=int, default=8)
    parser.add_argument("--size", type=int, default=4096, help="timed weights are size x size")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument(
        "--model",
        default="qwen2.5-0.5b",
        help="also time the step over every parameter of this built-in model (its ~290 tensors show the cost of "
        "a kernel launch per tensor; a `foam-hf memory` name or a config.json; '' skips it)",
    )
    parser.add_argument("--trainer-steps", type=int, default=30, help="0 skips the Trainer run")
    parser.add_argument(
        "--commit", default=None, help="the commit to record, where the checkout has no .git (default: git's)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.block_sizes = [b for b in args.block_sizes if b in (1, 3, 4)] or [4]
        args.n_weights, args.size, args.reps, args.steps, args.model = 2, 256, 3, 2, ""
        args.trainer_steps = min(args.trainer_steps, 3)
    return args


# ---------------------------------------------------------------------------- 1. parity


def parity_case(
    device,
    shapes,
    block_size: int,
    dtype: torch.dtype,
    state_dtype: str | None,
    steps: int,
    *,
    second_moment: str = "mean_sq",
    weight_rounding: str = "nearest",
    variant: dict | None = None,
) -> dict:
    """Step the same problem with the Triton kernels and the readable path on ``device``, each step from the same
    inputs (``_fused_triton.parity_checks``, what the self-check runs): the worst gaps, and whether every tensor
    stayed within the tests' tolerances at every step. ``variant``: ``scale``, ``res_scale``, ``grad_dtype``.
    Stochastically rounded entries (bf16 weights under ``weight_rounding="stochastic"``, bf16 moments) also report the
    largest share of a step's weights, or of its moments, that the kernels rounded to the other neighbour than the
    readable path (``None`` where nothing is stochastically rounded)."""
    from foam_hf import _fused_triton

    moment_dtype = torch.bfloat16 if state_dtype == "bfloat16" else torch.float32
    kind = (dtype, moment_dtype, block_size, second_moment, weight_rounding)
    weight_gap = moment_gap = 0.0
    rounded_otherwise = None
    ok = True
    checks = _fused_triton.parity_checks(device, kind, shapes, steps, **(variant or {}))
    for _, name, got, want, atol, rtol in checks:
        got, want = got.float(), want.float()
        ok &= bool(torch.allclose(got, want, atol=atol, rtol=rtol))
        if name == "weight":
            weight_gap = max(weight_gap, (got - want).abs().max().item())
        elif name in (_fused_triton._ROUNDED_OTHERWISE, _fused_triton._MOMENTS_ROUNDED_OTHERWISE):
            rounded_otherwise = max(rounded_otherwise or 0.0, got.item())
        else:
            moment_gap = max(moment_gap, ((got - want).abs() / (want.abs() + 1e-30)).max().item())
    described = {k: str(v).removeprefix("torch.") for k, v in (variant or {}).items()}
    return {
        "block_size": block_size,
        "dtype": str(dtype).removeprefix("torch."),
        "state_dtype": str(moment_dtype).removeprefix("torch."),
        "variant": ", ".join(
            [f"second_moment={second_moment}"] * (second_moment != "mean_sq")
            + [f"weight_rounding={weight_rounding}"] * (weight_rounding != "nearest")
            + [f"{k}={v}" for k, v in described.items()]
        )
        or "",
        "max_weight_gap": weight_gap,
        "max_moment_rel_gap": moment_gap,
        "max_rounded_otherwise": rounded_otherwise,
        "pass": ok,
    }


def check_parity(args, device) -> list[dict]:
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    rows = []
    for block_size, dname, sname in itertools.product(args.block_sizes, args.dtypes, args.state_dtypes):
        rows.append(parity_case(device, shapes, block_size, DTYPES[dname], STATE_DTYPES[sname], args.steps))
    # What the grid above holds fixed: the other second moment, scale and res_scale, fp32 gradients of bf16
    # weights (FSDP2's fp32 reduction), stochastically rounded bf16 weights (kernels of their own, folded and
    # unfolded), and blocks wider than a 2048-entry tile (more warps per launch).
    for dname, sname in itertools.product(args.dtypes, args.state_dtypes):
        dtype, state = DTYPES[dname], STATE_DTYPES[sname]
        rows.append(parity_case(device, shapes, 4, dtype, state, args.steps, second_moment="sq_mean"))
        rows.append(parity_case(device, shapes, 4, dtype, state, args.steps, variant=dict(scale=0.5, res_scale=0.5)))
        if dtype != torch.float32:
            variant = dict(grad_dtype=torch.float32)
            rows.append(parity_case(device, shapes, 4, dtype, state, args.steps, variant=variant))
        if dtype == torch.bfloat16:
            rows.append(parity_case(device, shapes, 4, dtype, state, args.steps, weight_rounding="stochastic"))
    wide = [(2, 5000)] if args.quick else [(3, 10000), (1, 70000)]
    for sname in args.state_dtypes:
        rows.append(parity_case(device, wide, 4096, DTYPES[args.dtypes[0]], STATE_DTYPES[sname], args.steps))
    return rows


# ---------------------------------------------------------------------------- 2-3. step time and memory


def with_shared_max_entries(make, entries: int):
    """``make``'s optimizer, stepping with ``_SHARED_MAX_ENTRIES = entries``: 0 gives every tensor a Triton launch
    of its own (what the shared launches of small tensors save), ``sys.maxsize`` puts every tensor in shared
    launches (what the launches of their own of large tensors gain)."""

    from foam_hf import _fused_triton

    def build(params):
        optimizer = make(params)
        default_step = optimizer.step

        def step(*args, **kwargs):
            default = _fused_triton._SHARED_MAX_ENTRIES
            _fused_triton._SHARED_MAX_ENTRIES = entries
            try:
                return default_step(*args, **kwargs)
            finally:
                _fused_triton._SHARED_MAX_ENTRIES = default

        optimizer.step = step
        return optimizer

    return build


def step_candidates():
    from foam_hf import FOAM

    return [
        ("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, fused=True)),
        ("torch AdamW foreach", lambda ps: torch.optim.AdamW(ps, foreach=True)),
        ("FOAM Triton B=4", lambda ps: FOAM(ps, block_size=4, fused=True)),
        (
            "FOAM Triton B=4, a launch per tensor",
            with_shared_max_entries(lambda ps: FOAM(ps, block_size=4, fused=True), 0),
        ),
        (
            "FOAM Triton B=4, all in shared launches",
            with_shared_max_entries(lambda ps: FOAM(ps, block_size=4, fused=True), sys.maxsize),
        ),
        ("FOAM Triton B=4, bf16 states", lambda ps: FOAM(ps, block_size=4, fused=True, state_dtype="bfloat16")),
        ("FOAM default B=4", lambda ps: FOAM(ps, block_size=4)),
        ("FOAM foreach B=4", lambda ps: FOAM(ps, block_size=4, foreach=True, fused=False)),
        ("FOAM foreach B=4, bf16 states", lambda ps: FOAM(ps, block_size=4, foreach=True, state_dtype="bfloat16")),
        ("FOAM for-loop B=4", lambda ps: FOAM(ps, block_size=4, foreach=False, fused=False)),
    ]


def shape_sets(args) -> list[tuple[str, list[tuple[int, ...]]]]:
    """The parameter lists timed: ``--n-weights`` of ``--size``², and every parameter of ``--model`` (built on the
    meta device: shapes only), where the per-tensor cost of the step shows."""
    sets = [(f"{args.n_weights} x {args.size}²", [(args.size, args.size)] * args.n_weights)]
    if args.model:
        from bench_step import model_parameter_shapes

        shapes = model_parameter_shapes(args.model)
        sets.append((f"{args.model} ({len(shapes)} tensors)", shapes))
    return sets


def time_and_memory(args, device, rows: list[dict]) -> list[dict]:
    """Append a row per (shapes, dtype, path) to ``rows`` as it is measured (a failure later keeps the rows before
    it); a path that fails gets a row with its error, and the others run."""
    for (shapes_name, shapes), dname in itertools.product(shape_sets(args), ("bf16", "fp32")):
        dtype = DTYPES[dname]
        for name, make in step_candidates():
            try:
                rows.append(_time_one(args, device, shapes_name, shapes, dname, dtype, name, make))
            except Exception as exc:  # noqa: BLE001 - one path's failure must not cost the others' rows
                rows.append(
                    {"shapes": shapes_name, "path": name, "dtype": dname, "error": f"{type(exc).__name__}: {exc}"}
                )
            gc.collect()  # the step wrappers of with_shared_max_entries hold their optimizer in a cycle
            torch.cuda.empty_cache()
        same = [r for r in rows if r["dtype"] == dname and r["shapes"] == shapes_name and "ms" in r]
        base = next((r["ms"] for r in same if r["path"] == "torch AdamW fused"), None)
        for r in same:
            r["ratio_to_adamw_fused"] = r["ms"] / base if base else float("nan")
    return rows


def _time_one(args, device, shapes_name, shapes, dname, dtype, name, make) -> dict:
    """One path on one parameter list: median step time, host time, and peak transient memory."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device, generator=gen).to(dtype))
        p.grad = (torch.randn(p.shape, device=device, generator=gen) * 1e-2).to(dtype)
        params.append(p)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    optimizer = make(params)
    for _ in range(3):  # states allocated, kernels compiled
        optimizer.step()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    optimizer.step()
    torch.cuda.synchronize(device)
    transient = torch.cuda.max_memory_allocated(device) - before
    reps = args.reps if "for-loop" not in name else max(3, args.reps // 5)
    times, host_times = [], []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        host_start = time.perf_counter()
        optimizer.step()
        host_times.append((time.perf_counter() - host_start) * 1e3)  # the host's time to queue the step
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {
        "shapes": shapes_name,
        "path": name,
        "dtype": dname,
        "ms": statistics.median(times),
        "host_ms": statistics.median(host_times),
        "transient_bytes": transient,
        "transient_share": transient / param_bytes,
    }


# ---------------------------------------------------------------------------- 4. Trainer


def trainer_run(args, device, out: Path) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    import foam_hf  # noqa: F401  (registers optim="foam")
    from foam_hf import functional

    chosen: list[str] = []  # the path each group's step took (not the self-check's own calls of the kernels)
    select = functional.select_implementation

    def recording(*a, **k):
        chosen.append(select(*a, **k))
        return chosen[-1]

    functional.select_implementation = recording
    small = args.quick or device.type != "cuda"
    config = LlamaConfig(
        vocab_size=256 if small else 4096,
        hidden_size=32 if small else 512,
        intermediate_size=64 if small else 1536,
        num_hidden_layers=2 if small else 8,
        num_attention_heads=4 if small else 8,
        num_key_value_heads=2 if small else 4,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    seq = 32 if small else 128
    ids = torch.randint(0, config.vocab_size, (64, seq), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"),
        optim="foam",
        bf16=True,
        learning_rate=1e-3,
        max_steps=args.trainer_steps,
        per_device_train_batch_size=4 if small else 16,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=device.type != "cuda",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    start = time.perf_counter()
    try:
        trainer.train()
    finally:
        functional.select_implementation = select
    seconds = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "all_finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses)),
        "seconds_per_step": seconds / max(1, trainer.state.global_step),
        "implementations": sorted(set(chosen)),
    }


# ---------------------------------------------------------------------------- report


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines: the header, its rule, one line per row."""
    return [" | ".join(["", *header, ""]).strip(), "|---" * len(header) + "|"] + [
        " | ".join(["", *row, ""]).strip() for row in rows
    ]


def markdown(results: dict) -> str:
    lines = [
        f"GPU check, {results['date']}: {results['device']}; torch {results['torch']}, triton {results['triton']}, "
        f"git {results['git']}, {results.get('seconds', 0):.0f} s"
    ]
    if "ready" in results:
        lines += ["", f"**Self-check** (`triton_ready`, what `fused=None` asks): {results['ready']}"]
        kinds = ", ".join(f"{kind}: {ok}" for kind, ok in results.get("ready_kinds", {}).items())
        lines += [f"per kind (parameters, moments, B[, weight rounding]): {kinds}"] if kinds else []
    if "environment" in results:
        paths = "; ".join(f"{where}: {path}" for where, path in results["environment"]["default_paths"].items())
        lines += ["", f"**Default paths** (`foam-hf env`): {paths}"]
    if results["parity"]:
        passed = sum(r["pass"] for r in results["parity"])
        lines += ["", f"**Triton vs readable path**: {passed}/{len(results['parity'])} cases within tolerance", ""]
        lines += _table(
            ["B", "params", "moments", "also", "max weight gap", "max moment rel. gap", "rounded otherwise", "pass"],
            [
                [
                    str(r["block_size"]),
                    r["dtype"],
                    str(r["state_dtype"]),
                    r.get("variant", ""),
                    f"{r['max_weight_gap']:.2e}",
                    f"{r['max_moment_rel_gap']:.2e}",
                    "" if r.get("max_rounded_otherwise") is None else f"{r['max_rounded_otherwise']:.2%}",
                    "yes" if r["pass"] else "**NO**",
                ]
                for r in results["parity"]
            ],
        )
    if results["steps"]:
        lines += [
            "",
            "**Step time and peak transient memory** (median GPU time of a step, and the host's time to queue it: "
            "a step whose host time reaches its GPU time is bound by Python and launches; ratio to AdamW fused, same "
            "dtype: with bf16 weights torch's AdamW keeps bf16 moments, FOAM fp32 ones unless the row says bf16 "
            "states)",
            "",
        ]
        lines += _table(
            ["shapes", "path", "dtype", "ms/step", "host ms/step", "x AdamW fused", "transient", "% of params"],
            [
                [
                    r["shapes"],
                    r["path"],
                    r["dtype"],
                    f"{r['ms']:.3f}",
                    f"{r['host_ms']:.3f}",
                    f"{r.get('ratio_to_adamw_fused', float('nan')):.2f}x",
                    f"{r['transient_bytes'] / 2**20:.1f} MiB",
                    f"{100 * r['transient_share']:.1f}%",
                ]
                if "ms" in r
                else [r["shapes"], r["path"], r["dtype"], f"**failed**: {r['error'][:200]}", "", "", "", ""]
                for r in results["steps"]
            ],
        )
    if results["trainer"]:
        t = results["trainer"]
        lines += [
            "",
            f'**Trainer bf16, optim="foam"**: {t["steps"]} steps, loss {t["first_loss"]:.4f} -> '
            f"{t['last_loss']:.4f}, finite: {t['all_finite']}, {t['seconds_per_step']:.3f} s/step, "
            f"stepped by {', '.join(t['implementations'])}",
        ]
    for name, error in results.get("errors", {}).items():
        lines += ["", f"**Section {name!r} failed**:", "", "```", error.strip(), "```"]
    return "\n".join(lines) + "\n"


def _save(results: dict, out: Path) -> None:
    """Write results.json, then results.md: after every section, so a run cut short keeps what it measured."""
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("gpu_check: --interpret needs TRITON_INTERPRET=1 in the environment (set it, then rerun).")
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit(
                "gpu_check: no CUDA device here (torch.cuda.is_available() is False), so there is nothing to check. "
                "Run it on a machine with an NVIDIA GPU and a CUDA build of torch; --interpret runs the parity "
                "harness in Triton's interpreter on CPU instead."
            )
        device = torch.device(args.device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # CUDA events record on the current device's stream; FOAM keys its checks so
    from foam_hf import _fused_triton

    if not _fused_triton.triton_available():
        raise SystemExit("gpu_check: Triton is not importable here; install the CUDA build of torch (it ships it).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    results = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, Triton interpreter",
        "host": platform.node(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git": args.commit or git_sha(),
        "argv": sys.argv[1:] if argv is None else argv,
        "parity": [],
        "steps": [],
        "trainer": None,
        "errors": {},
    }
    start = time.perf_counter()

    def section(name: str, run) -> None:
        """Run one section; a failure is recorded (and printed) and the next section runs all the same."""
        try:
            run()
        except Exception:  # noqa: BLE001 - one broken section must not cost the others' measurements
            results["errors"][name] = traceback.format_exc()
            print(f"gpu_check: section {name!r} failed:\n{results['errors'][name]}", file=sys.stderr)
        results["seconds"] = time.perf_counter() - start
        _save(results, out)

    def self_check() -> None:
        results["ready"] = _fused_triton.triton_ready(device)  # the self-check the default path runs
        results["ready_kinds"] = {}  # and at B=4, per pair of dtypes the parity below covers at every B
        for dname, sname in itertools.product(args.dtypes, args.state_dtypes):
            moment_dtype = torch.bfloat16 if STATE_DTYPES[sname] else torch.float32
            kind = (DTYPES[dname], moment_dtype, 4, "mean_sq")  # as parity_case steps
            results["ready_kinds"][f"{dname}/{sname}/4"] = _fused_triton.triton_ready(device, [kind])
            if DTYPES[dname] == torch.bfloat16:  # stochastically rounded weights: kernels of their own
                ready = _fused_triton.triton_ready(device, [(*kind, "stochastic")])
                results["ready_kinds"][f"{dname}/{sname}/4/stochastic"] = ready

    def parity() -> None:
        results["parity"] = check_parity(args, device)

    def steps() -> None:
        time_and_memory(args, device, results["steps"])  # rows land in results as they are measured

    def trainer() -> None:
        results["trainer"] = trainer_run(args, device, out)

    def environment() -> None:
        from foam_hf.tools.environment import collect

        results["environment"] = collect().to_dict()  # what `foam-hf env` reports (builds the CPU kernel: last)

    if device.type == "cuda":
        section("self-check", self_check)
    section("parity", parity)
    if device.type == "cuda":
        section("steps", steps)
    if args.trainer_steps:
        section("trainer", trainer)
    section("environment", environment)
    print(markdown(results))
    failed = [r for r in results["parity"] if not r["pass"]]
    failed_steps = [r for r in results["steps"] if "error" in r]
    not_ready = device.type == "cuda" and results.get("ready") is False  # fused=None would take the foreach path
    return 1 if failed or failed_steps or not_ready or results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
