"""SeLa on fixed features: a frozen backbone's cached views, or an embedding table.

With the backbone fixed, step 1 of SeLa trains the T heads only and step 2 solves on the same features, so
the features are computed once: V views per image (the plain view, then V - 1 augmented ones standing in for
augmentation), stored as float16 in a memory-mapped cache keyed by everything they depend on. The heads read
PCA-whitened features: whitening makes every direction of the feature space count the same (what clustering
of pretrained features needs: raw features are dominated by a few high-variance directions), and the reduced
width is what makes 50 epochs over 100,000 samples take minutes on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._util.files import atomic_path
from ..data import Order
from ..errors import DataError
from ..solver import FeatureFile, write_features
from ..quality import spherical_kmeans

__all__ = ["Whiten", "FeatureTrunk", "FeatureCache", "TableRows", "ViewsOnDisk", "whitened_views", "whitened_storage", "head_draws", "head_batches", "head_step", "neighbours", "weights_digest", "cached_views"]


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
            scale: str = "yes", variance: float = 0.98, cap: int = 128, rows: np.ndarray | None = None) -> "Whiten":
        """Fit on (a seeded sample of at most ``sample`` rows of) ``features`` (a tensor, or anything that
        gives a tensor for an index array and has ``shape``), or of its ``rows`` when given. ``dim`` None keeps
        the directions that hold ``variance`` of the total, at most ``cap`` (whitening gives every kept
        direction unit variance, so directions of mere noise would weigh as much as the rest); 0 keeps every
        direction with non-negligible variance. ``scale`` "yes" whitens; "no" keeps the directions' own
        variances (one common factor brings the largest to 1): a projection, not a whitening; "both" gives the
        two side by side (``2 * dim`` features), the whitened half scaled to the same total variance as the
        other, so that neither outweighs the other in a distance."""
        rows = np.arange(features.shape[0]) if rows is None else np.asarray(rows)
        n, in_dim = len(rows), features.shape[1]
        picked = rows[np.sort(np.random.default_rng(seed).choice(n, min(n, sample), replace=False))]
        x = features[torch.from_numpy(picked)].float()
        mean = x.double().mean(0)
        centred = x - mean.float()
        # the covariance product in float32 (the cost), its eigenvectors in float64
        covariance = (centred.T @ centred).double().numpy() / max(len(x) - 1, 1)
        values, vectors = np.linalg.eigh(covariance)  # ascending
        values, vectors = torch.from_numpy(values[::-1].copy()), torch.from_numpy(vectors[:, ::-1].copy())
        useful = int((values > values[0] * 1e-6).sum())
        if dim is None:
            share = torch.cumsum(values.clamp_min(0), 0) / values.clamp_min(0).sum()
            dim = min(cap, int((share < variance).sum()) + 1)
        dim = min(dim or in_dim, useful, len(picked) - 1 if len(picked) > 1 else 1)
        kept = vectors[:, :dim] / values[0].sqrt()
        white = vectors[:, :dim] / values[:dim].clamp_min(1e-12).sqrt()
        equal = (values[:dim].clamp_min(0).sum() / values[0] / dim).sqrt()  # the total variance of ``kept``
        projection = {"yes": white, "no": kept, "both": torch.cat([kept, white * equal], 1)}[scale]
        whiten = cls(in_dim, projection.shape[1])
        whiten.mean.copy_(mean.float())
        whiten.projection.copy_(projection.float())
        return whiten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.projection


class FeatureTrunk(nn.Module):
    """What the heads read from whitened features: the features themselves, or one hidden layer
    (Linear + BatchNorm + ReLU) when ``hidden`` is given (``--head-hidden``)."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        self.layer = (nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))
                      if hidden else nn.Identity())
        self.num_features = self.head_hidden_size = hidden or dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class TableRows:
    """An embedding table's vectors as the frozen loop reads them, without holding the table: ``rows[a:b]``
    and ``rows[index]`` read just those rows (float32) from the (memory-mapped) source."""

    def __init__(self, source):
        self.source = source
        self.shape = (len(source), int(source.dim))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        rows = index if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        block = self.source.vectors(rows)
        # a float32 table's run is a read-only view of its mapped file; torch wants memory it may write
        return torch.from_numpy(block if block.flags.writeable else block.copy())


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
        whiten = Whiten.fit(views[0], config.pca, config.seed, rows=np.flatnonzero(keep), scale=scale)
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
    record = {"type": "whiten", "scaling": scale, "width": width, "seconds": round(time.perf_counter() - began, 2),
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


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Views of features on disk: ``DIR/<key>.npy`` float16 (V, N, D), memory-mapped, plus ``<key>.json``
    recording what the key covers and which samples could not be read. A cache is used only when every part
    of its key matches; a partial or damaged file is never read (written under a temporary name, renamed when
    complete)."""

    def __init__(self, folder: str | Path, parts: dict):
        self.folder = Path(folder)
        self.parts = json.loads(json.dumps(parts, sort_keys=True))  # as it reads back from the record
        self.key = hashlib.sha256(json.dumps(self.parts, sort_keys=True).encode()).hexdigest()[:24]
        self.path = self.folder / f"{self.key}.npy"
        self.record = self.folder / f"{self.key}.json"

    def load(self) -> tuple[torch.Tensor, dict] | None:
        """(views, skipped samples) when a complete cache with exactly this key exists."""
        if not (self.path.is_file() and self.record.is_file()):
            return None
        try:
            record = json.loads(self.record.read_text())
            if record.get("parts") != self.parts:
                return None
            views = _read_only(self.path)
        except (ValueError, OSError):
            return None
        return views, dict(record.get("skipped", {}))

    def write(self, shape: tuple[int, int, int], fill, skipped) -> torch.Tensor:
        """Create the (V, N, D) float16 file, let ``fill(array)`` write it view by view (off the heap), then
        publish it with its record; ``skipped()`` gives the unreadable samples once it is filled."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
            fill(array)
            array.flush()
            del array
        with atomic_path(self.record) as tmp:
            Path(tmp).write_text(json.dumps({"parts": self.parts, "skipped": skipped()}, sort_keys=True, indent=1))
        return _read_only(self.path)

    def write_shared(self, shape: tuple[int, int, int], fill, skipped, dist) -> torch.Tensor:
        """:meth:`write` by every torchrun rank at once: rank 0 creates the file, each rank's ``fill`` writes
        its own rows into it, and rank 0 publishes it once all have. The folder must be one that every rank
        sees (the run folder is: the ranks share checkpoints through it)."""
        partial = self.path.with_name(self.path.name + ".partial")
        if dist.main:
            self.folder.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=shape).flush()
        dist.barrier()
        array = np.load(partial, mmap_mode="r+")
        fill(array)
        array.flush()
        del array
        found = skipped()  # a collective: every rank's unreadable samples
        dist.barrier()
        if dist.main:
            partial.replace(self.path)
            with atomic_path(self.record) as tmp:
                Path(tmp).write_text(json.dumps({"parts": self.parts, "skipped": found}, sort_keys=True, indent=1))
        dist.barrier()
        return _read_only(self.path)


