r"""FOAM: Adam with blocked state folding (arXiv 2512.07112), in the shape of ``torch.optim``.

Layout follows ``torch/optim/adam.py``: the :class:`FOAM` class validates and gathers tensors, the
functional :func:`foam` picks an implementation once per param group, :func:`_single_tensor_foam` is the
readable reference path and :func:`_multi_tensor_foam` the ``torch._foreach_*`` path. This module imports
nothing from transformers, TRL or PEFT.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any, Literal

import torch
from torch.optim.optimizer import Optimizer, ParamsT

from . import _chunking, _fused_cpu
from .checkpoint import check_loadable, restore_moments
from .distributed import check_sharding, local_tensor, zeros_state_like
from .errors import FoamConfigError
from .folding import block_mean, folded_shape, is_foldable, unfold
from .precision import STATE_DTYPES, normalize_state_dtype, state_dtype_for
from .precision import compute_dtype as _compute_dtype
from .precision import rounding_dither as _rounding_dither  # noqa: F401 - kept importable from here
from .precision import store_moment as _store_moment

__all__ = ["FOAM", "SECOND_MOMENT_MODES", "STATE_DTYPES", "foam", "state_dtype_for"]

SecondMoment = Literal["mean_sq", "sq_mean"]

#: The two second-moment rules: fold the block mean of ``G⊙G`` (``"mean_sq"``, what the paper's released
#: code does) or the square of the block mean of ``G`` (``"sq_mean"``, the paper's equations as written).
SECOND_MOMENT_MODES: tuple[str, ...] = ("mean_sq", "sq_mean")

#: The keys every FOAM param group carries, with their defaults. One list, used by validation,
#: ``__setstate__`` and the integration's ``optim_args`` parser.
_GROUP_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "block_size": 4,
    "scale": 1.0,
    "res_scale": 1.0,
    "second_moment": "mean_sq",
    "foreach": None,
    "fused": None,
    "state_dtype": None,
}


def _is_real_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _check_number(name: str, value: Any, *, rule: str, ok: Callable[[float], bool], fix: str) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise FoamConfigError(
                f"FOAM: {name} is a tensor of shape {tuple(value.shape)}; it must be a number or a one-element "
                f"tensor. Fix: {fix}"
            )
        value = value.item()
    if not _is_real_number(value):
        raise TypeError(f"FOAM: {name}={value!r} has type {type(value).__name__}; it must be a real number. Fix: {fix}")
    if not (math.isfinite(value) and ok(float(value))):
        raise FoamConfigError(f"FOAM: {name}={value!r} is invalid: it must be {rule}. Fix: {fix}")


def validate_group_options(options: dict[str, Any], where: str = "") -> None:
    """Validate FOAM hyper-parameters; raise ``TypeError``/:class:`FoamConfigError` naming value, rule, fix."""
    at = f" (in {where})" if where else ""
    _check_number("lr", options["lr"], rule="finite and >= 0", ok=lambda v: v >= 0, fix=f"pass e.g. lr=1e-3{at}.")
    _check_number("eps", options["eps"], rule="finite and >= 0", ok=lambda v: v >= 0, fix=f"pass e.g. eps=1e-8{at}.")
    _check_number(
        "weight_decay",
        options["weight_decay"],
        rule="finite and >= 0",
        ok=lambda v: v >= 0,
        fix=f"pass e.g. weight_decay=0.01, or 0.0 for none{at}.",
    )
    betas = options["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"FOAM: betas={betas!r} must be a pair (beta1, beta2). Fix: pass betas=(0.9, 0.999){at}.")
    for i, beta in enumerate(betas):
        _check_number(
            f"betas[{i}]",
            beta,
            rule="in [0, 1)",
            ok=lambda v: 0.0 <= v < 1.0,
            fix=f"pass betas=(0.9, 0.999) or other values in [0, 1){at}.",
        )
    block_size = options["block_size"]
    if not isinstance(block_size, Integral) or isinstance(block_size, bool):
        raise TypeError(
            f"FOAM: block_size={block_size!r} has type {type(block_size).__name__}; it must be a positive int "
            f"(the paper's level l is block_size=2**l). Fix: pass block_size=4{at}."
        )
    if block_size < 1:
        raise FoamConfigError(
            f"FOAM: block_size={block_size} is invalid: it must be a positive int (1 = plain AdamW states; "
            f"the paper's level l is block_size=2**l). Fix: pass block_size=4 or another int >= 1{at}."
        )
    _check_number(
        "scale",
        options["scale"],
        rule="finite and > 0",
        ok=lambda v: v > 0,
        fix=f"pass scale=1.0 (the update multiplier alpha of folded tensors){at}.",
    )
    _check_number(
        "res_scale",
        options["res_scale"],
        rule="finite and >= 0",
        ok=lambda v: v >= 0,
        fix=f"pass res_scale=1.0 (0 drops the residual){at}.",
    )
    if options["second_moment"] not in SECOND_MOMENT_MODES:
        raise FoamConfigError(
            f"FOAM: second_moment={options['second_moment']!r} is invalid: it must be one of "
            f"{SECOND_MOMENT_MODES}. Fix: pass second_moment='mean_sq' (the default){at}."
        )
    if options["foreach"] not in (None, True, False):
        raise TypeError(
            f"FOAM: foreach={options['foreach']!r} must be None, True or False. Fix: pass foreach=None to "
            f"let FOAM choose{at}."
        )
    if options.get("fused") not in (None, True, False):
        raise TypeError(
            f"FOAM: fused={options['fused']!r} must be None, True or False. Fix: pass fused=None to let FOAM "
            f"choose{at}."
        )
    state_dtype = options.get("state_dtype")
    if state_dtype not in STATE_DTYPES:
        why = (
            " fp16 moments underflow (second moments of small gradients flush to zero) and overflow."
            if state_dtype in ("float16", torch.float16)
            else ""
        )
        raise FoamConfigError(
            f"FOAM: state_dtype={state_dtype!r} is invalid: it must be one of {list(STATE_DTYPES)} (or "
            f"torch.float32/torch.bfloat16).{why} Fix: pass state_dtype='bfloat16' to halve state memory, or "
            f"None for fp32 states{at}."
        )
    if options.get("fused") and options["foreach"]:
        raise FoamConfigError(
            f"FOAM: fused=True and foreach=True cannot be set together (they name two implementations). "
            f"Fix: pass only one of them{at}."
        )


def _triton() -> Any:
    """``foam_hf._fused_triton``, imported on first use: only CUDA parameters need it (and Triton)."""
    from . import _fused_triton

    return _fused_triton


def _check_fused_available(param_groups: list[dict[str, Any]], *, allow_meta: bool = False) -> None:
    """Raise a clear error when a group asks for ``fused=True`` and no fused kernel can step it: the C++
    kernel for CPU tensors, the Triton kernels for CUDA tensors.

    ``allow_meta`` (at construction) lets parameters on the meta device through: with deferred
    initialisation they get their real device later (``to_empty``), and :meth:`FOAM.step` checks them then,
    as torch's fused AdamW does."""
    for index, group in enumerate(param_groups):
        if not group["fused"]:
            continue
        params = [p for p in group["params"] if not (allow_meta and p.device.type == "meta")]
        devices = {p.device.type for p in params}
        for p in params:
            if p.device.type == "meta":
                raise RuntimeError(
                    f"FOAM: fused=True in param group {index}, but a parameter of shape {tuple(p.shape)} is still "
                    "on the meta device at step(). Fix: materialise the model first (module.to_empty(device=...) "
                    "with torch.__future__.set_swap_module_params_on_conversion(True) keeps the optimizer's "
                    "parameters, or build the optimizer after materialising)."
                )
            if not (_fused_cpu.fused_supported(p) or (p.is_cuda and _triton().triton_supported(p))):
                raise RuntimeError(
                    f"FOAM: fused=True in param group {index}, but a parameter of shape {tuple(p.shape)} is "
                    f"{p.dtype} on {p.device} (contiguous={p.is_contiguous()}); the fused kernels step contiguous "
                    "CPU float32/bfloat16/float16/float64 or CUDA float32/bfloat16/float16 tensors. "
                    "Fix: pass fused=None or False for this group."
                )
            moments = state_dtype_for(p, group["state_dtype"])
            if p.device.type == "cpu" and not _fused_cpu.fused_supported(p, moments):
                raise FoamConfigError(
                    f"FOAM: fused=True in param group {index} with {p.dtype} parameters and {moments} states "
                    f"(state_dtype={group['state_dtype']!r}); the fused CPU kernel keeps the states of float64 "
                    "parameters in float64. Fix: pass state_dtype=None for this group, or fused=None."
                )
        if devices == {"cuda", "cpu"}:
            raise RuntimeError(
                f"FOAM: fused=True in param group {index}, which holds both CPU and CUDA parameters; a fused step "
                "runs on one device. Fix: put each device's parameters in a group of their own, or pass fused=None."
            )
        if "cuda" in devices and not _triton().triton_available():
            raise RuntimeError(
                "FOAM: fused=True for CUDA parameters needs Triton, which is not importable here. Fix: install the "
                "CUDA build of torch (it ships Triton) or `pip install triton`, or pass fused=None."
            )
        if "cpu" in devices and _fused_cpu.load_kernel() is None:
            raise RuntimeError(
                "FOAM: fused=True, but the fused CPU kernel could not be built: "
                f"{_fused_cpu.kernel_build_error()}. Fix: install a C++ compiler and ninja, or pass fused=None."
            )


