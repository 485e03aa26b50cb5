"""The fused CPU kernel's build: cached under a name keyed to its source, and announced when it is built."""

from __future__ import annotations

import logging

import pytest
import torch
from _helpers import HPARAMS, _fused_cpu, fused_step_results, grad_sequence, make_params


def test_the_cache_name_follows_the_source_bytes(tmp_path, monkeypatch):
    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text("int x = 1;\n")
    b.write_text("int x = 2;\n")
    copy_of_a = tmp_path / "elsewhere" / "a.cpp"
    copy_of_a.parent.mkdir()
    copy_of_a.write_bytes(a.read_bytes())
    assert _fused_cpu.extension_name((str(a),)) != _fused_cpu.extension_name((str(b),))
    assert _fused_cpu.extension_name((str(a),)) == _fused_cpu.extension_name((str(a),))
    # The same bytes in another checkout get their own build (torch's build file names the source path).
    assert _fused_cpu.extension_name((str(a),)) != _fused_cpu.extension_name((str(copy_of_a),))
    # Other compiler flags get a build of their own (torch's cache is not keyed to them).
    assert _fused_cpu.extension_name((str(a),), ("-O3",)) != _fused_cpu.extension_name((str(a),), ("-O2",))
    # So do other linker flags (a sanitized build links the sanitizers' runtimes).
    unlinked = _fused_cpu.extension_name((str(a),))
    monkeypatch.setattr(_fused_cpu, "LDFLAGS", ("-fsanitize=address",))
    assert _fused_cpu.extension_name((str(a),)) != unlinked
    monkeypatch.setattr(_fused_cpu, "LDFLAGS", ())
    # Another torch, Python or compiler (two venvs over one editable checkout) gets a build of its own: torch's
    # build file names their include paths, so one shared name rebuilt the kernel at every switch of venv.
    here = _fused_cpu.build_environment()
    assert _fused_cpu.extension_name((str(a),)) == _fused_cpu.extension_name((str(a),), environment=here)
    for index in range(len(here)):
        other = (*here[:index], here[index] + "-other", *here[index + 1 :])
        assert _fused_cpu.extension_name((str(a),), environment=other) != _fused_cpu.extension_name((str(a),))
    # The shipped source gets a name of its own, not one fixed name for every version.
    assert _fused_cpu.extension_name() not in (_fused_cpu.extension_name((str(a),)), "foam_hf_fused_cpu_v3")


class BuildCalls(list):
    """The names torch's (stubbed) build was asked for; ``folders`` the ``build_directory`` of each."""

    def __init__(self):
        super().__init__()
        self.folders = []


@pytest.fixture
def fresh_loader(monkeypatch):
    """load_kernel as in a new process, with torch's build replaced by a stub (this test is about our logging
    and cache logic, not about compiling): the stub records the name it was asked to build, and where."""
    import torch.utils.cpp_extension

    calls = BuildCalls()

    def load(name, **kwargs):
        calls.append(name)
        calls.folders.append(kwargs.get("build_directory"))
        return object()

    monkeypatch.setattr(_fused_cpu, "_tried", False)
    monkeypatch.setattr(_fused_cpu, "_kernel", None)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    return calls


def test_a_build_into_an_empty_cache_is_announced_with_its_duration(tmp_path, monkeypatch, caplog, fresh_loader):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level(logging.INFO, logger=_fused_cpu.__name__):
        assert _fused_cpu.load_kernel() is not None
    name = _fused_cpu.extension_name()
    assert fresh_loader == [name]
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith(f"FOAM: building the fused CPU kernel {name}")
    assert messages[1].startswith(f"FOAM: fused CPU kernel {name} built in")
    # built in the folder the next process imports from, named to torch explicitly (not left to torch's own
    # layout, which a torch release may change: every process would then rebuild)
    assert fresh_loader.folders == [str(tmp_path / name)] and (tmp_path / name).is_dir()