def _read_only(path: Path) -> torch.Tensor:
    """A memory-mapped .npy as a tensor; the map is read-only and labelkit never writes through it."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.load(path, mmap_mode="r"))


def neighbours(features: torch.Tensor, k: int, *, exact_below: int = 50_000, seed: int = 0,
               block: int = 4096, probes: int = 32) -> torch.Tensor:
    """The ``k`` nearest neighbours (cosine) of every row, itself excluded: (N, k) int64.

    Exact (blocks of rows against all rows, memory block x N) up to ``exact_below`` rows, where its N^2 cost is
    still seconds; above, an inverted-file search: a spherical k-means makes about sqrt(N) cells, every row is
    listed under its ``probes`` nearest cells, and the rows whose nearest cell is c search the list of c. Two
    near rows are found when one's nearest cell is among the other's ``probes``; the cost is about
    probes x N^1.5 instead of N^2 (``bench/neighbours.py`` measures the recall and the time).
    """
    x = nn.functional.normalize(features.float(), dim=1)
    n = len(x)
    k = min(k, n - 1)
    if n <= exact_below:
        return _search(x, torch.arange(n), torch.arange(n), k, block)
    cells = max(2, round(math.sqrt(n)))
    probes = min(probes, cells)
    centres = spherical_kmeans(x, cells, seed, sample=min(n, 64 * cells), rounds=10)
    nearest = torch.cat([(x[i:i + 65536] @ centres.T).topk(probes, dim=1).indices for i in range(0, n, 65536)])
    listed = torch.argsort(nearest.reshape(-1), stable=True)  # (row, rank) pairs grouped by cell
    list_rows = listed // probes
    list_bounds = _bounds(nearest.reshape(-1), cells)
    home = torch.argsort(nearest[:, 0], stable=True)
    home_bounds = _bounds(nearest[:, 0], cells)
    out = torch.empty((n, k), dtype=torch.int64)
    for c in range(cells):
        members = home[home_bounds[c]:home_bounds[c + 1]]
        if len(members) == 0:
            continue
        candidates = list_rows[list_bounds[c]:list_bounds[c + 1]]
        if len(candidates) <= k:  # a stray tiny neighbourhood: search everything
            candidates = torch.arange(n)
        out[members] = _search(x, members, candidates, k, block)
    return out


def _bounds(cell: torch.Tensor, cells: int) -> torch.Tensor:
    """Where each cell's run starts and ends once ``cell`` is sorted: (cells + 1,)."""
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(cell, minlength=cells).cumsum(0)])


