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
from ..quality import spherical_kmeans

__all__ = ["FeatureTrunk", "FeatureCache", "TableRows", "head_draws", "head_batches", "head_step", "neighbours", "weights_digest", "cached_views"]


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
