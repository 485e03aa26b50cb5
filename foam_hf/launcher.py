"""``optim="foam"`` wherever Hugging Face users launch training, without editing a script.

argparse fixes the choices of ``--optim`` when a parser is built, and config files are checked against
transformers' ``OptimizerNames`` when ``TrainingArguments`` is built, in every process that parses
(the ``trl`` CLI parses, then parses again in the child ``accelerate launch`` starts). So each Python process
must have ``foam_hf`` imported, which registers the names lazily, before its arguments are parsed:

* :func:`run_command` (``foam-hf run CMD ...``) runs any command with a ``sitecustomize`` of ours first on
  ``PYTHONPATH``, so every Python process under it imports ``foam_hf`` at start-up (and then runs the
  environment's own ``sitecustomize``);
* :mod:`foam_hf.run` (``python -m foam_hf.run SCRIPT ...``) does the same in-process, for
  ``accelerate launch -m foam_hf.run`` and ``torchrun -m foam_hf.run``;
* :func:`autoregister` (``foam-hf autoregister on``) installs a start-up hook in one environment, for
  when commands cannot be prefixed: a ``.pth`` import line (Python <= 3.14) and its PEP 829 ``.start``
  twin (3.15+, where the ``.start`` file disables the ``.pth`` import line). Both only ``import foam_hf``,
  which imports neither torch nor transformers, so start-up costs stay within noise (docs/usage.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HOOK_NAME",
    "AutoregisterError",
    "AutoregisterStatus",
    "autoregister",
    "autoregister_status",
    "launch_env",
    "run_command",
]

#: Directory holding the ``sitecustomize.py`` that :func:`run_command` puts first on ``PYTHONPATH``.
STARTUP_DIR = str(Path(__file__).resolve().parent / "integration" / "startup")

#: Base name of the start-up hook files :func:`autoregister` writes into site-packages.
HOOK_NAME = "foam_hf-autoregister"

_PTH_LINE = "import sys; exec('try:\\n import foam_hf\\nexcept ImportError:\\n pass')\n"
_START_LINE = "foam_hf.integration:register_lazily\n"
_HEADER = "# Written by `foam-hf autoregister on`: registers optim='foam' when transformers is imported.\n"


def launch_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with foam-hf's start-up directory first on ``PYTHONPATH``."""
    result = dict(os.environ if env is None else env)
    value = result.get("PYTHONPATH", "")
    # An empty entry (``PYTHONPATH=:/x``, ``$PYTHONPATH:/x``) means the current directory to Python: kept.
    parts = [p for p in value.split(os.pathsep) if not p or os.path.realpath(p) != STARTUP_DIR] if value else []
    result["PYTHONPATH"] = os.pathsep.join([STARTUP_DIR, *parts])
    return result


def run_command(command: Sequence[str]) -> int:
    """Run ``command`` with ``optim="foam"`` registered in every Python process it starts; its exit code.

    On POSIX the command replaces this process (signals and the exit code are the command's own)."""
    if not command:
        raise ValueError("foam-hf run: no command given. Fix: e.g. foam-hf run trl sft --optim foam ...")
    executable = shutil.which(command[0])
    if (
        executable is None
        and os.path.isfile(command[0])
        and os.sep not in command[0]
        and os.access(command[0], os.X_OK)
    ):
        sys.stderr.write(
            f"foam-hf run: {command[0]!r} is a program in the current directory, which is not on PATH (as in a "
            f"shell). Fix: foam-hf run ./{command[0]} ...\n"
        )
        return 127
    if executable is None and os.path.isfile(command[0]):
        sys.stderr.write(
            f"foam-hf run: {command[0]!r} is a file but not executable: CMD is run as a program. Fix: run it "
            f"with its interpreter, e.g. foam-hf run python {command[0]} ... or foam-hf run bash {command[0]} ..., "
            f"or make it executable (chmod +x {command[0]}).\n"
        )
        return 126
    if executable is None:
        sys.stderr.write(
            f"foam-hf run: command not found: {command[0]!r}: CMD is a program on PATH or the path of one. Fix: "
            "install it in this environment or give its full path, e.g. foam-hf run python train.py ...\n"
        )
        return 127
    env = launch_env()
    if os.name == "posix":
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(executable, list(command), env)
    return subprocess.call([executable, *command[1:]], env=env)


