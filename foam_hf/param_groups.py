r"""Which parameters fold, with which block size: resolved once from a model and a :class:`FoamConfig`.

Rules, in order:

1. Only trainable parameters (``requires_grad``) are considered; a PEFT model therefore contributes only
   its adapter weights. Tied or shared parameters are one tensor and get exactly one block size.
2. *Default targets*: the ``weight`` of every linear layer (``nn.Linear``, transformers' ``Conv1D``)
   except the output head and the input embeddings (the paper's choice), and except PEFT adapter weights
   (any parameter inside a PEFT tuner layer: LoRA's ``lora_A``/``lora_B``, ..., or a prompt-learning encoder:
   P-tuning's MLP, prefix tuning's projection). Adapters keep AdamW states
   by default because folding them cost loss in every LoRA configuration measured (docs/benchmarks.md,
   "LoRA adapters") while their states are a tiny share of memory; ``block_sizes=lora_A:4`` folds them.
   Output heads are the module ``get_output_embeddings()`` returns and task heads named as in
   :data:`OUTPUT_HEAD_NAMES`, with every module inside them (a PEFT ``modules_to_save`` copy of a head is a
   head). ``target_modules`` replaces that set: a list of module-name patterns, one full regex string, or
   ``"all-linear"`` (every linear layer outside the output heads and embeddings, as PEFT defines it). A
   pattern targets every linear layer in the modules it matches, as an override does (``lora_A`` targets
   the ``lora_A.default`` layers, ``mlp`` the linear layers of every MLP), adapters included. Targets fold
   with ``block_size``.
3. *Overrides* (``block_sizes``) then set the block size of every trainable parameter inside a matched
   module, target or not (``lm_head:4`` folds the head, ``q_proj:1`` keeps AdamW states); an override above 1
   that reaches only parameters that never fold (norm weights, biases) is an error. A pattern
   matches a module name as PEFT's ``rank_pattern`` does: the name ends with the pattern at a ``.``
   boundary (``q_proj`` matches ``model.layers.0.self_attn.q_proj``), the pattern being a regex. The
   most specific match wins: the deepest matched module, then the longest pattern; two different sizes
   at the same specificity are an error.
4. Everything else keeps AdamW states (block size 1). One-dimensional parameters never fold whatever
   their block size (see :func:`foam_hf.folding.is_foldable`).

A pattern or target that matches no trainable parameter raises :class:`NoMatchingModuleError`: with the
closest module names, or, where it matches modules whose parameters are all frozen (or, for a target, none
of which is a linear layer's weight), with those modules.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import FoamConfig, _looks_like_regex
from .errors import FoamConfigError, NoMatchingModuleError
from .folding import folds_in_full

__all__ = ["BlockSizePlan", "build_param_groups", "foam_param_groups", "resolve_block_sizes"]


@dataclass(frozen=True)
class BlockSizePlan:
    """The resolved plan: ``size_by_parameter`` maps each trainable parameter's name to its block size
    (1 = AdamW states). (``FoamConfig.block_sizes`` is something else: the pattern → size overrides.)"""

    size_by_parameter: dict[str, int]

    @property
    def block_sizes(self) -> dict[str, int]:
        """Deprecated name of :attr:`size_by_parameter`."""
        warnings.warn(
            "BlockSizePlan.block_sizes is deprecated: use BlockSizePlan.size_by_parameter (parameter name -> "
            "block size; block_sizes is FoamConfig's name for the pattern overrides).",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.size_by_parameter


def _linear_types() -> tuple[type[nn.Module], ...]:
    types: list[type[nn.Module]] = [nn.Linear]
    try:  # GPT-2 style models use transformers' Conv1D as their linear layer.
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return tuple(types)


def literal_characters(pattern: str) -> int:
    r"""How many characters of a module name ``pattern`` spells out: the fewest literal characters any match holds
    (``q_proj`` 6, ``.*_proj`` 5, ``(?:q|v)_proj`` 5, ``layers\.1\.self_attn\.q_proj`` 25; a wildcard or a class
    of several characters spells none). Of two patterns that match the same module, the one that spells out more
    is the more specific, whichever is longer: ``q_proj`` (6) wins over ``.*_proj`` (5), but ``layers\.0\..*``
    (9) wins over ``q_proj`` for layer 0's ``q_proj``."""
    try:  # the parser of the re module itself: re._parser from Python 3.11, sre_parse before
        from re import _constants as sre
        from re import _parser as sre_parse
    except ImportError:
        try:
            import sre_constants as sre  # type: ignore[no-redef]
            import sre_parse  # type: ignore[no-redef]
        except ImportError:  # another Python's layout: the pattern's length, the rule before this one
            return len(pattern)

    def weight(items: Any) -> int:
        total = 0
        for op, value in items:
            if op is sre.LITERAL:
                total += 1
            elif op is sre.SUBPATTERN:
                total += weight(value[-1])
            elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", None)):
                low, _, sub = value
                total += low * weight(sub)
            elif op is sre.BRANCH:
                total += min(weight(branch) for branch in value[1])
        return total

    return weight(sre_parse.parse(pattern))


