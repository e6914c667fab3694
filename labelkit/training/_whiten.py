"""PCA whitening of fixed features, and the whitened views that the heads train on.

The heads read fixed features through one linear map fitted once (:class:`Whiten`): the top principal
directions, scaled to unit variance, kept as they are, or both at once (``--whiten``), after each column
is scaled to unit variance where the columns are in different units (``--standardize``). The map is stored
with the heads, so that ``predict`` repeats it; the views pass through it once, into memory or a float16 file.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import DataError
from ..solver import FeatureFile, write_features
from ._config import column_scaling

__all__ = ["Whiten", "ViewsOnDisk", "whitened_views", "whitened_storage", "column_scale", "SPREAD_LIMIT"]


# Columns in different units (a table of measurements: a few grams beside thousands of milligrams) make any
# distance measure the widest columns alone. Where the widest column's standard deviation is more than this
# many times the median column's, --standardize auto scales every column to unit variance first (as a user of
# such a table would). On the 22 tables of bench/suite.py the ratio is 1.0-8.8 for pixels, networks' features,
# HOG descriptors and colour histograms, 2.2 for iris, and 388 and 7,829 for the wine and breast-cancer
# measurements; scaled, labelkit's NMI on those two went from 0.386 / 0.443 to 0.805-0.892 / 0.720.
SPREAD_LIMIT = 100.0


def column_scale(variances: np.ndarray, mode: str) -> tuple[np.ndarray | None, float]:
    """The columns' standard deviations, by which each is divided, when ``mode`` is "yes", or "auto" and the
    widest is more than :data:`SPREAD_LIMIT` times the median (None otherwise); and that ratio. Columns of
    (almost) no variance are left out of the median and keep a scale of 1: scaled up, they would be noise."""
    spread = np.sqrt(np.maximum(np.asarray(variances, dtype=np.float64), 0.0))
    varying = spread > spread.max() * 1e-6
    ratio = float(spread.max() / np.median(spread[varying])) if varying.any() else 1.0
    if mode == "no" or (mode == "auto" and ratio <= SPREAD_LIMIT):
        return None, ratio
    return np.where(varying, spread, 1.0), ratio


class Whiten(nn.Module):
    """A fixed PCA whitening, ``(x - mean) @ projection``: the top ``dim`` principal directions, each scaled
    to unit variance (or as :meth:`fit`'s ``scale`` says). Fitted once on the features; stored with the heads so
    that ``predict`` repeats it."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("projection", torch.eye(in_dim, dim))
        self.num_features = self.head_hidden_size = dim

    @classmethod
    def fit(cls, features, dim: int | None, seed: int = 0, sample: int = 100_000,
            scale: str = "yes", variance: float = 0.98, cap: int = 128, rows: np.ndarray | None = None,
            columns: str = "no") -> "Whiten":
        """Fit on (a seeded sample of at most ``sample`` rows of) ``features`` (a tensor, or anything that
        gives a tensor for an index array and has ``shape``), or of its ``rows`` when given. ``dim`` None keeps
        the directions that hold ``variance`` of the total, at most ``cap`` (whitening gives every kept
        direction unit variance, so directions of mere noise would weigh as much as the rest); 0 keeps every
        direction with non-negligible variance. ``scale`` "yes" whitens; "no" keeps the directions' own
        variances (one common factor brings the largest to 1): a projection, not a whitening; "both" gives the
        geometry of the two side by side, the whitened one scaled to the same total variance as the other so that
        neither outweighs the other in a distance, in ``dim`` features (see the code's comment). ``columns``
        (see :func:`column_scale`) first scales each column to unit variance, folded into the projection;
        ``columns`` on the fitted module says whether it did and the columns' spread ratio, ``column_scale`` by
        what it divided them (or None)."""
        rows = np.arange(features.shape[0]) if rows is None else np.asarray(rows)
        n, in_dim = len(rows), features.shape[1]
        picked = rows[np.sort(np.random.default_rng(seed).choice(n, min(n, sample), replace=False))]
        x = features[torch.from_numpy(picked)].float()
        mean = x.double().mean(0)
        centred = x - mean.float()
        # the covariance product in float32 (the cost), its eigenvectors in float64
        covariance = (centred.T @ centred).double().numpy() / max(len(x) - 1, 1)
        divisors, ratio = column_scale(np.diag(covariance), columns)
        if divisors is not None:  # the covariance of the scaled columns
            covariance = covariance / np.outer(divisors, divisors)
        values, vectors = np.linalg.eigh(covariance)  # ascending
        values, vectors = torch.from_numpy(values[::-1].copy()), torch.from_numpy(vectors[:, ::-1].copy())
        useful = int((values > values[0] * 1e-6).sum())
        if dim is None:
            share = torch.cumsum(values.clamp_min(0), 0) / values.clamp_min(0).sum()
            dim = min(cap, int((share < variance).sum()) + 1)
        dim = min(dim or in_dim, useful, len(picked) - 1 if len(picked) > 1 else 1)
        directions, variances = vectors[:, :dim], values[:dim].clamp_min(1e-12)
        kept = directions / values[0].sqrt()
        white = directions / variances.sqrt()
        equal2 = values[:dim].clamp_min(0).sum() / values[0] / dim  # ``white`` times its root: ``kept``'s total variance
        # [kept, white * sqrt(equal2)] side by side map each direction twice; one map of it, scaled by the length
        # of the pair, gives every dot product and distance of the two (an isometry) at half the width
        both = directions * (1 / values[0] + equal2 / variances).sqrt()
        projection = {"yes": white, "no": kept, "both": both}[scale]
        if divisors is not None:
            projection = projection / torch.from_numpy(divisors)[:, None]
        whiten = cls(in_dim, projection.shape[1])
        whiten.columns = {"standardized": divisors is not None, "spread": round(ratio, 1)}
        whiten.column_scale = divisors
        whiten.mean.copy_(mean.float())
        whiten.projection.copy_(projection.float())
        return whiten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.projection


# the whitened views stay in memory as float32 up to this size, as float16 up to a quarter of the available
# memory (10 M x 128: 2.6 GB), and beyond that go to a float16 file in the run folder, read a batch at a time
# (each batch's random rows are then as many positional reads: measured 4x slower an epoch at 10 M)
WHITENED_IN_MEMORY = 1 << 30


def whitened_storage(count: int, n: int, width: int) -> str:
    """Where ``count`` whitened views of ``n`` x ``width`` go: ``float32`` or ``float16`` in memory, or ``disk``."""
    from ..solver import available_memory

    if count * n * width * 4 <= WHITENED_IN_MEMORY:
        return "float32"
    return "float16" if count * n * width * 2 <= available_memory() // 4 else "disk"


_BLOCK = 65536  # rows per block of a pass over the features


def whitened_views(views, keep: np.ndarray, config, scale: str, reporter=None,
                   shard=None) -> tuple[Whiten, torch.Tensor | ViewsOnDisk, dict]:
    """The whitening fitted on the plain view, and every view through it, block by block into one (V, N, width)
    tensor that the heads train on -- float32 or float16, or a float16 file, as :func:`whitened_storage` says.
    ``scale`` is :meth:`Whiten.fit`'s (see :func:`feature_scaling`).
    Under torchrun (a :class:`~labelkit.training._sharded.Shard`), rank 0 fits the whitening and every rank
    whitens its own rows only (:class:`~labelkit.training._sharded.ShardedViews`). Also returns the history's
    record of the pass."""
    from ._sharded import ShardedViews

    began = time.perf_counter()
    whiten = None
    if shard is None or shard.dist.main:
        whiten = Whiten.fit(views[0], config.pca, config.seed, rows=np.flatnonzero(keep), scale=scale,
                            columns=column_scaling(config))
    if shard is not None:
        whiten = shard.dist.broadcast(whiten)
    if whiten.num_features == 0:
        raise DataError(f"{config.data}: every vector is the same (no direction varies), so there is nothing to "
                        "cluster")
    count, n, width = len(views), len(views[0]), whiten.num_features
    held = n if shard is None else len(shard.rows)
    blocks = [(v, i) for v in range(count) for i in range(0, held, _BLOCK)]
    if reporter is not None:
        reporter.phase("whiten", len(blocks))

    def whitened_blocks():
        with torch.no_grad():
            for v, i in blocks:
                rows = slice(i, i + _BLOCK) if shard is None else shard.rows[i:i + _BLOCK]
                yield whiten(views[v][rows].float())
                if reporter is not None:
                    reporter.advance()

    storage = whitened_storage(count, held, width)
    if storage != "disk":
        whitened = torch.empty((count, held, width), dtype=torch.float32 if storage == "float32" else torch.float16)
        for (v, i), block in zip(blocks, whitened_blocks()):
            whitened[v, i:i + _BLOCK] = block
    else:  # derived from the table and the whitening: rewritten by a resume
        path = Path(config.out) / ("whitened.npy" if shard is None else f"whitened-rank{shard.dist.rank}.npy")
        whitened = ViewsOnDisk(FeatureFile(write_features(path, whitened_blocks(), count * held, width)), count)
    if reporter is not None:
        reporter.end_phase()
    record = {"type": "whiten", "scaling": scale, "columns": whiten.columns, "width": width, "seconds": round(time.perf_counter() - began, 2),
              "where": "disk" if storage == "disk" else f"memory ({storage})"}
    if shard is not None:  # what this rank (rank 0 writes the history) holds of the rows
        record.update(rows=held, ranks=shard.dist.world)
    return whiten, whitened if shard is None else ShardedViews(whitened, shard, n), record


class ViewsOnDisk:
    """(V, N, D) whitened views kept as a float16 file (a :class:`~labelkit.solver.FeatureFile` of V x N rows)
    instead of in memory, indexed as the tensor they stand for: ``views[v]`` is view v's rows (read with
    ``[a:b]`` or ``[rows]``, any order), ``views[v_of_each, rows]`` one view per row. What a table too large
    for memory trains on: each batch reads its rows, and the pages stay in the OS cache, not the process."""

    def __init__(self, file, views: int):
        self.file = file
        self.shape = (views, len(file) // views, file.dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, tuple):
            view, rows = (np.asarray(i, dtype=np.int64) for i in index)
            return _read_rows(self.file, view * self.shape[1] + rows)
        return _ViewRows(self, int(index))


class _ViewRows:
    def __init__(self, views: ViewsOnDisk, view: int):
        self.views, self.first = views, view * views.shape[1]
        self.shape = views.shape[1:]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self.views.file[self.first + start:self.first + max(start, stop)].float()
            index = np.arange(start, stop, step)
        return _read_rows(self.views.file, self.first + np.asarray(index, dtype=np.int64))


def _read_rows(file, positions: np.ndarray) -> torch.Tensor:
    """float32 rows of ``file`` at ``positions`` in any order (read ascending, as runs of consecutive rows)."""
    order = np.argsort(positions, kind="stable")
    out = torch.empty((len(positions), file.dim), dtype=torch.float32)
    out[torch.from_numpy(order)] = file.take(positions[order]).float()
    return out
