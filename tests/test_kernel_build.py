"""The fused CPU kernel's build: cached under a name keyed to its source, and announced when it is built."""

from __future__ import annotations

import logging

import pytest
from _helpers import _fused_cpu


def test_the_cache_name_follows_the_source_bytes(tmp_path):
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
    # Another torch, Python or compiler (two venvs over one editable checkout) gets a build of its own: torch's
    # build file names their include paths, so one shared name rebuilt the kernel at every switch of venv.
    here = _fused_cpu.build_environment()
    assert _fused_cpu.extension_name((str(a),)) == _fused_cpu.extension_name((str(a),), environment=here)
    for index in range(len(here)):
        other = (*here[:index], here[index] + "-other", *here[index + 1 :])
        assert _fused_cpu.extension_name((str(a),), environment=other) != _fused_cpu.extension_name((str(a),))
    # The shipped source gets a name of its own, not one fixed name for every version.
    assert _fused_cpu.extension_name() not in (_fused_cpu.extension_name((str(a),)), "foam_hf_fused_cpu_v3")


@pytest.fixture
def fresh_loader(monkeypatch):
    """load_kernel as in a new process, with torch's build replaced by a stub (this test is about our logging
    and cache logic, not about compiling): the stub records the name it was asked to build."""
    import torch.utils.cpp_extension

    calls = []
    monkeypatch.setattr(_fused_cpu, "_tried", False)
    monkeypatch.setattr(_fused_cpu, "_kernel", None)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda name, **kwargs: calls.append(name) or object())
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


def test_a_cached_build_is_only_loaded(tmp_path, monkeypatch, caplog, fresh_loader):
    # torch's layout: <TORCH_EXTENSIONS_DIR>/<python+build tag>/<name>/<name>.so
    name = _fused_cpu.extension_name()
    (tmp_path / "py311_cpu" / name).mkdir(parents=True)
    (tmp_path / "py311_cpu" / name / f"{name}.so").write_bytes(b"")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level(logging.INFO, logger=_fused_cpu.__name__):
        _fused_cpu.load_kernel()
    messages = [r.getMessage() for r in caplog.records]
    assert not any("building" in m for m in messages)
    assert messages == [m for m in messages if "loaded from torch's cache" in m] and len(messages) == 1


def test_a_cached_build_that_torch_rebuilds_is_said_aloud(tmp_path, monkeypatch, caplog, fresh_loader):
    # A cached name whose build torch found stale compiles again for about a minute: a warning, not a quiet INFO
    # line saying it was loaded from the cache. The stub's clock advances past the threshold during the load.
    name = _fused_cpu.extension_name()
    (tmp_path / "py311_cpu" / name).mkdir(parents=True)
    (tmp_path / "py311_cpu" / name / f"{name}.so").write_bytes(b"")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    clock = iter([100.0, 100.0 + _fused_cpu._REBUILT_AFTER_SECONDS + 40])
    monkeypatch.setattr(_fused_cpu.time, "perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger=_fused_cpu.__name__):
        _fused_cpu.load_kernel()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "took 45.0 s to load: torch rebuilt its cached build" in warnings[0]
