"""Figures people look at: curves (feature similarity per inversion step, paper Fig. 9) and image
grids (PCA of features, paper Fig. 6).

Matplotlib's object API without pyplot: no global figure state and no display backend, so it
runs on headless cluster nodes. Every PNG is written under a temporary name and renamed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

from stem.atomic import atomic_file

DPI = 120


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write `fig` to `path` as PNG, atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def plot_curves(path: str | Path, curves: Mapping[str, Sequence[float]], x: Sequence[float] | None = None,
                xlabel: str = "step", ylabel: str = "", title: str = "") -> Path:
    """One line per entry of `curves` ({label: values}) against `x` (default 1..len), saved as PNG."""
    if not curves or any(len(v) == 0 for v in curves.values()):
        raise ValueError(f"plot {Path(path).name}: every curve needs at least one value, got "
                         f"{ {k: len(v) for k, v in curves.items()} }")
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    for label, values in curves.items():
        xs = list(x) if x is not None else list(range(1, len(values) + 1))
        ax.plot(xs[:len(values)], list(values), marker="o" if len(values) <= 20 else None, markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def image_grid(path: str | Path, rows: Mapping[str, torch.Tensor], col_labels: Sequence[str] | None = None,
               title: str = "") -> Path:
    """A grid of images: one row per entry of `rows` ({label: (F, 3, h, w) in [0, 1]}), saved as PNG.

    Rows may differ in resolution (input frames beside feature maps); each image is shown at the
    same cell size with nearest-neighbour interpolation, so feature cells stay visible.
    """
    if not rows:
        raise ValueError(f"image grid {Path(path).name}: no rows to draw")
    cols = max(len(v) for v in rows.values())
    fig = Figure(figsize=(1.8 * cols + 0.6, 1.8 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image grid {Path(path).name}: row {label!r} must be (F, 3, h, w), got "
                             f"{tuple(images.shape)}")
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(),
                          interpolation="nearest")
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0 and col_labels is not None and c < len(col_labels):
                ax.set_title(col_labels[c], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_png(fig, path)
