"""Pre-train a causal LM with ``transformers.Trainer`` and ``optim="foam"``: the only change from AdamW is the name.

    python examples/pretrain_trainer.py                      # tiny Llama on stdlib text, CPU, ~a minute
    python examples/pretrain_trainer.py --short              # test-sized, seconds
    python examples/pretrain_trainer.py --model-name-or-path path/to/model --max-steps 1000 \\
        --block-size 8 --optim-args "block_sizes=lm_head:1" --seq-len 1024 --output-dir runs/foam

The text is the Python standard library's ``.py`` sources, tokenised and cut into fixed-length blocks;
one file in ten is held out for evaluation. ``FoamCallback`` (attached automatically) logs
``foam/state_bytes`` against ``foam/adamw_state_bytes``. Returns the losses, the eval loss and the
optimizer-state bytes.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    block_dataset,
    example_parser,
    load_model_and_tokenizer,
    save_final_model,
    stdlib_texts,
    summarize,
    training_kwargs,
)


def main(argv: list[str] | None = None) -> dict:
    parser = example_parser(__doc__, max_steps=200, learning_rate=3e-3)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    if args.short:
        args.seq_len = min(args.seq_len, 32)

    from transformers import Trainer, TrainingArguments

    import foam_hf  # noqa: F401  (registers optim="foam")

    model, tokenizer = load_model_and_tokenizer(args)
    texts = stdlib_texts(max_files=12 if args.short else 200)
    train_texts = [t for i, t in enumerate(texts) if i % 10 != 9]
    eval_texts = [t for i, t in enumerate(texts) if i % 10 == 9]
    n_rows = args.max_steps * args.batch_size
    train_data = block_dataset(tokenizer, train_texts, args.seq_len, n_rows)
    eval_data = block_dataset(tokenizer, eval_texts, args.seq_len, 16 if args.short else 128)

    training_args = TrainingArguments(**training_kwargs(args, "pretrain_trainer", weight_decay=0.1))
    trainer = Trainer(model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data)
    trainer.train()
    save_final_model(trainer, args)
    summary = summarize(trainer)
    summary["eval_loss"] = trainer.evaluate()["eval_loss"]
    print(f"eval loss {summary['eval_loss']:.4f} (perplexity {math.exp(summary['eval_loss']):.1f})")
    summary["trainer"] = trainer
    return summary


if __name__ == "__main__":
    main()
