"""Figures, drawn headless: the one place matplotlib is set up, and the cluster-size figure that both the report
and the Hub card show."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .files import atomic_path

__all__ = ["headless_pyplot", "sizes_figure"]


def headless_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sizes_figure(sizes: list[np.ndarray], path: str | os.PathLike) -> Path:
    """Cluster sizes of every head, largest first (log scale): equal sizes are a flat line, a long tail a
    slope, empty clusters a drop to the axis."""
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for head, size in enumerate(sizes):
        ordered = np.sort(np.asarray(size))[::-1]
        ax.plot(np.arange(1, len(ordered) + 1), np.maximum(ordered, 0.5), linewidth=1.2,
                label=f"head {head} (K={len(ordered)})")
    ax.set(xscale="log", yscale="log", xlabel="cluster rank", ylabel="samples", title="cluster sizes, largest first")
    ax.legend(frameon=False, fontsize=8, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