def test_a_cached_build_is_imported_without_torch_ninja_or_a_compiler(tmp_path, monkeypatch, caplog, kernel):
    # The kernel this machine built, copied to where build_directory() puts it under another
    # TORCH_EXTENSIONS_DIR: imported as it is. torch's load (which needs ninja on PATH, a writable cache, and may
    # rebuild on file times alone) is never called.
    import os
    import shutil

    import torch.utils.cpp_extension

    name = _fused_cpu.extension_name()
    built = _fused_cpu.build_directory(name)  # where the kernel fixture's build is
    assert os.path.exists(f"{built}/{name}.so"), built
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / name).mkdir()
    shutil.copy(f"{built}/{name}.so", tmp_path / name / f"{name}.so")
    monkeypatch.setattr(_fused_cpu, "_tried", False)
    monkeypatch.setattr(_fused_cpu, "_kernel", None)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kwargs: pytest.fail("torch's load was called"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no ninja, no compiler
    with caplog.at_level(logging.INFO, logger=_fused_cpu.__name__):
        module = _fused_cpu.load_kernel()
    assert module is not None and "portable" in module.available_isas()
    assert [r.levelname for r in caplog.records] == ["INFO"] and "loaded from" in caplog.records[0].getMessage()


def test_a_cached_build_that_does_not_import_is_built_again_aloud(tmp_path, monkeypatch, caplog, fresh_loader):
    name = _fused_cpu.extension_name()
    (tmp_path / name).mkdir()
    (tmp_path / name / f"{name}.so").write_bytes(b"")  # a build cut short
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level(logging.INFO, logger=_fused_cpu.__name__):
        assert _fused_cpu.load_kernel() is not None
    assert fresh_loader == [name]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "does not load" in warnings[0] and "building it again" in warnings[0]
    assert warnings[1].startswith(f"FOAM: building the fused CPU kernel {name}")


def test_a_lock_left_by_a_killed_build_is_removed_not_waited_on_forever(tmp_path, monkeypatch, caplog, fresh_loader):
    import os

    name = _fused_cpu.extension_name()
    (tmp_path / name).mkdir()
    lock = tmp_path / name / "lock"
    lock.write_text("")
    old = lock.stat().st_mtime - _fused_cpu.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger=_fused_cpu.__name__):
        assert _fused_cpu.load_kernel() is not None
    assert not lock.exists() and fresh_loader == [name]
    assert f"removing {lock}" in caplog.records[0].getMessage() and "killed" in caplog.records[0].getMessage()


def test_a_build_running_elsewhere_is_waited_for_and_said(tmp_path, monkeypatch, caplog, fresh_loader):
    import threading

    name = _fused_cpu.extension_name()
    (tmp_path / name).mkdir()
    lock = tmp_path / name / "lock"
    lock.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    threading.Timer(1.5, lock.unlink).start()  # the other process finishes
    with caplog.at_level(logging.WARNING, logger=_fused_cpu.__name__):
        assert _fused_cpu.load_kernel() is not None
    assert (
        "waiting for another process" in caplog.records[0].getMessage() and str(lock) in caplog.records[0].getMessage()
    )


def test_the_build_finds_this_environments_ninja_when_it_was_not_activated(tmp_path, monkeypatch, fresh_loader):
    import os
    import sys

    import torch.utils.cpp_extension

    (tmp_path / "bin").mkdir()
    ninja = tmp_path / "bin" / "ninja"
    ninja.write_text("#!/bin/sh\n")
    ninja.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    seen = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kwargs: seen.append(os.environ["PATH"]) or object())
    assert _fused_cpu.load_kernel() is not None
    assert seen == [f"{tmp_path / 'bin'}{os.pathsep}/nonexistent"] and os.environ["PATH"] == "/nonexistent"


def test_a_build_failure_names_its_cause_not_only_the_command():
    log = (
        "RuntimeError: Error building extension 'foam_hf_fused_cpu_abc': [1/2] c++ -MMD -MF foam_cpu.o.d -c x.cpp\n"
        "FAILED: foam_cpu.o\nc++ -MMD -MF foam_cpu.o.d -c x.cpp\n/bin/sh: 1: c++: not found\nninja: build stopped"
    )
    summary = _fused_cpu.build_failure_summary(log)
    assert summary.startswith("RuntimeError: Error building extension") and "(/bin/sh: 1: c++: not found)" in summary


@pytest.mark.parametrize(
    "error, fix",
    [
        ("RuntimeError: Ninja is required to load C++ extensions", "pip install ninja"),
        ("RuntimeError: Error building extension 'x': [1/2] c++ -c x.cpp\n/bin/sh: 1: c++: not found", "C++ compiler"),
        ("NotADirectoryError: [Errno 20] Not a directory: '/dev/null/x/lock'", "must be a writable folder"),
        # A missing compiler under ninja: the log ends with ninja's "build stopped", which is not a missing ninja
        # (the fix offered was "pip install ninja", with ninja installed).
        (
            "RuntimeError: Error building extension 'x': [1/2] /opt/g++ -c x.cpp\nFAILED: x.o\n"
            "/bin/sh: 1: /opt/g++: not found\nninja: build stopped: subcommand failed.",
            "C++ compiler",
        ),
        (
            "RuntimeError: Error building extension 'x': [1/2] c++ -c x.cpp\nFAILED: x.o\n"
            "x.cpp:1:10: fatal error: Python.h: No such file or directory\nninja: build stopped: subcommand failed.",
            "development headers",
        ),
        ("FileNotFoundError: [Errno 2] No such file or directory: 'ninja'", "pip install ninja"),
        # a missing cache folder is no compiler problem, though "access" holds "cc" and an empty CXX is in every line
        ("FileNotFoundError: [Errno 2] No such file or directory: '/no/access/x/lock'", "must be a writable folder"),
    ],
)
@pytest.mark.parametrize("cxx", [None, "", "/opt/gcc-13/bin/g++-13"])
def test_a_build_failure_gets_the_fix_its_error_calls_for(error, fix, cxx, monkeypatch):
    if cxx is None:
        monkeypatch.delenv("CXX", raising=False)
    else:
        monkeypatch.setenv("CXX", cxx)
    assert fix in _fused_cpu.build_failure_fix(error)


