"""The suite's own launcher (``run_process_tree`` in tests/_helpers.py), which every multi-process test runs through.

Two failures it exists for, each of which once hung later tests: workers outliving a launch that ran past its
timeout (torchrun starts each in a session of its own, and ``subprocess.run`` kills only the process it started),
and a lock file a killed torch extension build left, on which every later build of that extension waits forever.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from _helpers import _fused_cpu, run_process_tree

# A parent that starts a child in a session of its own, as torchrun starts its workers, writes the child's pid,
# and waits on it: both would run for ten minutes.
SPAWN_AND_WAIT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
child.wait()
"""


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (killed, not yet reaped by whichever process adopted it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_launch_past_its_timeout_ends_every_process_it_started(tmp_path):
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"ran past its 5 s and was killed with every process it started"):
        run_process_tree([sys.executable, "-c", SPAWN_AND_WAIT, str(pid_file)], timeout=5)
    assert time.monotonic() - started < 60
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(child), f"the worker {child} outlived its launch"


def test_a_stale_extension_lock_fails_the_launch_before_it_starts_naming_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    marker = tmp_path / "ran"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]

    ours = Path(_fused_cpu.build_directory(_fused_cpu.extension_name())) / "lock"
    fresh = tmp_path / "deepspeed_cpu_adam" / "lock"  # a build under way in another process
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    for lock in (ours, fresh, stale):
        lock.parent.mkdir(parents=True)
        lock.touch()
    long_ago = time.time() - _fused_cpu.STALE_LOCK_SECONDS - 60
    os.utime(ours, (long_ago, long_ago))  # FOAM's loader removes its own stale lock: not reported

    assert run_process_tree(command, timeout=120).returncode == 0 and marker.exists()

    marker.unlink()
    os.utime(stale, (long_ago, long_ago))
    with pytest.raises(AssertionError) as failure:
        run_process_tree(command, timeout=120)
    assert not marker.exists()
    message = str(failure.value)
    assert f"1 torch extension build lock(s) older than {_fused_cpu.STALE_LOCK_SECONDS:.0f} s: {stale}." in message
    assert "Fix: delete them" in message and str(ours) not in message and str(fresh) not in message
