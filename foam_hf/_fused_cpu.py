"""The fused CPU step of FOAM: a C++ kernel built at first use, with a clean fallback.

:func:`load_kernel` compiles ``csrc/foam_cpu.cpp`` (and the headers beside it) with
:func:`torch.utils.cpp_extension.load` the first time it is needed (the build is cached by torch under
``TORCH_EXTENSIONS_DIR``, and later processes import the cached module directly). When the build cannot
happen (no C++ compiler, no ninja, no headers, a non-CPU build of torch missing pieces) it logs one warning and
returns ``None``;
``fused=None`` then falls back to the other paths and only ``fused=True`` raises. :func:`_fused_foam` is the
``impl`` that :func:`foam_hf.functional.foam` dispatches to; it is tested for parity against ``_single_tensor_foam``
in ``tests/test_fused.py`` and ``tests/test_fused_kernel.py``.

The kernel picks its implementation from the CPU: AVX-512, AVX2 (both x86 only) or portable C++. The
environment variable ``FOAM_CPU_ISA`` (``portable``, ``avx2`` or ``avx512``) lowers that choice, e.g. to
benchmark or test another path on one machine; naming one the CPU cannot run is an error. The portable C++ is
compiled once per instruction set, and the choice picks its build too (its baseline build for ``portable``), so a
lowered choice runs what a smaller CPU runs, the code gcc vectorises included. (A clang build has only the portable
code, whose ``target_clones`` pick by the CPU.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sysconfig
import threading
import time
from typing import Any

import torch

from .distributed import PLAIN_TENSOR_TYPES
from .errors import FoamConfigError

__all__ = ["FUSED_DTYPES", "fused_supported", "kernel_build_error", "load_kernel", "moments_supported"]

logger = logging.getLogger(__name__)

#: Parameter dtypes the fused kernel handles. Moments: float32 or bfloat16 (``state_dtype="bfloat16"``), and
#: float64 for float64 parameters (their default state dtype).
FUSED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

#: Environment variable that lowers the kernel's choice of implementation (for tests and benchmarks).
ISA_ENV = "FOAM_CPU_ISA"
#: The kernel's implementations, slowest first (``kIsaNames`` in ``csrc/foam_kernel.h``).
ISA_NAMES: tuple[str, ...] = ("portable", "avx2", "avx512")


def check_isa_env() -> str:
    """``FOAM_CPU_ISA``, normalised (``""`` when unset); refused if it names no implementation at all (a typo):
    checked when FOAM is built, before any training; whether this CPU runs a valid name is known once the kernel
    is loaded, at the first CPU step."""
    wanted = os.environ.get(ISA_ENV, "").strip().lower()
    if wanted and wanted not in ISA_NAMES:
        raise FoamConfigError(
            f"FOAM: {ISA_ENV}={wanted!r} is not an implementation of the fused CPU kernel; they are "
            f"{', '.join(ISA_NAMES)}. Fix: set {ISA_ENV} to one of those, or unset it (the kernel then picks the "
            "best this CPU runs)."
        )
    return wanted


_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_SOURCE = os.path.join(_CSRC, "foam_cpu.cpp")
#: Every file the build reads: the source and the headers it includes.
_BUILD_FILES = (_SOURCE, os.path.join(_CSRC, "foam_kernel.h"), os.path.join(_CSRC, "foam_simd.h"))

#: The compiler flags of the build (besides OpenMP's, which follow torch's backend).
#:  * ``-O3`` for the vectoriser; ``-fno-math-errno`` so that sqrt vectorises (errno is never read here).
#:  * ``-ffp-contract=off``: the compiler may not fuse ``a * b + c`` into one FMA on its own. Where it did,
#:    the vectorised body of a loop and its scalar remainder rounded differently (the AVX-512 clone of the
#:    portable code fused only the body), so an entry's result depended on where a tile boundary fell, and bf16
#:    and fp32 states, which tile rows differently, stopped giving bit-equal weights. The explicit-SIMD code
#:    writes its FMAs out (``foam_simd.h``), so it keeps them, in the same places on every path.
#:  * no ``-march``: the source holds AVX-512, AVX2 and baseline code (target attributes) and picks one at load time.
CFLAGS: tuple[str, ...] = ("-O3", "-fno-math-errno", "-ffp-contract=off")

#: Extra linker flags of the build (besides OpenMP's): none. A build with other compiler flags that need the linker
#: too (the sanitizers' runtimes, ``.ci/sanitize``) sets both; the build reads both when it runs.
LDFLAGS: tuple[str, ...] = ()


def build_environment() -> tuple[str, ...]:
    """What else torch's build file names besides the sources and flags: the compiler, and the include and library
    paths of the torch and the Python that build it (so, the environment: a venv)."""
    return (
        os.environ.get("CXX", "c++"),
        torch.__version__,
        os.path.dirname(os.path.realpath(torch.__file__)),
        sysconfig.get_paths().get("include", ""),
    )


def extension_name(
    files: tuple[str, ...] = _BUILD_FILES,
    cflags: tuple[str, ...] | None = None,
    environment: tuple[str, ...] | None = None,
) -> str:
    """The name torch caches the build under, keyed to the bytes *and* the paths of every file the build
    reads, to the compiler flags and to :func:`build_environment`: torch rebuilds a cached extension whenever its
    build file changes, and that file names the source's path, the compiler and the include paths of torch and
    Python, so two checkouts, versions of foam_hf, or environments (two venvs over one editable checkout) sharing
    one name rebuilt each other's kernel at every switch, a silent minute each; and torch does not key its cache
    to the flags, so new flags under an old name would load the old build. ``cflags`` defaults to :data:`CFLAGS`
    as it is when called (the build reads it then too), and :data:`LDFLAGS` is read then."""
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            digest.update(handle.read())
        digest.update(os.path.realpath(path).encode())
    digest.update(" ".join(CFLAGS if cflags is None else cflags).encode())
    if LDFLAGS:  # (no linker flags: the names of earlier builds, unchanged)
        digest.update(("\0ldflags " + " ".join(LDFLAGS)).encode())
    digest.update("\0".join(build_environment() if environment is None else environment).encode())
    return f"foam_hf_fused_cpu_{digest.hexdigest()[:12]}"


#: A lock older than this is a killed build's (a build takes about a minute on two cores): it is removed.
STALE_LOCK_SECONDS = 600.0

_lock = threading.Lock()
_kernel: Any = None
_tried = False
_error: str | None = None


def load_kernel() -> Any:
    """The compiled extension module, building it on first call; ``None`` (with one warning) if it cannot be.

    A build already in torch's cache is imported directly: loading needs neither ninja nor a compiler nor a
    writable cache, and the file times torch's build compares (a checkout, a reinstall) cannot start a rebuild,
    since the name already pins the bytes of every source (:func:`extension_name`). Only a missing build goes
    through :func:`torch.utils.cpp_extension.load`."""
    global _kernel, _tried, _error
    if _tried:
        return _kernel
    with _lock:
        if _tried:
            return _kernel
        name = extension_name()
        directory = build_directory(name)
        try:
            _wait_for_another_build(directory)
            _kernel = _import_cached(name, directory)
            if _kernel is None:
                _kernel = _build(name, directory)
        except Exception as exc:  # no compiler, no ninja, no headers, ...: every failure means "unavailable"
            _kernel = None
            _error = f"{type(exc).__name__}: {exc}".strip()
            logger.warning(
                "FOAM: the fused CPU kernel could not be built, so FOAM steps CPU tensors on its for-loop path "
                "(same results, slower). Reason: %s Fix: %s",
                build_failure_summary(_error),
                build_failure_fix(_error),
            )
        if _kernel is not None:
            # A FOAM_CPU_ISA this CPU cannot run raises here, and again at every later call (the load is marked
            # done only after it), rather than once and then silently running the best implementation.
            _apply_isa_env(_kernel)
        _tried = True
    return _kernel


def build_directory(name: str) -> str:
    """Where the kernel ``name`` is built and cached: ``$TORCH_EXTENSIONS_DIR/name``, else
    ``<torch's default root>/py<major><minor><abiflags>_<cpu|cuXYZ|rocmXYZ>/name``, the folder torch's own rule
    gives today. :func:`_build` passes it to torch explicitly, so a torch that lays out its cache otherwise still
    builds where :func:`_import_cached` looks."""
    import sys

    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        if torch.version.hip is not None:
            accelerator = "rocm" + torch.version.hip.replace(".", "")
        elif torch.version.cuda is not None:
            accelerator = "cu" + torch.version.cuda.replace(".", "")
        else:
            accelerator = "cpu"
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{python}_{accelerator}")
    return os.path.join(root, name)


def _wait_for_another_build(directory: str) -> None:
    """Wait while another process builds the kernel (torch's lock file exists), saying so; a lock older than
    :data:`STALE_LOCK_SECONDS` was left by a killed build (SIGKILL or SIGTERM skip torch's cleanup) and would make
    torch wait forever: it is removed, with a warning."""
    lock = os.path.join(directory, "lock")
    announced = False
    while True:
        try:
            age = time.time() - os.stat(lock).st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_SECONDS:
            logger.warning(
                "FOAM: removing %s, left %.0f s ago by a fused CPU kernel build that did not finish (a killed "
                "process): torch would wait on it forever.",
                lock,
                age,
            )
            try:
                os.remove(lock)
            except FileNotFoundError:
                pass
            except OSError as exc:  # a read-only cache: a complete build there still imports; a missing one fails
                logger.warning("FOAM: cannot remove %s (%s).", lock, exc)
            return
        if not announced:
            logger.warning(
                "FOAM: waiting for another process to build the fused CPU kernel (lock %s; if no build is running, "
                "delete it).",
                lock,
            )
            announced = True
        time.sleep(1.0)


def _import_cached(name: str, directory: str) -> Any:
    """The module of a build already in torch's cache, imported directly; ``None`` when there is none or it does not
    import (then :func:`_build` builds it again)."""
    import importlib.util

    path = os.path.join(directory, f"{name}.so")
    if not os.path.exists(path):
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:  # a build cut short, another platform's file: build again
        logger.warning("FOAM: the cached fused CPU kernel %s does not load (%s); building it again.", path, exc)
        return None
    logger.info("FOAM: fused CPU kernel %s loaded from %s.", name, path)
    return module


def _build(name: str, directory: str) -> Any:
    """Build the kernel in ``directory`` with :func:`torch.utils.cpp_extension.load` (about a minute on two
    cores), saying so."""
    import shutil
    import sys

    from torch.utils.cpp_extension import load

    logger.warning("FOAM: building the fused CPU kernel %s (once per foam_hf version and environment)...", name)
    start = time.perf_counter()
    # torch runs the ninja on PATH: the one this environment installed is not there when it was not activated.
    # (PATH is the process's for the build's minute: torch's build subprocess takes the environment from it.)
    path = os.environ.get("PATH")
    here = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and shutil.which("ninja", path=here) is not None:
        os.environ["PATH"] = os.pathsep.join([here, path]) if path else here
    try:
        # at::parallel_for is a header template: with torch's OpenMP backend it only runs in parallel when the
        # extension itself is compiled with -fopenmp (without it the kernel silently uses one thread).
        openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
        os.makedirs(directory, exist_ok=True)
        module = load(
            name=name,
            sources=[_SOURCE],
            build_directory=directory,
            extra_cflags=[*CFLAGS, *openmp],
            extra_ldflags=[*openmp, *LDFLAGS],
            extra_include_paths=[_CSRC],
            verbose=False,
        )
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path
    logger.warning("FOAM: fused CPU kernel %s built in %.1f s.", name, time.perf_counter() - start)
    return module


def build_failure_fix(error: str) -> str:
    """What to do about a failed build, by what its error names. Every failed ninja build ends "ninja: build
    stopped" and names the compile command (``c++ ...``), so neither word alone says what is missing: a line that
    says a program is not found does."""
    lines = error.lower().splitlines()
    missing = [line for line in lines if any(k in line for k in ("not found", "no such file", "is required"))]
    compilers = {"c++", "g++", "gcc", "cc", "clang", "clang++", "compiler", "cl.exe"}
    compilers.add(os.path.basename(os.environ.get("CXX") or "c++").lower())  # CXX=/opt/gcc-13/bin/g++-13

    def names(line: str, programs: set[str]) -> bool:  # as a word of its own: "cc" is not in "access"
        return any(re.search(rf"(?<![\w+.-]){re.escape(p)}(?![\w+.-])", line) for p in programs)

    if any("python.h" in line for line in missing):
        return "install Python's development headers (e.g. apt install python3-dev), then start Python again."
    if any(names(line, {"ninja"}) for line in missing):
        return "pip install ninja (in this environment), then start Python again."
    if any(names(line, compilers) for line in missing):
        return "install a C++ compiler (g++), or point CXX at one, then start Python again."
    return (
        "see the reason; the first build writes to TORCH_EXTENSIONS_DIR (else ~/.cache/torch_extensions), which "
        "must be a writable folder."
    )


def build_failure_summary(error: str) -> str:
    """The first line of a build error and the line that says what went wrong, where ninja's log has one (its first
    line is only the compile command that failed)."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if not lines:
        return "unknown."
    cause = next(
        (line for line in lines[1:] if any(k in line.lower() for k in ("not found", "error:", "fatal", "no such"))),
        None,
    )
    first = lines[0] if len(lines[0]) <= 200 else lines[0][:200] + "..."
    return f"{first} ({cause})." if cause else f"{first}."


def _apply_isa_env(kernel: Any) -> None:
    """Honour ``FOAM_CPU_ISA``: run the named implementation instead of the best one."""
    wanted = check_isa_env()
    if not wanted:
        return
    available = list(kernel.available_isas())
    if wanted not in available:
        raise FoamConfigError(
            f"FOAM: {ISA_ENV}={wanted!r} names an implementation of the fused CPU kernel this CPU cannot run "
            f"(it can run: {', '.join(available)}). Fix: set {ISA_ENV} to one of those, or unset it."
        )
    kernel.set_isa(wanted)
    logger.info("FOAM: fused CPU kernel uses its %s implementation (%s).", wanted, ISA_ENV)


def loaded_kernel() -> Any:
    """The extension module if it is already built and loaded, else ``None``; never starts a build."""
    return _kernel


def kernel_build_error() -> str | None:
    """Why the kernel could not be built (``None`` if it was built or not yet tried)."""
    return _error


def fused_supported(param: torch.Tensor, state_dtype: torch.dtype | None = None) -> bool:
    """Whether the fused kernel can step ``param``: a dense, contiguous CPU tensor of a :data:`FUSED_DTYPES`,
    and, when ``state_dtype`` (the dtype of its moments) is given, moments the kernel can store."""
    if state_dtype is not None and not moments_supported(param.dtype, state_dtype):
        return False
    return (
        param.device.type == "cpu"
        and param.dtype in FUSED_DTYPES
        and param.layout == torch.strided
        and param.is_contiguous()
        and type(param) in PLAIN_TENSOR_TYPES
    )


def moments_supported(param_dtype: torch.dtype, moment_dtype: torch.dtype) -> bool:
    """Whether the kernel steps parameters of ``param_dtype`` with moments of ``moment_dtype``: float64 ones
    for float64 parameters, float32 or bfloat16 ones for the others."""
    return moment_dtype in ((torch.float64,) if param_dtype == torch.float64 else (torch.float32, torch.bfloat16))


def _fused_foam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    block_size: int,
    scale: float,
    res_scale: float,
    second_moment: str,
    weight_rounding: str = "nearest",
) -> None:
    """The fused path: one C++ call per group, one read of G and W and one write of W per element.

    Gradients that are not contiguous or not in the parameter's dtype are made so first (a copy, the only
    full-size allocation this path can make; Trainer's gradients never need it), but for one case: a gradient of
    another dtype than its 16-bit parameter (fp32 gradients of bf16 weights, as FSDP2's ``reduce_dtype=float32``
    gives them; a bf16 gradient of an fp16 weight), which the kernel would round to the parameter's dtype first.
    Those tensors take the readable path, which steps them on the unrounded gradient, as the Triton kernels do.
    bf16 moments are widened, stepped and stochastically rounded back inside the kernel, a few hundred entries
    at a time (the rounding is :func:`foam_hf.precision.store_moment`'s, bit for bit). Under
    ``weight_rounding="stochastic"`` bf16 weights are stepped with the sums the kernel takes for fp32 weights
    (so their fp32 values are those of an fp32 twin), their new values staged in fp32 a run at a time (a tile, a
    batch of blocks or a block) and stochastically rounded with :func:`foam_hf.precision.store_weight`'s rule.
    :func:`foam_hf.functional.foam` checks first that the kernel covers every tensor
    (:func:`foam_hf.implementation.check_fused_tensors`).
    """
    if not params:
        return
    wider = [_rounds_the_gradient(p, g) for p, g in zip(params, grads)]
    if any(wider):
        from .functional import _single_tensor_foam

        hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, block_size=block_size)
        hyper |= dict(scale=scale, res_scale=res_scale, second_moment=second_moment, weight_rounding=weight_rounding)
        tensors = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
        _single_tensor_foam(*([x for x, w in zip(t, wider) if w] for t in tensors), **hyper)
        params, grads, exp_avgs, exp_avg_sqs, state_steps = ([x for x, w in zip(t, wider) if not w] for t in tensors)
        if not params:
            return
    kernel = load_kernel()  # the caller checked it was built and covers these tensors (check_fused_tensors)
    grads = [
        g if g.dtype == p.dtype and g.is_contiguous() else g.to(p.dtype).contiguous() for p, g in zip(params, grads)
    ]
    kernel.fused_step(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        int(block_size),
        float(scale),
        float(res_scale),
        second_moment == "mean_sq",
        weight_rounding == "stochastic",
    )


def _rounds_the_gradient(param: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether handing ``grad`` to the kernel, which reads gradients in the parameter's dtype, would change it: any
    other dtype than its 16-bit parameter's. A wider one rounds; the other 16-bit format (a bf16 gradient of an fp16
    weight, or the reverse) rounds too and, fp16's range being 65504 against bf16's 3.4e38, may overflow or
    flush to zero."""
    return param.dtype in (torch.bfloat16, torch.float16) and grad.dtype != param.dtype