class FOAM(Optimizer):
    r"""Adam with *folded* first and second moments: states of a weight ``(*rows, n)`` are ``(*rows, ⌈n/B⌉)``.

    .. math::
       \begin{aligned}
       &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2, \epsilon, \lambda \text{ (weight decay)},
            B \text{ (block size)}, \alpha \text{ (scale)}, \rho \text{ (res\_scale)} \\
       &\textbf{initialize}: \tilde m_0 \leftarrow 0,\ \tilde v_0 \leftarrow 0
            \quad (\text{shape } \textit{rows} \times \lceil n/B \rceil) \\
       &\textbf{for}\ t = 1, 2, \ldots: \\
       &\quad G \leftarrow \nabla_W f_t(W_{t-1}) \\
       &\quad \tilde g \leftarrow \operatorname{blockmean}_B(G) \\
       &\quad \tilde g^{(2)} \leftarrow \operatorname{blockmean}_B(G \odot G)
            \ \ (\texttt{mean\_sq})
            \quad\text{or}\quad \tilde g \odot \tilde g \ \ (\texttt{sq\_mean}) \\
       &\quad \tilde m_t \leftarrow \beta_1 \tilde m_{t-1} + (1-\beta_1)\, \tilde g \\
       &\quad \tilde v_t \leftarrow \beta_2 \tilde v_{t-1} + (1-\beta_2)\, \tilde g^{(2)} \\
       &\quad R \leftarrow G - \operatorname{unfold}(\tilde g)
            \quad (\text{never stored}) \\
       &\quad M \leftarrow \operatorname{unfold}(\tilde m_t) + \rho R, \qquad
              V \leftarrow \operatorname{unfold}(\tilde v_t) + \rho^2 R \odot R \\
       &\quad W_t \leftarrow W_{t-1}(1 - \gamma\lambda)
            - \gamma\,\alpha\, \frac{M / (1-\beta_1^t)}{\sqrt{V / (1-\beta_2^t)} + \epsilon} \\
       &\textbf{return}\ W_t
       \end{aligned}

    ``blockmean`` averages each run of ``B`` adjacent entries of the last dimension; when ``B`` does not
    divide ``n`` the last block of a row holds ``n mod B`` entries and averages over those only (the paper's
    released code zero-pads and divides by ``B``, which shrinks that block's moments). Weight decay is
    decoupled and applied to the old weights exactly as :class:`torch.optim.AdamW` applies it, and
    :math:`\epsilon` is added outside the bias-corrected square root, as in AdamW. With ``B = 1`` (or for
    tensors that do not fold) the step *is* :class:`torch.optim.AdamW`; :math:`\alpha` scales only the
    update of folded tensors.

    Which tensors fold (:func:`foam_hf.folding.is_foldable`): those with two or more dimensions, along the
    last one, all leading dimensions acting as rows, when the group's ``block_size > 1``. One-dimensional
    tensors (biases, norm weights) keep full AdamW states. Choosing which *modules* sit in which group is
    the caller's job (the Trainer integration does it by module name).

    ============  ====================  ==========================================================
    symbol        argument              optimizer state
    ============  ====================  ==========================================================
    :math:`B`     ``block_size``        state shape ``(*rows, ceil(n / B))``
    :math:`\alpha` ``scale``            --
    :math:`\rho`  ``res_scale``         --
    :math:`\tilde m` --                 ``state["exp_avg"]``
    :math:`\tilde v` --                 ``state["exp_avg_sq"]``
    :math:`t`     --                    ``state["step"]`` (a CPU float32 tensor, as in torch Adam)
    ============  ====================  ==========================================================

    Memory: folded tensors cost ``2 * rows * ceil(n / B)`` state entries against AdamW's ``2 * rows * n``.
    States are fp32 for fp16/bf16 parameters (the update is computed in fp32 and written back in the
    parameter's dtype) and the parameter's dtype otherwise.

    Args:
        params: iterable of parameters or of dicts defining parameter groups; every group may carry its own
            value of each option below.
        lr: learning rate :math:`\gamma` (default: 1e-3).
        betas: coefficients :math:`(\beta_1, \beta_2)` of the running averages (default: (0.9, 0.999)).
        eps: term added to the denominator for numerical stability (default: 1e-8).
        weight_decay: decoupled weight decay :math:`\lambda` (default: 0).
        block_size: block size :math:`B`, a positive int; the paper's level :math:`l` is ``2**l``;
            1 means plain AdamW states (default: 4).
        scale: multiplier :math:`\alpha` of the update of folded tensors (default: 1.0).
        res_scale: weight :math:`\rho` of the un-stored residual in both moments; 0 gives pure
            block-wise Adam (default: 1.0).
        second_moment: ``"mean_sq"`` (block mean of :math:`G\odot G`) or ``"sq_mean"`` (square of the
            block mean) (default: ``"mean_sq"``).
        foreach: use the ``torch._foreach_*`` multi-tensor path; ``None`` picks it when every parameter of
            the group is on CUDA (default: None).
        fused: use a fused kernel, which reads ``G`` and ``W`` once and allocates nothing of parameter
            size: on CPU a C++ kernel built at first use (``foam_hf._fused_cpu``), on CUDA Triton kernels
            (``foam_hf._fused_triton``). ``None`` picks it when ``foreach`` is also ``None``, every parameter
            is a contiguous float32/bfloat16/float16 tensor on one of those devices and the kernel is available
            (else the other paths; a CPU build failure logs one warning); ``True`` raises if it cannot be
            used (default: None).
        state_dtype: storage dtype of the moments: ``None`` (fp32 for half-precision parameters, else the
            parameter's dtype), ``"float32"`` or ``"bfloat16"`` (half the bytes; computed in fp32 and stored
            with stochastic rounding, see :func:`_store_moment`) (default: None).

    Example::

        >>> model = torch.nn.Linear(64, 32)
        >>> opt = FOAM(model.parameters(), lr=1e-3, block_size=8)
        >>> model(torch.randn(4, 64)).sum().backward()
        >>> opt.step()
        >>> opt.state[model.weight]["exp_avg"].shape
        torch.Size([32, 8])

    Reference: Wen et al., *FOAM: Blocked State Folding for Memory-Efficient LLM Training*,
    https://arxiv.org/abs/2512.07112
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        block_size: int = 4,
        scale: float = 1.0,
        res_scale: float = 1.0,
        second_moment: SecondMoment = "mean_sq",
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        state_dtype: str | torch.dtype | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            block_size=block_size,
            scale=scale,
            res_scale=res_scale,
            second_moment=second_moment,
            foreach=foreach,
            fused=fused,
            state_dtype=normalize_state_dtype(state_dtype),
        )
        validate_group_options(defaults)
        super().__init__(params, defaults)
        if any(group["fused"] for group in self.param_groups):
            _check_fused_available(self.param_groups, allow_meta=True)
            # Checked in full unless a fused group still holds meta tensors: then step() checks once they are real.
            self._fused_checked = not any(
                p.device.type == "meta" for group in self.param_groups if group["fused"] for p in group["params"]
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after validating its options and parameters (see :class:`torch.optim.Optimizer`)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"FOAM: a param group must be a dict, got {type(param_group).__name__}.")
        index = len(self.param_groups)
        if "params" not in param_group:
            raise TypeError(
                f"FOAM: param group {index} has no 'params' key (keys: {sorted(param_group)}). "
                "Fix: pass {'params': [tensors], ...}."
            )
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch refuses sets itself (their order is not reproducible)
            # Materialise once: a generator (model.parameters()) would be used up by the duplicate check below
            # and reach torch empty, leaving a group that silently trains nothing.
            params = list(params)
            param_group = {**param_group, "params": params}
        for p in params if not isinstance(params, set) else ():
            if not isinstance(p, torch.Tensor):
                continue  # torch's own check names the type
            for other, group in enumerate(self.param_groups):
                if any(p is q for q in group["params"]):
                    raise FoamConfigError(
                        f"FOAM: a parameter of shape {tuple(p.shape)} in param group {index} is already in param "
                        f"group {other}; some parameters appear in more than one parameter group. Fix: put each "
                        "tensor in exactly one group (build the groups from disjoint lists, e.g. by module name)."
                    )
        unknown = set(param_group) - set(_GROUP_DEFAULTS) - {"params", "param_names"}
        # Foreign keys (e.g. "initial_lr" from schedulers) are legal in torch; only our own typos matter.
        typos = {k for k in unknown if k in ("level", "alpha", "rho", "beta1", "beta2", "blocksize")}
        if typos:
            raise FoamConfigError(
                f"FOAM: param group keys {sorted(typos)} are not FOAM options. Valid options: "
                f"{sorted(_GROUP_DEFAULTS)}. Fix: use block_size=2**level for 'level' and scale for 'alpha'."
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["fused"]:
            self._fused_checked = False  # step() checks the kernels cover it, once its tensors are materialised
        if isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
        group["state_dtype"] = normalize_state_dtype(group["state_dtype"])
        index = len(self.param_groups) - 1
        try:
            validate_group_options(group, where=f"param group {index}")
            for p in group["params"]:
                check_sharding(p, group["block_size"], where=f"param group {index}")
                if torch.is_complex(p):
                    raise TypeError(
                        f"FOAM: param group {index} holds a complex parameter of shape {tuple(p.shape)}; "
                        "FOAM folds real tensors only (torch.view_as_real would not help: it appends a dimension "
                        "of 2, so blocks would mix real and imaginary parts). Fix: optimize complex parameters "
                        "with torch.optim.AdamW in a second optimizer, or store the real and imaginary parts as "
                        "two real parameters, which FOAM folds each along its own last dimension."
                    )
                if not p.is_floating_point():
                    raise TypeError(
                        f"FOAM: param group {index} holds a parameter of dtype {p.dtype}; only floating-point "
                        "parameters can be optimized. Fix: leave integer tensors (buffers, indices) out of the "
                        "optimizer, e.g. pass [p for p in model.parameters() if p.is_floating_point()]."
                    )
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, default in _GROUP_DEFAULTS.items():
                group.setdefault(key, default)

    def _init_group(
        self,
        group: dict[str, Any],
        params_with_grad: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        state_steps: list[torch.Tensor],
        params: list[torch.Tensor] | None = None,
    ) -> None:
        block_size = group["block_size"]
        for p in group["params"] if params is None else params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"FOAM does not support sparse gradients (parameter of shape {tuple(p.shape)}). "
                    "Fix: use dense gradients (e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam."
                )
            # FSDP2 DTensors: step this rank's rows (folding rows locally is exact, see foam_hf.distributed).
            local_param = local_tensor(p)
            state = self.state[p]
            if len(state) == 0:
                dtype = state_dtype_for(p, group["state_dtype"])
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                if is_foldable(p, block_size):
                    shapes = folded_shape(local_param.shape, block_size), folded_shape(p.shape, block_size)
                    state["exp_avg"] = zeros_state_like(p, *shapes, dtype)
                    state["exp_avg_sq"] = zeros_state_like(p, *shapes, dtype)
                elif local_param is p:
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                else:
                    state["exp_avg"] = zeros_state_like(p, local_param.shape, p.shape, dtype)
                    state["exp_avg_sq"] = zeros_state_like(p, local_param.shape, p.shape, dtype)
            if local_param.numel() == 0:  # a rank left without rows by uneven sharding: only count the step
                state["step"] += 1
                continue
            params_with_grad.append(local_param)
            grads.append(local_tensor(p.grad))
            exp_avgs.append(local_tensor(state["exp_avg"]))
            exp_avg_sqs.append(local_tensor(state["exp_avg_sq"]))
            state_steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform a single optimization step.

        Args:
            closure: a closure that re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor] | None = None) -> None:
        """One FOAM step over ``group`` (or over ``params``, a subset of it: the layer-wise seam)."""
        if not getattr(self, "_fused_checked", True):
            _check_fused_available(self.param_groups)
            self._fused_checked = True
        params_with_grad: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        exp_avgs: list[torch.Tensor] = []
        exp_avg_sqs: list[torch.Tensor] = []
        state_steps: list[torch.Tensor] = []
        self._init_group(group, params_with_grad, grads, exp_avgs, exp_avg_sqs, state_steps, params)
        if not params_with_grad:
            return
        beta1, beta2 = group["betas"]
        foam(
            params_with_grad,
            grads,
            exp_avgs,
            exp_avg_sqs,
            state_steps,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            block_size=group["block_size"],
            scale=group["scale"],
            res_scale=group["res_scale"],
            second_moment=group["second_moment"],
            foreach=group["foreach"],
            fused=group["fused"],
        )

    # ------------------------------------------------------------------ checkpoints

    def _state_shape(self, param: torch.Tensor, group: dict[str, Any]) -> torch.Size:
        """Shape of each moment FOAM keeps for ``param`` in ``group`` (subclasses that step slices of a
        tensor, as :class:`foam_hf.zero.ZeroFOAM` does, override it)."""
        block_size = group["block_size"]
        return folded_shape(param.shape, block_size) if is_foldable(param, block_size) else param.shape

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state, plus each group's ``param_shapes`` (plain lists): with them a load can
        tell a ``(6, 8)`` from a ``(6, 7)`` parameter even though both fold to ``(6, 2)`` at ``B = 4``."""
        state = super().state_dict()
        for saved, group in zip(state["param_groups"], self.param_groups):
            saved["param_shapes"] = [list(p.shape) for p in group["params"]]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state written by :meth:`state_dict`, refusing anything that would not continue exactly.

        Raises :class:`~foam_hf.errors.FoamStateError` when a saved group was written under another
        ``block_size`` or ``second_moment``, by an optimizer that is not FOAM, or when a saved moment's
        shape differs from the shape this parameter folds to. Moments keep their saved dtype (fp32 for
        half-precision parameters) instead of torch's default cast to the parameter's dtype.
        """
        if isinstance(state_dict, dict):
            # torch's contract: the pre-hooks see, and may replace, what loads. Run them here once, so that what
            # is validated and whose moments are restored is what they returned; torch then loads it unhooked.
            state_dict = state_dict.copy()
            for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
                result = pre_hook(self, state_dict)
                if result is not None:
                    state_dict = result
        id_to_param = check_loadable(self.param_groups, state_dict, state_shape=self._state_shape)
        hooks, self._optimizer_load_state_dict_pre_hooks = self._optimizer_load_state_dict_pre_hooks, OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks
        restore_moments(self, state_dict["state"], id_to_param)

    # ------------------------------------------------------------------ memory

    def state_memory(self) -> StateMemory:  # noqa: F821 - imported lazily to keep one concept per module
        """Optimizer-state bytes of this FOAM instance against AdamW's, see :func:`foam_hf.state_memory`."""
        from .memory import state_memory

        return state_memory(self)


