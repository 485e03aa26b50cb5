"""FoamConfig: FOAM's options for the Hugging Face trainers, typed, validated once, and round-tripped
through the ``optim_args`` string that ``TrainingArguments`` and the command line carry.

``optim_args`` syntax (transformers splits it on ``,`` and ``=``)::

    block_size=4,scale=1.0,res_scale=1.0,second_moment=mean_sq,block_sizes=q_proj:8;down_proj:16;lm_head:1

``level=l`` is the paper's spelling of ``block_size=2**l``. ``block_sizes`` holds ``pattern:size`` pairs
separated by ``;`` (size 1 = unfolded); a pattern matches module names as PEFT's ``rank_pattern`` does
(see :mod:`foam_hf.param_groups`). ``target_modules`` replaces the default set of folded modules, like
``TrainingArguments.optim_target_modules``: a value with ``;`` is a list of module-name patterns matched as
suffixes (``q_proj;v_proj``; a trailing ``;`` makes a list of one: ``layers\\.0\\..*proj;``), a value without
``;`` is a list of one plain name (``q_proj``) or, if it looks like a regex or is wrapped as ``(?:...)``, one
regex matched against the whole module name (``.*\\.mlp\\..*``, ``(?:q_proj)``). ``callback=false`` stops
:class:`~foam_hf.FoamCallback` from being attached automatically.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

from .errors import FoamConfigError
from .options import GROUP_DEFAULTS, SECOND_MOMENT_MODES, check_option
from .precision import normalize_state_dtype

__all__ = ["OPTIM_ARGS_KEYS", "FoamConfig"]

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")

#: Every key ``optim_args`` accepts for ``optim="foam"``, with what it means.
OPTIM_ARGS_KEYS: dict[str, str] = {
    "block_size": "positive int B: folded states are (*rows, ceil(n/B)) (default 4)",
    "level": "the paper's spelling: block_size = 2**level",
    "scale": "update multiplier alpha of folded tensors, > 0 (default 1.0)",
    "res_scale": "weight rho of the residual, >= 0 (default 1.0)",
    "second_moment": f"one of {SECOND_MOMENT_MODES} (default mean_sq)",
    "state_dtype": "float32 or bfloat16: storage of the moments; bfloat16 halves them, stochastically rounded "
    "(default: float32, or the parameters' dtype when that is wider)",
    "weight_rounding": "nearest or stochastic: how new weights are stored into bf16 parameters; stochastic keeps "
    "updates below half a bf16 spacing (for bf16 weights without an fp32 master copy) (default nearest)",
    "block_sizes": "per-module overrides, pattern:size pairs separated by ';' (size 1 = unfolded)",
    "target_modules": "modules that fold: name patterns separated by ';', each matched as a suffix at a '.' "
    "boundary (a trailing ';' keeps one regex a list), or, without ';', one regex over the whole module name "
    "(a value that looks like a regex, or wrapped as (?:...)), or all-linear (every linear layer but the output "
    "heads) (default: linear layers except the output head and embeddings)",
    "callback": "true/false: attach FoamCallback automatically (default true)",
}


@dataclass(frozen=True)
class FoamConfig:
    """FOAM's options for ``optim="foam"``, the typed twin of the ``optim_args`` string.

    Args:
        block_size (`int`, *optional*, defaults to 4):
            Block size B of folded weights; the paper's level l is ``2**l``. 1 keeps AdamW states.
        scale (`float`, *optional*, defaults to 1.0):
            Multiplier alpha of the update of folded tensors.
        res_scale (`float`, *optional*, defaults to 1.0):
            Weight rho of the residual in both moments (0 = block-wise Adam).
        second_moment (`str`, *optional*, defaults to `"mean_sq"`):
            `"mean_sq"` folds the block mean of G*G, `"sq_mean"` the square of the block mean.
        state_dtype (`str`, *optional*):
            Storage dtype of the moments: `"float32"` or `"bfloat16"` (half the bytes; computed in fp32 and
            stored with stochastic rounding). `None` keeps fp32 states for half-precision parameters.
        weight_rounding (`str`, *optional*, defaults to `"nearest"`):
            How new weights are stored into bf16 parameters: `"nearest"`, or `"stochastic"` (unbiased: updates
            below half a bf16 spacing still move the weights in expectation). For models trained in bf16
            without an fp32 master copy; mixed precision keeps fp32 weights, and the optimizer refuses it then.
        block_sizes (`dict[str, int]`, *optional*):
            Per-module block sizes, ``{pattern: size}``; a pattern is a module-name suffix or a full
            regex, as PEFT's ``rank_pattern``. Size 1 keeps AdamW states for the matched modules. A
            pattern that matches no trainable parameter is an error.
        target_modules (`list[str]` or `str`, *optional*):
            Modules whose weights fold by default; ``None`` means every linear layer except the output head and
            the embeddings. As in transformers' ``optim_target_modules`` and PEFT's ``target_modules``, a list
            holds module-name patterns, each matched as a suffix at a ``.`` boundary (``["q_proj"]`` matches
            ``model.layers.0.self_attn.q_proj``); one ``str`` is one regex matched against the whole module name
            (``".*\\.mlp\\..*"``; ``"q_proj"`` alone matches only a module named exactly ``q_proj``);
            ``"all-linear"`` is every linear layer but the output heads (:mod:`foam_hf.param_groups`). A tuple
            is kept as a list.
        callback (`bool`, *optional*, defaults to `True`):
            Attach :class:`~foam_hf.FoamCallback` automatically when a Trainer builds FOAM by name.

    Example::

        >>> cfg = FoamConfig(block_size=4, block_sizes={"q_proj": 8, "lm_head": 1})
        >>> cfg.to_optim_args()
        'block_size=4,block_sizes=q_proj:8;lm_head:1'
        >>> FoamConfig.from_optim_args(cfg.to_optim_args()) == cfg
        True
    """

    block_size: int = GROUP_DEFAULTS["block_size"]
    scale: float = GROUP_DEFAULTS["scale"]
    res_scale: float = GROUP_DEFAULTS["res_scale"]
    second_moment: str = GROUP_DEFAULTS["second_moment"]
    state_dtype: str | None = GROUP_DEFAULTS["state_dtype"]
    weight_rounding: str = GROUP_DEFAULTS["weight_rounding"]
    block_sizes: dict[str, int] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    callback: bool = True

    def __post_init__(self) -> None:
        # torch.bfloat16 / torch.float32 are stored as the strings FOAM's groups hold (as FOAM(...) takes them).
        object.__setattr__(self, "state_dtype", normalize_state_dtype(self.state_dtype))
        # FOAM's own rules, option by option (the optimizer checks the same values with the same functions).
        for name in ("block_size", "scale", "res_scale", "second_moment", "state_dtype", "weight_rounding"):
            check_option(name, getattr(self, name), where="FoamConfig / optim_args")
        if not isinstance(self.block_sizes, dict):
            raise TypeError(
                f"FoamConfig: block_sizes={self.block_sizes!r} must be a dict {{pattern: size}}, "
                "e.g. {'q_proj': 8, 'lm_head': 1}. Fix: pass a dict, or the optim_args form "
                "block_sizes=q_proj:8;lm_head:1."
            )
        # NumPy ints as Python ints, as block_size takes them (a copy: the caller's dict stays as it was)
        sizes = {
            k: int(v) if isinstance(v, Integral) and not isinstance(v, bool) else v for k, v in self.block_sizes.items()
        }
        object.__setattr__(self, "block_sizes", sizes)
        for pattern, size in self.block_sizes.items():
            if not isinstance(pattern, str) or not pattern:
                raise FoamConfigError(
                    f"FoamConfig: block_sizes pattern {pattern!r} is invalid: a pattern must be a non-empty string "
                    "(a module-name suffix or a regex). Fix: e.g. block_sizes={'q_proj': 8}."
                )
            _compile_pattern(pattern)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise FoamConfigError(
                    f"FoamConfig: block_sizes[{pattern!r}]={size!r} is invalid: a block size must be an int >= 1 "
                    "(1 = unfolded). Fix: e.g. block_sizes={'" + pattern + "': 8}."
                )
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                check_one_target_regex(self.target_modules, "FoamConfig: target_modules")
                _compile_pattern(self.target_modules)
            elif not (
                isinstance(self.target_modules, (list, tuple))
                and self.target_modules
                and all(isinstance(t, str) and t for t in self.target_modules)
            ):
                raise TypeError(
                    f"FoamConfig: target_modules={self.target_modules!r} must be a non-empty list of module names, "
                    "one regex string, or 'all-linear'. Fix: e.g. target_modules=['q_proj', 'v_proj'], or None for "
                    "the default (linear layers except the output head and embeddings)."
                )
            else:
                for entry in self.target_modules:  # each entry is a regex too (matched as a module-name suffix)
                    if entry.lower() == "all-linear" and entry != "all-linear":
                        check_one_target_regex(entry, "FoamConfig / optim_args: target_modules")
                    _compile_pattern(entry)
                # one type per meaning, as from_optim_args gives it back
                object.__setattr__(self, "target_modules", list(self.target_modules))
            check_targets_fold(self.target_modules, self.block_size, "FoamConfig / optim_args: target_modules")
        if not isinstance(self.callback, bool):
            raise TypeError(
                f"FoamConfig: callback={self.callback!r} must be True or False. Fix: pass callback=True (attach "
                "FoamCallback) or callback=False."
            )

    # ---------------------------------------------------------------- optim_args round trip

    @classmethod
    def from_optim_args(cls, optim_args: str | Mapping[str, Any] | FoamConfig | None) -> FoamConfig:
        """Parse ``optim_args``: the ``key=value,...`` string; a mapping of the same keys (a YAML or JSON config,
        transformers' parsed ``{key: value}`` dict), whose ``block_sizes`` may be a mapping and whose
        ``target_modules`` may be a list; or a :class:`FoamConfig`, returned as it is.

        Raises :class:`~foam_hf.errors.FoamConfigError` on an unknown key (listing the valid ones) or a
        value that does not convert.
        """
        if isinstance(optim_args, FoamConfig):
            return optim_args
        if optim_args is not None and not isinstance(optim_args, (str, Mapping)):
            raise TypeError(
                f"optim_args={optim_args!r} has type {type(optim_args).__name__}; it must be a 'key=value,...' string, "
                "a mapping of those keys, or a foam_hf.FoamConfig. "
                "Fix: e.g. optim_args='block_size=4,block_sizes=q_proj:8;lm_head:1'."
            )
        items = _mapping_items(optim_args) if isinstance(optim_args, Mapping) else _split_optim_args(optim_args)
        unknown = sorted(set(items) - set(OPTIM_ARGS_KEYS))
        if unknown:
            raise FoamConfigError(_unknown_keys_message(unknown))
        kwargs: dict[str, Any] = {}
        if "block_size" in items and "level" in items:
            raise FoamConfigError(
                f"optim_args: block_size={items['block_size']} and level={items['level']} are both given; "
                "they say the same thing (block_size = 2**level). Fix: keep one."
            )
        if "block_size" in items:
            kwargs["block_size"] = _to_int("block_size", items["block_size"])
        if "level" in items:
            level = _to_int("level", items["level"])
            if not 0 <= level <= 16:
                raise FoamConfigError(
                    f"optim_args: level={level} is invalid: it must be an int in [0, 16] (block_size = 2**level). "
                    "Fix: e.g. level=2 for block_size=4."
                )
            kwargs["block_size"] = 2**level
        for key in ("scale", "res_scale"):
            if key in items:
                kwargs[key] = _to_float(key, items[key])
        for key in ("second_moment", "weight_rounding"):
            if key in items:
                kwargs[key] = items[key]
        if "state_dtype" in items:
            text = items["state_dtype"]
            # torch.bfloat16 as a string (what str(torch.bfloat16) prints) names the same dtype as bfloat16.
            kwargs["state_dtype"] = None if text.lower() in ("none", "default") else text.removeprefix("torch.")
        if "block_sizes" in items:
            value = items["block_sizes"]
            kwargs["block_sizes"] = dict(value) if isinstance(value, Mapping) else _parse_block_sizes(value)
        if "target_modules" in items and isinstance(items["target_modules"], (list, tuple)):
            kwargs["target_modules"] = list(items["target_modules"])  # a YAML/JSON list; FoamConfig checks it
        elif "target_modules" in items:
            kwargs["target_modules"] = _parse_target_modules(items["target_modules"])
        if "callback" in items:
            kwargs["callback"] = _to_bool("callback", items["callback"])
        return cls(**kwargs)

    def to_optim_args(self) -> str:
        """The ``optim_args`` string that :meth:`from_optim_args` turns back into this config.

        Raises :class:`~foam_hf.errors.FoamConfigError` for a ``block_sizes`` or ``target_modules`` pattern that
        the string cannot carry (it separates keys with ``,`` and ``=``, and list entries with ``;``)."""
        parts = []
        defaults = FoamConfig()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == getattr(defaults, f.name):
                continue
            if f.name == "block_sizes":
                for pattern in value:
                    found = [ch for ch in ",=;: " if ch in pattern]
                    if found:
                        raise FoamConfigError(
                            f"FoamConfig: block_sizes pattern {pattern!r} contains {' and '.join(map(repr, found))}, "
                            "which the optim_args string (the only form TrainingArguments hands on) cannot carry: "
                            "',' and '=' separate its keys, ';' the entries of a list, ':' gives a size, and "
                            "transformers removes spaces. Fix: rewrite the pattern without them; module names never "
                            "contain them, and a regex can do without (e.g. [0-9][0-9]? for [0-9]{1,2})."
                        )
                parts.append("block_sizes=" + ";".join(f"{p}:{s}" for p, s in value.items()))
            elif f.name == "target_modules":
                for pattern in [value] if isinstance(value, str) else value:
                    _check_target_is_carried(pattern)
                parts.append("target_modules=" + _target_modules_text(value))
            elif f.name == "callback":
                parts.append(f"callback={str(value).lower()}")
            else:
                parts.append(f"{f.name}={value}")
        return ",".join(parts)


def _split_optim_args(optim_args: str | None) -> dict[str, str]:
    """``key=value,...`` as transformers reads it (spaces removed, split on ``,`` then ``=``); errors quote what
    the user wrote."""
    if not optim_args:
        return {}
    items: dict[str, str] = {}
    previous = None
    for written in optim_args.split(","):
        part = written.replace(" ", "")
        if not part:
            continue
        key, _, value = part.partition("=")
        if key in _LIST_EXAMPLES and value[:1] in ("{", "[") and any(q in value for q in "'\""):
            raise FoamConfigError(_python_literal_message(key, optim_args))
        if "=" not in part and previous in _LIST_EXAMPLES and items[previous].count("{") > items[previous].count("}"):
            raise FoamConfigError(
                f"optim_args: {previous}={items[previous]},{part} holds a regex quantifier {{m,n}}, and its ',' splits "
                f"optim_args (transformers reads 'key=value' entries separated by ','), leaving {part!r} alone. "
                rf"Fix: write the pattern without a comma, e.g. \d+ for \d{{1,2}}."
            )
        if "=" not in part and previous in _TRAINING_ARGUMENTS_FIELDS:  # betas=(0.9,0.99): its ',' split it
            raise FoamConfigError(_unknown_keys_message([previous]))
        if "=" not in part and previous in _LIST_EXAMPLES:
            raise FoamConfigError(
                f"optim_args: {part!r} follows {previous}= but is not of the form key=value: entries of "
                f"{previous} are separated by ';', not ','. Fix: e.g. {_LIST_EXAMPLES[previous]}."
            )
        if part.count("=") != 1 or part.startswith("="):
            raise FoamConfigError(_not_key_value_message(written.strip(), part))
        key, value = part.split("=")
        if key in items:
            raise FoamConfigError(
                f"optim_args: key {key!r} is given twice ({key}={items[key]} and {key}={value}). Fix: keep one."
            )
        items[key] = value
        previous = key
    return items


def _python_literal_message(key: str, optim_args: str) -> str:
    """Why ``key``'s value, a mapping or list written as Python or JSON text (``block_sizes={'q_proj': 16}``: what
    joining a YAML mapping into ``k=v`` text gives, as axolotl does), does not parse, with the value respelt."""
    entry = re.search(rf"(?:^|,)\s*{re.escape(key)}\s*=\s*", optim_args)  # the entry, not the text in a value
    text = optim_args[entry.end() :] if entry else optim_args
    kind = "mapping" if text.startswith("{") else "list"
    literal, written = _leading_literal(text)
    respelt = None  # the value in optim_args' own form, where the literal holds plain names (and sizes)
    if isinstance(literal, Mapping) and all(
        isinstance(v, (int, str)) and not isinstance(v, bool) for v in literal.values()
    ):
        respelt = ";".join(f"{pattern}:{size}" for pattern, size in literal.items())
    elif isinstance(literal, (list, tuple)) and all(isinstance(item, str) for item in literal):
        respelt = ";".join(literal)
    value = respelt or _LIST_EXAMPLES[key].split("=", 1)[1]
    fix = f"Fix: {key}={value}" if respelt else f"Write it as e.g. {key}={value}"
    items = "pattern:size pairs" if key == "block_sizes" else "names"
    return (
        f"optim_args: {key}={written!r} writes {key} as a Python or JSON {kind}, which the 'key=value,...' string "
        f"cannot hold (its ',' splits entries): {key} takes {items} separated by ';'. {fix} (in a YAML config "
        f'whose optim_args is joined into such a string, as axolotl does: {key}: "{value}").'
    )


def _leading_literal(text: str) -> tuple[Any, str]:
    """The Python literal (a dict or list) that ``text`` starts with, ending at one of its closing brackets, and
    its text; ``(None, text)`` if there is none."""
    closing = "}" if text.startswith("{") else "]"
    for end, char in enumerate(text):
        if char == closing:
            try:
                return ast.literal_eval(text[: end + 1]), text[: end + 1]
            except (SyntaxError, ValueError):
                continue
    return None, text


def _not_key_value_message(written: str, part: str) -> str:
    """Why ``written`` (one ``,``-separated entry as the user wrote it; ``part`` without its spaces) is not a
    ``key=value`` entry, and the likely fix."""
    rule = "entries are key=value, separated by ','"
    if part.count("=") > 1 and len(written.split()) > 1:
        fixed = ",".join(written.split())
        return (
            f"optim_args: {written!r} is two entries separated by a space; {rule} (transformers removes spaces, "
            f"so it would read {part!r}). Fix: {fixed}"
        )
    key = part.split("=", 1)[0]
    if key == "block_sizes" and part.count("=") > 1:
        fixed = "block_sizes=" + part.split("=", 1)[1].replace("=", ":")
        return (
            f"optim_args: {written!r}: block_sizes entries are pattern:size (':' before the size, not '='), "
            f"separated by ';'. Fix: {fixed}"
        )
    return f"optim_args: {written!r} is not of the form key=value (entries are separated by ','). Example: {_EXAMPLE}."


_EXAMPLE = "optim_args='block_size=4,block_sizes=q_proj:8;lm_head:1'"

#: The keys whose value is a ';'-separated list, each with a well-formed example of it.
_LIST_EXAMPLES = {"block_sizes": "block_sizes=q_proj:8;lm_head:1", "target_modules": "target_modules=q_proj;v_proj"}

#: Keys users carry over from optimizer constructors, and the TrainingArguments field each value comes from.
_TRAINING_ARGUMENTS_FIELDS = {
    "lr": "learning_rate",
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
    "betas": "adam_beta1 and adam_beta2",
    "beta1": "adam_beta1",
    "beta2": "adam_beta2",
    "adam_beta1": "adam_beta1",
    "adam_beta2": "adam_beta2",
    "eps": "adam_epsilon",
    "epsilon": "adam_epsilon",
    "adam_epsilon": "adam_epsilon",
}


#: The paper's symbols, as users type them, and the key that holds each.
_PAPER_NAMES = {"alpha": "scale (the update's scale α)", "rho": "res_scale (the residual's scale ρ)"}


def _unknown_keys_message(unknown: list[str]) -> str:
    hints = []
    for key in unknown:
        if key.lower() in _TRAINING_ARGUMENTS_FIELDS:  # (any case: 'LR' gets where lr goes, not 'did you mean lr')
            field_name = _TRAINING_ARGUMENTS_FIELDS[key.lower()]
            flags = " and ".join(f"--{name}" for name in field_name.split(" and "))
            hints.append(
                f"{key!r} is not one of FOAM's own keys: FOAM takes it, as every optimizer does, from "
                f"TrainingArguments' {field_name} ({flags} on the command line). Fix: set it there and drop "
                f"{key!r} from optim_args."
            )
        elif key in _PAPER_NAMES:
            hints.append(f"{key!r} is the paper's name: FOAM's key is {_PAPER_NAMES[key]}.")
        elif key.lower() != key and key.lower() in OPTIM_ARGS_KEYS:
            hints.append(f"{key!r}: did you mean {key.lower()!r}? Keys are lower case.")
        else:
            close = difflib.get_close_matches(key, list(OPTIM_ARGS_KEYS), n=1, cutoff=0.75)
            if close:
                hints.append(f"{key!r}: did you mean {close[0]!r}?")
    valid = "\n".join(f"  {k}: {v}" for k, v in OPTIM_ARGS_KEYS.items())
    return (
        f"optim_args for optim='foam': unknown key(s) {unknown}."
        + "".join(f"\n{hint}" for hint in hints)
        + ("\n" if hints else " ")
        + f"Valid keys:\n{valid}\nExample: {_EXAMPLE}."
    )


def _mapping_items(optim_args: Mapping[str, Any]) -> dict[str, Any]:
    """A mapping's keys as :func:`_split_optim_args` gives them: scalar values as their ``optim_args`` text;
    ``block_sizes`` as a mapping or that text, ``target_modules`` as a list or that text."""
    items: dict[str, Any] = {}
    for key, value in optim_args.items():
        if not isinstance(key, str):
            raise FoamConfigError(f"optim_args: key {key!r} is not a string. Example: {_EXAMPLE}.")
        if value is None:  # YAML's null, JSON's null: the key is left at its default, as if absent
            continue
        if (key == "block_sizes" and isinstance(value, Mapping)) or (
            key == "target_modules" and isinstance(value, (list, tuple))
        ):
            items[key] = value
        elif isinstance(value, bool):
            items[key] = str(value).lower()
        elif isinstance(value, (str, int, float)):
            items[key] = str(value)
        else:
            raise FoamConfigError(
                f"optim_args: {key}={value!r} has type {type(value).__name__}; a value is a string or a number "
                f"(block_sizes may be a mapping, target_modules a list). Example: {_EXAMPLE}."
            )
    return items


def _parse_block_sizes(text: str) -> dict[str, int]:
    overrides: dict[str, int] = {}
    for pair in text.split(";"):
        if not pair:
            continue
        pattern, sep, size = pair.rpartition(":")
        if not sep or not pattern:
            raise FoamConfigError(
                f"optim_args: block_sizes entry {pair!r} is not pattern:size. "
                "Example: block_sizes=q_proj:8;down_proj:16;lm_head:1."
            )
        if ":" in _GROUP_OPENER.sub("", pattern):  # module names hold no ':'; a regex's (?: groups are not one
            raise FoamConfigError(
                f"optim_args: block_sizes entry {pair!r} holds more than one ':'; an entry is one pattern:size "
                "(module names hold no ':'). Fix: e.g. block_sizes=q_proj:8;lm_head:1 (entries separated by ';')."
            )
        if pattern in overrides:
            raise FoamConfigError(
                f"optim_args: block_sizes pattern {pattern!r} is given twice ({pattern}:{overrides[pattern]} and "
                f"{pair}). Fix: keep one size per pattern."
            )
        try:
            value = int(size)
        except ValueError:
            value = None
        if value is None or value < 1:
            raise FoamConfigError(
                f"optim_args: block_sizes entry {pair!r}: size {size!r} is not an int >= 1 (1 = unfolded). "
                f"Fix: e.g. block_sizes={pattern}:4."
            )
        overrides[pattern] = value
    if not overrides:
        raise FoamConfigError("optim_args: block_sizes= is empty. Example: block_sizes=q_proj:8;lm_head:1.")
    return overrides


def _parse_target_modules(text: str) -> list[str] | str:
    """The ``target_modules`` value of ``optim_args``: a list of module-name patterns or one full regex.

    A value with a ``;`` is a list (``q_proj;v_proj``; ``layers\\.0\\..*proj;`` is a list of one regex). A value
    without one is one entry: a plain name is a list of that name (``q_proj`` -> ``['q_proj']``); ``all-linear``
    and an entry that looks like a regex are one string, the latter a full regex over the whole module name
    (``.*\\.mlp\\..*``); and one non-capturing group around the whole value is the full regex inside it
    (``(?:q_proj)`` -> ``'q_proj'``: how :meth:`FoamConfig.to_optim_args` writes one string that looks like a
    plain name).
    """
    names = [t for t in text.split(";") if t]
    if not names:
        raise FoamConfigError(f"optim_args: target_modules= is empty. Fix: e.g. {_LIST_EXAMPLES['target_modules']}.")
    for name in names:
        if ":" in _GROUP_OPENER.sub("", name):
            pattern, _, size = name.rpartition(":")
            pattern = pattern or "q_proj"
            size = size if size.isdigit() and int(size) >= 1 else "8"
            raise FoamConfigError(
                f"optim_args: target_modules entry {name!r} gives a size (':'), but target_modules entries take "
                f"none: they name the modules that fold with block_size. Fix: block_sizes={pattern}:{size} to fold "
                f"{pattern} with block size {size}, or target_modules={pattern} to fold it with block_size."
            )
    if ";" in text:
        return names
    (name,) = names
    inner = _group_content(name)
    if inner is not None:
        return inner
    return name if _reads_as_one_string(name) else names


def _check_target_is_carried(pattern: str) -> None:
    """Refuse a ``target_modules`` pattern that the ``optim_args`` string cannot hold as it is."""
    found = [ch for ch in ",=; " if ch in pattern]
    if ":" in _GROUP_OPENER.sub("", pattern):
        found.append(":")
    if found:
        raise FoamConfigError(
            f"FoamConfig: target_modules pattern {pattern!r} contains {' and '.join(map(repr, found))}, which the "
            "optim_args string (the only form TrainingArguments hands on) cannot carry: ',' and '=' separate its "
            "keys, ';' the entries of a list, ':' gives a size, and transformers removes spaces. Fix: give one list "
            "entry per name, and write each pattern without them; module names never contain them, and a regex can "
            "do without (e.g. [0-9][0-9]? for [0-9]{1,2}; the ':' of a group, as in (?:q|v)_proj, is allowed)."
        )


def _target_modules_text(targets: list[str] | str) -> str:
    """The ``target_modules`` value that :func:`_parse_target_modules` reads back as ``targets``: one string that
    would read as a list of one name, or as the regex inside its outer group, is wrapped in ``(?:...)`` (the
    same full regex); a list of one entry that would read as one regex gets a trailing ``;``."""
    if isinstance(targets, str):
        reads_as_itself = _reads_as_one_string(targets) and _group_content(targets) is None
        return targets if reads_as_itself else f"(?:{targets})"
    text = ";".join(targets)
    return text + ";" if len(targets) == 1 and _reads_as_one_string(targets[0]) else text


def _to_int(key: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise FoamConfigError(f"optim_args: {key}={text!r} is not an integer. Example: {key}=4.") from None


def _to_float(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise FoamConfigError(f"optim_args: {key}={text!r} is not a number. Example: {key}=1.0.") from None


def _to_bool(key: str, text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise FoamConfigError(f"optim_args: {key}={text!r} is not a boolean. Use {key}=true or {key}=false.")


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise FoamConfigError(
            f"FOAM: the module pattern {pattern!r} is not a valid regex ({err}). Fix: write a module-name suffix "
            "such as q_proj, or a full regex with balanced brackets (escape literal characters with \\)."
        ) from None


def check_targets_fold(targets: Any, block_size: int, where: str) -> None:
    """Refuse target modules beside ``block_size=1``: the targets fold with the default block size, and 1 keeps
    AdamW states, so naming them would change nothing (``level=0`` is block size 1 too)."""
    if targets is not None and block_size == 1:
        raise FoamConfigError(
            f"{where}={targets!r} names the modules that fold with block_size, which is 1 (AdamW states, also "
            "from level=0): they would fold nothing. Fix: a block_size > 1 for them (e.g. block_size=4), or size "
            "modules one by one in block_sizes (e.g. block_sizes=q_proj:4) without target modules."
        )


def check_one_target_regex(text: str, where: str) -> None:
    """Refuse a one-string target (read as one regex over the whole module name) that can match no module: the
    empty string, and names joined by commas (``"q_proj,v_proj"``; no module name holds a ``,``). ``where`` names
    the field, e.g. ``"TrainingArguments: optim_target_modules"``."""
    if text.lower() == "all-linear" and text != "all-linear":  # else one regex that matches no module name
        raise FoamConfigError(f"{where}={text!r}: did you mean 'all-linear'? It is written in lower case.")
    if not text.strip():
        raise FoamConfigError(
            f"{where}={text!r} names no module. Fix: None for FOAM's default (linear layers except the output head "
            "and embeddings), 'all-linear', or module names such as ['q_proj', 'v_proj']."
        )
    names = [name.strip() for name in text.split(",")]
    if len(names) > 1 and all(re.fullmatch(r"[\w.]+", name) for name in names):
        as_list = "[" + ", ".join(repr(name) for name in names) + "]"
        raise FoamConfigError(
            f"{where}={text!r} is one string, which transformers and FOAM read as one regex over the whole module "
            f"name, and no module name holds a ',': it would match nothing. Fix: a list ({as_list}), or optim_args "
            f"target_modules={';'.join(names)}."
        )


def _looks_like_regex(text: str) -> bool:
    return any(ch in text for ch in "*+?[](){}|^$\\")


def _reads_as_one_string(entry: str) -> bool:
    """Whether ``target_modules=ENTRY`` (one entry, no ``;``) is one string rather than a list of one name."""
    return entry == "all-linear" or _looks_like_regex(entry)


#: A group's opening that holds a ``:`` of regex syntax: ``(?:``, and ``(?i:`` or ``(?-i:`` with inline flags.
_GROUP_OPENER = re.compile(r"\(\?[aiLmsux]*(?:-[imsx]+)?:")


def _group_content(text: str) -> str | None:
    """The regex inside one non-capturing group that spans all of ``text`` (``(?:q_proj)`` -> ``q_proj``), else
    ``None``. Both match the same whole names. If the group closed before the end (``(?:a)|(?:b)``), what lies
    between ``(?:`` and the last ``)`` holds an unbalanced ``)`` and does not compile."""
    if not (text.startswith("(?:") and text.endswith(")")):
        return None
    inner = text[3:-1]
    try:
        re.compile(inner)
    except re.error:
        return None
    return inner
