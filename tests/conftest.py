"""Session-wide test settings, and the pytest fixtures over the tables of tests/_helpers.py.

``TRITON_INTERPRET=1``: Triton kernels run in Triton's interpreter, on CPU tensors (tests/test_fused_triton.py).
It must be set before Triton is first imported (by transformers, bitsandbytes or foam-hf), because Triton
decorates its own standard-library functions at import time; conftest.py is loaded before any test module.
The suite is CPU-only, so nothing here wants compiled Triton kernels.
"""

import os
import shutil

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

from _helpers import CPU_ISAS, _fused_cpu  # noqa: E402  (after TRITON_INTERPRET: it imports foam_hf)


@pytest.fixture(scope="module")
def kernel():
    """The fused CPU kernel. Where a C++ compiler exists and the kernel does not build, the test fails with
    the build error (a broken kernel must not hide behind the fallback); with no compiler it is skipped."""
    module = _fused_cpu.load_kernel()
    if module is None:
        if shutil.which("c++") or shutil.which("g++"):
            reason = _fused_cpu.kernel_build_error()
            pytest.fail(f"a C++ compiler is present but the fused kernel did not build: {reason}")
        pytest.skip(f"no C++ compiler on this machine, fused kernel unavailable: {_fused_cpu.kernel_build_error()}")
    return module


@pytest.fixture(params=CPU_ISAS)
def isa(request, kernel):
    """Each implementation of the fused kernel  this CPU can run, the others skipped
    with that reason; the default implementation is restored afterwards."""
    if request.param not in kernel.available_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernel (it runs {kernel.available_isas()})")
    default = kernel.isa()
    kernel.set_isa(request.param)
    yield request.param
    kernel.set_isa(default)
