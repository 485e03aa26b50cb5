"""The fused CPU step of FOAM: a C++ kernel built at first use, with a clean fallback.

:func:`load_kernel` compiles ``csrc/foam_cpu.cpp`` with :func:`torch.utils.cpp_extension.load` the first
time it is needed (the build is cached by torch under ``TORCH_EXTENSIONS_DIR``, so later processes only
load it). When the build cannot happen (no C++ compiler, no ninja, no headers, a non-CPU build of torch
missing pieces) it logs one warning and returns ``None``; ``fused=None`` then falls back to the other
paths and only ``fused=True`` raises. :func:`_fused_foam` is the ``impl`` that :func:`foam_hf.optim.foam`
dispatches to; it is tested for parity against ``_single_tensor_foam`` in ``tests/test_fused.py``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from typing import Any

import torch

__all__ = ["FUSED_DTYPES", "fused_supported", "kernel_build_error", "kernel_build_seconds", "load_kernel"]

logger = logging.getLogger(__name__)

#: Parameter dtypes the fused kernel handles (moments are always float32).
FUSED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "foam_cpu.cpp")


def extension_name(source: str = _SOURCE) -> str:
    """The name torch caches the build under, keyed to the source's bytes *and* its path: torch rebuilds a
    cached extension whenever its build file changes, and the build file names the source's path, so two
    checkouts (or versions) of foam_hf sharing one name rebuilt each other's kernel at every switch."""
    with open(source, "rb") as handle:
        digest = hashlib.sha256(handle.read() + os.path.realpath(source).encode()).hexdigest()[:12]
    return f"foam_hf_fused_cpu_{digest}"


_lock = threading.Lock()
_kernel: Any = None
_tried = False
_error: str | None = None
_build_seconds: float | None = None


def load_kernel() -> Any:
    """The compiled extension module, building it on first call; ``None`` (with one warning) if it cannot be."""
    global _kernel, _tried, _error, _build_seconds
    if _tried:
        return _kernel
    with _lock:
        if _tried:
            return _kernel
        start = time.perf_counter()
        name = extension_name()
        try:
            from torch.utils.cpp_extension import load

            building = not _is_cached(name)
            if building:  # about a minute on two cores: say so instead of stalling silently
                logger.warning("FOAM: building the fused CPU kernel %s (once per foam_hf source version)...", name)
            # at::parallel_for is a header template: with torch's OpenMP backend it only runs in parallel when
            # the extension itself is compiled with -fopenmp (without it the kernel silently uses one thread).
            openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
            _kernel = load(
                name=name,
                sources=[_SOURCE],
                # -O3 for the vectoriser; -fno-math-errno so that sqrt vectorises (errno is never read here);
                # no -march: the source picks AVX-512/AVX2/baseline code at load time (target_clones).
                extra_cflags=["-O3", "-fno-math-errno", *openmp],
                extra_ldflags=openmp,
                verbose=False,
            )
            _build_seconds = time.perf_counter() - start
            if building:
                logger.warning("FOAM: fused CPU kernel %s built in %.1f s.", name, _build_seconds)
            else:
                logger.info("FOAM: fused CPU kernel %s loaded from torch's cache in %.1f s.", name, _build_seconds)
        except Exception as exc:  # no compiler, no ninja, no headers, ...: every failure means "unavailable"
            _kernel = None
            _error = f"{type(exc).__name__}: {exc}".strip()
            logger.warning(
                "FOAM: the fused CPU kernel could not be built, so FOAM uses its foreach/for-loop paths "
                "(same results, slower). Reason: %s",
                _error.splitlines()[0] if _error else "unknown",
            )
        _tried = True
    return _kernel


def _is_cached(name: str) -> bool:
    """Whether torch's extension cache already holds a build called ``name`` (then load only links it)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return any(os.path.exists(os.path.join(d, f"{name}.so")) for d, _, _ in os.walk(root) if d.endswith(name))


def kernel_build_error() -> str | None:
    """Why the kernel could not be built (``None`` if it was built or not yet tried)."""
    return _error


def kernel_build_seconds() -> float | None:
    """Seconds the first :func:`load_kernel` took in this process (compile, or load from cache)."""
    return _build_seconds


def fused_supported(param: torch.Tensor) -> bool:
    """Whether the fused kernel can step ``param``: a dense, contiguous CPU tensor of a :data:`FUSED_DTYPES`."""
    return (
        param.device.type == "cpu"
        and param.dtype in FUSED_DTYPES
        and param.layout == torch.strided
        and param.is_contiguous()
        # Plain tensors only: subclasses (DTensor, quantised wrappers) have no flat data pointer to step.
        and type(param) in (torch.Tensor, torch.nn.Parameter)
    )


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
) -> None:
    """The fused path: one C++ call per group, one read of G and W and one write of W per element.

    Gradients that are not contiguous or not in the parameter's dtype are made so first (a copy, the only
    full-size allocation this path can make; Trainer's gradients never need it). Tensors with bf16 moments
    are stepped one at a time on fp32 copies of their moments, which are then stochastically rounded back.
    """
    if not params:
        return
    kernel = load_kernel()
    if kernel is None:
        raise RuntimeError(f"FOAM: fused=True but the fused CPU kernel could not be built: {_error}")
    for p in params:
        if not fused_supported(p):
            raise RuntimeError(
                f"FOAM: the fused CPU path got a parameter of shape {tuple(p.shape)}, dtype {p.dtype}, device "
                f"{p.device}, contiguous={p.is_contiguous()}; it needs contiguous CPU float32/bfloat16/float16 "
                "tensors. Fix: pass fused=False (or None) for this group."
            )
    for m, v in zip(exp_avgs, exp_avg_sqs):
        if m.dtype != v.dtype or m.dtype not in (torch.float32, torch.bfloat16):
            raise RuntimeError(
                f"FOAM: the fused CPU path stores moments in float32 or bfloat16; got {m.dtype} and {v.dtype}. "
                "Fix: pass fused=None or False for this group."
            )
    grads = [
        g if g.dtype == p.dtype and g.is_contiguous() else g.to(p.dtype).contiguous() for p, g in zip(params, grads)
    ]
    hyper = (
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        int(block_size),
        float(scale),
        float(res_scale),
        second_moment == "mean_sq",
    )
    fp32 = [i for i, m in enumerate(exp_avgs) if m.dtype == torch.float32]
    if fp32:
        pick = lambda seq: [seq[i] for i in fp32]  # noqa: E731
        kernel.fused_step(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(state_steps), *hyper)
    # bf16 moments (state_dtype="bfloat16"): one tensor at a time, the moments staged in fp32 (transient bytes:
    # 8 per moment entry of the tensor being stepped, i.e. 8/B per weight entry), stepped by the same kernel,
    # then stored back with the stochastic rounding of the other paths (foam_hf.optim._store_moment).
    for i in (i for i, m in enumerate(exp_avgs) if m.dtype == torch.bfloat16):
        exp_avg, exp_avg_sq = exp_avgs[i].float(), exp_avg_sqs[i].float()
        kernel.fused_step([params[i]], [grads[i]], [exp_avg], [exp_avg_sq], [state_steps[i]], *hyper)
        step = int(state_steps[i].item())
        kernel.stochastic_round_bf16(exp_avg, exp_avgs[i], step, 0)
        kernel.stochastic_round_bf16(exp_avg_sq, exp_avg_sqs[i], step, 1)
