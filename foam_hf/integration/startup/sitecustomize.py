"""Put on ``PYTHONPATH`` by ``foam-hf run`` and ``python -m foam_hf.run``: every Python process they start,
children included (``trl`` -> ``accelerate launch`` -> the training script, ``torchrun`` workers), registers
``optim="foam"`` before any argument is parsed. ``import foam_hf`` is light and registers lazily, when
transformers is imported. This file shadows the environment's own ``sitecustomize``, which it then runs."""

import os
import sys


def _start() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        import foam_hf  # noqa: F401 - registers optim="foam" when transformers is imported
    except ImportError as exc:
        sys.stderr.write(
            f"foam-hf run: this Python ({sys.executable}) cannot import foam_hf ({exc}); "
            "optim='foam' is not registered in it.\n"
        )
    import importlib.machinery
    import importlib.util

    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_start()
