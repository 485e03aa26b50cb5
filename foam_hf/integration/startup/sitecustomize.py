"""Put on ``PYTHONPATH`` by ``foam-hf run`` and ``python -m foam_hf.run``: every Python process they start,
children included (``trl`` -> ``accelerate launch`` -> the training script, ``torchrun`` workers), registers
``optim="foam"`` before any argument is parsed. ``import foam_hf`` is light and registers lazily, when
transformers is imported. This file shadows the environment's own ``sitecustomize``, which it then runs.

Two copies of this file may be on the path (a ``foam-hf`` of another environment running this one's
``python -m foam_hf.run``, or one folder under two spellings): the folders already seen are kept in
``sys._foam_hf_startup_dirs``, so each copy skips them all and the chain ends at the environment's own file."""

import os
import sys


def _start() -> None:
    seen = sys.__dict__.setdefault("_foam_hf_startup_dirs", set())
    first = not seen
    seen.add(os.path.realpath(os.path.dirname(os.path.abspath(__file__))))
    if first:
        try:
            import foam_hf  # noqa: F401 - registers optim="foam" when transformers is imported
        except ImportError as exc:
            sys.stderr.write(
                f"foam-hf run: this Python ({sys.executable}) cannot import foam_hf ({exc}); "
                "optim='foam' is not registered in it. Fix: install foam-hf in this environment, "
                "or start this Python outside foam-hf run.\n"
            )
    import importlib.machinery
    import importlib.util

    path = [p for p in sys.path if os.path.realpath(p or os.curdir) not in seen]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_start()
