"""Draw the figures of docs/method.md from the library's own fold and unfold.

    python docs/figures/make_figures.py            # writes docs/figures/fold_unfold.png

Deterministic: a fixed seed, the Agg backend and no timestamp or version in the PNG metadata, so running it
twice writes the same bytes with the same matplotlib.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from foam_hf.folding import block_mean, unfold  # noqa: E402

HERE = Path(__file__).resolve().parent

#: A small gradient: 4 rows, n = 10 columns, B = 4, so K = ceil(10/4) = 3 blocks and the last one is ragged
#: (2 entries), the case docs/method.md spells out.
ROWS, N, BLOCK = 4, 10, 4


def example() -> dict[str, torch.Tensor]:
    """G, its folded block means, their unfolding and the residual R = G - unfold(blockmean(G))."""
    gen = torch.Generator().manual_seed(7)
    grad = torch.randn(ROWS, N, generator=gen).round(decimals=1)
    folded = block_mean(grad, BLOCK)
    unfolded = unfold(folded, N, BLOCK)
    return {"G": grad, "folded": folded, "unfolded": unfolded, "R": grad - unfolded}


def _panel(ax: Axes, values: torch.Tensor, title: str, vmax: float, boundaries: list[float]) -> None:
    ax.imshow(values.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="equal")
    for (i, j), v in zip(
        ((i, j) for i in range(values.shape[0]) for j in range(values.shape[1])), values.flatten().tolist()
    ):
        color = "white" if abs(v) > 0.6 * vmax else "black"  # readable on the darkest cells
        ax.text(j, i, f"{v:.2f}".replace("-0.00", "0.00"), ha="center", va="center", fontsize=7.5, color=color)
    for x in boundaries:
        ax.axvline(x, color="black", linewidth=1.6)
    ax.set_title(title, fontsize=9.5)
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))
    ax.tick_params(labelsize=6, length=0)


def fold_unfold(path: Path) -> None:
    parts = example()
    vmax = float(parts["G"].abs().max())
    # Block boundaries of the full-width panels: after columns 3 and 7 (0-based), i.e. at x = 3.5 and 7.5.
    edges = [k * BLOCK - 0.5 for k in range(1, -(-N // BLOCK))]
    # 2 x 2: the input and what is stored on top, what the step rebuilds from them below.
    fig, axes = plt.subplots(2, 2, figsize=(10, 4.4), gridspec_kw={"hspace": 0.35, "wspace": 0.08})
    _panel(axes[0, 0], parts["G"], f"gradient G ({ROWS}×{N}), B = {BLOCK}: blocks of {BLOCK} columns", vmax, edges)
    _panel(axes[0, 1], parts["folded"], f"fold: block means, {ROWS}×⌈{N}/{BLOCK}⌉ = {ROWS}×3 (stored)", vmax, [])
    _panel(axes[1, 0], parts["unfolded"], "unfold: each mean repeated over its block", vmax, edges)
    _panel(axes[1, 1], parts["R"], "residual R = G − unfold(fold(G)): sums to 0 in each block", vmax, edges)
    fig.savefig(path, dpi=130, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    fold_unfold(args.output_dir / "fold_unfold.png")


if __name__ == "__main__":
    main()
