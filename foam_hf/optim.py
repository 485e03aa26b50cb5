r"""FOAM: Adam with blocked state folding (arXiv 2512.07112), in the shape of ``torch.optim``.

Layout follows ``torch/optim/adam.py``, one concept per module: the :class:`FOAM` class here validates its
options (:mod:`foam_hf.options`) and gathers a group's tensors; the functional :func:`~foam_hf.functional.foam`
steps them with the implementation :mod:`foam_hf.implementation` picks (the readable
``_single_tensor_foam``, the ``torch._foreach_*`` path, or a fused kernel); checkpoints are checked by
:mod:`foam_hf.checkpoint`, state dtypes decided by :mod:`foam_hf.precision`. This module imports nothing
from transformers, TRL or PEFT.
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch.nn.parameter import is_lazy
from torch.optim.optimizer import Optimizer, ParamsT

from . import _fused_cpu
from .checkpoint import UPDATE_KEYS, check_loadable, restore_moments
from .distributed import check_sharding, is_dtensor, local_grad, local_tensor, zeros_state_like
from .errors import FoamConfigError
from .folding import folded_shape, folds_in_full, is_foldable
from .functional import _foam, foam
from .implementation import check_fused_available
from .options import GROUP_DEFAULTS, SECOND_MOMENT_MODES, as_builtin_numbers, check_option, validate_group_options
from .param_groups import check_keywords_reach_a_group
from .precision import PARAM_DTYPES, STATE_DTYPES, check_weight_rounding, normalize_state_dtype, state_dtype_for

__all__ = ["FOAM", "SECOND_MOMENT_MODES", "STATE_DTYPES", "foam", "state_dtype_for", "validate_group_options"]

SecondMoment = Literal["mean_sq", "sq_mean"]
WeightRounding = Literal["nearest", "stochastic"]


def _name_in(group: dict[str, Any], param: torch.Tensor) -> str | None:
    """``param``'s name from the group's ``param_names`` (the Trainer's groups carry them), else ``None``."""
    names = group.get("param_names") or ()
    return next((name for p, name in zip(group["params"], names) if p is param), None)


#: torch.optim.Adam(W) flags FOAM has no mode for, with what to do instead (refused in a param group when on).
_ADAM_FLAGS_NOT_IN_FOAM = {
    "maximize": "minimize the negated objective (loss = -objective) instead of maximize=True",
    "amsgrad": "drop amsgrad (FOAM keeps no running maximum of the folded second moment)",
    "capturable": "drop capturable (FOAM's CUDA step is not CUDA-graph capturable)",
    "differentiable": "drop differentiable (FOAM's step is not differentiable)",
}


def _check_something_to_round(groups: list[dict[str, Any]], when: str = "") -> None:
    """Refuse ``weight_rounding="stochastic"`` in an optimizer that holds no bf16 parameter: it would round
    nothing, silently (mixed precision keeps fp32 master weights, which are stored as computed). ``when`` says
    what changed since construction, for the check the first step repeats."""
    if not any(group["weight_rounding"] == "stochastic" for group in groups):
        return
    dtypes = {p.dtype for group in groups for p in group["params"]}
    if torch.bfloat16 not in dtypes:
        found = sorted(str(d).removeprefix("torch.") for d in dtypes) or ["none: no parameters"]
        raise FoamConfigError(
            f"FOAM: weight_rounding='stochastic' stochastically rounds bf16 weights, but this optimizer holds no "
            f"bf16 parameter{when} (dtypes: {', '.join(found)}). Mixed precision (Trainer's bf16=True on a model "
            "loaded in fp32, DeepSpeed's bf16) keeps fp32 weights, which are stored as computed and need no rounding, "
            "and PEFT keeps LoRA adapters in fp32 on a bf16 model. Fix: drop weight_rounding, or train bf16 weights "
            "(load the model with torch_dtype=torch.bfloat16; for adapters, get_peft_model(..., "
            "autocast_adapter_dtype=False))."
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
            with stochastic rounding, see :func:`foam_hf.precision.store_moment`) (default: None).
        weight_rounding: how the new weights are stored into bf16 parameters: ``"nearest"`` (round to nearest
            even, as torch's AdamW) or ``"stochastic"`` (stochastic rounding by the moments' counter hash, so
            that updates below half a bf16 spacing still move the weights in expectation; for training with
            bf16 weights and no fp32 master copy, see :func:`foam_hf.precision.store_weight`). A group with
            ``"stochastic"`` may not hold fp16 parameters, and an optimizer built with it must hold at least
            one bf16 parameter (fp32 weights, as mixed precision keeps them, are never rounded)
            (default: ``"nearest"``).

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
        lr: float = GROUP_DEFAULTS["lr"],
        betas: tuple[float, float] = GROUP_DEFAULTS["betas"],
        eps: float = GROUP_DEFAULTS["eps"],
        weight_decay: float = GROUP_DEFAULTS["weight_decay"],
        block_size: int = GROUP_DEFAULTS["block_size"],
        scale: float = GROUP_DEFAULTS["scale"],
        res_scale: float = GROUP_DEFAULTS["res_scale"],
        second_moment: SecondMoment = GROUP_DEFAULTS["second_moment"],
        *,
        foreach: bool | None = GROUP_DEFAULTS["foreach"],
        fused: bool | None = GROUP_DEFAULTS["fused"],
        state_dtype: str | torch.dtype | None = GROUP_DEFAULTS["state_dtype"],
        weight_rounding: WeightRounding = GROUP_DEFAULTS["weight_rounding"],
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
            weight_rounding=weight_rounding,
        )
        validate_group_options(defaults)
        check_keywords_reach_a_group(params, defaults, {**GROUP_DEFAULTS, "state_dtype": None})
        _fused_cpu.check_isa_env()  # a misspelt FOAM_CPU_ISA fails here, not at the first CPU step
        self._fused_checked = True  # add_param_group checks each fused group, or leaves it to step() (meta tensors)
        self._group_of_param: dict[int, int] = {}  # id(parameter) -> its group's index, see add_param_group
        self._built_with: dict[int, tuple[dict[str, Any], tuple[Any, ...]]] = {}  # see _check_structure
        self._checked_values: dict[int, tuple[dict[str, Any], tuple[Any, ...]]] = {}  # see _check_values
        super().__init__(params, defaults)
        from .layerwise import warn_if_stepped_in_backward  # (layerwise imports this module)

        warn_if_stepped_in_backward(self)
        _check_something_to_round(self.param_groups)
        # DeepSpeed swaps bf16 weights for fp32 master partitions after construction: the first step asks again.
        self._check_rounding = any(group["weight_rounding"] == "stochastic" for group in self.param_groups)
        # DeepSpeed ZeRO and FSDP1 swap the groups' tensors for flat 1-D shards after construction, and those never
        # fold: the first step() looks once for that swap (_warn_if_flattened).
        self._check_flattened = any(
            folds_in_full(p, group["block_size"]) for group in self.param_groups for p in group["params"]
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
            # and reach torch empty, leaving a group that silently trains nothing. Into a copy of the caller's dict
            # (torch fills it with this optimizer's defaults: a group list reused for a second FOAM would carry the
            # first one's block_size into it); edit optimizer.param_groups to change a group.
            params = list(params)
            param_group = {**param_group, "params": params}
        # id(parameter) -> the group it was added to: one look-up per parameter, where a scan of every group
        # made adding thousands of groups (ZeroFOAM makes one per folded tensor) quadratic. A hit is confirmed in
        # the groups themselves, which their owner may have edited since.
        for p in params if not isinstance(params, set) else ():
            if isinstance(p, tuple) and len(p) == 2:  # torch's (name, tensor) pairs
                p = p[1]
            if not isinstance(p, torch.Tensor):
                continue  # torch's own check names the type
            other = self._group_of_param.get(id(p))
            if other is not None and other < index and any(p is q for q in self.param_groups[other]["params"]):
                raise FoamConfigError(
                    f"FOAM: a parameter of shape {tuple(p.shape)} in param group {index} is already in param "
                    f"group {other}; some parameters appear in more than one parameter group. Fix: put each "
                    "tensor in exactly one group (build the groups from disjoint lists, e.g. by module name)."
                )
        unknown = set(param_group) - set(GROUP_DEFAULTS) - {"params", "param_names"}
        # Foreign keys (e.g. "initial_lr" from schedulers) are legal in torch; only our own typos matter: the
        # paper's names, and keys within a typo of an option, which would otherwise leave it at its default.
        typos = {k for k in unknown if k in ("level", "alpha", "rho", "beta1", "beta2", "blocksize")}
        near = {k: difflib.get_close_matches(k, list(GROUP_DEFAULTS), n=1, cutoff=0.8) for k in unknown}
        typos |= {k for k, match in near.items() if match} | ({"block_sizes"} & unknown)
        # torch's Adam flags FOAM does not have: harmless when off (a group copied from an AdamW state_dict carries
        # them so), but on, each would be a different algorithm trained without a word.
        unsupported = {k: param_group[k] for k in _ADAM_FLAGS_NOT_IN_FOAM if param_group.get(k)}
        if unsupported:
            raise FoamConfigError(
                f"FOAM: param group {index} sets {unsupported}; FOAM has no such mode, and would step as if "
                f"they were off. Fix: {'; '.join(_ADAM_FLAGS_NOT_IN_FOAM[k] for k in unsupported)}."
            )
        if typos:
            hints = {
                "level": "use block_size=2**level",
                "alpha": "use scale",
                "rho": "use res_scale",
                "beta1": "use betas=(beta1, beta2)",
                "beta2": "use betas=(beta1, beta2)",
                "block_sizes": "block_sizes is a FoamConfig / optim_args key (sizes per module); a param group takes "
                "one block_size",
            }
            fixes = "; ".join(
                f"{k!r}: " + (hints.get(k) or (f"use {near[k][0]!r} (a typo?)" if near.get(k) else "drop it"))
                for k in sorted(typos)
            )
            raise FoamConfigError(
                f"FOAM: param group keys {sorted(typos)} are not FOAM options, and would be ignored. Valid options: "
                f"{sorted(GROUP_DEFAULTS)}. Fix: {fixes}."
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
        group["state_dtype"] = normalize_state_dtype(group["state_dtype"])
        index = len(self.param_groups) - 1
        try:
            validate_group_options(group, where=f"param group {index}")
            as_builtin_numbers(group)
            names = group.get("param_names") or [None] * len(group["params"])
            for p, name in zip(group["params"], names):
                if is_lazy(p):  # nn.LazyLinear and co.: shape and dtype come with the first forward
                    continue
                check_sharding(p, group["block_size"], where=f"param group {index}", name=name)
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
                if p.dtype not in PARAM_DTYPES:
                    raise TypeError(
                        f"FOAM: param group {index} holds a parameter of dtype {p.dtype}; FOAM steps "
                        f"{[str(d).removeprefix('torch.') for d in PARAM_DTYPES]} parameters (fp8 weights need a "
                        "master copy in a wider dtype). Fix: optimize a bf16 or fp32 master copy of the weights."
                    )
            check_weight_rounding(group["params"], group["weight_rounding"], f"param group {index}", names)
            if group["fused"]:
                # What the kernels cannot step fails here, not at the first step(); tensors still on the meta device
                # (or lazy) are checked by step() once they are real.
                check_fused_available([group], allow_meta=True, first_index=index)
                if any(p.device.type == "meta" or is_lazy(p) for p in group["params"]):
                    self._fused_checked = False
        except (TypeError, ValueError, RuntimeError):
            self.param_groups.pop()
            raise
        for p in group["params"]:
            self._group_of_param[id(p)] = index
        self._built_with[id(group)] = (group, self._structure(group))

    #: Whether the next step() checks that the tensors still fold (see _warn_if_flattened); unpickled FOAMs do not.
    _check_flattened = False
    #: Whether the next step() checks that weight_rounding="stochastic" still has bf16 weights to round.
    _check_rounding = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, default in GROUP_DEFAULTS.items():
                group.setdefault(key, default)
        self._group_of_param = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self._record_structure()
        self._checked_values = {}  # a copy's groups, or the loaded ones: checked again at their next step

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
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    f"FOAM does not support sparse gradients (parameter of shape {tuple(p.shape)}). "
                    "Fix: use dense gradients (e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam."
                )
            # FSDP2 DTensors: step this rank's rows (folding rows locally is exact, see foam_hf.distributed).
            local_param = local_tensor(p)
            state = self.state[p]
            if len(state) == 0:
                # Checked when the group was added, and here again: FSDP2's DTensors may be swapped into the groups
                # after construction (accelerate does), with a placement that cuts folded blocks across ranks.
                if is_dtensor(p):
                    check_sharding(p, block_size, name=_name_in(group, p))
                dtype = state_dtype_for(p, group["state_dtype"])
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                if is_foldable(p, block_size):
                    shapes = folded_shape(local_param.shape, block_size), folded_shape(p.shape, block_size)
                    state["exp_avg"] = zeros_state_like(p, *shapes, dtype)
                    state["exp_avg_sq"] = zeros_state_like(p, *shapes, dtype)
                elif local_param is p:
                    # Contiguous whatever the parameter's layout: the fused kernels need it, and a channels_last
                    # weight may turn contiguous later (model.to(memory_format=...)) while its moments stay.
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
                else:
                    state["exp_avg"] = zeros_state_like(p, local_param.shape, p.shape, dtype)
                    state["exp_avg_sq"] = zeros_state_like(p, local_param.shape, p.shape, dtype)
            if local_param.numel() == 0:  # a rank left without rows by uneven sharding: only count the step
                state["step"] += 1
                continue
            params_with_grad.append(local_param)
            grads.append(local_grad(p, grad))
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

        if self._check_flattened:
            self._warn_if_flattened()
        self._check_rounding_still_applies()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _check_rounding_still_applies(self) -> None:
        """At the first step: refuse weight_rounding="stochastic" if no bf16 weight is left to round (DeepSpeed puts
        fp32 master partitions in the groups after construction)."""
        if self._check_rounding:
            self._check_rounding = False
            _check_something_to_round(self.param_groups, when=" now (its tensors were replaced after construction)")

    def _warn_if_flattened(self) -> None:
        """Warn once if FOAM was built over tensors that fold but now steps only 1-D ones (flat ZeRO/FSDP1 shards)."""
        tensors = [p for group in self.param_groups for p in group["params"]]
        if not tensors:  # groups emptied between steps: look again at the next one
            return
        self._check_flattened = False
        if all(p.ndim <= 1 for p in tensors):
            warnings.warn(
                "FOAM was built over tensors that fold, but every tensor it steps now is one-dimensional: its "
                "parameters were replaced by flat shards (DeepSpeed ZeRO's partitions, or FSDP1's flat parameters), "
                "and 1-D tensors never fold, so every optimizer state is AdamW-sized. Fix: under DeepSpeed build "
                "foam_hf.zero.ZeroFOAM instead of FOAM (optim='foam' through the Trainer does); under FSDP use "
                "FSDP2 (torch.distributed.fsdp.fully_shard; accelerate's fsdp_version: 2).",
                UserWarning,
                stacklevel=2,
            )

    #: Options that shape the moments a group's states are built with: changing one afterwards would read them as
    #: another folding, another rule or another dtype.
    _STRUCTURAL_OPTIONS = ("block_size", "second_moment", "state_dtype")

    def _structure(self, group: dict[str, Any]) -> tuple[Any, ...]:
        # weight_rounding is recorded too, though not structural: a change of it is checked, then taken
        structural = tuple(normalize_state_dtype(group[key]) for key in self._STRUCTURAL_OPTIONS)
        return (*structural, group.get("weight_rounding", GROUP_DEFAULTS["weight_rounding"]))

    def _record_structure(self) -> None:
        """What each group's moments are (or will be) built with: recorded when a group is added or loaded."""
        self._built_with = {id(group): (group, self._structure(group)) for group in self.param_groups}

    #: The options a step reads that do not shape the moments: set on a group after it was added (by hand, or by a
    #: scheduler), a value is checked at the next step, once per change, as the constructor checks it.
    _VALUE_OPTIONS = ("lr", "betas", "eps", "weight_decay", "scale", "res_scale", "fused", "foreach")

    def _check_values(self, group: dict[str, Any]) -> None:
        """Validate the :attr:`_VALUE_OPTIONS` of ``group`` that changed since its last step: ``lr=nan`` set by hand
        would turn every weight into NaN, ``lr="1e-3"`` fail deep inside the step. Values are compared by identity
        (a tensor lr is never read, nor its ``==`` run); where only ``lr`` changed (a scheduler's step), only it is
        checked."""
        now = tuple(map(group.__getitem__, self._VALUE_OPTIONS))
        entry = self._checked_values.get(id(group))
        if entry is not None and entry[0] is group:
            changed = [old is not new for old, new in zip(entry[1], now)]
            if not any(changed):
                return
            if not any(changed[1:]):
                check_option("lr", group["lr"], f"param group {self._index_of(group)}")
                self._checked_values[id(group)] = (group, now)
                return
        validate_group_options(group, f"param group {self._index_of(group)}")
        self._checked_values[id(group)] = (group, now)

    def _check_structure(self, group: dict[str, Any]) -> None:
        """Refuse a change of :attr:`_STRUCTURAL_OPTIONS` in ``group`` that its existing moments would be misread
        under (one look-up per group and step while nothing changes). A changed value is validated; a change that
        no moment depends on yet (no state, or parameters it does not concern) is taken. The other options are
        checked by :meth:`_check_values` first."""
        self._check_values(group)
        now = self._structure(group)
        entry = self._built_with.get(id(group))
        if entry is not None and entry[0] is group and entry[1] == now:
            return
        group["state_dtype"] = normalize_state_dtype(group["state_dtype"])  # torch.bfloat16 -> "bfloat16", as added
        try:
            validate_group_options(group)  # a value set on the group since it was added
        except (TypeError, ValueError):
            validate_group_options(group, where=f"param group {self._index_of(group)}")  # the same, naming the group
            raise
        names = [_name_in(group, p) for p in group["params"]]
        check_weight_rounding(group["params"], group["weight_rounding"], f"param group {self._index_of(group)}", names)
        if entry is not None and entry[0] is group and self._structure_change_matters(group, entry[1], now):
            index = self._index_of(group)
            changed = {k: (a, b) for k, a, b in zip(self._STRUCTURAL_OPTIONS, entry[1], now) if a != b}
            raise FoamConfigError(
                f"FOAM: param group {index} changed "
                + ", ".join(f"{k} from {a!r} to {b!r}" for k, (a, b) in changed.items())
                + " after its moments were built: they hold the state of the old value, and would be read as "
                "another folding, second-moment rule or dtype. Fix: put the old value back, or build a new optimizer "
                "with the new one (checkpoints refuse the same change)."
            )
        self._built_with[id(group)] = (group, now)

    def _index_of(self, group: dict[str, Any]) -> int:
        """The position of ``group`` (the dict itself) in :attr:`param_groups`, for messages (a scan: not per step)."""
        return next(i for i, g in enumerate(self.param_groups) if g is group)

    def _structure_change_matters(self, group: dict[str, Any], old: tuple[Any, ...], now: tuple[Any, ...]) -> bool:
        """Whether a parameter of ``group`` holds moments that the change from ``old`` to ``now`` (values of
        :attr:`_STRUCTURAL_OPTIONS`) would be misread under."""
        (old_size, old_rule, old_dtype), (size, rule, dtype) = old[:3], now[:3]
        for p in group["params"]:
            if "exp_avg" not in self.state.get(p, {}):
                continue
            folded = folds_in_full(p, size)
            if old_size != size and (folded or folds_in_full(p, old_size)):
                return True
            if old_rule != rule and folded:
                return True
            if state_dtype_for(p, old_dtype) != state_dtype_for(p, dtype):
                return True
        return False

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor] | None = None) -> None:
        """One FOAM step over ``group`` (or over ``params``, a subset of it: the layer-wise seam)."""
        if not getattr(self, "_fused_checked", True):
            check_fused_available(self.param_groups)
            self._fused_checked = True
        self._check_structure(group)
        params_with_grad: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        exp_avgs: list[torch.Tensor] = []
        exp_avg_sqs: list[torch.Tensor] = []
        state_steps: list[torch.Tensor] = []
        self._init_group(group, params_with_grad, grads, exp_avgs, exp_avg_sqs, state_steps, params)
        if not params_with_grad:
            return
        beta1, beta2 = group["betas"]
        _foam(
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
            weight_rounding=group["weight_rounding"],
        )

    # ------------------------------------------------------------------ checkpoints

    def _state_shape(self, param: torch.Tensor, group: dict[str, Any]) -> torch.Size:
        """Shape of each moment FOAM keeps for ``param`` in ``group`` (subclasses that step slices of a
        tensor, as :class:`foam_hf.zero.ZeroFOAM` does, override it)."""
        block_size = group["block_size"]
        return folded_shape(param.shape, block_size) if is_foldable(param, block_size) else param.shape

    @contextlib.contextmanager
    def _hooks_set_aside(self, *names: str) -> Iterator[tuple[OrderedDict, ...]]:
        """torch's hook dicts ``names`` emptied while the block runs (torch's own state_dict/load_state_dict would
        run them too early), and yielded so that FOAM runs them itself; put back however the block ends."""
        held = tuple(getattr(self, name) for name in names)
        for name in names:
            setattr(self, name, OrderedDict())
        try:
            yield held
        finally:
            for name, hooks in zip(names, held):
                setattr(self, name, hooks)

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state, plus each group's ``param_shapes`` (plain lists): with them a load can
        tell a ``(6, 8)`` from a ``(6, 7)`` parameter even though both fold to ``(6, 2)`` at ``B = 4``."""
        # torch runs the post-hooks inside its state_dict(); they must see the whole state, param_shapes included.
        with self._hooks_set_aside("_optimizer_state_dict_post_hooks") as (hooks,):
            state = super().state_dict()
        for saved, group in zip(state["param_groups"], self.param_groups):
            # None for a lazy parameter (nn.LazyLinear before its first forward): it has no shape yet
            saved["param_shapes"] = [None if is_lazy(p) else list(p.shape) for p in group["params"]]
        for post_hook in hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state written by :meth:`state_dict`, refusing anything that would not continue exactly.

        Raises :class:`~foam_hf.errors.FoamStateError` when a saved group was written under another
        ``block_size``, ``second_moment``, ``scale`` or ``res_scale``, by an optimizer that is not FOAM, or when
        a saved moment's shape differs from the shape this parameter folds to. Every other option loads as torch
        loads it (the saved value wins), but ``state_dtype``: the moments are put in the dtype this optimizer
        was built to keep (fp32 for half-precision parameters unless asked otherwise), not cast to the
        parameter's dtype as torch would, and converted with a warning where the checkpoint holds another; and
        ``fused`` and ``foreach``, which choose how this run computes the same step, not what it computes.
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
        # The state dtype is a storage choice, not the run's: the one this optimizer was built with stays. So do
        # FOAM's update options a saved group lacks (a state from before they existed, or edited by hand): torch
        # would fill them from the defaults (__setstate__), dropping the built values without a word.
        # The names of the parameters this optimizer holds stay too: torch would put the saved ones over them (a
        # renamed model loads by position), and later checkpoints and errors would name other tensors.
        kept = [
            {
                "state_dtype": group["state_dtype"],
                "weight_rounding": group["weight_rounding"],
                # The implementation is this run's: a checkpoint of a fused run resumed with fused=False (another
                # device, non-contiguous tensors) must not step fused, and then fail, telling to pass fused=False.
                "fused": group["fused"],
                "foreach": group["foreach"],
                **{key: group[key] for key in UPDATE_KEYS if key not in saved},
                **{key: group[key] for key in ("param_names",) if key in group},
            }
            for group, saved in zip(self.param_groups, state_dict["param_groups"])
        ]
        # torch then loads it without the pre-hooks (they ran) and without the post-hooks, which must see the
        # moments restored in FOAM's own dtypes: they run last.
        held = ("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")
        with self._hooks_set_aside(*held) as (_, post_hooks):
            super().load_state_dict(state_dict)
        for group, values in zip(self.param_groups, kept):
            group.update(values)
        self._record_structure()  # the loaded groups, whose structural values check_loadable held to the saved ones
        converted = restore_moments(self, state_dict["state"], id_to_param)
        if converted:
            warnings.warn(
                f"FOAM.load_state_dict: {converted} saved moment(s) were in another dtype than this optimizer's "
                f"state_dtype {[g['state_dtype'] for g in self.param_groups]} (per group) asks for; they were "
                "converted (rounded once, to nearest, where narrowed to bfloat16). Resuming is exact only under "
                "the saving run's state_dtype.",
                stacklevel=2,
            )
        for post_hook in post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------------ memory

    def state_memory(self) -> StateMemory:  # noqa: F821 - imported lazily to keep one concept per module
        """Optimizer-state bytes of this FOAM instance against AdamW's, see :func:`foam_hf.state_memory`."""
        from .memory import state_memory

        return state_memory(self)
