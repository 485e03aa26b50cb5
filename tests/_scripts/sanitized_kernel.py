"""A pytest plugin (``-p sanitized_kernel``, with this folder on ``PYTHONPATH``): the fused CPU kernel built with
AddressSanitizer and UndefinedBehaviorSanitizer in place of the normal build, so that the kernel tests run every
implementation (portable, AVX2, AVX-512: those this CPU runs) under both. Any out-of-bounds access, misaligned
access or other undefined behaviour in the kernel stops the run with a report. ``.ci/sanitize`` runs it; the
sanitizers' runtimes must be preloaded into Python, which is not built with them.

The build is cached like the normal one, under a name keyed to the sources and to these flags.
"""

from __future__ import annotations

import os

import torch.utils.cpp_extension

from foam_hf import _fused_cpu

SANITIZE = (
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",  # a report stops the run: none is missed in the log
    "-fno-omit-frame-pointer",
    "-g",
)

_flags = (*_fused_cpu.CFLAGS, *SANITIZE)
_name = _fused_cpu.extension_name(cflags=_flags)
_openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
_directory = _fused_cpu.build_directory(_name)
os.makedirs(_directory, exist_ok=True)
_kernel = torch.utils.cpp_extension.load(
    name=_name,
    sources=[_fused_cpu._SOURCE],
    build_directory=_directory,
    extra_cflags=[*_flags, *_openmp],
    extra_ldflags=[*_openmp, *SANITIZE[:1]],
    extra_include_paths=[_fused_cpu._CSRC],
    verbose=False,
)
_fused_cpu._kernel = _kernel
_fused_cpu._tried = True
_fused_cpu._apply_isa_env(_kernel)
print(f"sanitized fused CPU kernel: {_kernel.__file__} (runs {_kernel.isa()}; this CPU: {_kernel.available_isas()})")
