"""``python -m foam_hf.run SCRIPT [ARGS...]`` (or ``-m MODULE [ARGS...]``): run a training script with
``optim="foam"`` registered before it parses its arguments, as ``python SCRIPT ARGS`` would run it.

For launchers that take a module: ``accelerate launch -m foam_hf.run train.py --optim foam ...`` and
``torchrun --nproc-per-node 2 -m foam_hf.run train.py ...``. Processes the script starts inherit the
registration too (see :mod:`foam_hf.launcher`), except under ``python -I``/``-E``, which ignore ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import runpy
import sys

from .launcher import launch_env

_USAGE = "usage: python -m foam_hf.run SCRIPT [ARGS...]  |  python -m foam_hf.run -m MODULE [ARGS...]"


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:  # as `foam-hf run -- CMD` takes it
        args = args[1:]
    if not args or args[0] in ("-h", "--help") or (args[0] == "-m" and len(args) < 2):
        asked = bool(args) and args[0] in ("-h", "--help")
        print(_USAGE, file=sys.stdout if asked else sys.stderr)
        raise SystemExit(0 if asked else 2)
    os.environ.update(launch_env())  # child processes register too
    import foam_hf  # noqa: F401 - registers optim="foam" (lazily, when transformers is imported)

    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        if not _module_exists(args[1]):
            _refuse(
                f"no module named {args[1]!r}: -m MODULE runs an importable module, as `python -m MODULE` does. "
                f"Fix: check the name and that this Python ({sys.executable}) has it installed, or give a script "
                "path without -m."
            )
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        script = args[0]
        if not os.path.exists(script):
            _refuse(
                f"can't open script {script!r} ({os.path.abspath(script)}): no such file. SCRIPT is the path of a "
                "Python file, as in `python SCRIPT`; a module is run with -m MODULE. Fix: check the path (it is "
                f"relative to {os.getcwd()}), e.g. python -m foam_hf.run train.py --optim foam ..."
            )
        sys.argv = [script, *args[1:]]
        if not getattr(
            sys.flags, "safe_path", False
        ):  # (3.11+) as `python SCRIPT`: the script's real folder replaces -m's current directory
            sys.path[0] = os.path.dirname(os.path.realpath(script))
        runpy.run_path(script, run_name="__main__")


def _module_exists(name: str) -> bool:
    """Whether module ``name`` exists (its parent packages are imported to find out, as ``-m`` would). An error
    raised inside a parent package (say, its own missing dependency) is not ours to reword: it propagates."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError as exc:  # a parent package of the name itself is missing
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            return False
        raise
    except ValueError:  # an empty or relative name
        return False


def _refuse(message: str) -> None:
    """Print ``python -m foam_hf.run: message`` and exit with code 2, like a command-line usage error."""
    sys.stderr.write(f"python -m foam_hf.run: {message}\n")
    raise SystemExit(2)


if __name__ == "__main__":
    main()
