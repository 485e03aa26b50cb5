"""A pytest plugin (``-p sanitized_kernel``, with this folder on ``PYTHONPATH``): the fused CPU kernel built with
AddressSanitizer and UndefinedBehaviorSanitizer in place of the normal build, so that the kernel tests run every
implementation (portable, AVX2, AVX-512: those this CPU runs) under both. Any out-of-bounds access, misaligned
access or other undefined behaviour in the kernel stops the run with a report. ``.ci/sanitize`` runs it; the
sanitizers' runtimes must be preloaded into Python, which is not built with them.

The build is cached like the normal one, under a name keyed to the sources and to these flags.
"""

from __future__ import annotations

from foam_hf import _fused_cpu

SANITIZE = (
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",  # a report stops the run: none is missed in the log
    "-fno-omit-frame-pointer",
    "-g",
)

# The package's own build, with the flags added: its name, cache, lock and messages are those of any build.
_fused_cpu.CFLAGS = (*_fused_cpu.CFLAGS, *SANITIZE)
_fused_cpu.LDFLAGS = (*_fused_cpu.LDFLAGS, SANITIZE[0])
_fused_cpu._tried = False
_kernel = _fused_cpu.load_kernel()
if _kernel is None:  # the package would fall back to its for-loop path: nothing sanitized would run
    raise RuntimeError(f"the sanitized fused CPU kernel did not build: {_fused_cpu._error}")
print(f"sanitized fused CPU kernel: {_kernel.__file__} (runs {_kernel.isa()}; this CPU: {_kernel.available_isas()})")
