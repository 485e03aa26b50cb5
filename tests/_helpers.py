"""Expectations the tests work out for themselves, from a model's module names and parameter shapes.

Nothing here calls foam_hf's resolver, grouping or memory functions (``foam_hf.param_groups``,
``foam_hf.memory``): those are what the tests check. The rules are written out from the documentation
(docs/integration.md, ``foam_hf.param_groups``): under ``optim="foam"`` the ``weight`` of every
``nn.Linear`` folds with the default block size, except the output heads and PEFT adapter layers; every
other trainable parameter keeps AdamW states; a one-dimensional parameter never folds. Weight decay skips
biases and norm weights, as ``Trainer`` does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: ``FoamConfig``'s documented default block size.
DEFAULT_BLOCK_SIZE = 4

#: Output heads of the models these tests build: a causal-LM head and a reward/sequence-classification head.
OUTPUT_HEADS = ("lm_head", "score")

_STEP_BYTES = 4  # state["step"]: a float32 scalar per parameter, as in torch.optim.AdamW


def _is_adapter(name: str) -> bool:
    """PEFT LoRA adapter weights live under ``...<layer>.lora_A.<adapter>`` / ``lora_B``."""
    return any(part.startswith("lora_") for part in name.split("."))


def expected_block_sizes(
    model: nn.Module, block_size: int = DEFAULT_BLOCK_SIZE, overrides: dict[str, int] | None = None
) -> dict[str, int]:
    """Trainable parameter name -> block size under ``optim="foam"``.

    ``overrides`` maps a module name component (``"lm_head"``, ``"lora_A"``) to a block size for every
    trainable parameter below a module of that name, as ``block_sizes=lm_head:2`` does.
    """
    folded = {
        f"{module_name}.weight"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module_name.rsplit(".", 1)[-1] not in OUTPUT_HEADS
        and not _is_adapter(module_name)
    }
    sizes = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        size = block_size if name in folded else 1
        for component, override in (overrides or {}).items():
            if component in name.split(".")[:-1]:
                size = override
        sizes[name] = size
    return sizes


def expected_moment_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """``(*rows, ceil(n / B))`` for a parameter of two or more dimensions and ``B > 1``, else the shape itself."""
    if block_size > 1 and len(shape) >= 2:
        return (*shape[:-1], math.ceil(shape[-1] / block_size))
    return tuple(shape)


def state_itemsize(param: torch.Tensor) -> int:
    """Bytes per moment entry: fp32 for half-precision parameters, else the parameter's own dtype."""
    return 4 if param.dtype in (torch.float16, torch.bfloat16) else param.element_size()


def expected_state_bytes(model: nn.Module, block_sizes: dict[str, int]) -> tuple[int, int]:
    """(FOAM, AdamW) optimizer-state bytes: two moments and a 4-byte step per trainable parameter."""
    params = dict(model.named_parameters())
    foam = adamw = 0
    for name, block_size in block_sizes.items():
        p = params[name]
        foam += 2 * math.prod(expected_moment_shape(tuple(p.shape), block_size)) * state_itemsize(p) + _STEP_BYTES
        adamw += 2 * p.numel() * state_itemsize(p) + _STEP_BYTES
    return foam, adamw


def decays(model: nn.Module) -> dict[str, bool]:
    """Trainable parameter name -> whether weight decay applies: not to biases nor to norm layers' weights."""
    norm_modules = {
        module_name for module_name, module in model.named_modules() if type(module).__name__.endswith("Norm")
    }
    result = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            module_name, _, leaf = name.rpartition(".")
            result[name] = leaf != "bias" and module_name not in norm_modules
    return result


def hand_built_foam_groups(model: nn.Module, block_sizes: dict[str, int], weight_decay: float) -> list[dict]:
    """Param groups written the way a user would for ``FOAM(...)``: one per (block size, decays?) pair."""
    decay = decays(model)
    params = dict(model.named_parameters())
    groups: dict[tuple[int, bool], list[torch.Tensor]] = {}
    for name, block_size in block_sizes.items():
        groups.setdefault((block_size, decay[name]), []).append(params[name])
    return [
        {"params": ps, "block_size": b, "weight_decay": weight_decay if d else 0.0} for (b, d), ps in groups.items()
    ]
