"""Which implementation steps a param group: the readable path, the ``torch._foreach_*`` path or a fused kernel.

One place decides, as ``torch.optim``'s ``_default_to_fused_or_foreach`` does for Adam:

* ``fused=None, foreach=None`` (the default): a fused kernel when one covers every tensor of the group — the C++
  kernel for contiguous CPU float32/bfloat16/float16/float64 tensors (:mod:`foam_hf._fused_cpu`, built at first
  use), the Triton kernels for such CUDA tensors once their numeric self-check passed for the group's dtypes,
  block size and second moment (:func:`foam_hf._fused_triton.triton_ready`); else foreach on CUDA and the
  readable path on CPU;
* ``fused=True``: the fused kernel, and :func:`check_fused_available` says at construction why it cannot be;
* ``foreach=True`` / ``False``: that path.

The functions of each path live in :mod:`foam_hf.functional`; this module only names them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.nn.parameter import is_lazy

from . import _fused_cpu
from .distributed import PLAIN_TENSOR_TYPES, local_tensor
from .errors import FoamConfigError
from .precision import state_dtype_for

__all__ = [
    "Implementation",
    "check_fused_available",
    "check_fused_tensors",
    "fused_unsupported",
    "select_implementation",
]

#: The four step functions of :mod:`foam_hf.functional`, by name.
Implementation = Literal["single_tensor", "foreach", "fused_cpu", "fused_triton"]


def _triton() -> Any:
    """``foam_hf._fused_triton``, imported on first use: only CUDA parameters need it (and Triton)."""
    from . import _fused_triton

    return _fused_triton


def _fused_default(
    params: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    on_cuda: bool,
    exp_avg_sqs: list[torch.Tensor] | None = None,
    block_size: int | None = None,
    second_moment: str | None = None,
    weight_rounding: str = "nearest",
) -> bool:
    """Whether ``fused=None`` means fused for these tensors (every one covered, the kernel ready)."""
    if on_cuda:  # the Triton kernels store fp32 or bf16 moments (state_dtype="bfloat16")
        triton = _triton()
        # blocks no wider than they step, moments they index in place (contiguous, on the parameter's device: else
        # the foreach path, which takes any), and ready on every GPU the group spans for every kind of step it
        # takes (dtypes, block size, second moment, and the stochastic rounding of bf16 weights, which compiles kernels
        # of its own: self-checked once per device and kind)
        if not (
            all(triton.triton_supported(p, block_size) for p in params)
            and all(map(triton.moments_supported, params, exp_avgs))
            and (exp_avg_sqs is None or all(map(triton.moments_supported, params, exp_avg_sqs)))
        ):
            return False
        _, _, default_block_size, default_second_moment = triton.DEFAULT_CHECK_KINDS[0]
        check_block_size = default_block_size if block_size is None else block_size
        check_second_moment = default_second_moment if second_moment is None else second_moment
        # the weight rounding as a fifth part where it is not the default (triton_ready keys kinds by the kernels
        # they compile: "stochastic" is a kind of its own for bf16 weights only)
        rounding = (weight_rounding,) if weight_rounding != "nearest" else ()
        kinds = {(p.dtype, m.dtype, check_block_size, check_second_moment, *rounding) for p, m in zip(params, exp_avgs)}
        return all(triton.triton_ready(device, kinds) for device in dict.fromkeys(p.device for p in params))
    # the CPU kernel also steps bf16 moments, and float64 parameters with float64 moments. Once it is loaded, it
    # answers for the whole list in one call (fused_supported's rule, tested equal to it), after the Python-type
    # test; before, the rule runs here, and only a list it covers starts the build.
    kernel = _fused_cpu.loaded_kernel()
    if kernel is not None:
        return all(type(p) in PLAIN_TENSOR_TYPES for p in params) and kernel.covers(params, exp_avgs)
    return all(map(_fused_cpu.fused_supported, params, (m.dtype for m in exp_avgs))) and (
        _fused_cpu.load_kernel() is not None
    )


def select_implementation(
    params: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    *,
    foreach: bool | None,
    fused: bool | None,
    exp_avg_sqs: list[torch.Tensor] | None = None,
    block_size: int | None = None,
    second_moment: str | None = None,
    weight_rounding: str = "nearest",
) -> Implementation:
    """The implementation that steps one group's ``params`` (with moments ``exp_avgs`` and, where given,
    ``exp_avg_sqs``: the Triton kernels take only contiguous ones) under its options. ``block_size``, the group's,
    rules out the Triton kernels for tensors whose blocks are wider than they step
    (:data:`foam_hf._fused_triton.MAX_BLOCK_WIDTH`); ``None`` asks only about the tensors. On CUDA, ``block_size``
    and ``second_moment`` also name the kernels the Triton self-check must have passed for (``None``: its
    defaults), and ``weight_rounding`` whether bf16 weights are checked with their stochastic rounding."""
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    if fused is None and foreach is None:
        fused = _fused_default(params, exp_avgs, on_cuda, exp_avg_sqs, block_size, second_moment, weight_rounding)
    if fused:
        return "fused_triton" if on_cuda else "fused_cpu"
    if foreach is None:
        foreach = on_cuda
    return "foreach" if foreach else "single_tensor"


def fused_unsupported(
    param: torch.Tensor, moment_dtype: torch.dtype, block_size: int | None = None
) -> tuple[type[Exception], str] | None:
    """Why no fused kernel steps ``param`` with moments of ``moment_dtype`` (under the group's ``block_size``, where
    given): ``(error type, reason)``, or ``None`` when one does. The one statement of what the kernels cover, for the
    check at construction (:func:`check_fused_available`) and for direct calls of the functional API
    (:func:`check_fused_tensors`)."""
    on_cpu_kernel = _fused_cpu.fused_supported(param)
    if not (on_cpu_kernel or (param.is_cuda and _triton().triton_supported(param))):
        return RuntimeError, (
            f"a parameter of shape {tuple(param.shape)} that is {param.dtype} on {param.device} "
            f"(contiguous={param.is_contiguous()}): the fused kernels step contiguous CPU "
            "float32/bfloat16/float16/float64 or CUDA float32/bfloat16/float16 tensors"
        )
    if param.is_cuda and block_size is not None and not _triton().triton_supported(param, block_size):
        return RuntimeError, (
            f"a parameter of shape {tuple(param.shape)} whose blocks hold "
            f"{_triton().block_width(param, block_size)} entries at block_size={block_size}: the Triton kernels "
            f"step blocks of at most {_triton().MAX_BLOCK_WIDTH}"
        )
    if param.is_cuda and moment_dtype not in _triton().STATE_DTYPES:
        return RuntimeError, f"{moment_dtype} moments: the Triton kernels store moments in float32 or bfloat16"
    if on_cpu_kernel and not _fused_cpu.moments_supported(param.dtype, moment_dtype):
        return FoamConfigError, (
            f"{param.dtype} parameters and {moment_dtype} states: the fused CPU kernel keeps the states of "
            "float64 parameters in float64 (and of the others in float32 or bfloat16)"
        )
    return None


def _kernels_missing(devices: set[str]) -> str | None:
    if "cuda" in devices and not _triton().triton_available():
        return (
            "FOAM: fused=True for CUDA parameters needs Triton, which is not importable here. Fix: install the "
            "CUDA build of torch (it ships Triton) or `pip install triton`, or pass fused=None."
        )
    if "cpu" in devices and _fused_cpu.load_kernel() is None:
        return (
            "FOAM: fused=True, but the fused CPU kernel could not be built: "
            f"{_fused_cpu.kernel_build_error()}. Fix: install a C++ compiler and ninja, or pass fused=None."
        )
    return None


def check_fused_tensors(
    params: list[torch.Tensor], exp_avgs: list[torch.Tensor], block_size: int | None = None
) -> None:
    """Raise unless a fused kernel steps every one of ``params`` with its moments: what a direct call of
    :func:`foam_hf.functional.foam` with ``fused=True`` is checked by (:class:`~foam_hf.FOAM` checks at
    construction, :func:`check_fused_available`)."""
    if params and _fused_default(params, exp_avgs, on_cuda=False):  # every step's case first: the C++ kernel covers all
        return
    for param, exp_avg in zip(params, exp_avgs):
        problem = fused_unsupported(param, exp_avg.dtype, block_size)
        if problem is not None:
            error, reason = problem
            raise error(f"FOAM: fused=True with {reason}. Fix: pass fused=None or False for these tensors.")
    missing = _kernels_missing({p.device.type for p in params})
    if missing:
        raise RuntimeError(missing)


def check_fused_available(
    param_groups: list[dict[str, Any]], *, allow_meta: bool = False, first_index: int = 0
) -> None:
    """Raise a clear error when a group asks for ``fused=True`` and no fused kernel can step it: the C++
    kernel for CPU tensors, the Triton kernels for CUDA tensors. Errors number the groups from ``first_index``
    (a group being added is checked alone).

    ``allow_meta`` (at construction) lets parameters on the meta device (and lazy ones) through: with deferred
    initialisation they get their real device later (``to_empty``), and :meth:`FOAM.step` checks them then,
    as torch's fused AdamW does."""
    for index, group in enumerate(param_groups, start=first_index):
        if not group["fused"]:
            continue
        params = [p for p in group["params"] if not (allow_meta and (p.device.type == "meta" or is_lazy(p)))]
        devices = {p.device.type for p in params}
        for p in params:
            if p.device.type == "meta":
                raise RuntimeError(
                    f"FOAM: fused=True in param group {index}, but a parameter of shape {tuple(p.shape)} is still "
                    "on the meta device at step(). Fix: materialise the model first (module.to_empty(device=...) "
                    "with torch.__future__.set_swap_module_params_on_conversion(True) keeps the optimizer's "
                    "parameters, or build the optimizer after materialising)."
                )
            # the kernels step this rank's shard of a DTensor (FSDP2, tensor parallelism), as the step hands it over
            problem = fused_unsupported(local_tensor(p), state_dtype_for(p, group["state_dtype"]), group["block_size"])
            if problem is not None:
                error, reason = problem
                fix = "pass fused=None or False for this group"
                if error is FoamConfigError:
                    fix = "pass state_dtype=None for this group, or fused=None"
                raise error(
                    f"FOAM: fused=True in param group {index} (state_dtype={group['state_dtype']!r}) with {reason}. "
                    f"Fix: {fix}."
                )
        if devices == {"cuda", "cpu"}:
            raise RuntimeError(
                f"FOAM: fused=True in param group {index}, which holds both CPU and CUDA parameters; a fused step "
                "runs on one device. Fix: put each device's parameters in a group of their own, or pass fused=None."
            )
        missing = _kernels_missing(devices)
        if missing:
            raise RuntimeError(missing)
