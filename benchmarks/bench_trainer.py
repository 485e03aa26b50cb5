"""End-to-end: peak memory and throughput of a real Trainer run with AdamW / optim="foam" / "foam_layerwise"
on the same Llama built from a config (no weights downloaded).

    python benchmarks/bench_trainer.py                      # ~21M-parameter Llama, 12 steps each
    python benchmarks/bench_trainer.py --hidden 256 --layers 2 --steps 6   # quicker
    python benchmarks/bench_trainer.py --adamw adamw_torch  # the AdamW baseline of the figures of 2026-12-01

The AdamW row is ``--adamw`` (default ``adamw_torch_fused``: torch's fused AdamW, the fastest it has on CPU and
GPU; ``adamw_torch`` is its default for-loop path on CPU). One run per optimizer, not interleaved: steps per
second include the first step and vary by a few percent between runs.

Each optimizer runs in its own fresh process, so peak memory is that run's own: CPU peak RSS
(``ru_maxrss``) or, on CUDA, ``torch.cuda.max_memory_allocated``. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

OPTIMS = ("foam", "foam_layerwise")


def child(options: dict) -> dict:
    import torch
    import transformers
    from _provenance import cpu_name, git_sha  # the child runs this file: its folder is on sys.path
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    import foam_hf  # noqa: F401  (registers the names)

    torch.manual_seed(0)
    torch.set_num_threads(options["threads"])
    config = LlamaConfig(
        vocab_size=options["vocab"],
        hidden_size=options["hidden"],
        intermediate_size=int(options["hidden"] * 2.75),
        num_hidden_layers=options["layers"],
        num_attention_heads=max(1, options["hidden"] // 64),
        max_position_embeddings=options["seq"],
    )
    model = LlamaForCausalLM(config)
    use_cuda = torch.cuda.is_available()
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, options["vocab"], (options["steps"] * options["batch"], options["seq"]), generator=gen)
    dataset = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(
        output_dir=options["output_dir"],
        optim=options["optim"],
        max_steps=options["steps"],
        per_device_train_batch_size=options["batch"],
        learning_rate=1e-3,
        max_grad_norm=0.0,  # layer-wise FOAM cannot clip by global norm; same setting for every run
        logging_steps=options["steps"],
        save_strategy="no",
        report_to=[],
        use_cpu=not use_cuda,
        bf16=use_cuda,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated()
        if use_cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    )
    inner = trainer.optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    state_bytes = sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values())
    return {
        "optim": options["optim"],
        "params": sum(p.numel() for p in model.parameters()),
        "peak_bytes": peak,
        "peak_kind": "cuda max_memory_allocated" if use_cuda else "CPU peak RSS",
        "state_bytes": state_bytes,
        "steps_per_second": options["steps"] / elapsed,
        "device": torch.cuda.get_device_name() if use_cuda else f"{platform.machine()} {cpu_name()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git": git_sha(),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adamw", default="adamw_torch_fused", help="the AdamW row's optim (the baseline)")
    parser.add_argument(
        "--optims", default=None, help="comma-separated optim names (default: --adamw, foam, foam_layerwise)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return []

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for optim in (args.optims or ",".join((args.adamw, *OPTIMS))).split(","):
            options = {**vars(args), "optim": optim, "output_dir": os.path.join(tmp, optim)}
            for key in ("child", "optims", "adamw"):
                options.pop(key)
            out = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(options)], capture_output=True, text=True
            )
            if out.returncode != 0:
                raise RuntimeError(f"{optim} run failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))

    base = results[0]
    print(
        f"\nDate {datetime.date.today()}, {base['device']}, {args.threads} threads, torch {base['torch']}, "
        f"transformers {base['transformers']}, git {base['git']}; Llama {base['params'] / 1e6:.1f}M params, "
        f"{args.steps} steps, batch {args.batch}x{args.seq}, {base['peak_kind']}\n"
    )
    print("| optim | optimizer state | peak memory | vs first row | steps/s |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        delta = (r["peak_bytes"] - base["peak_bytes"]) / 2**20
        print(
            f"| {r['optim']} | {r['state_bytes'] / 2**20:.1f} MiB | {r['peak_bytes'] / 2**20:.0f} MiB | "
            f"{delta:+.0f} MiB | {r['steps_per_second']:.2f} |"
        )
    return results


if __name__ == "__main__":
    main()
