"""FOAM in a plain PyTorch loop: a causal LM trained with AdamW and with FOAM side by side, no Trainer.

    python examples/plain_pytorch.py                         # tiny Llama on stdlib text, CPU, about a minute
    python examples/plain_pytorch.py --short                 # test-sized, seconds
    python examples/plain_pytorch.py --model-name-or-path path/to/model --max-steps 500 --block-size 8 \\
        --seq-len 1024 --batch-size 4

The loop is the one every PyTorch user writes: forward, ``loss.backward()``, ``optimizer.step()``. The only
change for FOAM is the optimizer: ``FOAM(foam_hf.foam_param_groups(model, "block_size=4", weight_decay=0.1),
lr=...)`` folds what ``optim="foam"`` folds in a Trainer (the linear layers, not the embeddings or the output
head), per-module ``block_sizes`` of ``--optim-args`` included, with transformers' weight-decay rule; AdamW gets
the same parameters and weight decay. (``FOAM(model.parameters(), block_size=B)`` would fold every tensor of two
or more dimensions, embeddings and head included, docs/api.md.) Both runs start from the same weights and see
the same batches (the Python standard library's ``.py`` sources, tokenised and cut into fixed-length blocks), on
the GPU when there is one. Prints and returns the first and last loss (the mean over the last 5 steps too) and
the bytes each optimizer holds in its state.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import (  # noqa: E402
    adamw_param_groups,
    block_dataset,
    example_parser,
    foam_optim_args,
    foam_param_groups,
    load_model_and_tokenizer,
    positive_int,
    stdlib_texts,
)

from foam_hf import FOAM  # noqa: E402


def held_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor ``optimizer`` holds in its state (moments and step counters)."""
    return sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    )


def train(name: str, model: torch.nn.Module, args, batches: list[torch.Tensor], device: torch.device) -> dict:
    """``len(batches)`` steps of ``name`` ("adamw" or "foam") on ``model``: the losses and the state bytes."""
    model.to(device).train()
    groups = foam_param_groups(model, args, weight_decay=0.1)
    if name == "foam":
        optimizer = FOAM(groups, lr=args.learning_rate)
    else:
        optimizer = torch.optim.AdamW(adamw_param_groups(groups), lr=args.learning_rate)
    losses = []
    for input_ids in batches:
        input_ids = input_ids.to(device)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return dict(optimizer=type(optimizer).__name__, losses=losses, state_bytes=held_bytes(optimizer))


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = example_parser(__doc__, max_steps=200, learning_rate=3e-3, trainer=False)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    args = parser.parse_args(argv)
    if args.short:
        args.seq_len = min(args.seq_len, 32)
    foam_optim_args(args)  # bad --optim-args stop here, before any model loads

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(args)
    rows = block_dataset(
        tokenizer, stdlib_texts(max_files=12 if args.short else 200), args.seq_len, args.max_steps * args.batch_size
    )["input_ids"]
    ids = torch.tensor(rows)
    # Each step its own batch; with less text than steps need, the blocks are reused in order.
    batches = [
        ids[[(step * args.batch_size + i) % len(ids) for i in range(args.batch_size)]] for step in range(args.max_steps)
    ]

    results = {"adamw": train("adamw", model, args, batches, device)}
    del model  # one model at a time on the device; the same seed (or checkpoint) gives the same start again
    results["foam"] = train("foam", load_model_and_tokenizer(args)[0], args, batches, device)
    tail = min(5, args.max_steps)
    print(f"{'optimizer':<10} {'first loss':>11} {'last loss':>11} {f'last {tail} mean':>12} {'state bytes':>13}")
    for name, r in results.items():
        r["tail_mean_loss"] = sum(r["losses"][-tail:]) / tail
        print(
            f"{name:<10} {r['losses'][0]:>11.4f} {r['losses'][-1]:>11.4f} {r['tail_mean_loss']:>12.4f} "
            f"{r['state_bytes']:>13,}"
        )
    adamw, foam = results["adamw"]["state_bytes"], results["foam"]["state_bytes"]
    print(f"FOAM holds {adamw / foam:.2f}x less optimizer state than AdamW")
    return results


if __name__ == "__main__":
    main()
