"""Heads on fixed features under ``torchrun``: each rank holds the whitened views of its own share of the rows
and no other, and the heads train as in one process.

A rank's share is a contiguous run of the kept rows (so that its reads of the table are sequential). Training
takes the batches one process would take, in the same order with the same random draws: every rank walks the
same global order, reads the rows of each batch that it holds, and the ranks gather the batch (a few hundred
KB a step) before every rank takes the same step on it. The heads then stay equal on every rank without a
gradient all-reduce, and BatchNorm in a hidden layer sees the whole batch, as in one process (torch's
SyncBatchNorm does not run on CPUs). The label step solves on each rank's own rows with the solver's
collectives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .._util import collectives
from ._distributed import Distributed

__all__ = ["Shard", "ShardedViews", "sharded_batches", "gathered_inputs", "row_share", "refuse_neighbours"]


@dataclass
class Shard:
    """This rank's share of the kept rows under torchrun: ``rows`` (sorted global indices), and the first
    global row of every rank's share, from which anyone can tell which rank holds a row."""

    dist: Distributed
    rows: np.ndarray
    firsts: np.ndarray

    @classmethod
    def of(cls, keep: np.ndarray, dist: Distributed) -> "Shard | None":
        """The shares of ``keep``'s rows, or None in one process (which holds every row)."""
        if dist.world == 1:
            return None
        kept = np.flatnonzero(keep)
        if len(kept) < dist.world:
            from ..errors import ConfigError

            raise ConfigError(f"{len(kept)} rows to label are fewer than the {dist.world} torchrun processes; "
                              "run fewer processes")
        parts = np.array_split(kept, dist.world)  # views of every kept row: the share is copied out of them
        return cls(dist, parts[dist.rank].copy(), np.array([part[0] for part in parts]))

    def owner(self, rows: np.ndarray) -> np.ndarray:
        """The rank that holds each of ``rows`` (kept rows only)."""
        return np.searchsorted(self.firsts, rows, side="right") - 1

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Where this rank's ``rows`` sit in its share; a row of another rank is a bug, never a wrong read."""
        rows = np.asarray(rows, dtype=np.int64)
        at = np.searchsorted(self.rows, rows)
        if len(rows) and (at.max() >= len(self.rows) or not np.array_equal(self.rows[at], rows)):
            raise RuntimeError(f"rank {self.dist.rank} was asked for rows it does not hold")
        return at

    def assemble(self, rows: np.ndarray, mine: torch.Tensor) -> torch.Tensor:
        """The features of every one of ``rows`` on every rank, from ``mine`` (this rank's rows among them, in
        their order in ``rows``): one all-gather, each rank's part padded to the largest."""
        who = self.owner(np.asarray(rows))
        counts = np.bincount(who, minlength=self.dist.world)
        padded = torch.zeros((int(counts.max()), mine.shape[1]), dtype=mine.dtype)
        padded[:len(mine)] = mine
        out = torch.empty((len(who), mine.shape[1]), dtype=mine.dtype)
        for rank, part in enumerate(collectives.all_gather_tensors(padded, self.dist.group)):
            out[torch.from_numpy(who == rank)] = part[:counts[rank]]
        return out


def refuse_neighbours(neighbours: int) -> None:
    """The neighbour term under torchrun: its search reads every vector, which no rank holds."""
    if neighbours:
        from ..errors import ConfigError

        raise ConfigError(f"--neighbours {neighbours}: the neighbour search reads every vector, which a torchrun "
                          "process does not hold; give --neighbours 0 under torchrun")


def row_share(n: int, dist: Distributed) -> slice:
    """This rank's contiguous share of ``n`` rows, for a pass that each rank makes over its part alone."""
    bounds = np.linspace(0, n, dist.world + 1).round().astype(np.int64)
    return slice(int(bounds[dist.rank]), int(bounds[dist.rank + 1]))


class ShardedViews:
    """(V, N, D) whitened views of which this rank holds only its share of the rows (``local``: a (V, n, D)
    tensor or :class:`~labelkit.training.ViewsOnDisk`). ``views[v][rows]`` reads rows this rank holds;
    :meth:`gathered` reads any rows, from whichever rank holds them (a collective: every rank calls it alike)."""

    def __init__(self, local, shard: Shard, n: int):
        self.local, self.shard = local, shard
        self.shape = (local.shape[0], n, local.shape[2])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, view: int) -> "_ViewRows":
        return _ViewRows(self, int(view), gather=False)

    def held(self, view: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """This rank's ``rows``, each in its own view (one per row)."""
        at = self.shard.positions(rows)
        if isinstance(self.local, torch.Tensor):
            return self.local[torch.from_numpy(np.asarray(view, dtype=np.int64)), torch.from_numpy(at)]
        return self.local[np.asarray(view, dtype=np.int64), at]

    def gathered(self, view: int) -> "_ViewRows":
        return _ViewRows(self, int(view), gather=True)


class _ViewRows:
    """One view's rows: this rank's own, or (``gather``) any rows, assembled from the ranks that hold them."""

    def __init__(self, views: ShardedViews, view: int, gather: bool):
        self.views, self.view, self.gather = views, view, gather
        self.shape = views.shape[1:]

    def __getitem__(self, rows) -> torch.Tensor:
        rows = np.asarray(rows, dtype=np.int64)
        if not self.gather:
            return self.views.held(np.full(len(rows), self.view), rows)
        shard = self.views.shard
        mine = rows[shard.owner(rows) == shard.dist.rank]
        return shard.assemble(rows, self.views.held(np.full(len(mine), self.view), mine).float())


def sharded_batches(views: ShardedViews, draws, start: int = 0):
    """The batches of :func:`~labelkit.training._frozen.head_draws` on a rank, from batch ``start``: each
    batch's global rows (the same on every rank) with this rank's part of its inputs, which
    :func:`gathered_inputs` gathers."""
    shard = views.shard
    for step, (rows, view, other) in enumerate(draws):
        if step < start:
            continue
        if view is None:
            yield torch.from_numpy(rows), None, []
            continue
        mine = shard.owner(rows) == shard.dist.rank
        yield torch.from_numpy(rows), (views.held(view[mine], rows[mine]).float(), other), []


def gathered_inputs(views: ShardedViews, rows: torch.Tensor, inputs: tuple) -> tuple:
    """A batch's inputs whole on every rank, from each rank's part."""
    mine, other = inputs
    return views.shard.assemble(rows.numpy(), mine), other