def test_a_missing_compiler_named_by_cxx_gets_the_compiler_fix(monkeypatch):
    monkeypatch.setenv("CXX", "/opt/gcc-13/bin/g++-13")
    error = "RuntimeError: Error building extension 'x'\n/bin/sh: 1: /opt/gcc-13/bin/g++-13: not found"
    assert "C++ compiler" in _fused_cpu.build_failure_fix(error)


def test_the_build_leaves_an_unset_path_unset(tmp_path, monkeypatch, fresh_loader):
    import os

    monkeypatch.delenv("PATH", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert _fused_cpu.load_kernel() is not None
    assert "PATH" not in os.environ


def test_a_stale_lock_in_a_read_only_cache_does_not_cost_the_cached_build(tmp_path, monkeypatch, caplog, kernel):
    import os
    import shutil

    name = _fused_cpu.extension_name()
    (tmp_path / name).mkdir()
    shutil.copy(f"{_fused_cpu.build_directory(name)}/{name}.so", tmp_path / name / f"{name}.so")
    lock = tmp_path / name / "lock"
    lock.write_text("")
    old = lock.stat().st_mtime - _fused_cpu.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))

    def read_only(path, *args, **kwargs):
        raise PermissionError(30, "Read-only file system", str(path))

    monkeypatch.setattr(os, "remove", read_only)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(_fused_cpu, "_tried", False)
    monkeypatch.setattr(_fused_cpu, "_kernel", None)
    with caplog.at_level(logging.WARNING, logger=_fused_cpu.__name__):
        assert _fused_cpu.load_kernel() is not None
    assert "cannot remove" in caplog.records[-1].getMessage()


def test_the_build_without_the_simd_code_steps_as_the_portable_code_here(monkeypatch, kernel):
    """ARM CPUs and clang builds compile the kernel without the explicit-SIMD code: one build of the portable C++
    (gcc-style target_clones on x86), nothing else. No CI machine is one, so gcc builds that configuration here
    (FOAM_PORTABLE_ONLY) through load_kernel, as a user's first step would. It must offer only the portable code and
    step bit for bit as this build's baseline build of it (the builds compute the same values), over fp32, bf16
    (stochastically rounded too), fp16 and fp64 weights, both state dtypes and folded and unfolded tensors."""
    cases = [
        (torch.float32, 4, "float32", "nearest"),
        (torch.float32, 8, "bfloat16", "nearest"),
        (torch.bfloat16, 2, "float32", "stochastic"),
        (torch.bfloat16, 16, "bfloat16", "nearest"),
        (torch.float16, 5, "float32", "nearest"),
        (torch.float64, 4, None, "nearest"),
    ]

    def steps(dtype, block_size, state_dtype, weight_rounding):
        params = make_params([(3, 9 * block_size + 3), (2, 4, 32), (37,)], dtype)
        options = dict(block_size=block_size, state_dtype=state_dtype, weight_rounding=weight_rounding)
        return fused_step_results(params, grad_sequence(params, 3), **options, **HPARAMS["every_term"])

    default_isa = kernel.isa()
    kernel.set_isa("portable")
    try:
        expected = {case: steps(*case) for case in cases}
    finally:
        kernel.set_isa(default_isa)

    monkeypatch.delenv(_fused_cpu.ISA_ENV, raising=False)
    monkeypatch.setattr(_fused_cpu, "CFLAGS", (*_fused_cpu.CFLAGS, "-DFOAM_PORTABLE_ONLY"))
    monkeypatch.setattr(_fused_cpu, "_tried", False)
    monkeypatch.setattr(_fused_cpu, "_kernel", None)
    portable_only = _fused_cpu.load_kernel()
    assert portable_only is not None, _fused_cpu.kernel_build_error()
    assert portable_only is not kernel
    assert list(portable_only.available_isas()) == ["portable"] and portable_only.isa() == "portable"
    for case in cases:
        for index, (a, b) in enumerate(zip(expected[case], steps(*case))):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (case, index)