def _suffix_match(pattern: str, name: str) -> bool:
    return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name) is not None


def _full_match(regex: str, name: str) -> bool:
    return re.fullmatch(regex, name) is not None


def _reaches(pattern: str, module_name: str, names: Callable[[str, str], bool] = _suffix_match) -> bool:
    """Whether ``pattern`` names the module ``module_name`` or a module containing it (``names(pattern, name)``:
    whether it names that one module)."""
    return any(names(pattern, prefix) for prefix in _ancestors(module_name)) if module_name else False


def _ancestors(module_name: str) -> Iterable[str]:
    """``a.b.c`` → ``a.b.c``, ``a.b``, ``a`` (deepest first)."""
    parts = module_name.split(".")
    for depth in range(len(parts), 0, -1):
        yield ".".join(parts[:depth])


#: Last name components of task heads that transformers models build as plain linear layers but that are
#: output heads all the same (sequence classification, reward and value models, QA).
OUTPUT_HEAD_NAMES = ("lm_head", "score", "classifier", "v_head", "qa_outputs")


def _excluded_modules(model: nn.Module) -> set[int]:
    """ids of the output heads and input embedding modules and of every module inside them (never default targets,
    nor ``"all-linear"`` ones). A head wrapped by PEFT's ``modules_to_save`` (``lm_head.modules_to_save.default``,
    ``score.original_module``) is a head all the same: the wrapper is named as the head, its copies are inside it."""
    roots: list[nn.Module] = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES:
            roots.append(module)
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        fn = getattr(model, getter, None)
        if callable(fn):
            try:
                module = fn()
            except (AttributeError, NotImplementedError):
                module = None
            if module is not None:
                roots.append(module)
    roots.extend(module for module in model.modules() if isinstance(module, nn.Embedding))
    return {id(inner) for root in roots for inner in root.modules()}


def _adapter_layer_names(model: nn.Module) -> set[str]:
    """Names of the PEFT adapter modules in ``model``: its tuner layers (e.g. a LoRA-wrapped ``q_proj``) and the
    encoders of prompt learning (P-tuning's MLP, prefix tuning's projection: modules PEFT's tuners define);
    empty without PEFT."""
    try:
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    except ImportError:  # PEFT not installed: no model can hold its layers
        return set()

    def is_adapter(module: nn.Module) -> bool:
        if isinstance(module, BaseTunerLayer):
            return True
        # a tuner's own module (P-tuning's PromptEncoder, prefix tuning's PrefixEncoder), not the tuner that wraps
        # the whole base model (LoraModel is a BaseTuner): what it holds besides adapters is the user's
        return type(module).__module__.startswith("peft.tuners.") and not isinstance(module, BaseTuner)

    return {name for name, module in model.named_modules() if is_adapter(module)}