# ---------------------------------------------------------------------------- functional API


def foam(
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
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    r"""Functional FOAM step over one group's tensors; see :class:`FOAM` for the algorithm.

    ``foreach=None`` uses the multi-tensor path when every parameter is on CUDA, as torch does.
    ``fused=None`` (with ``foreach=None``) uses a fused kernel where one is available: the C++ kernel when
    every parameter is a contiguous CPU float32/bfloat16/float16 tensor and it can be built, the Triton
    kernels when every parameter is such a CUDA tensor, Triton imports and its self-check passed
    (:func:`foam_hf._fused_triton.triton_ready`). Both step fp32 and bf16 moments.
    """
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    if fused is None and foreach is None:
        if on_cuda:  # the Triton kernels store fp32 or bf16 moments (state_dtype="bfloat16")
            fused = all(map(_triton().triton_supported, params)) and _triton().triton_ready(params[0].device)
        else:  # the CPU kernel also steps bf16 moments (state_dtype="bfloat16")
            fused = (
                all(map(_fused_cpu.fused_supported, params, (m.dtype for m in exp_avgs)))
                and _fused_cpu.load_kernel() is not None
            )
    if foreach is None:
        foreach = on_cuda
    if fused:
        impl = _triton()._fused_foam_triton if on_cuda else _fused_cpu._fused_foam
    else:
        impl = _multi_tensor_foam if foreach else _single_tensor_foam
    impl(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        lr=float(lr),
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(eps),
        weight_decay=float(weight_decay),
        block_size=int(block_size),
        scale=float(scale),
        res_scale=float(res_scale),
        second_moment=second_moment,
    )


def _single_tensor_foam(
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
    """The readable path: one tensor at a time, each line matching a line of the algorithm box."""
    for param, grad, stored_avg, stored_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        compute_dtype = _compute_dtype(param)
        # Half-precision parameters or bf16 states: compute on fp32 copies, write back at the end.
        weight = param if param.dtype == compute_dtype else param.to(compute_dtype)
        grad = grad.to(compute_dtype)
        exp_avg = stored_avg.to(compute_dtype)
        exp_avg_sq = stored_avg_sq.to(compute_dtype)

        step_t += 1
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        step_size = lr / bias_correction1

        # W ← W(1 − γλ), on the old weights, as AdamW.
        weight.mul_(1 - lr * weight_decay)

        if is_foldable(param, block_size):
            n = grad.shape[-1]
            # g̃ = blockmean(G);  g̃⁽²⁾ = blockmean(G⊙G) or g̃⊙g̃
            grad_mean = block_mean(grad, block_size)
            if second_moment == "mean_sq":
                grad_sq_mean = block_mean(grad * grad, block_size)
            else:
                grad_sq_mean = grad_mean * grad_mean
            # m̃ ← β1 m̃ + (1−β1) g̃;  ṽ ← β2 ṽ + (1−β2) g̃⁽²⁾
            exp_avg.lerp_(grad_mean, 1 - beta1)
            exp_avg_sq.mul_(beta2).add_(grad_sq_mean, alpha=1 - beta2)
            # M = unfold(m̃) + ρR;  V = unfold(ṽ) + ρ²R⊙R;  R = G − unfold(g̃)
            first = unfold(exp_avg, n, block_size)
            second = unfold(exp_avg_sq, n, block_size)
            if res_scale != 0:
                residual = grad - unfold(grad_mean, n, block_size)
                first = first + res_scale * residual
                second = second + (res_scale * res_scale) * (residual * residual)
            # W ← W − γα (M/bc1) / (sqrt(V/bc2) + ε)
            denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
            weight.addcdiv_(first, denom, value=-step_size * scale)
        else:
            # Plain AdamW, op for op as torch.optim.AdamW's single-tensor path.
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            weight.addcdiv_(exp_avg, denom, value=-step_size)

        if weight is not param:
            param.copy_(weight)
        _store_moment(stored_avg, exp_avg, step, salt=0)
        _store_moment(stored_avg_sq, exp_avg_sq, step, salt=1)


def _multi_tensor_foam(
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
    """The ``torch._foreach_*`` path: element-wise updates batched over tensors, in batches of bounded size.

    The tensors are cut into row pieces and stepped batch by batch (:mod:`foam_hf._chunking`), so the
    temporaries of a step stay within 25 % of the stepped parameters' bytes instead of several times them.
    Folding is per piece (shapes differ): the unfolded moments are added into the residual by broadcasting,
    never materialised. Same operations on the same values as :func:`_single_tensor_foam`, so the same
    results up to the rounding of vectorised kernels, and the same stochastic rounding of bf16 moments.
    """
    if not params:
        return
    torch._foreach_add_(state_steps, 1)
    steps = [s.item() for s in state_steps]
    folded = [is_foldable(p, block_size) for p in params]
    costs = [_foreach_bytes_per_entry(p, g, m, f, block_size) for p, g, m, f in zip(params, grads, exp_avgs, folded)]
    hyper = dict(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, block_size=block_size, scale=scale
    )
    for batch in _chunking.batches(
        params, grads, exp_avgs, exp_avg_sqs, folded, costs, _chunking.transient_budget(params)
    ):
        _foreach_step_batch(batch, steps, folded, res_scale=res_scale, second_moment=second_moment, **hyper)


def _foreach_bytes_per_entry(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, folded: bool, block_size: int
) -> int:
    """An upper bound of the temporaries one entry of ``param`` costs in :func:`_foreach_step_batch`."""
    compute_dtype = _compute_dtype(param)
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    weight_copy = param.dtype != compute_dtype
    state_copies = 2 * (exp_avg.dtype != compute_dtype)
    # Stochastic rounding into bf16 (_store_moment): int64 indices and hash steps, ~48 bytes per moment entry.
    rounding = 48 if exp_avg.dtype == torch.bfloat16 else 0
    if folded:
        # the weight's copy; G⊙G and its zero-padded copy (ragged rows) while folding; then the residual (the
        # gradient's copy or clone) and the second moment: 3 full-size buffers at most; plus g̃, g̃⁽²⁾, moments.
        return math.ceil(itemsize * (weight_copy + 3 + (2 + state_copies) / block_size) + rounding / block_size)
    # weight, gradient and moment copies, and the denominator
    return itemsize * (weight_copy + (grad.dtype != compute_dtype) + state_copies + 1) + rounding


def _foreach_step_batch(
    batch: list[_chunking.Piece],
    steps: list[float],
    folded: list[bool],
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
    """One batch of :func:`_multi_tensor_foam`: the algorithm box, line by line, over a list of row pieces."""
    compute_dtypes = [_compute_dtype(piece.param) for piece in batch]
    # Half-precision pieces or bf16 states: fp32 copies (of this batch only), written back at the end.
    weights = [piece.param.to(dt) for piece, dt in zip(batch, compute_dtypes)]
    piece_grads = [piece.grad.to(dt) for piece, dt in zip(batch, compute_dtypes)]
    moments = [piece.exp_avg.to(dt) for piece, dt in zip(batch, compute_dtypes)]
    moments_sq = [piece.exp_avg_sq.to(dt) for piece, dt in zip(batch, compute_dtypes)]
    piece_steps = [steps[piece.index] for piece in batch]
    bias_correction2_sqrts = [(1 - beta2**s) ** 0.5 for s in piece_steps]
    step_sizes = [lr / (1 - beta1**s) for s in piece_steps]

    # W ← W(1 − γλ), on the old weights, as AdamW.
    if weight_decay != 0:
        torch._foreach_mul_(weights, 1 - lr * weight_decay)

    plain = [i for i, piece in enumerate(batch) if not folded[piece.index]]
    fold = [i for i, piece in enumerate(batch) if folded[piece.index]]

    def pick(seq: list[Any], idx: list[int]) -> list[Any]:
        return [seq[i] for i in idx]

    if plain:  # plain AdamW, op for op as torch.optim.AdamW's foreach path
        p_w, p_g = pick(weights, plain), pick(piece_grads, plain)
        p_m, p_v = pick(moments, plain), pick(moments_sq, plain)
        torch._foreach_lerp_(p_m, p_g, 1 - beta1)
        torch._foreach_mul_(p_v, beta2)
        torch._foreach_addcmul_(p_v, p_g, p_g, 1 - beta2)
        denom = torch._foreach_sqrt(p_v)
        torch._foreach_div_(denom, pick(bias_correction2_sqrts, plain))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p_w, p_m, denom, [-s for s in pick(step_sizes, plain)])
        del denom

    if fold:
        f_w, f_m, f_v = pick(weights, fold), pick(moments, fold), pick(moments_sq, fold)
        # g̃ = blockmean(G);  g̃⁽²⁾ = blockmean(G⊙G) or g̃⊙g̃
        grad_means = [block_mean(piece_grads[i], block_size) for i in fold]
        if second_moment == "mean_sq":
            grad_sq_means = [block_mean(piece_grads[i] * piece_grads[i], block_size) for i in fold]
        else:
            grad_sq_means = torch._foreach_mul(grad_means, grad_means)
        # m̃ ← β1 m̃ + (1−β1) g̃;  ṽ ← β2 ṽ + (1−β2) g̃⁽²⁾
        torch._foreach_lerp_(f_m, grad_means, 1 - beta1)
        torch._foreach_mul_(f_v, beta2)
        torch._foreach_add_(f_v, grad_sq_means, alpha=1 - beta2)
        del grad_sq_means
        firsts, seconds = [], []
        for j, i in enumerate(fold):
            grad = piece_grads[i]
            if res_scale != 0:
                # R = G − unfold(g̃), in the gradient's fp32 copy when there is one (it is not needed after this)
                residual = grad if grad is not batch[i].grad else grad.clone()
                piece_grads[i] = None
                _add_unfolded_(residual, grad_means[j], block_size, subtract=True)
                # V = unfold(ṽ) + ρ²R⊙R;  M = unfold(m̃) + ρR
                second = residual * residual
                second.mul_(res_scale * res_scale)
                _add_unfolded_(second, f_v[j], block_size)
                first = residual.mul_(res_scale)
                _add_unfolded_(first, f_m[j], block_size)
            else:
                first = _unfold_copy(f_m[j], grad.shape[-1], block_size)
                second = _unfold_copy(f_v[j], grad.shape[-1], block_size)
            firsts.append(first)
            seconds.append(second)
        # W ← W − γα (M/bc1) / (sqrt(V/bc2) + ε)
        torch._foreach_sqrt_(seconds)
        torch._foreach_div_(seconds, pick(bias_correction2_sqrts, fold))
        torch._foreach_add_(seconds, eps)
        torch._foreach_addcdiv_(f_w, firsts, seconds, [-s * scale for s in pick(step_sizes, fold)])
        del firsts, seconds

    for piece, weight in zip(batch, weights):
        if weight is not piece.param:
            piece.param.copy_(weight)
    for piece, exp_avg, exp_avg_sq, step in zip(batch, moments, moments_sq, piece_steps):
        _store_moment(piece.exp_avg, exp_avg, step, salt=0, offset=piece.state_offset)
        _store_moment(piece.exp_avg_sq, exp_avg_sq, step, salt=1, offset=piece.state_offset)


def _add_unfolded_(x: torch.Tensor, y: torch.Tensor, block_size: int, subtract: bool = False) -> torch.Tensor:
    """``x += unfold(y)`` (or ``x -= unfold(y)``) in place, by broadcasting each folded entry over its block: no
    full-size temporary, and elementwise the same IEEE operation as ``x + unfold(y)`` (``x - unfold(y)``)."""
    n = x.shape[-1]
    whole = n // block_size  # blocks of B entries; a ragged last block holds n mod B
    op = torch.Tensor.sub_ if subtract else torch.Tensor.add_
    if whole:
        op(x[..., : whole * block_size].unflatten(-1, (whole, block_size)), y[..., :whole].unsqueeze(-1))
    if n % block_size:
        op(x[..., whole * block_size :], y[..., whole:])
    return x


def _unfold_copy(y: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """A fresh, contiguous ``unfold(y, n, block_size)`` (``unfold`` itself may return a view of ``y``)."""
    out = y.new_empty((*y.shape[:-1], n))
    whole = n // block_size
    if whole:
        out[..., : whole * block_size].unflatten(-1, (whole, block_size)).copy_(y[..., :whole].unsqueeze(-1))
    if n % block_size:
        out[..., whole * block_size :].copy_(y[..., whole:])
    return out
