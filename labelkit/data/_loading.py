"""From a :class:`~labelkit.data.Source` to batches: transforms, torch datasets and loaders.

Every batch is ``(indices, images, bad)``: positions in ``source.ids``, a float tensor, and ``(index, reason)``
of samples that could not be decoded -- those are skipped and counted, or fail at once under ``strict``.
A labelling pass (``shuffle=False``) visits every sample exactly once across ranks and workers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ._source import DecodeError, ReadFailure, Source
from ..errors import DataError

__all__ = ["Order", "make_loader", "SkipLog", "rank_slice", "batches_per_rank"]


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (1 << 63)


def _transform(transform, image, seed: int):
    """Apply ``transform`` with torch's RNG seeded for this one sample: a sample's augmentation depends on
    (seed, epoch, sample) only -- not on the worker that loads it, the batch it lands in or where a run
    resumed -- and the caller's own RNG stream is left as it was."""
    # torch.manual_seed would also walk every accelerator's seeding hooks (~0.3 ms a call, more than a small
    # image's whole transform); torchvision's RandomChoice/RandomOrder draw from Python's random
    generator, state, py_state = torch.default_generator, torch.default_generator.get_state(), random.getstate()
    generator.manual_seed(seed)
    random.seed(seed)
    try:
        return transform(image)
    finally:
        generator.set_state(state)
        random.setstate(py_state)