def _first_few(names: list[str], limit: int = 5) -> str:
    """``names`` as an error message lists them: the first ``limit``, then how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def _no_match_error(
    what: str,
    pattern: str,
    module_names: list[str],
    matched: dict[str, str] | None = None,
    *,
    one_regex: bool = False,
) -> NoMatchingModuleError:
    """The error for ``pattern`` that steps nothing. ``matched``: the modules it does match, each with why none of
    their parameters counts (frozen, or, for a target, not a linear layer's weight). ``one_regex``: the pattern is
    a target given as one string, a regex over the whole module name rather than a suffix."""
    if matched:
        shown = _first_few([f"{name} ({why})" for name, why in matched.items()])
        if any("frozen" in why for why in matched.values()):
            found = "no parameter there is trainable"
            fix = (
                "Fix: drop it, or unfreeze those parameters (requires_grad_(True)); with PEFT, name a module that "
                "has an adapter (or its lora_A / lora_B), or add the module to the adapter's target_modules."
            )
        elif set(matched.values()) == {"no parameters"}:
            found = "they hold no parameters"
            fix = (
                "Fix: name modules that hold parameters (PEFT adds empty lora_embedding_A / lora_embedding_B "
                "containers to every layer it adapts; the adapters of linear layers are lora_A / lora_B)."
            )
        else:
            found = "no parameter there is a trainable linear weight"
            fix = (
                "Fix: name linear layers (or modules that contain them); other parameters fold only through "
                "block_sizes."
            )
        return NoMatchingModuleError(
            f"FOAM: {what} {pattern!r} matches modules of the model, but {found}: {shown}. {fix}"
        )
    leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names if n})
    leaves = [leaf for leaf in leaves if not leaf.isdigit()]  # layer indices of a ModuleList say nothing of a name
    close = difflib.get_close_matches(pattern, leaves, n=5, cutoff=0.5) or difflib.get_close_matches(
        pattern, module_names, n=5, cutoff=0.4
    )
    hint = f" Closest module names: {close}." if close else f" Module name endings in this model: {leaves[:20]}."
    if one_regex:
        anywhere = f".*(?:{pattern})" if "|" in pattern else f".*{pattern}"
        as_list = f"{pattern};" if _looks_like_regex(pattern) else pattern  # a ';' keeps a regex a list
        rule = (
            "A target given as one string is one regex matched against the whole module name (as transformers' "
            f"optim_target_modules and PEFT's target_modules read a str), not a suffix. Fix: pass a list "
            f"([{pattern!r}]) to match names that end with it at a '.' boundary, a regex over the whole name "
            f"such as {anywhere!r}, or optim_args target_modules={as_list}."
        )
    else:
        rule = "Patterns match module names as PEFT's rank_pattern does (a suffix at a '.' boundary, or a full regex)."
    return NoMatchingModuleError(
        f"FOAM: {what} {pattern!r} matches no trainable parameter of the model.{hint} {rule} Print the names with "
        "`[n for n, _ in model.named_modules()]`, and remember that frozen parameters (e.g. a LoRA base model) "
        "have no optimizer state."
    )


def _why_nothing_steps(model: nn.Module, matches: Callable[[str], bool], linear_only: bool) -> dict[str, str]:
    """The modules of ``model`` whose names ``matches`` (outermost ones), each with why none of the parameters in
    it is stepped (as a target, when ``linear_only``): ``"frozen"``, ``"no linear layer weight"`` or
    ``"no parameters"``. Modules where one is stepped are left out."""
    linear_types = _linear_types()
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or not matches(name) or any(name.startswith(outer + ".") for outer in found):
            continue
        if linear_only:
            candidates = [sub.weight for sub in module.modules() if isinstance(sub, linear_types)]
            missing = "no linear layer weight"
        else:
            candidates = list(module.parameters())
            missing = "no parameters"
        if not candidates:
            found[name] = missing
        elif not any(p.requires_grad for p in candidates):
            found[name] = "frozen"
    return found


def resolve_block_sizes(
    model: nn.Module, config: FoamConfig, target_modules: list[str] | str | None = None
) -> BlockSizePlan:
    """Resolve every trainable parameter of ``model`` to a block size, following the module rules above.

    ``target_modules`` (e.g. ``TrainingArguments.optim_target_modules``) is used when ``config`` has none;
    giving both is an error. Mixture-of-experts weights that the plan leaves with AdamW states only because
    nothing named them are named in a warning.
    """
    return _resolve_block_sizes(model, config, target_modules, warn_unfolded_experts=True)


def _resolve_block_sizes(
    model: nn.Module, config: FoamConfig, target_modules: list[str] | str | None, *, warn_unfolded_experts: bool
) -> BlockSizePlan:
    """:func:`resolve_block_sizes`, its warning optional: the memory report also resolves plans that it only
    compares against (the defaults), which would warn about experts the user's own options fold."""
    if config.target_modules is not None and target_modules is not None:
        raise FoamConfigError(
            f"FOAM: target modules are given twice (optim_args target_modules={config.target_modules!r} and "
            f"optim_target_modules={target_modules!r}). Fix: keep one."
        )
    targets = config.target_modules if config.target_modules is not None else target_modules

    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise FoamConfigError(
            "FOAM: the model has no trainable parameter (every requires_grad is False), so there is nothing to "
            "optimize. Fix: unfreeze what should train (param.requires_grad_(True)), or attach the PEFT adapter "
            "before building the Trainer."
        )
    trainable_ids = {id(p) for _, p in trainable}

    # Every module that owns each trainable parameter (tied weights have several owners).
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    module_names: list[str] = []
    for module_name, module in model.named_modules():
        module_names.append(module_name)
        for param_name, p in module.named_parameters(recurse=False):
            if id(p) in trainable_ids:
                owners.setdefault(id(p), []).append((module_name, module, param_name))

    linear_types = _linear_types()
    excluded = _excluded_modules(model)
    all_linear = isinstance(targets, str) and targets.replace("_", "-") == "all-linear"
    if isinstance(targets, (list, tuple)) and [t.replace("_", "-") for t in targets] == ["all-linear"]:
        all_linear = True
    adapter_layers = _adapter_layer_names(model) if targets is None else set()
    # One regex string matches whole module names; a list holds names matched as suffixes, as PEFT matches them.
    target_names = _full_match if isinstance(targets, str) else _suffix_match
    target_list = [targets] if isinstance(targets, str) else list(targets or [])

    def is_default_target(module_name: str, module: nn.Module, param_name: str) -> bool:
        if param_name != "weight" or not isinstance(module, linear_types):
            return False
        if targets is None:
            in_adapter = any(prefix in adapter_layers for prefix in _ancestors(module_name)) if module_name else False
            return id(module) not in excluded and not in_adapter
        if all_linear:
            return id(module) not in excluded
        return any(_reaches(t, module_name, target_names) for t in target_list)

    literal = {pattern: literal_characters(pattern) for pattern in config.block_sizes}  # parsed once a pattern
    used_targets: set[str] = set()
    sized_by_pattern: dict[str, list[tuple[str, torch.Tensor]]] = {}  # what each override decided the size of
    size_by_parameter: dict[str, int] = {}
    for name, p in trainable:
        param_owners = owners.get(id(p), [])
        size = 1
        if any(is_default_target(*owner) for owner in param_owners):
            size = config.block_size
            if not all_linear:
                used_targets.update(t for t in target_list for m, _, _ in param_owners if _reaches(t, m, target_names))
        best: tuple[int, int, int] | None = None
        chosen: dict[str, int] = {}
        by_owner: dict[str, dict[str, int]] = {}  # a tied parameter's owners, each with the override it would take
        for module_name, _, _ in param_owners:
            owner_best: tuple[int, int, int] | None = None
            for prefix in _ancestors(module_name) if module_name else []:
                depth = prefix.count(".") + 1
                for pattern, override in config.block_sizes.items():
                    if not _suffix_match(pattern, prefix):
                        continue
                    # the deepest module, then the pattern that spells out more of the name, then the longest
                    score = (depth, literal[pattern], len(pattern))
                    # A tied tensor's owners disagree only where overrides name them: one reached through a parent
                    # (model:8 over embed_tokens) yields to specificity below.
                    if prefix == module_name:
                        if owner_best is None or score > owner_best:
                            owner_best, by_owner[module_name] = score, {pattern: override}
                        elif score == owner_best:
                            by_owner[module_name][pattern] = override
                    if best is None or score > best:
                        best, chosen = score, {pattern: override}
                    elif score == best:
                        chosen[pattern] = override
        if len({size for sizes in by_owner.values() for size in sizes.values()}) > 1 and len(by_owner) > 1:
            asked = "; ".join(
                f"{module} by {', '.join(f'{pattern}:{size}' for pattern, size in sorted(sizes.items()))}"
                for module, sizes in by_owner.items()
            )
            raise FoamConfigError(
                f"FOAM: parameter {name!r} is one tensor shared by {len(param_owners)} modules (tied weights), and "
                f"block_sizes asks different sizes for it through them: {asked}. Fix: give the tied modules one "
                "size, or name only one of them."
            )
        if chosen:
            sizes = set(chosen.values())
            if len(sizes) > 1:
                raise FoamConfigError(
                    f"FOAM: parameter {name!r} is matched equally specifically by the block_sizes entries "
                    f"{';'.join(f'{pattern}:{size}' for pattern, size in sorted(chosen.items()))}, which disagree. "
                    "Fix: make one pattern more specific, or give them one size."
                )
            for pattern in chosen:
                sized_by_pattern.setdefault(pattern, []).append((name, p))
            size = sizes.pop()
        size_by_parameter[name] = size

    for pattern in config.block_sizes:
        if pattern not in sized_by_pattern:
            # A pattern may be shadowed everywhere by a more specific one yet still match: report only
            # patterns that match no trainable parameter's module at all.
            matches = any(
                _reaches(pattern, module_name) for owner_list in owners.values() for module_name, _, _ in owner_list
            )
            if not matches:
                matched = _why_nothing_steps(model, lambda name, p=pattern: _suffix_match(p, name), False)
                raise _no_match_error("block_sizes pattern", pattern, module_names, matched)
    for pattern, sized in sized_by_pattern.items():
        size = config.block_sizes[pattern]
        if size > 1 and not any(folds_in_full(p, size) for _, p in sized):
            shown = _first_few([name for name, _ in sized])
            raise FoamConfigError(
                f"FOAM: block_sizes pattern {pattern!r} sets block size {size} only on parameters that never fold "
                f"(one-dimensional or empty: {shown}), so it would change nothing. Fix: drop it, or name modules "
                "with weight matrices (e.g. linear layers)."
            )
    if targets is not None and not all_linear:
        for target in target_list:
            if target not in used_targets:
                matched = _why_nothing_steps(model, lambda name, t=target: target_names(t, name), True)
                raise _no_match_error(
                    "target module", target, module_names, matched, one_regex=isinstance(targets, str)
                )
    if warn_unfolded_experts and config.block_size > 1 and (targets is None or all_linear):  # the default targets
        named = {name for sized in sized_by_pattern.values() for name, _ in sized}
        _warn_unfolded_experts([(n, p) for n, p in trainable if n not in named], owners, size_by_parameter)
    return BlockSizePlan(size_by_parameter)


def _warn_unfolded_experts(
    unnamed: list[tuple[str, torch.Tensor]], owners: dict[int, list[tuple[str, nn.Module, str]]], sizes: dict[str, int]
) -> None:
    """Warn when mixture-of-experts weights keep AdamW states because nothing named them: transformers keeps a MoE
    layer's experts as 3-D parameters of one ``*Experts`` module (``experts.gate_up_proj``, ``(experts, out, in)``),
    not as linear layers, so the default targets leave out what is most of such a model's parameters."""
    left = [
        (name, p)
        for name, p in unnamed
        if p.ndim >= 3
        and sizes[name] == 1
        and any(type(module).__name__.endswith("Experts") for _, module, _ in owners.get(id(p), []))
    ]
    if not left:
        return
    entries = sum(p.numel() for _, p in left)
    module = next(type(m).__name__ for _, m, _ in owners[id(left[0][1])] if type(m).__name__.endswith("Experts"))
    warnings.warn(
        f"FOAM: {len(left)} mixture-of-experts weight tensors ({entries:,} entries; e.g. {left[0][0]!r} of a "
        f"{module}) keep AdamW states: experts stored as 3-D parameters are not linear layers, which are what FOAM "
        "folds by default. Fix: fold them by name with block_sizes=experts:4 in optim_args (they fold along their last "
        "dimension, the input features for an (experts, out, in) layout), or block_sizes=experts:1 to keep AdamW "
        "states without this warning.",
        UserWarning,
        stacklevel=4,  # the caller of resolve_block_sizes
    )


def build_param_groups(
    model: nn.Module,
    plan: BlockSizePlan,
    *,
    weight_decay: float,
    decay_parameter_names: Iterable[str],
) -> list[dict]:
    """Torch param groups, one per (block size, decays?) pair, in a deterministic order.

    Each group carries its own ``block_size`` (so it shows in ``optimizer.state_dict()`` and survives
    resume), ``weight_decay`` (``weight_decay`` for ``decay_parameter_names``, else 0) and ``param_names``
    (torch's key: saved with the state, so a resume under other groups is refused by name, see
    :func:`foam_hf.checkpoint.check_loadable`).
    """
    decay = set(decay_parameter_names)
    groups: dict[tuple[int, bool], list[tuple[str, torch.Tensor]]] = {}
    for name, p in model.named_parameters():
        if name not in plan.size_by_parameter:
            continue
        key = (plan.size_by_parameter[name], name in decay)
        groups.setdefault(key, []).append((name, p))
    return [
        {
            "params": [p for _, p in named],
            "param_names": [name for name, _ in named],
            "block_size": block_size,
            "weight_decay": weight_decay if decays else 0.0,
        }
        for (block_size, decays), named in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))
    ]


