r"""``foam-hf memory MODEL``: optimizer-state and training memory of AdamW against FOAM, per model.

MODEL is a ``config.json`` path (or a folder holding one) or a short name from :data:`KNOWN_MODELS`. The model
is built on the meta device from its config, so no weights are loaded or downloaded and a 7B model costs
milliseconds. The report gives, in bytes:

* optimizer states of AdamW and of FOAM at several block sizes (the default FOAM targets: every linear layer
  except the output head and the embeddings; everything else keeps AdamW states), counted exactly as
  :func:`foam_hf.memory.foam_state_bytes` / :func:`~foam_hf.memory.adamw_state_bytes` count them (fp32
  moments plus a 4-byte step counter per tensor), so they equal what a real optimizer holds after a step;
* whole-training memory = weights + gradients + optimizer states, with fp32 weights and with bf16 weights
  (bf16 gradients; each optimizer's states in the dtype it keeps for bf16 weights: bf16 moments for torch's
  AdamW and for GaLore, fp32 for FOAM's default and for transformers' Adafactor); activations, buffers and
  framework overhead are not counted;
* for context, 8-bit Adam, Adafactor and GaLore from formulas stated in :data:`CONTEXT_FORMULAS`;
* a per-category breakdown (embeddings, lm_head, attention, MLP, norms, other);
* the effect of per-module overrides written as in ``optim_args``.

This module computes the report (:func:`memory_report` returns a :class:`MemoryReport`, JSON-ready through
:meth:`MemoryReport.to_dict`); :func:`foam_hf.tools.memory_markdown.format_markdown` renders it, and
:mod:`foam_hf.tools.cli` is the command line.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import FoamConfig
from ..errors import FoamConfigError
from ..folding import is_foldable
from ..memory import adamw_state_bytes, foam_state_bytes
from ..param_groups import _resolve_block_sizes
from .model_shapes import KNOWN_MODELS

__all__ = [
    "CATEGORIES",
    "CONTEXT_FORMULAS",
    "DEFAULT_COMPARED_BLOCK_SIZES",
    "KNOWN_MODELS",
    "MemoryReport",
    "ParamEntry",
    "build_meta_model",
    "load_config",
    "memory_report",
]

#: The FOAM block sizes a report compares unless told otherwise (``foam-hf memory --block-sizes``).
DEFAULT_COMPARED_BLOCK_SIZES: tuple[int, ...] = (2, 4, 8, 16, 32)

#: How the context optimizers are counted (all states fp32 unless said otherwise).
CONTEXT_FORMULAS: dict[str, str] = {
    "adam8bit": "2 bytes per parameter (two 8-bit moments); the per-block quantisation scales (<1%) and "
    "bitsandbytes' fp32 fallback for small tensors are not counted",
    "adafactor": "per tensor of >= 2 dims: 4 * (rows + cols) bytes for the factored second moment (rows = "
    "prod(shape[:-1]), cols = prod(shape[:-2]) * shape[-1], as transformers.Adafactor); 1-D tensors 4 * numel; "
    "with beta1 set, plus 4 * numel for the first moment (transformers.Adafactor's default is beta1=None, none); "
    "plus the 4-byte RMS scalar per tensor",
    "galore": "per projected matrix m x n (the FOAM target set), r' = min(r, m, n): 4 * (r' * min(m, n) + "
    "2 * r' * max(m, n)) bytes (projection matrix + the two low-rank Adam moments); other tensors AdamW "
    "(8 * numel); half of all that with bf16 weights, whose projections and moments GaLore keeps in bf16",
}

CATEGORIES: tuple[str, ...] = ("embeddings", "lm_head", "attention", "mlp", "norms", "other")


# ---------------------------------------------------------------------------- model loading


def load_config(model: str) -> tuple[Any, str, str]:
    """Resolve MODEL into ``(config, label, source)``: a config.json path or folder, or a built-in name (a path
    that exists wins over the built-in name it spells: ``./mistral-7b`` is the user's download).

    Raises :class:`~foam_hf.errors.FoamConfigError` when MODEL is neither, listing the built-in names.
    """
    from transformers import AutoConfig

    key = model.strip().lower()
    path = model
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
        if not os.path.isfile(path) and key not in KNOWN_MODELS:
            raise FoamConfigError(
                f"memory: MODEL={model!r} is a folder with no config.json in it. Fix: pass the folder that holds "
                "the model's config.json (or the file's path)."
            )
    if key in KNOWN_MODELS and not os.path.isfile(path):  # a folder or file of that name wins: it is the user's
        spec = dict(KNOWN_MODELS[key])
        source = spec.pop("source")
        return AutoConfig.for_model(spec.pop("model_type"), **spec), key, source
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as err:
            raise FoamConfigError(
                f"memory: MODEL={model!r} could not be read as a JSON config ({err}). Fix: pass the path of a "
                "model's config.json."
            ) from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise FoamConfigError(
                f"memory: {path!r} has no 'model_type' key, so it is not a transformers config.json. "
                "Fix: pass the config.json that sits next to a model's weights."
            )
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as err:  # also the config classes' own validation errors, which are not ValueErrors
            raise FoamConfigError(
                f"memory: transformers cannot build a config from {path!r} (model_type="
                f"{data['model_type']!r}): {_one_line(err)} Fix: correct that field of "
                "the config.json, check the model_type, or upgrade transformers."
            ) from None
        return config, os.path.basename(os.path.dirname(os.path.abspath(path))) or path, path
    names = ", ".join(KNOWN_MODELS)
    raise FoamConfigError(
        f"memory: MODEL={model!r} is neither a built-in model name nor an existing config.json path or folder. "
        f"Built-in names: {names}. Fix: pass one of those names, or the path of a model's config.json."
    )


def _one_line(err: BaseException) -> str:
    """The error's message on one line: its lines joined, at most 300 characters (a validation error's first
    line names only the validator; the next says what is wrong)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def build_meta_model(config: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_config(config)`` on the meta device, fp32: shapes only, no memory, no I/O."""
    from transformers import AutoModelForCausalLM

    model_type = getattr(config, "model_type", None)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise FoamConfigError(
                f"memory: transformers cannot build a {model_type!r} model from this config: {_one_line(err)}. "
                "Fix: correct that field of the config.json."
            ) from None
        raise FoamConfigError(
            f"memory: model_type={model_type!r} has no causal-LM class in transformers ({_one_line(err)}). "
            "Fix: pass the config of a decoder-only language model."
        ) from None


# ---------------------------------------------------------------------------- block-size resolution
#
# Which tensors fold, with which block size, is decided by the Trainer integration's resolver
# (:func:`foam_hf.param_groups.resolve_block_sizes` from a :class:`~foam_hf.config.FoamConfig`), so the
# calculator reports exactly what ``TrainingArguments(optim="foam", optim_args=...)`` would build.


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """Every (module name, module) that directly holds each parameter (tied weights have several)."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append((module_name, module))
    return owners


def _plan(model: nn.Module, config: FoamConfig, *, users: bool) -> dict[str, int]:
    """Block size per parameter. ``users``: the plan ``optim_args`` would build, whose warnings (mixture-of-experts
    weights left unfolded) are the user's; the default plans the report compares against stay silent."""
    return _resolve_block_sizes(model, config, None, warn_unfolded_experts=users).size_by_parameter


# ---------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class ParamEntry:
    """One trainable tensor of the model: name, shape, category and whether FOAM folds it by default."""

    name: str
    shape: tuple[int, ...]
    category: str
    target: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class MemoryReport:
    """Everything the ``memory`` command prints; :meth:`to_dict` is the JSON form. All sizes in bytes.

    ``compared_block_sizes`` are the FOAM block sizes of the comparison rows (``foam_state`` is keyed by
    them); the block sizes of ``--optim-args`` overrides are in ``override_changed``.
    """

    model: str
    source: str
    architecture: str
    tied_embeddings: bool
    params: list[ParamEntry]
    compared_block_sizes: tuple[int, ...]
    rank: int
    adamw_state: int
    foam_state: dict[int, int]
    adam8bit_state: int
    adafactor_state: int
    adafactor_beta1_state: int
    galore_state: int
    categories: dict[str, dict[str, Any]]
    #: torch's AdamW and GaLore keep their moments in the weights' dtype, so with bf16 weights they hold about
    #: half the bytes of the figures above, which are for fp32 weights (FOAM's default, Adafactor and 8-bit Adam
    #: hold the same bytes for both).
    adamw_state_bf16_weights: int
    galore_state_bf16_weights: int
    optim_args: str | None = None
    override_block_size: int | None = None
    override_state: int | None = None
    override_default_state: int | None = None
    override_changed: dict[str, tuple[int, int]] = field(default_factory=dict)
    override_state_dtype: str | None = None

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Deprecated name of :attr:`compared_block_sizes`."""
        warnings.warn(
            "MemoryReport.block_sizes is deprecated: use MemoryReport.compared_block_sizes (the FOAM block sizes "
            "the report compares).",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.compared_block_sizes

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)

    def training_bytes(self, state_bytes: int, weight_bytes: int) -> int:
        """Weights + gradients (``weight_bytes`` each per parameter) + ``state_bytes`` of optimizer state."""
        return 2 * weight_bytes * self.num_params + state_bytes

    def optimizer_rows(self) -> list[tuple[str, int]]:
        """(label, state bytes with fp32 weights) for every optimizer in the comparison, AdamW first."""
        return [(label, state) for label, state, _ in self.optimizer_rows_by_weight_dtype()]

    def optimizer_rows_by_weight_dtype(self) -> list[tuple[str, int, int]]:
        """(label, state bytes with fp32 weights, state bytes with bf16 weights) for every optimizer in the
        comparison, AdamW first."""
        rows = [("AdamW", self.adamw_state, self.adamw_state_bf16_weights)]
        rows += [(f"FOAM B={b}", self.foam_state[b], self.foam_state[b]) for b in self.compared_block_sizes]
        if self.override_state is not None:
            states = "bf16 states" if self.override_state_dtype == "bfloat16" else "fp32 states"
            label = f"FOAM with --optim-args (B={self.override_block_size} + overrides, {states})"
            rows.append((label, self.override_state, self.override_state))
        rows += [
            ("8-bit Adam", self.adam8bit_state, self.adam8bit_state),
            ("Adafactor (beta1=None: no first moment)", self.adafactor_state, self.adafactor_state),
            ("Adafactor (beta1=0.9: with first moment)", self.adafactor_beta1_state, self.adafactor_beta1_state),
            (f"GaLore r={self.rank}", self.galore_state, self.galore_state_bf16_weights),
        ]
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "source": self.source,
            "architecture": self.architecture,
            "tied_embeddings": self.tied_embeddings,
            "num_params": self.num_params,
            "num_tensors": len(self.params),
            "compared_block_sizes": list(self.compared_block_sizes),
            "block_sizes": list(self.compared_block_sizes),  # its earlier name, kept for readers of it
            "rank": self.rank,
            "optimizers": [
                {
                    "optimizer": label,
                    "state_bytes": state,
                    "ratio_vs_adamw": self.adamw_state / state if state else None,
                    "training_bytes_fp32": self.training_bytes(state, 4),
                    "state_bytes_bf16_weights": state_bf16,
                    "training_bytes_bf16": self.training_bytes(state_bf16, 2),
                }
                for label, state, state_bf16 in self.optimizer_rows_by_weight_dtype()
            ],
            "categories": self.categories,
            "overrides": None
            if self.optim_args is None
            else {
                "optim_args": self.optim_args,
                "block_size": self.override_block_size,
                "state_dtype": self.override_state_dtype or "float32",
                "state_bytes": self.override_state,
                "default_state_bytes": self.override_default_state,
                "changed": {name: {"default": a, "override": b} for name, (a, b) in self.override_changed.items()},
            },
            "formulas": {
                "foam": "8 * rows * ceil(n / B) per folded tensor + 8 * numel per other tensor, + 4 per tensor "
                "(step counter), fp32 states",
                "adamw": "8 * numel + 4 per tensor (4 * numel + 4 with bf16 weights: torch keeps bf16 moments)",
                **CONTEXT_FORMULAS,
            },
        }


def _category(name: str, holders: list[tuple[str, nn.Module]], model: nn.Module, param: torch.Tensor) -> str:
    modules = [m for _, m in holders]
    if model.get_input_embeddings() in modules or any(isinstance(m, nn.Embedding) for m in modules):
        return "embeddings"
    if model.get_output_embeddings() in modules:
        return "lm_head"
    lowered = name.lower()
    if param.ndim == 1 and ("norm" in lowered or any("norm" in type(m).__name__.lower() for m in modules)):
        return "norms"
    if re.search(r"attn|attention", lowered):
        return "attention"
    if re.search(r"mlp|feed_forward|ffn", lowered):
        return "mlp"
    return "other"


def _adafactor_bytes(shape: tuple[int, ...], beta1: bool) -> int:
    numel = math.prod(shape)
    if len(shape) >= 2:
        second = math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
    else:
        second = numel
    return 4 * (second + (numel if beta1 else 0)) + 4  # + the 0-d fp32 "RMS" tensor transformers keeps


def _galore_bytes(shape: tuple[int, ...], rank: int, projected: bool, itemsize: int = 4) -> int:
    """GaLore's state of one tensor with ``itemsize``-byte entries (4 for fp32 weights, 2 for bf16: GaLore
    keeps its projection and moments in the weights' dtype)."""
    if not (projected and len(shape) == 2):
        return 2 * itemsize * math.prod(shape)
    m, n = shape
    r = min(rank, m, n)
    return itemsize * (r * min(m, n) + 2 * r * max(m, n))


def memory_report(
    model: str | Any,
    compared_block_sizes: Sequence[int] = DEFAULT_COMPARED_BLOCK_SIZES,
    rank: int | None = None,
    optim_args: str | None = None,
    *,
    block_sizes: Sequence[int] | None = None,
) -> MemoryReport:
    """Compute the report for MODEL (a built-in name, a config.json path, or a transformers config object).

    Args:
        model: see :func:`load_config`; a ``PretrainedConfig`` instance is used as is.
        compared_block_sizes: FOAM block sizes to compare, one row each (default: 2, 4, 8, 16, 32).
        rank: GaLore rank; ``None`` means ``hidden_size // 4`` (the GaLore paper's ratio for most sizes).
        optim_args: optional ``"block_size=4,block_sizes=q_proj:8;lm_head:4"`` to show per-module overrides.
        block_sizes: deprecated name of ``compared_block_sizes``.
    """
    if block_sizes is not None:
        if compared_block_sizes is not DEFAULT_COMPARED_BLOCK_SIZES:
            raise TypeError(
                f"memory_report: compared_block_sizes={compared_block_sizes!r} and block_sizes={block_sizes!r} are "
                "the same option (block_sizes is its deprecated name). Fix: pass compared_block_sizes only."
            )
        warnings.warn(
            "memory_report(block_sizes=...) is deprecated: use compared_block_sizes=... (block_sizes is the "
            "optim_args key of per-module overrides).",
            DeprecationWarning,
            stacklevel=2,
        )
        compared_block_sizes = block_sizes
    if isinstance(model, str):
        config, label, source = load_config(model)
    else:
        config, label, source = model, type(model).__name__, "config object"
    sizes = tuple(compared_block_sizes)
    for b in sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise FoamConfigError(
                f"memory: block size {b!r} is invalid: block sizes are ints >= 1. Fix: e.g. --block-sizes 2,4,8,16,32."
            )
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 1024
    if rank is None:
        rank = max(1, hidden // 4)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise FoamConfigError(
            f"memory: rank={rank!r} is invalid: the GaLore rank is an int >= 1. Fix: e.g. --rank 256."
        )

    net = build_meta_model(config)
    owners = _owners(net)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    default_plan = _plan(net, FoamConfig(block_size=2), users=optim_args is None)
    entries: list[ParamEntry] = []
    for name, param in named:
        holders = owners.get(id(param), [(name.rpartition(".")[0], net)])
        target = default_plan.get(name, 1) > 1 and is_foldable(param, 2)
        entries.append(ParamEntry(name, tuple(param.shape), _category(name, holders, net, param), target))

    def foam_bytes(block_of: dict[str, int], state_dtype: str | None = None) -> int:
        return sum(foam_state_bytes(p, block_of[n], state_dtype) for n, p in named)

    adamw = sum(adamw_state_bytes(p) for _, p in named)
    foam = {b: foam_bytes({e.name: b if e.target else 1 for e in entries}) for b in sizes}

    categories: dict[str, dict[str, Any]] = {}
    for cat in CATEGORIES:
        members = [(e, p) for e, (_, p) in zip(entries, named) if e.category == cat]
        if not members:
            continue
        categories[cat] = {
            "tensors": len(members),
            "params": sum(e.numel for e, _ in members),
            "folded_by_default": sum(e.target for e, _ in members),
            "adamw_state_bytes": sum(adamw_state_bytes(p) for _, p in members),
            "foam_state_bytes": {b: sum(foam_state_bytes(p, b if e.target else 1) for e, p in members) for b in sizes},
        }

    report = MemoryReport(
        model=label,
        source=source,
        architecture=type(net).__name__,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        params=entries,
        compared_block_sizes=sizes,
        rank=rank,
        adamw_state=adamw,
        foam_state=foam,
        adam8bit_state=2 * sum(e.numel for e in entries),
        adafactor_state=sum(_adafactor_bytes(e.shape, beta1=False) for e in entries),
        adafactor_beta1_state=sum(_adafactor_bytes(e.shape, beta1=True) for e in entries),
        galore_state=sum(_galore_bytes(e.shape, rank, e.target) for e in entries),
        categories=categories,
        adamw_state_bf16_weights=sum(adamw_state_bytes(p.to(torch.bfloat16)) for _, p in named),
        galore_state_bf16_weights=sum(_galore_bytes(e.shape, rank, e.target, itemsize=2) for e in entries),
    )
    if optim_args is not None:
        config_with = FoamConfig.from_optim_args(optim_args)
        blocks = _plan(net, config_with, users=True)
        default_blocks = _plan(net, FoamConfig(block_size=config_with.block_size), users=False)
        report.optim_args = optim_args
        report.override_block_size = config_with.block_size
        report.override_state_dtype = config_with.state_dtype
        report.override_state = foam_bytes(blocks, config_with.state_dtype)
        report.override_default_state = foam_bytes(default_blocks, config_with.state_dtype)
        params = dict(named)

        def effective(block_of: dict[str, int], n: str) -> int:
            return block_of[n] if is_foldable(params[n], block_of[n]) else 1

        report.override_changed = {
            n: (effective(default_blocks, n), effective(blocks, n))
            for n in blocks
            if effective(blocks, n) != effective(default_blocks, n)
        }
    return report
