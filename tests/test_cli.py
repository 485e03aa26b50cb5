"""The ``foam-hf`` command line as a shell runs it: ``--version``, and output piped into a reader that stops
early.

Each test starts ``python -m foam_hf`` (the same ``main`` as the console script) in a subprocess with this
checkout first on ``PYTHONPATH``, and checks what a user sees: the exit code, stdout and stderr.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
FOAM_HF = [sys.executable, "-m", "foam_hf"]


def test_version_prints_the_installed_distribution_version():
    result = subprocess.run([*FOAM_HF, "--version"], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # The version pip installed (pyproject.toml reads it from foam_hf.__version__), as `foam-hf X.Y.Z`.
    assert result.stdout == f"foam-hf {importlib.metadata.version('foam-hf')}\n"


def test_a_reader_that_stops_early_ends_the_command_quietly():
    # `foam-hf memory ... | head -1`: the reader goes away before the command has written everything. Here
    # it is gone before the first byte, so the write fails every time, not only when the output outgrows
    # the pipe's buffer.
    args = ["memory", "llama-60m", "--format", "json"]
    proc = subprocess.Popen([*FOAM_HF, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    try:
        stderr = proc.stderr.read()
        proc.wait(timeout=300)
    finally:
        proc.kill()
    # Python's documented recipe ("Note on SIGPIPE", signal module): exit code 1, no traceback, and no
    # "Exception ignored ... BrokenPipeError" from the interpreter's own flush at exit.
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr, stderr
