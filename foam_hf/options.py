"""FOAM's per-group options: their defaults and the one validator of each.

Every place that accepts a FOAM option checks it here: :class:`~foam_hf.FOAM` (its defaults and every param
group), :class:`~foam_hf.FoamConfig` (``optim_args``) and the ``TrainingArguments`` fields the integration reads
(``learning_rate``, ``adam_beta1``, ...). So a rule, its wording and its fix are written once, and an error
always names the value, the rule and the fix. This module imports nothing of the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch

from .errors import FoamConfigError
from .precision import STATE_DTYPES, WEIGHT_ROUNDINGS

__all__ = [
    "GROUP_DEFAULTS",
    "SECOND_MOMENT_MODES",
    "as_builtin_numbers",
    "check_number",
    "check_option",
    "validate_group_options",
]

#: The two second-moment rules: fold the block mean of ``G⊙G`` (``"mean_sq"``, what the paper's released
#: code does) or the square of the block mean of ``G`` (``"sq_mean"``, the paper's equations as written).
SECOND_MOMENT_MODES: tuple[str, ...] = ("mean_sq", "sq_mean")

#: The keys every FOAM param group carries, with their defaults: the defaults of :class:`~foam_hf.FOAM`'s
#: arguments and of :class:`~foam_hf.FoamConfig`'s fields, and what ``__setstate__`` fills in for old pickles.
GROUP_DEFAULTS: dict[str, Any] = {
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
    "weight_rounding": "nearest",
}


@dataclass(frozen=True)
class NumberRule:
    """A rule for a real-valued option: its wording, its test and the fix it suggests (``{label}`` is how the
    user spelled the option)."""

    text: str
    ok: Callable[[float], bool]
    fix: str


#: The real-valued options (``beta`` covers each entry of ``betas``, and ``adam_beta1``/``adam_beta2``).
NUMBER_RULES: dict[str, NumberRule] = {
    "lr": NumberRule("finite and >= 0", lambda v: v >= 0, "pass e.g. {label}=1e-3"),
    "eps": NumberRule("finite and >= 0", lambda v: v >= 0, "pass e.g. {label}=1e-8"),
    "weight_decay": NumberRule("finite and >= 0", lambda v: v >= 0, "pass e.g. {label}=0.01, or 0.0 for none"),
    "beta": NumberRule("in [0, 1)", lambda v: 0.0 <= v < 1.0, "pass betas=(0.9, 0.999) or other values in [0, 1)"),
    "scale": NumberRule(
        "finite and > 0", lambda v: v > 0, "pass {label}=1.0 (the update multiplier alpha of folded tensors)"
    ),
    "res_scale": NumberRule("finite and >= 0", lambda v: v >= 0, "pass {label}=1.0 (0 drops the residual)"),
}


def _is_real_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def check_number(
    label: str,
    value: Any,
    rule: str,
    *,
    owner: str = "FOAM",
    invalid_for: str = "",
    context: str = "",
    fix: str | None = None,
) -> None:
    """Raise unless ``value`` is a real number (or a one-element tensor) obeying ``NUMBER_RULES[rule]``.

    ``label`` is how the user spelled the option (``"betas[1]"``, ``"adam_beta2"``), ``owner`` what they passed
    it to (``invalid_for``, e.g. ``" for optim='foam'"``, says for what), ``context`` where (appended to the
    fix), ``fix`` replaces the rule's default suggestion.
    """
    number_rule = NUMBER_RULES[rule]
    fix = f"{fix or number_rule.fix.format(label=label)}{context}."
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise FoamConfigError(
                f"{owner}: {label} is a tensor of shape {tuple(value.shape)}; it must be a number or a one-element "
                f"tensor. Fix: {fix}"
            )
        value = value.item()
    if not _is_real_number(value):
        raise TypeError(
            f"{owner}: {label}={value!r} has type {type(value).__name__}; it must be a real number. Fix: {fix}"
        )
    if not (math.isfinite(value) and number_rule.ok(float(value))):
        raise FoamConfigError(
            f"{owner}: {label}={value!r} is invalid{invalid_for}: it must be {number_rule.text}. Fix: {fix}"
        )


def _check_block_size(value: Any, at: str) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise TypeError(
            f"FOAM: block_size={value!r} has type {type(value).__name__}; it must be a positive int "
            f"(the paper's level l is block_size=2**l). Fix: pass block_size=4{at}."
        )
    if value < 1:
        raise FoamConfigError(
            f"FOAM: block_size={value} is invalid: it must be a positive int (1 = plain AdamW states; "
            f"the paper's level l is block_size=2**l). Fix: pass block_size=4 or another int >= 1{at}."
        )


def _check_betas(value: Any, at: str) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"FOAM: betas={value!r} must be a pair (beta1, beta2). Fix: pass betas=(0.9, 0.999){at}.")
    for i, beta in enumerate(value):
        check_number(f"betas[{i}]", beta, "beta", context=at)


def _check_second_moment(value: Any, at: str) -> None:
    if value not in SECOND_MOMENT_MODES:
        raise FoamConfigError(
            f"FOAM: second_moment={value!r} is invalid: it must be one of {SECOND_MOMENT_MODES}. "
            f"Fix: pass second_moment='mean_sq' (the default){at}."
        )


def _check_tristate(name: str) -> Callable[[Any, str], None]:
    def check(value: Any, at: str) -> None:
        if value not in (None, True, False):
            raise TypeError(
                f"FOAM: {name}={value!r} must be None, True or False. Fix: pass {name}=None to let FOAM choose{at}."
            )

    return check


def _check_state_dtype(value: Any, at: str) -> None:
    if value not in STATE_DTYPES:
        why = (
            " fp16 moments underflow (second moments of small gradients flush to zero) and overflow."
            if value in ("float16", torch.float16)
            else ""
        )
        raise FoamConfigError(
            f"FOAM: state_dtype={value!r} is invalid: it must be one of {list(STATE_DTYPES)} (in Python also "
            f"the dtypes torch.float32 and torch.bfloat16).{why} Fix: pass state_dtype='bfloat16' to halve state "
            f"memory, or None for fp32 states{at}."
        )


def _check_weight_rounding(value: Any, at: str) -> None:
    if value not in WEIGHT_ROUNDINGS:
        raise FoamConfigError(
            f"FOAM: weight_rounding={value!r} is invalid: it must be one of {WEIGHT_ROUNDINGS} (how new weights are "
            f"stored into bf16 parameters). Fix: pass weight_rounding='stochastic' for bf16 weights, or 'nearest' "
            f"(the default){at}."
        )


def _number_check(name: str) -> Callable[[Any, str], None]:
    def check(value: Any, at: str) -> None:
        check_number(name, value, name, context=at)

    return check


#: One validator per option of :data:`GROUP_DEFAULTS`: ``check(value, at)``, ``at`` a " (in ...)" suffix.
_CHECKS: dict[str, Callable[[Any, str], None]] = {
    "lr": _number_check("lr"),
    "betas": _check_betas,
    "eps": _number_check("eps"),
    "weight_decay": _number_check("weight_decay"),
    "block_size": _check_block_size,
    "scale": _number_check("scale"),
    "res_scale": _number_check("res_scale"),
    "second_moment": _check_second_moment,
    "foreach": _check_tristate("foreach"),
    "fused": _check_tristate("fused"),
    "state_dtype": _check_state_dtype,
    "weight_rounding": _check_weight_rounding,
}
assert _CHECKS.keys() == GROUP_DEFAULTS.keys()


def check_option(name: str, value: Any, where: str = "") -> None:
    """Validate one option of :data:`GROUP_DEFAULTS`; raise ``TypeError``/:class:`FoamConfigError` naming value,
    rule and fix (``where``, e.g. ``"param group 2"``, is added to the fix)."""
    _CHECKS[name](value, f" (in {where})" if where else "")


def as_builtin_numbers(options: dict[str, Any]) -> None:
    """Turn the group's numeric options that are other numbers (NumPy scalars) into Python's int and float, in
    place: a NumPy scalar in a param group pickles as a NumPy object, and ``torch.load(..., weights_only=True)``,
    torch's default and the Trainer's, then refuses the checkpoint. Tensors (a tensor lr) stay as they are."""

    def builtin(value: Any, kind: type) -> Any:
        if isinstance(value, Real) and not isinstance(value, (bool, torch.Tensor)) and type(value) not in (int, float):
            return kind(value)
        return value

    for key in ("lr", "eps", "weight_decay", "scale", "res_scale"):
        if key in options:
            options[key] = builtin(options[key], float)
    if "block_size" in options:  # an Integral: validate_group_options ran first
        options["block_size"] = builtin(options["block_size"], int)
    if isinstance(options.get("betas"), tuple):
        options["betas"] = tuple(builtin(beta, float) for beta in options["betas"])


def validate_group_options(options: dict[str, Any], where: str = "") -> None:
    """Validate every option of a param group (missing ``fused``/``state_dtype``/``weight_rounding`` take their
    defaults), and the one rule between options: ``fused=True`` and ``foreach=True`` name two implementations."""
    optional = ("fused", "state_dtype", "weight_rounding")
    for name in GROUP_DEFAULTS:
        check_option(name, options.get(name, GROUP_DEFAULTS[name]) if name in optional else options[name], where)
    if options.get("fused") and options["foreach"]:
        at = f" (in {where})" if where else ""
        raise FoamConfigError(
            f"FOAM: fused=True and foreach=True cannot be set together (they name two implementations). "
            f"Fix: pass only one of them{at}."
        )