#: What :func:`foam_param_groups` sets in every group: a keyword of the optimizer for one of these reaches a parameter
#: only through a group that holds the same value.
GROUP_WIDE_OPTIONS = (
    "block_size",
    "weight_decay",
    "scale",
    "res_scale",
    "second_moment",
    "state_dtype",
    "weight_rounding",
)


class FoamParamGroups(list):
    """The list of param groups :func:`foam_param_groups` returns, a ``list`` of dicts in every other way.

    Its type tells :class:`~foam_hf.FOAM` that every group sets each of :data:`GROUP_WIDE_OPTIONS`, so that a group's
    value wins over the optimizer's keyword (torch's rule): ``FOAM(foam_param_groups(model), weight_decay=0.1)`` would
    train without weight decay. :func:`check_keywords_reach_a_group` refuses that.
    """


def _in_order(value: Any) -> tuple:
    """Sort key of option values: None first, numbers by value, the rest by text."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (value is not None, not number, value if number else 0, str(value))


def check_keywords_reach_a_group(groups: Any, keywords: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse a keyword of the optimizer, set to other than its default, that no group of ``groups`` takes, where
    ``groups`` came from :func:`foam_param_groups` (a :class:`FoamParamGroups`); other groups follow torch's rule.

    ``keywords`` and ``defaults`` hold the options as the optimizer normalised them (``state_dtype`` a dtype).
    """
    if not isinstance(groups, FoamParamGroups) or not groups:
        return
    from .precision import normalize_state_dtype

    def held(group: dict, name: str) -> Any:
        return normalize_state_dtype(group[name]) if name == "state_dtype" else group[name]

    unused = {
        name: sorted({held(group, name) for group in groups}, key=_in_order)
        for name in GROUP_WIDE_OPTIONS
        if keywords[name] != defaults[name]
        and all(name in group for group in groups)
        and all(held(group, name) != keywords[name] for group in groups)
    }
    if not unused:
        return
    passed = ", ".join(f"{name}={keywords[name]!r}" for name in unused)
    held_values = "; ".join(f"{name} {', '.join(map(str, values))}" for name, values in unused.items())
    arguments = []
    options = ",".join(f"{name}={keywords[name]}" for name in unused if name != "weight_decay")
    if options:
        arguments.append(f'"{options}"'.replace("torch.", ""))
    if "weight_decay" in unused:
        arguments.append(f"weight_decay={keywords['weight_decay']}")
    raise FoamConfigError(
        f"FOAM: {passed} reaches no parameter: every group from foam_param_groups sets its own value ({held_values}), "
        "and a group's value wins over the optimizer's keyword (torch's rule). "
        f"Fix: give it to foam_param_groups instead: foam_param_groups(model, {', '.join(arguments)})."
    )


