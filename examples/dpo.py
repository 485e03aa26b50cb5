"""Direct preference optimisation with TRL's ``DPOTrainer`` and FOAM.

    python examples/dpo.py                                   # tiny Llama, CPU
    python examples/dpo.py --short                           # test-sized, seconds
    python examples/dpo.py --model-name-or-path path/to/sft-model --max-steps 500 --block-size 8 \\
        --output-dir runs/dpo-foam

Preferences from local text: the prompt is the first line of a standard-library function, ``chosen`` is
its real body, ``rejected`` the body of another function. The reference model is a frozen copy of the
starting model, passed as ``ref_model`` (so TRL never looks one up on a hub). Returns the losses, the
reward margins and the state bytes.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    example_parser,
    function_pairs,
    load_model_and_tokenizer,
    save_final_model,
    summarize,
    training_kwargs,
)


def main(argv: list[str] | None = None) -> dict:
    parser = example_parser(__doc__, max_steps=60, learning_rate=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args(argv)
    if args.short:
        args.max_length = min(args.max_length, 48)

    import trl
    from datasets import Dataset

    import foam_hf  # noqa: F401  (registers optim="foam")

    model, tokenizer = load_model_and_tokenizer(args)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    pairs = function_pairs(args.short)
    data = Dataset.from_dict(
        {
            "prompt": [p for p, _ in pairs],
            "chosen": [c for _, c in pairs],
            "rejected": [pairs[(i + len(pairs) // 2) % len(pairs)][1] for i in range(len(pairs))],
        }
    )
    config = trl.DPOConfig(**training_kwargs(args, "dpo", beta=args.beta, max_length=args.max_length))
    trainer = trl.DPOTrainer(
        model=model, ref_model=ref_model, args=config, train_dataset=data, processing_class=tokenizer
    )
    trainer.train()
    save_final_model(trainer, args)
    summary = summarize(trainer)
    summary["reward_margins"] = [e["rewards/margins"] for e in trainer.state.log_history if "rewards/margins" in e]
    summary["trainer"] = trainer
    return summary


if __name__ == "__main__":
    main()
