"""Figures people look at (matplotlib, headless backend)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .._util.figures import headless_pyplot, sizes_figure
from .._util.files import atomic_path

__all__ = ["metrics_figure", "sizes_figure", "headless_pyplot"]


def metrics_figure(sizes: list[np.ndarray], scores: dict, path: str | os.PathLike) -> Path:
    """Cluster-size histogram and per-cluster entropy histogram, one row per head."""
    plt = headless_pyplot()
    heads = scores["heads"]
    fig, axes = plt.subplots(len(heads), 2, figsize=(10, 3.2 * len(heads)), squeeze=False)
    for row, (head, size) in enumerate(zip(heads, sizes)):
        ax = axes[row, 0]
        ax.hist(size, bins=min(50, max(10, len(size) // 4)), color="#3b6ea8")
        ax.axvline(size.mean(), color="k", linestyle="--", linewidth=1, label=f"N/K = {size.mean():.1f}")
        ax.set(title=f"head {head['head']}: cluster sizes (K={head['k']}, empty={head['empty']}), NMI {head['nmi']:.3f}",
               xlabel="samples per cluster", ylabel="clusters")
        ax.legend(frameon=False)
        ax = axes[row, 1]
        hist = head.get("entropy_hist")
        if hist:
            edges = np.asarray(hist["edges"])
            ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="#c0504d")
            ax.set(title=f"class entropy inside clusters (mean {head['entropy_mean']:.2f} nats)",
                   xlabel="entropy (nats)", ylabel="clusters")
        else:
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)
    return path
