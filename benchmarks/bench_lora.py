"""LoRA adapters under FOAM: which adapter matrices should fold? AdamW vs FOAM variants on a small LoRA run.

    python benchmarks/bench_lora.py --ranks 8 32 --seeds 0 1 2 --steps 200 --base-steps 300 --seq-len 64 --threads 1

The data, the model, the batches, the schedule and the evaluation are those of ``foam-hf demo`` and
``benchmarks/bench_quality.py`` (:mod:`foam_hf.tools.demo_training`, through ``benchmarks/_engine.py``): byte-level
text of the Python standard library's top-level ``.py`` files, whole files held out for evaluation, and a
randomly initialised ``LlamaForCausalLM`` of :data:`~foam_hf.tools.demo_training.MODEL_SIZES`. The loop is plain
PyTorch (a PEFT model over a pre-trained base), fed the batches a Trainer run of the same budget would see.

1. *Base*: the model is pre-trained with AdamW on the first half (by bytes) of the training files, once; every
   LoRA run starts from these weights.
2. *LoRA*: adapters (``target_modules="all-linear"``, ``lora_alpha = 2 r``, no dropout; the output head and
   embeddings stay frozen) are trained on the second half of the training files with each optimizer below,
   then evaluated on the held-out files. Per seed, every optimizer sees the same adapter initialisation and
   the same batches, under the same linear-warmup + cosine schedule (``_engine.lr_factor``).

Optimizers. FOAM is built as ``TrainingArguments(optim="foam", optim_args=...)`` builds it in a Trainer:
:func:`foam_hf.integration.optimizer_cls_and_kwargs`, i.e. :func:`~foam_hf.param_groups.resolve_block_sizes`
then :func:`~foam_hf.param_groups.build_param_groups`:

* ``adamw``: ``torch.optim.AdamW`` over the adapter weights (what ``optim="foam"`` does by default with a
  PEFT model: adapters keep AdamW states, see :mod:`foam_hf.param_groups`);
* ``foam B=4``: ``block_sizes=lora_A:4;lora_B:4``, every adapter matrix folds (lora_A ``r x in`` along
  ``in``, lora_B ``out x r`` along ``r``);
* ``foam B=4, lora_A only``: ``block_sizes=lora_A:4``, lora_A folds, lora_B keeps AdamW states;
* ``foam B=4, lora_B only``: ``block_sizes=lora_B:4``, lora_B folds, lora_A keeps AdamW states;
* ``foam B=8``: ``block_sizes=lora_A:8;lora_B:8``, every adapter matrix folds.

Prints a Markdown table: final train loss (mean of the last 20 steps), eval loss, the eval-loss difference to
AdamW on the same seed (paired), optimizer-state bytes (measured from the state tensors) and their ratio to
AdamW's. Spreads are half the range over seeds. Offline; CPU by default, CUDA when present.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import foam_hf  # noqa: F401  (registers optim="foam" with transformers)
from foam_hf.integration import optimizer_cls_and_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _engine import (  # noqa: E402
    MODEL_SIZES,
    RunConfig,
    build_model,
    evaluate,
    load_corpus,
    lr_factor,
    optimizer_state_bytes,
    training_batches,
)
from _provenance import git_sha  # noqa: E402

#: Label -> ``optim_args`` of ``optim="foam"`` (``None``: AdamW).
VARIANTS: dict[str, str | None] = {
    "adamw": None,
    "foam B=4": "block_sizes=lora_A:4;lora_B:4",
    "foam B=4, lora_A only": "block_sizes=lora_A:4",
    "foam B=4, lora_B only": "block_sizes=lora_B:4",
    "foam B=8": "block_sizes=lora_A:8;lora_B:8",
}

# Final train loss: mean over this many last steps (one step's loss is one batch, too noisy alone).
_LAST_STEPS = 20


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor, config: RunConfig) -> list:
    """A plain loop on a given model and optimizer: the batches and schedule of a Trainer run of ``config``."""
    device = config.resolved_device()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.steps, config.warmup_fraction)
    )
    losses = []
    for x in training_batches(data, config):
        x = x.to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.item())
    return losses


def lora_optimizer(model: torch.nn.Module, optim_args: str | None, lr: float) -> torch.optim.Optimizer:
    """AdamW (``optim_args=None``) or FOAM exactly as ``Trainer`` builds it for ``optim="foam"``."""
    if optim_args is None:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=tempfile.gettempdir(),
        optim="foam",
        optim_args=optim_args,
        learning_rate=lr,
        weight_decay=0.0,
        report_to=[],
    )
    cls, kwargs = optimizer_cls_and_kwargs(args, model)
    return cls(**kwargs)


def lora_run(config: RunConfig, base_state: dict, rank: int, optim_args: str | None, lr: float, tune, held_out):
    from peft import LoraConfig, get_peft_model

    model = build_model(config.model_size, config.seed, seq_len=config.seq_len)
    model.load_state_dict(base_state)
    torch.manual_seed(config.seed)  # adapter initialisation: one per seed, the same for every optimizer
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(model, lora).to(config.resolved_device())
    optimizer = lora_optimizer(model, optim_args, lr)
    start = time.perf_counter()
    losses = fit(model, optimizer, tune, config)
    seconds = time.perf_counter() - start
    return dict(
        train=statistics.fmean(losses[-_LAST_STEPS:]),
        eval=evaluate(model, held_out, config),
        state_bytes=optimizer_state_bytes(optimizer),
        seconds=seconds,
        finite=all(math.isfinite(x) for x in losses),
    )


def fmt(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--model-size", default="tiny", choices=list(MODEL_SIZES))
    parser.add_argument("--steps", type=int, default=200, help="LoRA steps per run")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak LoRA lr (every optimizer)")
    parser.add_argument("--base-steps", type=int, default=300, help="AdamW steps of the base pre-training")
    parser.add_argument("--base-lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--max-files", type=int, default=None, help="passed to load_corpus")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.perf_counter()

    corpus = load_corpus(args.max_files)
    half = corpus.train.numel() // 2
    base_data, tune_data = corpus.train[:half], corpus.train[half:]
    config = RunConfig(
        model_size=args.model_size,
        steps=args.base_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=1234,
        eval_batches=args.eval_batches,
        device=args.device,
    )
    print(f"corpus: {corpus.describe()}; base on {half:,} bytes, LoRA on {tune_data.numel():,}", file=sys.stderr)
    base = build_model(args.model_size, config.seed, seq_len=args.seq_len).to(config.resolved_device())
    losses = fit(base, torch.optim.AdamW(base.parameters(), lr=args.base_lr, weight_decay=0.0), base_data, config)
    base_eval = evaluate(base, corpus.eval, config)
    base_state = {k: v.detach().cpu().clone() for k, v in base.state_dict().items()}
    del base
    print(
        f"base: {args.base_steps} AdamW steps, train loss {statistics.fmean(losses[-_LAST_STEPS:]):.4f}, "
        f"eval loss {base_eval:.4f}",
        file=sys.stderr,
    )

    rows = []
    for rank in args.ranks:
        for variant in args.variants:
            results = []
            for seed in args.seeds:
                run_config = replace(config, steps=args.steps, seed=seed)
                result = lora_run(run_config, base_state, rank, VARIANTS[variant], args.lr, tune_data, corpus.eval)
                print(f"r={rank} {variant} seed={seed}: {result}", file=sys.stderr, flush=True)
                results.append(result)
            rows.append(dict(rank=rank, variant=variant, results=results))

    sha = git_sha()  # of the checkout this script is in, wherever it is started from
    import peft
    import transformers

    print(
        f"\n{datetime.date.today()} · {platform.machine()} {platform.system()}, {torch.get_num_threads()} threads, "
        f"{config.resolved_device().type} · torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__} · git {sha} · model {args.model_size}, base {args.base_steps} AdamW "
        f"steps · seeds {args.seeds} · {args.steps} LoRA steps, lr {args.lr:g}, batch "
        f"{args.batch_size}x{args.seq_len} bytes · total {time.perf_counter() - t_start:.0f} s\n"
    )
    print(f"Base model without adapters: eval loss {base_eval:.4f}.\n")
    print(
        "| r | optimizer | final train loss | eval loss | Δ eval vs AdamW (paired) | state bytes | vs AdamW | s/run |"
    )
    print("|---|---|---|---|---|---|---|---|")
    adamw = {row["rank"]: row["results"] for row in rows if row["variant"] == "adamw"}
    for row in rows:
        res = row["results"]
        sb = res[0]["state_bytes"]
        ref = adamw.get(row["rank"])
        ratio = f"{sb / ref[0]['state_bytes']:.3f}" if ref else "n/a"
        delta = fmt([r["eval"] - a["eval"] for r, a in zip(res, ref)], 4) if ref and row["variant"] != "adamw" else "-"
        finite = "" if all(r["finite"] for r in res) else " (non-finite loss)"
        print(
            f"| {row['rank']} | {row['variant']}{finite} | {fmt([r['train'] for r in res])} | "
            f"{fmt([r['eval'] for r in res])} | {delta} | {sb:,} | {ratio} | "
            f"{statistics.fmean(r['seconds'] for r in res):.0f} |"
        )
    return rows


if __name__ == "__main__":
    main()
