"""The few collectives labelkit uses, written once for the solver and the training loop.

Every function takes a ``torch.distributed`` process group, or None for one process, where it returns its input
unchanged: callers never test whether they run distributed."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["all_reduce", "all_gather", "all_gather_tensors", "gather_arrays", "gather_chunks", "broadcast", "rank",
           "world_size"]


def _dist():
    import torch.distributed as dist

    return dist


def all_reduce(tensor: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """``tensor`` reduced in place over the ranks of ``group`` by ``op`` (``"sum"``, ``"max"`` or ``"min"``)."""
    if group is not None:
        dist = _dist()
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                    "min": dist.ReduceOp.MIN}[op], group=group)
    return tensor


def all_gather(value: Any, group) -> list:
    """Every rank's ``value`` (any picklable object), in rank order; ``[value]`` in one process."""
    if group is None:
        return [value]
    dist = _dist()
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, value, group=group)
    return parts


def all_gather_tensors(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (the same shape and dtype on each), in rank order; ``[tensor]`` in one process.
    Unlike :func:`all_gather`, nothing is pickled: what a training step gathers goes as it is."""
    if group is None:
        return [tensor]
    dist = _dist()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def gather_arrays(group, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every rank's ``arrays`` (of one length on a rank, lengths differing between ranks), each concatenated
    along its first axis in rank order; the arrays themselves in one process. They go as tensors padded to the
    longest rank's, one array at a time, not pickled: a pickled gather holds every rank's arrays several times
    over (at 10 M rows, gigabytes on every rank)."""
    if group is None:
        return arrays
    counts = [int(c) for c in all_gather_tensors(torch.tensor([len(arrays[0])]), group)]
    gathered = []
    for array in arrays:
        mine = torch.from_numpy(np.ascontiguousarray(array))
        padded = torch.zeros((max(counts), *array.shape[1:]), dtype=mine.dtype)
        padded[: len(array)] = mine
        parts = all_gather_tensors(padded, group) if max(counts) else [padded] * len(counts)
        del padded
        gathered.append(np.concatenate([part[:count].numpy() for part, count in zip(parts, counts)]))
        del parts
    return tuple(gathered)


def gather_chunks(group, *arrays: np.ndarray, rows: int = 1 << 20):
    """:func:`gather_arrays` a chunk of ``rows`` rows of every rank at a time: yields the gathered arrays of each
    chunk, so that a rank never holds every rank's whole arrays (at 10 M rows a label step's rows, labels and
    scores gathered whole held 0.3 GB on every rank). Every rank gets the same number of chunks."""
    if group is None:
        yield arrays
        return
    longest = max(int(c) for c in all_gather_tensors(torch.tensor([len(arrays[0])]), group))
    for start in range(0, max(longest, 1), rows):
        yield gather_arrays(group, *(array[start:start + rows] for array in arrays))


def broadcast(value: Any, group) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if group is None:
        return value
    dist = _dist()
    box = [value if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def rank(group) -> int:
    return 0 if group is None else _dist().get_rank(group)


def world_size(group) -> int:
    return 1 if group is None else _dist().get_world_size(group)
