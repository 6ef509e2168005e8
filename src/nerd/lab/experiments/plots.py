"""Small matplotlib helpers shared by the experiments' figures (imported only when a figure is drawn)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def learning_curves(ax: Any, curves: Mapping[str, Sequence[Mapping[str, float]]], title: str = "") -> None:
    """Validation PSNR (held-out training images) against the optimiser step, one line per variant."""
    for name, rows in curves.items():
        if rows:
            ax.plot([r["step"] for r in rows], [r["val_psnr"] for r in rows], marker="o", ms=3, label=name)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("validation PSNR (dB)")
    ax.set_title(title or "learning curves (held-out Train400 images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def paper_vs_ours(ax: Any, paper: Mapping[str, float | None], ours: Mapping[str, float], title: str = "",
                  ylabel: str = "PSNR - mean of the variants (dB)") -> None:
    """Grouped bars: each variant's PSNR relative to the mean of its group, the paper's and ours side by side
    (absolute levels differ with the scale; the ordering is what is compared)."""
    names = list(ours)
    width = 0.38
    xs = range(len(names))
    p = [paper.get(n) for n in names]
    known = [v for v in p if v is not None]
    if known:
        mp = sum(known) / len(known)
        ax.bar([x - width / 2 for x in xs], [0 if v is None else v - mp for v in p], width, label="paper")
    mo = sum(ours.values()) / max(1, len(ours))
    ax.bar([x + width / 2 for x in xs], [ours[n] - mo for n in names], width, label="ours")
    ax.set_xticks(list(xs), names, rotation=20, fontsize=8)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Set12 test PSNR, relative")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