def _site_dir(site_dir: str | os.PathLike[str] | None) -> Path:
    return Path(site_dir) if site_dir is not None else Path(sysconfig.get_paths()["purelib"])


def _hook_files(site_dir: Path) -> tuple[Path, Path]:
    return site_dir / f"{HOOK_NAME}.pth", site_dir / f"{HOOK_NAME}.start"


class AutoregisterError(OSError):
    """:func:`autoregister` could not change the start-up hook; the message says why and how to fix it."""


class SiteDirNotFoundError(AutoregisterError, FileNotFoundError):
    """The site-packages folder given to :func:`autoregister` does not exist (a ``FileNotFoundError``, as before)."""


@dataclass(frozen=True)
class AutoregisterStatus:
    """Which start-up hook files exist in ``site_dir``, and whether this interpreter reads ``.start`` files."""

    site_dir: Path
    pth: Path | None
    start: Path | None
    start_files_supported: bool

    @property
    def on(self) -> bool:
        return self.pth is not None or self.start is not None

    def describe(self) -> str:
        if not self.on:
            return f"foam-hf autoregister: off (no hook in {self.site_dir})"
        files = ", ".join(str(p) for p in (self.pth, self.start) if p is not None)
        active = "the .start file" if self.start_files_supported and self.start else "the .pth import line"
        return f"foam-hf autoregister: on ({files}); Python {sys.version_info[0]}.{sys.version_info[1]} runs {active}"


def autoregister_status(site_dir: str | os.PathLike[str] | None = None) -> AutoregisterStatus:
    """What :func:`autoregister` installed in ``site_dir`` (default: this environment's site-packages)."""
    directory = _site_dir(site_dir)
    pth, start = _hook_files(directory)
    return AutoregisterStatus(
        directory, pth if pth.exists() else None, start if start.exists() else None, sys.version_info >= (3, 15)
    )


def autoregister(enable: bool, site_dir: str | os.PathLike[str] | None = None) -> AutoregisterStatus:
    """Install (``enable=True``) or remove the start-up hook in ``site_dir`` (default: this environment's
    site-packages); return the resulting status. Idempotent."""
    directory = _site_dir(site_dir)
    if not directory.is_dir():
        raise SiteDirNotFoundError(
            f"foam-hf autoregister: {directory} is not a directory. Fix: pass --site-dir with an existing "
            "site-packages folder, or run the command with the Python of the environment to change."
        )
    pth, start = _hook_files(directory)
    try:
        if enable:
            pth.write_text(_HEADER + _PTH_LINE, encoding="utf-8")
            start.write_text(_HEADER + _START_LINE, encoding="utf-8")
        else:
            for path in (pth, start):
                path.unlink(missing_ok=True)
    except OSError as exc:  # a root-owned system site-packages, a read-only or pseudo file system
        raise AutoregisterError(
            f"foam-hf autoregister: cannot {'write' if enable else 'remove'} the start-up hook in {directory} "
            f"({exc.strerror or exc}): the hook lives in the site-packages of the environment it registers in. "
            "Fix: run it as a user who may write there, or pass --site-dir with a site-packages folder you own "
            "(`python -m site --user-site` prints yours)."
        ) from exc
    return autoregister_status(directory)


def is_site_dir(directory: str | os.PathLike[str]) -> bool:
    """Whether Python reads ``.pth``/``.start`` files in ``directory``: one of this Python's site folders, or a
    folder named like one (``site-packages``/``dist-packages``, e.g. another environment's)."""
    import site

    path = Path(directory).resolve()
    known = [*site.getsitepackages(), site.getusersitepackages()]
    return path.name in ("site-packages", "dist-packages") or any(path == Path(p).resolve() for p in known)