def rank_slice(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's share of ``indices``: disjoint, covering, no padding (sizes differ by at most one)."""
    return indices[rank::world]


class _MapDataset(Dataset):
    def __init__(self, source: Source, indices: np.ndarray, transform, seed: int, epoch: int):
        self.source, self.indices, self.transform = source, indices, transform
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = int(self.indices[j])
        try:
            image = self.source.load(i)
        except DecodeError as exc:
            return i, None, f"cannot decode: {exc}"
        except OSError as exc:  # after retries: reported to the main process, which stops the run
            return i, None, ReadFailure(f"{type(exc).__name__}: {exc}")
        return i, _transform(self.transform, image, _sample_seed(self.seed, self.epoch, i)), None


@dataclass(frozen=True, eq=False)
class Order:
    """Which samples one pass of a loader reads, in which order, and where it starts.

    Attributes:
        batch_size: samples per batch.
        shuffle: a training pass (seeded by ``seed`` and ``epoch``); ``False`` for a labelling pass, which sees
            every kept sample exactly once across ``world`` ranks and the loader's workers.
        seed, epoch: what the order and every sample's augmentation are drawn from.
        rank, world: this process's share of the pass.
        keep: boolean mask over samples; others are not read (e.g. samples skipped before).
        skip_batches: start the pass at this batch of this rank's order (resuming mid-epoch): exact for
            arrays and folders; for shards exact while every worker still has samples.
        shuffle_buffer: samples a shard stream shuffles within (training passes).
    """

    batch_size: int
    shuffle: bool = False
    seed: int = 0
    epoch: int = 0
    rank: int = 0
    world: int = 1
    keep: np.ndarray | None = None
    skip_batches: int = 0
    shuffle_buffer: int = 2000


class _ShardDataset(IterableDataset):
    """Streams shards; each (rank, worker) reads a disjoint part, shards when there are enough of them."""

    def __init__(self, source, transform, order: Order):
        self.source, self.transform = source, transform
        self.rank, self.world, self.keep = order.rank, order.world, order.keep
        self.shuffle_buffer = order.shuffle_buffer if order.shuffle else 0
        self.seed, self.epoch = order.seed, order.epoch
        self.batch_size, self.skip_batches = order.batch_size, order.skip_batches

    def _skipped_here(self, workers: int, worker: int) -> int:
        """Samples this worker drops to resume at batch ``skip_batches``: the DataLoader takes batches from
        the workers in turn, so worker w made batches w, w + W, ... of those already trained on."""
        done = len(range(worker, self.skip_batches, workers))
        return done * self.batch_size

    def _stream(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        order_seed = self.seed * 1000 + self.epoch if self.shuffle_buffer else None
        urls, every, part = _shard_part(self.source.urls, self.rank, self.world, workers, worker, order_seed)
        for n, (i, image, reason) in enumerate(self.source.iter_samples(urls)):
            if every is not None and n % every != part:
                continue
            if self.keep is not None and not self.keep[i]:
                continue
            yield i, image, reason

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        stream = self._stream()
        if self.shuffle_buffer:
            from webdataset import filters

            seed = (self.seed * 1000 + self.epoch) * 7919 + worker + 131 * self.rank
            stream = filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 4, seed=seed)(stream)
        skip = self._skipped_here(workers, worker)
        for n, (i, image, reason) in enumerate(stream):
            if n < skip:
                continue
            if image is None:
                yield i, None, reason
                continue
            try:
                yield i, _transform(self.transform, image, _sample_seed(self.seed, self.epoch, i)), None
            except Exception as exc:
                yield i, None, f"cannot transform: {exc}"


def _shard_part(urls, rank: int, world: int, workers: int, worker: int, order_seed: int | None):
    """The shards one (rank, worker) reads, as ``(urls, every, part)``: whole shards when there are enough for
    every reader (in a seeded order for training passes), else every shard with each reader keeping the
    samples at stream positions ``n % every == part``."""
    parts, part = world * workers, rank * workers + worker
    urls = list(urls)
    if order_seed is not None:
        np.random.default_rng(order_seed).shuffle(urls)
    if len(urls) >= parts:
        return urls[part::parts], None, part
    return urls, parts, part


def batches_per_rank(source: Source, keep: np.ndarray | None, batch_size: int, *, world: int = 1, workers: int = 0,
                     seed: int = 0, epoch: int = 0, shuffle: bool = False) -> int:
    """Batches of ``batch_size`` that every rank of a pass can take -- the fewest any rank has, since ranks
    step together: the length of a training epoch for its learning-rate schedule and progress bar."""
    kept = np.ones(len(source), dtype=bool) if keep is None else keep
    if source.map_style:
        return max(1, math.ceil(int(kept.sum()) // world / batch_size))
    readers = max(1, workers)
    order_seed = seed * 1000 + epoch if shuffle else None
    fewest = None
    for rank in range(world):
        batches = 0
        for worker in range(readers):  # each worker batches its own stream
            urls, every, part = _shard_part(source.urls, rank, world, readers, worker, order_seed)
            rows = np.concatenate([source.members[url] for url in urls]) if urls else np.zeros(0, np.int64)
            if every is not None:
                rows = rows[part::every]
            batches += math.ceil(int(kept[rows].sum()) / batch_size)
        fewest = batches if fewest is None else min(fewest, batches)
    return max(1, fewest)


def _collate(batch):
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, reason) for i, x, reason in batch if x is None]
    indices = torch.tensor([i for i, _ in good], dtype=torch.long)
    images = torch.stack([x for _, x in good]) if good else None
    return indices, images, bad


@dataclass
class SkipLog:
    """Bad samples met during a pass, by id; under ``strict`` the first one raises :class:`DataError`."""

    source: Source
    strict: bool = False
    skipped: dict = field(default_factory=dict)

    def add(self, bad: list[tuple[int, str]]) -> None:
        for i, reason in bad:
            sample_id = self.source.ids[i]
            if isinstance(reason, ReadFailure):
                raise DataError(f"{self.source.spec}: cannot read sample {sample_id!r} ({reason}), tried 3 times; "
                                "stopped here (the last checkpoint stays: fix the storage and --resume)")
            if self.strict:
                raise DataError(f"{self.source.spec}: bad sample {sample_id!r}: {reason} (drop --strict to skip)")
            self.skipped[sample_id] = reason

    def mask(self) -> np.ndarray:
        """Boolean mask over the source's samples: True where a sample was skipped."""
        bad = np.zeros(len(self.source), dtype=bool)
        bad[self.source.positions_of(list(self.skipped))] = True
        return bad

    def as_list(self) -> list[dict]:
        return [{"sample_id": k, "reason": v} for k, v in sorted(self.skipped.items())]

    def __len__(self) -> int:
        return len(self.skipped)


def make_loader(source: Source, transform, order: Order, workers: int = 0, device: torch.device | None = None):
    """A loader over ``source`` yielding ``(indices, images, bad)``, reading the samples of ``order``.

    Random augmentation is drawn per sample from (seed, epoch, sample), so it does not depend on ``workers``.
    A source whose images were decoded once (``source.decoded``, see :func:`labelkit.data.keep_decoded`) with a transform
    that has a batch form (``transform.batch``) is read from memory and transformed a batch at a time, on
    ``device`` if given (the images then come on it).
    """
    decoded, batch = getattr(source, "decoded", None), getattr(transform, "batch", None)
    if source.map_style and decoded is not None and batch is not None:
        return _DecodedLoader(decoded, batch, _map_indices(source, order), order, device)
    generator = torch.Generator().manual_seed(order.seed * 100003 + order.epoch)
    common = dict(batch_size=order.batch_size, num_workers=workers, collate_fn=_collate, drop_last=False,
                  generator=generator, persistent_workers=False, pin_memory=torch.cuda.is_available())
    if source.map_style:
        indices = _map_indices(source, order)
        return DataLoader(_MapDataset(source, indices, transform, order.seed, order.epoch), shuffle=False, **common)
    return DataLoader(_ShardDataset(source, transform, order), **common)


def _map_indices(source: Source, order: Order) -> np.ndarray:
    """The samples this rank reads in a pass of ``order``, in order, from its starting batch."""
    indices = np.arange(len(source)) if order.keep is None else np.flatnonzero(order.keep)
    if order.shuffle:
        indices = np.random.default_rng([order.seed, order.epoch]).permutation(indices)
    return rank_slice(indices, order.rank, order.world)[order.skip_batches * order.batch_size:]


class _DecodedLoader:
    """Batches of decoded images (:class:`~labelkit.data.Decoded`) through a batch transform, in the order and
    with the per-sample seeds of the per-sample path."""

    def __init__(self, decoded, transform, indices: np.ndarray, order: Order, device: torch.device | None):
        self.decoded, self.transform, self.indices, self.order = decoded, transform, indices, order
        self.device = device
        self.unreadable = np.zeros(len(decoded.pixels), dtype=bool)
        self.unreadable[list(decoded.bad)] = True

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.order.batch_size)

    def __iter__(self):
        size, base = self.order.batch_size, _sample_seed(self.order.seed, self.order.epoch, 0)
        for start in range(0, len(self.indices), size):
            chunk = self.indices[start:start + size]
            failed = self.unreadable[chunk]
            bad = [(int(i), self.decoded.bad[int(i)]) for i in chunk[failed]]
            good = chunk[~failed]
            if len(good) == 0:
                yield torch.zeros(0, dtype=torch.long), None, bad
                continue
            seeds = (np.uint64(base) + good.astype(np.uint64)) % np.uint64(1 << 63)  # _sample_seed of each
            pixels = self.decoded.batch(good)
            images = self.transform(pixels if self.device is None else pixels.to(self.device, non_blocking=True), seeds)
            yield torch.from_numpy(good.astype(np.int64)), images, bad
