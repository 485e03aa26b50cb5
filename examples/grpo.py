"""GRPO with TRL's ``GRPOTrainer``, FOAM, and a reward computed by a Python function.

    python examples/grpo.py                                  # tiny Llama, CPU
    python examples/grpo.py --short                          # test-sized, seconds
    python examples/grpo.py --model-name-or-path path/to/model --max-steps 300 --num-generations 8 \\
        --max-completion-length 128 --output-dir runs/grpo-foam

Prompts are first lines of standard-library functions (``def name(args):``); the reward scores how much the
completion looks like a function body: the share of its non-empty lines indented by four spaces, plus 1 if
``def`` line + completion compiles. ``beta=0.0`` (no KL term) means no reference model is built, so
nothing is looked up on a hub. Returns the losses, the mean rewards and the state bytes.
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
    positive_int,
    save_final_model,
    summarize,
    training_kwargs,
)


def function_body_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """Share of non-empty completion lines indented by 4 spaces, + 1 when prompt + completion compiles."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        lines = [line for line in completion.splitlines() if line.strip()]
        indented = sum(line.startswith("    ") for line in lines) / len(lines) if lines else 0.0
        try:
            compile(prompt + completion, "<completion>", "exec")
            compiles = 1.0
        except (SyntaxError, ValueError):
            compiles = 0.0
        rewards.append(indented + compiles)
    return rewards


def main(argv: list[str] | None = None) -> dict:
    parser = example_parser(__doc__, max_steps=40, learning_rate=1e-3)
    parser.add_argument(
        "--num-generations",
        type=positive_int,
        default=None,
        help="completions per prompt, >= 2 (default 4; 2 with --short)",
    )
    parser.add_argument("--max-completion-length", type=positive_int, default=32)
    args = parser.parse_args(argv)
    if args.num_generations is None:
        args.num_generations = 2 if args.short else 4
    if args.num_generations < 2:
        parser.error(
            f"--num-generations {args.num_generations}: GRPO compares completions of a prompt, so it needs >= 2"
        )
    if args.short:
        args.max_completion_length = min(args.max_completion_length, 8)
    # A generation batch holds whole groups of completions: the largest multiple of --num-generations that fits.
    batch_size = max(args.batch_size - args.batch_size % args.num_generations, args.num_generations)
    if batch_size != args.batch_size:
        print(f"--batch-size {args.batch_size} -> {batch_size}: a multiple of --num-generations {args.num_generations}")
        args.batch_size = batch_size

    import trl
    from datasets import Dataset

    import foam_hf  # noqa: F401  (registers optim="foam")

    model, tokenizer = load_model_and_tokenizer(args)
    pairs = function_pairs(args.short)
    data = Dataset.from_dict({"prompt": [p for p, _ in pairs]})
    config = trl.GRPOConfig(
        **training_kwargs(
            args,
            "grpo",
            beta=0.0,  # no KL term: no reference model is built (it would be looked up on a hub)
            num_generations=args.num_generations,
            generation_batch_size=args.batch_size,
            max_completion_length=args.max_completion_length,
        )
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=function_body_reward,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    save_final_model(trainer, args)
    summary = summarize(trainer)
    summary["rewards"] = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    print(f"mean reward {summary['rewards'][0]:.3f} -> {summary['rewards'][-1]:.3f}" if summary["rewards"] else "")
    summary["trainer"] = trainer
    return summary


if __name__ == "__main__":
    main()
