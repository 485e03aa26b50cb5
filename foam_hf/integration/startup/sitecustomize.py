"""Put on ``PYTHONPATH`` by ``foam-hf run`` and ``python -m foam_hf.run``: every Python process they start,
children included (``trl`` -> ``accelerate launch`` -> the training script, ``torchrun`` workers), registers
``optim="foam"`` before any argument is parsed. ``import foam_hf`` is light and registers lazily, when
transformers is imported. This file shadows the environment's own ``sitecustomize``, which it then runs.

Other copies of this file may be on the path too (a ``foam-hf`` of another environment, of another version,
running this one's ``python -m foam_hf.run``; one folder under two spellings): the chain skips every folder whose
``sitecustomize.py`` starts as this one does, so it ends at the environment's own file, run once."""

import os
import sys

#: How every version of this file begins: what marks a folder as one of ours.
_MARK = b'"""Put on ``PYTHONPATH`` by ``foam-hf run``'


def _ours(folder: str) -> bool:
    try:
        with open(os.path.join(folder or os.curdir, "sitecustomize.py"), "rb") as handle:
            return handle.read(len(_MARK)) == _MARK
    except OSError:
        return False


def _start() -> None:
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

    path = [p for p in sys.path if not _ours(p)]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_start()
