"""The ``foam-hf`` command line (also ``python -m foam_hf``).

One subcommand = one ``_add_<name>(subparsers)`` function that registers it through :func:`_add_command`
with a ``_run_<name>(args) -> int`` handler; the work itself lives in a module of its own
(:mod:`~foam_hf.tools.demo`, :mod:`~foam_hf.tools.memory_report`, :mod:`foam_hf.launcher`). Values are
checked by the ``type=`` converters below while the arguments are parsed, before any work starts.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]


def _positive_int(example: str) -> Callable[[str], int]:
    """An argparse ``type=`` for an int >= 1; ``example`` (e.g. ``"--rank 256"``) ends its error messages."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an integer: it must be an int >= 1. Example: {example}"
            ) from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int >= 1 ({value} is invalid). Example: {example}")
        return value

    return convert


def _seed(text: str) -> int:
    """A seed NumPy and torch both take: an int in [0, 2**32 - 1] (NumPy refuses others, after the corpus loads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer: a seed is an int in [0, 2**32 - 1]") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value} is invalid: a seed is an int in [0, 2**32 - 1], e.g. 0")
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


def _block_size_list(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of ints. Example: --block-sizes 2,4,8,16,32"
        ) from None
    if not sizes or any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: block sizes are ints >= 1. Example: --block-sizes 2,4,8,16,32")
    return sizes


def _add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    run: Callable[[argparse.Namespace], int],
    *,
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    """Register subcommand ``name``, dispatched to ``run(args)`` (the exit code) through ``args.func``."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.set_defaults(func=run)
    return parser