def _search(x: torch.Tensor, queries: torch.Tensor, candidates: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """The ``k`` most similar of ``candidates`` (ascending row numbers of ``x``) for each of ``queries``, self
    excluded."""
    pool = x[candidates]
    out = torch.empty((len(queries), k), dtype=torch.int64)
    for start in range(0, len(queries), block):
        rows = queries[start:start + block]
        sims = x[rows] @ pool.T
        own = torch.searchsorted(candidates, rows).clamp_max(len(candidates) - 1)  # where each query sits
        inside = torch.nonzero(candidates[own] == rows).squeeze(1)
        sims[inside, own[inside]] = -math.inf
        out[start:start + block] = candidates[sims.topk(k, dim=1).indices]
    return out


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``logits`` against integer ``target`` with one pass of exponentials: the forward
    pass keeps the softmax, and the gradient is that softmax minus the one-hot target. Same value and gradient
    as ``nn.functional.cross_entropy``, whose log-softmax backward takes the exponentials again -- on heads over
    cached features the exp passes are a large share of a step (``bench/frozen.py epoch`` times both)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        top = logits.amax(dim=1, keepdim=True)
        p = (logits - top).exp_()
        total = p.sum(dim=1, keepdim=True)
        p.div_(total)
        ctx.save_for_backward(p, target)
        ctx.used = False
        picked = logits.gather(1, target[:, None]) - top - total.log()  # log p of the target, without underflow
        return -picked.mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.used:
            raise RuntimeError("labelkit's cross_entropy turns its saved softmax into the gradient; backward runs once")
        ctx.used = True
        p, target = ctx.saved_tensors
        p[torch.arange(len(target)), target] -= 1  # in place: a copy of the softmax would cost most of the gain
        return p.mul_(grad / len(target)), None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, as ``nn.functional.cross_entropy`` with integer targets (see :class:`_CrossEntropy`)."""
    return _CrossEntropy.apply(logits, target)


def head_draws(count: int, keep: np.ndarray, near: torch.Tensor | None, config, epoch: int, min_batch: int = 1):
    """The draws of one epoch of the heads on ``count`` cached views: for each batch, its rows (numpy), the view
    of each row and each row's drawn neighbour (None without ``near``). A batch below ``min_batch`` samples
    draws nothing (view None: BatchNorm cannot train on one sample; the loop skips it). Everything comes from
    (seed, epoch), so a resumed epoch, and every torchrun rank, draws the same."""
    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(np.flatnonzero(keep))
    batch = config.batch_size
    for step in range(max(1, math.ceil(len(order) / batch))):
        rows = order[step * batch:(step + 1) * batch]
        if len(rows) < min_batch:
            yield rows, None, None
            continue
        view = rng.integers(0, count, len(rows))
        other = None if near is None else near[torch.from_numpy(rows),
                                               torch.from_numpy(rng.integers(0, near.shape[1], len(rows)))]
        yield rows, view, other


def head_batches(views: torch.Tensor, keep: np.ndarray, near: torch.Tensor | None, config, epoch: int, start: int = 0,
                 min_batch: int = 1):
    """Step 1 of SeLa with the backbone fixed: the batches of one epoch of the heads on cached (V, N, D) views,
    from batch ``start``, as ``(rows, (x, neighbours), [])``.

    Each sample is seen once, in one view drawn at random (the cached stand-in for augmentation). With
    ``near`` (N, k) neighbours, each sample also brings one random neighbour, trained towards the same labels
    at half the weight (SCAN's prior: neighbours in a good feature space share a class). A batch below
    ``min_batch`` samples comes without inputs (see :func:`head_draws`).
    """
    for step, (rows, view, other) in enumerate(head_draws(views.shape[0], keep, near, config, epoch, min_batch)):
        if step < start:
            continue
        rows = torch.from_numpy(rows)
        yield rows, None if view is None else (views[torch.from_numpy(view), rows].float(), other), []


def head_step(model: nn.Module, optimizer, rows: torch.Tensor, inputs: tuple, targets: torch.Tensor) -> float:
    """One optimiser step of the heads on samples ``rows``: cross-entropy averaged over heads towards their labels
    in ``targets`` (heads, N), and at half the weight towards the labels of each one's neighbour, if any."""
    x, other = inputs
    logits = model(x)
    loss = sum(cross_entropy(out, targets[h, rows]) for h, out in enumerate(logits))
    if other is not None:
        loss = loss + 0.5 * sum(cross_entropy(out, targets[h, other]) for h, out in enumerate(logits))
    loss = loss / len(logits)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _check_float16(features: torch.Tensor, what: str) -> None:
    """The float16 cache cannot hold finite values beyond 65,504 (they would become inf); NaN stays NaN for
    the solver to name."""
    largest = float(features.nan_to_num(nan=0.0).abs().max()) if features.numel() else 0.0
    if largest > float(np.finfo(np.float16).max):
        raise DataError(f"{what} reach {largest:.3g}, beyond float16's range (65,504), which the feature cache "
                        "holds; the backbone's outputs are not normalised (its weights may not fit it: check "
                        "--init), or give another --arch")


def cached_views(job, net: nn.Module, plain, augmented, dim: int) -> tuple[torch.Tensor, dict]:
    """(V, N, D) float16 features of a frozen ``net``: view 0 through ``plain``, views 1..V-1 through
    ``augmented`` (each sample's randomness drawn from (seed, view, sample)), from the cache when its key --
    data ids and content, arch, weights, transforms, views, seed -- matches exactly, else computed once and
    cached. Samples that could not be decoded go into the job's skip log either way. Returns the views and a
    record of where they came from."""
    from ._loop import autocast, extract_features

    config, source = job.config, job.source
    count = config.views
    parts = {"format": 1, "data": source.fingerprint, "content": source.content, "arch": config.arch,
             "weights": weights_digest(net), "plain": repr(plain), "views": count,
             "augmented": repr(augmented) if count > 1 else None, "seed": config.seed if count > 1 else None}
    cache = FeatureCache(config.feature_cache or Path(config.out) / "features", parts)
    found = cache.load()
    if found is not None:
        views, skipped = found
        job.skips.skipped.update(skipped)
        return views, {"type": "features", "cache": str(cache.path), "reused": True, "views": count}
    net = net.to(job.device).eval()
    started = time.perf_counter()

    dist = job.dist

    def fill(array):  # under torchrun each rank extracts its share of the samples, into the one file
        for v in range(count):
            order = Order(config.batch_size, seed=config.seed, epoch=v, keep=~job.skips.mask(), rank=dist.rank,
                          world=dist.world)

            def sink(rows: np.ndarray, out: torch.Tensor, v: int = v) -> None:
                _check_float16(out, f"--freeze: the {config.arch} features of view {v}")
                array[v, rows] = out.float().cpu().numpy()

            with autocast(job.device, config.precision):
                extract_features(net, dim, source, plain if v == 0 else augmented, order, workers=config.workers,
                                 device=job.device, skips=job.skips, reporter=job.reporter, sink=sink)

    def skipped() -> dict:  # every rank's
        job.merge_skips()
        return dict(job.skips.skipped)

    shape = (count, len(source), dim)
    views = cache.write(shape, fill, skipped) if dist.world == 1 else cache.write_shared(shape, fill, skipped, dist)
    return views, {"type": "features", "cache": str(cache.path), "reused": False, "views": count,
                   "seconds": round(time.perf_counter() - started, 1)}
