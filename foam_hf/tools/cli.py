"""The ``foam-hf`` command line.

One subcommand = one ``_add_<name>(subparsers)`` function that calls ``subparsers.add_parser`` and sets
``func`` to a ``_run_<name>(args) -> int`` handler; the work itself lives in a library module.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer: it must be an int >= 1, e.g. 4") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: it must be an int >= 1, e.g. 4")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number: it must be a finite number > 0, e.g. 3e-3"
        ) from None
    # inf would pass `> 0`: the AdamW run would train (minutes) before FOAM refused it.
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is invalid: it must be a finite number > 0, e.g. 3e-3")
    return value


def _device(text: str) -> str:
    """A device torch can use here, checked before any training starts (not minutes into the AdamW run)."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 or auto"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use --device cpu or auto")
    return text


def _output_dir(text: str) -> str:
    """A folder the results can be written to: refused up front if a file sits on the path."""
    path = Path(text)
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise argparse.ArgumentTypeError(
                    f"{text!r}: {str(ancestor)!r} is a file, so the results folder cannot be created there; "
                    "pass another --output-dir"
                )
            break
    return text


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    from .demo import DEFAULT_LRS, DemoOptions
    from .demo_training import MODEL_SIZES

    d = DemoOptions()
    p = subparsers.add_parser(
        "demo",
        help="pre-train a tiny Llama with AdamW and with FOAM on local text and compare them",
        description="Pre-train a tiny Llama on the Python standard library's sources twice with transformers.Trainer "
        "(optim='adamw_torch_fused', then optim='foam'; same seed, batches and budget) and report held-out loss, "
        "optimizer-state bytes and time per step. Writes loss.png, results.json and results.csv to --output-dir. "
        "Nothing is downloaded.",
    )
    p.add_argument("--steps", type=_positive_int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    p.add_argument(
        "--block-size", type=_positive_int, default=d.block_size, help=f"FOAM block size B (default: {d.block_size})"
    )
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default=d.model_size, help=f"(default: {d.model_size})")
    p.add_argument("--output-dir", type=_output_dir, default=d.output_dir, help=f"(default: {d.output_dir}/)")
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"one peak lr for both optimizers (default: per optimizer, AdamW {DEFAULT_LRS['adamw']:g}, "
        f"FOAM {DEFAULT_LRS['foam']:g}: each one's best in the project's sweep)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"weights and batch order (default: {d.seed})")
    p.add_argument("--device", type=_device, default=d.device, help="cpu, cuda, cuda:1, ... or auto (default: auto)")
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


_NOT_REGISTERED = (
    "Without it, transformers answers `argument --optim: invalid choice: 'foam'` (argparse, e.g. `trl sft`) or "
    "`ValueError: foam is not a valid OptimizerNames` (a config file, or TrainingArguments built before "
    "`import foam_hf`)."
)


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="run any command with optim='foam' registered in every Python process it starts",
        description="Run CMD so that every Python process it starts, children included, has optim='foam' "
        "registered before it parses arguments: `foam-hf run trl sft --optim foam ...`, `foam-hf run "
        "accelerate launch train.py --optim foam`, `foam-hf run torchrun ...`, `foam-hf run python "
        f"run_clm.py args.json`. The exit code is CMD's. {_NOT_REGISTERED}",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD [ARGS...]", help="the command to run")
    p.set_defaults(func=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    from ..launcher import run_command

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise SystemExit("foam-hf run: no command given. Fix: e.g. foam-hf run trl sft --optim foam ...")
    return run_command(command)


def _add_autoregister(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "autoregister",
        help="install or remove a start-up hook that registers optim='foam' in this environment",
        description="`on` writes a start-up hook into this environment's site-packages (a .pth import line, "
        "and its PEP 829 .start twin for Python 3.15+) so that every Python process of the environment "
        "registers optim='foam' when it imports transformers, with no command prefix. It only imports "
        "foam_hf, which imports neither torch nor transformers. `off` removes it; `status` says what is "
        f"installed where. Off by default. {_NOT_REGISTERED}",
    )
    p.add_argument("action", choices=["on", "off", "status"])
    p.add_argument("--site-dir", default=None, help="the site-packages folder (default: this Python's)")
    p.set_defaults(func=_run_autoregister)


def _run_autoregister(args: argparse.Namespace) -> int:
    from ..launcher import autoregister, autoregister_status

    if args.action == "status":
        status = autoregister_status(args.site_dir)
    else:
        status = autoregister(args.action == "on", args.site_dir)
    print(status.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``foam-hf`` parser with every subcommand registered."""
    from .memory_report import add_memory_parser

    parser = argparse.ArgumentParser(
        prog="foam-hf",
        description="FOAM, the folded-state Adam optimizer. To use optim='foam' from an unmodified command "
        "(trl sft, accelerate launch, torchrun, example scripts, YAML/JSON configs): `foam-hf run CMD ...`, "
        f"or `foam-hf autoregister on` once per environment. {_NOT_REGISTERED}",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(subparsers)
    add_memory_parser(subparsers)
    _add_run(subparsers)
    _add_autoregister(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``foam-hf`` console script and of ``python -m foam_hf``; returns the exit code."""
    import sys

    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] in (["run"], ["autoregister"]):
        # Launcher subcommands parse without the others: building those imports torch and transformers (seconds).
        parser = argparse.ArgumentParser(prog="foam-hf")
        light = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        _add_run(light)
        _add_autoregister(light)
        args = parser.parse_args(words)
    else:
        args = build_parser().parse_args(words)
    return args.func(args)