def _add_demo(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .demo import DEFAULT_LRS, DemoOptions
    from .demo_training import MODEL_SIZES

    d = DemoOptions()
    p = _add_command(
        subparsers,
        "demo",
        _run_demo,
        help="pre-train a tiny Llama with AdamW and with FOAM on local text and compare them",
        description="Pre-train a tiny Llama on the Python standard library's sources twice with transformers.Trainer "
        "(optim='adamw_torch_fused', then optim='foam'; same seed, batches and budget) and report held-out loss, "
        "optimizer-state bytes and time per step. Writes loss.png, results.json and results.csv to --output-dir. "
        "Nothing is downloaded.",
    )
    p.add_argument(
        "--steps",
        type=_positive_int(f"--steps {d.steps}"),
        default=d.steps,
        help=f"optimizer steps (default: {d.steps})",
    )
    p.add_argument(
        "--block-size",
        type=_positive_int(f"--block-size {d.block_size}"),
        default=d.block_size,
        help=f"FOAM block size B (default: {d.block_size})",
    )
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default=d.model_size, help=f"(default: {d.model_size})")
    p.add_argument("--output-dir", type=_output_dir, default=d.output_dir, help=f"(default: {d.output_dir}/)")
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"one peak lr for both optimizers (default: per optimizer, AdamW {DEFAULT_LRS['adamw']:g}, "
        f"FOAM {DEFAULT_LRS['foam']:g}: each one's best of 3e-4..1e-2 at these settings, docs/benchmarks.md)",
    )
    p.add_argument("--seed", type=_seed, default=d.seed, help=f"weights and batch order (default: {d.seed})")
    p.add_argument("--device", type=_device, default=d.device, help="cpu, cuda, cuda:1, ... or auto (default: auto)")
    p.add_argument(
        "--batch-size",
        type=_positive_int(f"--batch-size {d.batch_size}"),
        default=d.batch_size,
        help=f"(default: {d.batch_size})",
    )
    p.add_argument(
        "--seq-len", type=_positive_int(f"--seq-len {d.seq_len}"), default=d.seq_len, help=f"(default: {d.seq_len})"
    )
    p.add_argument(
        "--eval-batches",
        type=_positive_int(f"--eval-batches {d.eval_batches}"),
        default=d.eval_batches,
        help=f"held-out batches per evaluation (default: {d.eval_batches})",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, MissingDemoPackages, run_demo

    try:
        run_demo(DemoOptions.from_namespace(args), progress=not args.no_progress)
    except MissingDemoPackages as err:  # raised before any training
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _add_memory(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .memory_report import DEFAULT_COMPARED_BLOCK_SIZES
    from .model_shapes import KNOWN_MODELS

    p = _add_command(
        subparsers,
        "memory",
        _run_memory,
        help="optimizer-state and training memory of AdamW vs FOAM for a model (no weights loaded)",
        description="Print optimizer-state and whole-training memory (weights + grads + states) of AdamW and FOAM "
        "at several block sizes, with 8-bit Adam, Adafactor and GaLore for context. The model is built on the "
        "meta device from its config: nothing is loaded or downloaded.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a config.json path (or a folder holding one) or a built-in name: " + ", ".join(KNOWN_MODELS),
    )
    p.add_argument(
        "--block-sizes",
        dest="compared_block_sizes",
        metavar="BLOCK_SIZES",
        type=_block_size_list,
        default=DEFAULT_COMPARED_BLOCK_SIZES,
        help="comma-separated FOAM block sizes to compare (default: "
        + ",".join(map(str, DEFAULT_COMPARED_BLOCK_SIZES))
        + ")",
    )
    p.add_argument(
        "--rank",
        type=_positive_int("--rank 256"),
        default=None,
        help="GaLore rank for the context row (default: hidden_size // 4)",
    )
    p.add_argument(
        "--optim-args",
        default=None,
        help="show the effect of per-module overrides written as in TrainingArguments.optim_args, "
        "e.g. 'block_size=4,block_sizes=q_proj:8;lm_head:4'",
    )
    p.add_argument("--format", choices=("markdown", "json"), default="markdown", help="output format")
    return p


def _run_memory(args: argparse.Namespace) -> int:
    """Print the report; on bad input print the error and return 2."""
    import json

    from ..errors import FoamConfigError
    from .memory_markdown import format_markdown
    from .memory_report import memory_report

    try:
        report = memory_report(args.model, args.compared_block_sizes, args.rank, args.optim_args)
    except FoamConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_markdown(report), end="")
    return 0


_NOT_REGISTERED = (
    "Without it, transformers answers `argument --optim: invalid choice: 'foam'` (argparse, e.g. `trl sft`) or "
    "`ValueError: foam is not a valid OptimizerNames` (a config file, or TrainingArguments built before "
    "`import foam_hf`)."
)


def _add_run(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _add_command(
        subparsers,
        "run",
        _run_run,
        help="run any command with optim='foam' registered in every Python process it starts",
        description="Run CMD so that every Python process it starts, children included, has optim='foam' "
        "registered before it parses arguments: `foam-hf run trl sft --optim foam ...`, `foam-hf run "
        "accelerate launch train.py --optim foam`, `foam-hf run torchrun ...`, `foam-hf run python "
        f"run_clm.py args.json`. The exit code is CMD's. {_NOT_REGISTERED}",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD [ARGS...]", help="the command to run")
    return p


def _run_run(args: argparse.Namespace) -> int:
    from ..launcher import run_command

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:  # a usage error, as argparse reports one: usage line, message, exit code 2
        print(
            "usage: foam-hf run CMD [ARGS...]\nfoam-hf run: no command given. Fix: e.g. foam-hf run trl sft "
            "--optim foam ...",
            file=sys.stderr,
        )
        return 2
    return run_command(command)


def _add_autoregister(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _add_command(
        subparsers,
        "autoregister",
        _run_autoregister,
        help="install or remove a start-up hook that registers optim='foam' in this environment",
        description="`on` writes a start-up hook into this environment's site-packages (a .pth import line, "
        "and its PEP 829 .start twin for Python 3.15+) so that every Python process of the environment "
        "registers optim='foam' when it imports transformers, with no command prefix. It only imports "
        "foam_hf, which imports neither torch nor transformers. `off` removes it; `status` says what is "
        f"installed where. Off by default. {_NOT_REGISTERED}",
    )
    p.add_argument("action", choices=["on", "off", "status"])
    p.add_argument("--site-dir", default=None, help="the site-packages folder (default: this Python's)")
    return p


def _run_autoregister(args: argparse.Namespace) -> int:
    from ..launcher import AutoregisterError, autoregister, autoregister_status, is_site_dir

    try:
        if args.action == "status":
            status = autoregister_status(args.site_dir)
        else:
            before = autoregister_status(args.site_dir)
            status = autoregister(args.action == "on", args.site_dir)
            if args.action == "off" and before.on:
                removed = ", ".join(str(p) for p in (before.pth, before.start) if p is not None)
                print(f"foam-hf autoregister: off (removed {removed})")
                return 0
    except AutoregisterError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if args.action == "on" and not is_site_dir(status.site_dir):
        print(
            f"foam-hf autoregister: warning: {status.site_dir} is not a site-packages folder, and Python runs start-up "
            "hooks only from those: no Python will run this one. Fix: foam-hf autoregister off --site-dir "
            f"{status.site_dir}, then pass a folder that `python -m site` lists (or one named site-packages).",
            file=sys.stderr,
        )
    print(status.describe())
    return 0


def _add_env(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _add_command(
        subparsers,
        "env",
        _run_env,
        help="what FOAM runs on here: versions, the CPU kernel, Triton per GPU, and the path each device takes",
        description="Report what FOAM runs on here, for a bug report: package versions, the fused CPU kernel (built, "
        "its instruction set), Triton and the self-check of its kernels on every CUDA device, and the implementation "
        "optim='foam' steps fp32 and bf16 parameters with on each device. The first run builds the CPU kernel "
        "(about a minute).",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _run_env(args: argparse.Namespace) -> int:
    import json

    from .environment import collect, describe

    env = collect()
    print(json.dumps(env.to_dict(), indent=1) if args.json else describe(env))
    return 0


def _add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: prints ``foam-hf X.Y.Z`` (``foam_hf.__version__``) and exits."""
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"foam-hf {__version__}")


def build_parser() -> argparse.ArgumentParser:
    """The ``foam-hf`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="foam-hf",
        description="FOAM, the folded-state Adam optimizer. To use optim='foam' from an unmodified command "
        "(trl sft, accelerate launch, torchrun, example scripts, YAML/JSON configs): `foam-hf run CMD ...`, "
        f"or `foam-hf autoregister on` once per environment. {_NOT_REGISTERED}",
    )
    _add_version(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(subparsers)
    _add_memory(subparsers)
    _add_run(subparsers)
    _add_autoregister(subparsers)
    _add_env(subparsers)
    return parser


def _parse_and_run(words: list[str]) -> int:
    if words[:1] in (["run"], ["autoregister"], ["--version"]):
        # Launcher subcommands and --version parse without the others: building those imports torch and
        # transformers (seconds).
        parser = argparse.ArgumentParser(prog="foam-hf")
        _add_version(parser)
        light = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        _add_run(light)
        _add_autoregister(light)
        args = parser.parse_args(words)
    else:
        args = build_parser().parse_args(words)
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``foam-hf`` console script and of ``python -m foam_hf``; returns the exit code.

    When the reader of the output goes away early (``foam-hf memory ... | head -1``), the command stops quietly
    with exit code 1, as the Python documentation recommends ("Note on SIGPIPE" in the ``signal`` module),
    instead of printing a ``BrokenPipeError`` traceback.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            code = _parse_and_run(words)
        finally:
            # Flush here, inside the try (also before the SystemExit of --help or --version): a pipe closed
            # early would otherwise fail in the interpreter's own flush at exit, out of reach of the except.
            sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at devnull so that flush cannot fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return code
