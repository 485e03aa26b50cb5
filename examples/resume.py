"""Resume FOAM from a checkpoint: train, interrupt, resume, and compare with an uninterrupted run.

    python examples/resume.py                                # tiny Llama, 2 x 20 steps, CPU
    python examples/resume.py --short                        # test-sized, seconds
    python examples/resume.py --model-name-or-path path/to/model --max-steps 200 --output-dir runs/resume

Three runs with the same seed and data order:

1. *straight*: ``--max-steps`` steps without a stop;
2. *interrupted*: the same run stopped after half the steps, right after ``checkpoint-<half>`` is saved
   (``optimizer.pt`` holds FOAM's folded states and each group's block size, only tensors and plain
   numbers, so Trainer's ``weights_only=True`` loading accepts it);
3. *resumed*: a new Trainer on a freshly built model, ``trainer.train(resume_from_checkpoint=...)``.

On a CPU the ops are deterministic, so the resumed weights and optimizer states equal the straight run's
bit for bit; on a GPU, expect agreement to rounding (set ``--deterministic`` for bitwise). Returns the
largest absolute difference of weights and of optimizer states.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import (  # noqa: E402
    block_dataset,
    example_parser,
    load_model_and_tokenizer,
    stdlib_texts,
    training_kwargs,
    unwrap_optimizer,
)


def run(args: argparse.Namespace, name: str, *, stop_at: int | None = None, resume: str | None = None):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import foam_hf  # noqa: F401  (registers optim="foam")

    class StopAt(TrainerCallback):
        """Simulates an interruption: training stops after step ``stop_at`` (its checkpoint is saved)."""

        def on_step_end(self, training_args, state, control, **kwargs):
            if state.global_step == stop_at:
                control.should_training_stop = True

    model, tokenizer = load_model_and_tokenizer(args)
    data = block_dataset(tokenizer, stdlib_texts(max_files=8), args.seq_len, args.max_steps * args.batch_size)
    output_dir = Path(args.output_dir or "outputs/resume") / name
    training_args = TrainingArguments(
        **training_kwargs(
            args,
            "resume",
            output_dir=str(output_dir),
            save_strategy="steps",
            save_steps=args.max_steps // 2,
            weight_decay=0.1,
            full_determinism=args.deterministic,
        )
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=data, callbacks=[StopAt()] if stop_at is not None else []
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b, strict=True))


def optimizer_states(trainer) -> list[torch.Tensor]:
    optimizer = unwrap_optimizer(trainer.optimizer)
    return [
        state[key]
        for group in optimizer.param_groups
        for p in group["params"]
        for state in [optimizer.state[p]]
        for key in ("exp_avg", "exp_avg_sq")
        if key in state
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = example_parser(__doc__, max_steps=40, learning_rate=3e-3)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--deterministic", action="store_true", help="Trainer full_determinism (GPU bitwise)")
    args = parser.parse_args(argv)
    if args.short:
        args.seq_len = min(args.seq_len, 32)
    if args.max_steps < 2 or args.max_steps % 2:
        parser.error(f"--max-steps {args.max_steps}: needs an even number >= 2 (interrupted at half)")
    half = args.max_steps // 2

    straight = run(args, "straight")
    interrupted = run(args, "interrupted", stop_at=half)
    checkpoint = Path(interrupted.args.output_dir) / f"checkpoint-{half}"
    resumed = run(args, "interrupted", resume=str(checkpoint))

    weights = max_abs_diff(list(straight.model.parameters()), list(resumed.model.parameters()))
    states = max_abs_diff(optimizer_states(straight), optimizer_states(resumed))
    print(
        f"interrupted at step {interrupted.state.global_step}, resumed from {checkpoint.name} to step "
        f"{resumed.state.global_step}"
    )
    print(
        f"max |straight - resumed|: weights {weights:.3g}, optimizer states {states:.3g}"
        f"{'  (bitwise equal)' if weights == states == 0 else ''}"
    )
    return dict(
        weights_max_abs_diff=weights,
        states_max_abs_diff=states,
        interrupted_step=interrupted.state.global_step,
        resumed_step=resumed.state.global_step,
        checkpoint=checkpoint,
        straight=straight,
        resumed=resumed,
    )


if __name__ == "__main__":
    main()
