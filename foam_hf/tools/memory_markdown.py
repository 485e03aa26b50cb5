"""The ``foam-hf memory`` report as Markdown tables (what the command prints unless ``--format json``)."""

from __future__ import annotations

from .memory_report import CONTEXT_FORMULAS, MemoryReport

__all__ = ["format_markdown"]

_GIB = 1 << 30


def _gib(n: int) -> str:
    """Bytes in GiB from 0.1 GiB up, in MiB from 0.1 MiB up, else in KiB (a small model's states would
    otherwise read ``0.0 MiB``)."""
    if n >= _GIB // 10:
        return f"{n / _GIB:.2f} GiB"
    if n >= (1 << 20) // 10:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def _count(n: int) -> str:
    """A parameter count: in billions or millions from a million up, exact below (a small model or the norms
    of a large one would otherwise read ``0.0 M``)."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n:,}"


def format_markdown(report: MemoryReport) -> str:
    """The report as Markdown tables (what ``foam-hf memory MODEL`` prints)."""
    n = report.num_params
    tied = (
        " (input embeddings tied to the output head, counted once under embeddings)" if report.tied_embeddings else ""
    )
    lines = [
        f"## {report.model}: {report.architecture}, {_count(n)} parameters, {len(report.params)} tensors",
        "",
        f"Shapes from: {report.source}{tied}. Built on the meta device: no weights loaded.",
        "FOAM folds, by default, the weights of every linear layer except the output head and the embeddings; "
        "all other tensors keep AdamW states. Optimizer states (of fp32 weights) are fp32 unless a row says otherwise "
        "(--optim-args state_dtype=bfloat16 halves FOAM's). 1 GiB = 2^30 bytes.",
        "",
        "### Optimizer states and training memory",
        "",
        "| optimizer | optimizer states | AdamW / this | weights + grads + states, fp32 weights "
        "| weights + grads + states, bf16 weights |",
        "|---|--:|--:|--:|--:|",
    ]
    for label, state, state_bf16 in report.optimizer_rows_by_weight_dtype():
        ratio = f"{report.adamw_state / state:.2f}x" if state else "-"
        lines.append(
            f"| {label} | {_gib(state)} | {ratio} | {_gib(report.training_bytes(state, 4))} "
            f"| {_gib(report.training_bytes(state_bf16, 2))} |"
        )
    lines += [
        "",
        "Weights and gradients: 4 + 4 bytes per parameter (fp32) or 2 + 2 (bf16); activations are not counted. "
        "Optimizer states and their ratio are those of fp32 weights. With bf16 weights, torch's AdamW and GaLore "
        "keep bf16 moments (half the bytes; the last column counts them so), while FOAM keeps fp32 ones unless "
        "state_dtype=bfloat16, and transformers' Adafactor fp32 ones.",
        "",
        "### Where the parameters and the states are",
        "",
        "| category | tensors | parameters | share | AdamW states | "
        + " | ".join(f"FOAM B={b}" for b in report.compared_block_sizes)
        + " |",
        "|---|--:|--:|--:|--:|" + "--:|" * len(report.compared_block_sizes),
    ]
    for cat, info in report.categories.items():
        lines.append(
            f"| {cat} | {info['tensors']} | {_count(info['params'])} | {100 * info['params'] / n:.1f}% "
            f"| {_gib(info['adamw_state_bytes'])} | "
            + " | ".join(_gib(info["foam_state_bytes"][b]) for b in report.compared_block_sizes)
            + " |"
        )
    if report.compared_block_sizes:
        big = max(report.compared_block_sizes)
        unfolded = sum(
            info["foam_state_bytes"][big] for cat, info in report.categories.items() if cat in ("embeddings", "lm_head")
        )
        lines += [
            "",
            f"At B={big}, embeddings and the output head hold {100 * unfolded / report.foam_state[big]:.0f}% of "
            f"FOAM's optimizer states ({_gib(unfolded)} of {_gib(report.foam_state[big])}): they are not folded "
            "by default.",
        ]
    if report.optim_args is not None:
        lines += [
            "",
            f"### Per-module overrides: `{report.optim_args}`",
            "",
            f"FOAM states ({'bf16' if report.override_state_dtype == 'bfloat16' else 'fp32'}): "
            f"{_gib(report.override_default_state or 0)} with block_size={report.override_block_size} "
            f"alone, {_gib(report.override_state or 0)} with the overrides; "
            f"{len(report.override_changed)} tensors change block size:",
            "",
            "| block size: default -> override | tensors | example |",
            "|---|--:|---|",
        ]
        groups: dict[tuple[int, int], list[str]] = {}
        for name, change in report.override_changed.items():
            groups.setdefault(change, []).append(name)
        for (a, b), names in sorted(groups.items()):
            lines.append(f"| {a} -> {b} | {len(names)} | `{names[0]}` |")
    lines += [
        "",
        "Formulas: AdamW 8 bytes per parameter; FOAM 8 * rows * ceil(n/B) per folded tensor (rows x n), "
        "8 * numel otherwise (4 and 4 bytes per moment entry; 2 and 2 with bf16 states); both + 4 bytes of "
        "step counter per tensor. "
        f"8-bit Adam: {CONTEXT_FORMULAS['adam8bit']}. Adafactor: {CONTEXT_FORMULAS['adafactor']}. "
        f"GaLore: {CONTEXT_FORMULAS['galore']}.",
    ]
    return "\n".join(lines) + "\n"
