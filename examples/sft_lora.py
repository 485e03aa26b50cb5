"""Supervised fine-tuning with TRL's ``SFTTrainer``, PEFT LoRA adapters and FOAM.

    python examples/sft_lora.py                              # tiny Llama, LoRA r=16 on all linear layers
    python examples/sft_lora.py --short                      # test-sized, seconds
    python examples/sft_lora.py --model-name-or-path path/to/model --lora-r 32 --max-steps 500 \\
        --output-dir runs/sft-foam

The task: given the first line of a standard-library function (``def name(args):``), write its body
(prompt-completion pairs, so the loss covers the completion only). Only the adapters are trainable, so only
they get optimizer states, and by default they keep AdamW states: folding them cost loss in every LoRA run
measured (docs/benchmarks.md, "LoRA adapters"). ``--optim-args "block_sizes=lora_A:4"`` folds ``lora_A``
(r x in, along ``in``), the cheapest of the folding variants measured. Returns the losses, the state bytes
and the block size of every adapter weight.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    # noqa: E402
    example_parser,
    function_pairs,
    load_model_and_tokenizer,
    save_final_model,
    summarize,
    training_kwargs,
    unwrap_optimizer,
)


def main(argv: list[str] | None = None) -> dict:
    parser = example_parser(__doc__, max_steps=100, learning_rate=2e-3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=None, help="default: 2 * r")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args(argv)
    if args.short:
        args.max_length = min(args.max_length, 48)

    import trl
    from datasets import Dataset
    from peft import LoraConfig

    import foam_hf  # noqa: F401  (registers optim="foam")

    model, tokenizer = load_model_and_tokenizer(args)
    pairs = function_pairs(args.short)
    data = Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})

    config = trl.SFTConfig(**training_kwargs(args, "sft_lora", max_length=args.max_length))
    peft_config = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear"
    )
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train()
    save_final_model(trainer, args)
    summary = summarize(trainer)
    optimizer = unwrap_optimizer(trainer.optimizer)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    summary["block_sizes"] = {names[id(p)]: g["block_size"] for g in optimizer.param_groups for p in g["params"]}
    summary["trainer"] = trainer
    return summary


if __name__ == "__main__":
    main()
