"""Where a benchmark's numbers come from, for the line under every results table: the source commit and the CPU.

``cpu_name`` is the demo's (:func:`foam_hf.tools.demo_training.cpu_name`), so the demo's ``results.json`` and the
benchmark tables name a machine the same way.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from foam_hf.tools.demo_training import cpu_name

__all__ = ["cpu_name", "git_sha"]


def git_sha() -> str:
    """The short commit of the checkout these scripts are in (not of the working folder), or ``"unknown"``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()
