"""``python -m foam_hf.run SCRIPT [ARGS...]`` (or ``-m MODULE [ARGS...]``): run a training script with
``optim="foam"`` registered before it parses its arguments, as ``python SCRIPT ARGS`` would run it.

For launchers that take a module: ``accelerate launch -m foam_hf.run train.py --optim foam ...`` and
``torchrun --nproc-per-node 2 -m foam_hf.run train.py ...``. Processes the script starts inherit the
registration too (see :mod:`foam_hf.launcher`).
"""

from __future__ import annotations

import os
import runpy
import sys

from .launcher import launch_env

_USAGE = "usage: python -m foam_hf.run SCRIPT [ARGS...]  |  python -m foam_hf.run -m MODULE [ARGS...]"


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or (args[0] == "-m" and len(args) < 2):
        print(_USAGE)
        raise SystemExit(0 if args and args[0] in ("-h", "--help") else 2)
    os.environ.update(launch_env())  # child processes register too
    import foam_hf  # noqa: F401 - registers optim="foam" (lazily, when transformers is imported)

    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        script = args[0]
        sys.argv = [script, *args[1:]]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
