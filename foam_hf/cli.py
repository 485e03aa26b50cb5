"""The ``foam-hf`` command line.

One subcommand = one ``_add_<name>(subparsers)`` function that calls ``subparsers.add_parser`` and sets
``func`` to a ``_run_<name>(args) -> int`` handler; the work itself lives in a library module.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .memory_report import add_memory_parser

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: it must be an int >= 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is invalid: it must be a number > 0")
    return value


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    from .demo import DEFAULT_LRS, DemoOptions
    from .pretrain import MODEL_SIZES

    d = DemoOptions()
    p = subparsers.add_parser(
        "demo",
        help="pre-train a tiny Llama with AdamW and with FOAM on local text and compare them",
        description="Pre-train a tiny Llama on the Python standard library's sources twice (AdamW, then FOAM; "
        "same seed, batches and budget) and report held-out loss, optimizer-state bytes, peak memory and time "
        "per step. Writes loss.png, results.json and results.csv to --output-dir. Nothing is downloaded.",
    )
    p.add_argument("--steps", type=_positive_int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    p.add_argument(
        "--block-size", type=_positive_int, default=d.block_size, help=f"FOAM block size B (default: {d.block_size})"
    )
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default=d.model_size, help=f"(default: {d.model_size})")
    p.add_argument("--output-dir", default=d.output_dir, help=f"(default: {d.output_dir}/)")
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"one peak lr for both optimizers (default: per optimizer, AdamW {DEFAULT_LRS['adamw']:g}, "
        f"FOAM {DEFAULT_LRS['foam']:g}: each one's best in the project's sweep)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"weights and batch order (default: {d.seed})")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ... or auto (default: auto)")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help=f"(default: {d.batch_size})")
    p.add_argument("--seq-len", type=_positive_int, default=d.seq_len, help=f"(default: {d.seq_len})")
    p.add_argument(
        "--eval-batches",
        type=_positive_int,
        default=d.eval_batches,
        help=f"held-out batches per evaluation (default: {d.eval_batches})",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo

    options = DemoOptions(
        steps=args.steps,
        block_size=args.block_size,
        model_size=args.model_size,
        output_dir=args.output_dir,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        eval_batches=args.eval_batches,
    )
    run_demo(options, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``foam-hf`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="foam-hf", description="FOAM, the folded-state Adam optimizer.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(subparsers)
    add_memory_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``foam-hf`` console script and of ``python -m foam_hf``; returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)