def foam_param_groups(
    model: nn.Module, optim_args: str | FoamConfig | dict | None = None, *, weight_decay: float = 0.0
) -> list[dict]:
    """The param groups ``optim="foam"`` builds for ``model``, for a plain PyTorch loop: ``FOAM(foam_param_groups(
    model, "block_size=4"), lr=...)`` folds what the Trainer would (linear layers, not the embeddings or the output
    head, unless ``optim_args`` says otherwise) with transformers' weight-decay rule (none on biases and norm
    weights) at ``weight_decay``. ``optim_args`` takes every form ``TrainingArguments.optim_args`` takes; its
    ``scale``, ``res_scale``, ``second_moment``, ``state_dtype`` and ``weight_rounding`` go into every group, so
    the optimizer's keywords for these (and for ``block_size`` and ``weight_decay``) reach no group: :class:`FOAM`
    refuses them where they differ from every group's value (:class:`FoamParamGroups`).
    (``FOAM(model.parameters())`` instead folds every tensor of two or more dimensions, embeddings included.)
    Each group carries torch's ``param_names``, which torch then asks of every group added later too:
    ``optimizer.add_param_group({"params": [p], "param_names": ["name"]})``.
    """
    from .integration._seam import decay_parameter_names

    if not isinstance(model, nn.Module):
        raise TypeError(
            f"foam_param_groups: model={type(model).__name__} is not an nn.Module: the groups are chosen by module "
            "names (linear layers fold, heads and embeddings do not). Fix: pass the model itself, "
            "foam_param_groups(model), not model.parameters()."
        )
    config = FoamConfig.from_optim_args(optim_args)
    groups = build_param_groups(
        model,
        resolve_block_sizes(model, config),
        weight_decay=weight_decay,
        decay_parameter_names=decay_parameter_names(model),
    )
    options = dict(
        scale=config.scale,
        res_scale=config.res_scale,
        second_moment=config.second_moment,
        state_dtype=config.state_dtype,
        weight_rounding=config.weight_rounding,
    )
    return FoamParamGroups({**group, **options} for group in groups)
