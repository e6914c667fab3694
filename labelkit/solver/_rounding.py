"""Rounding the transport plan to labels under constraints: exact balance (every cluster floor(N/K) or ceil(N/K))
and the floor of relaxed balance."""

from __future__ import annotations

import heapq
import math

import numpy as np
import torch

from .._util import collectives
from ._kernel import _Logits

__all__ = ["balanced_labels", "floored_labels"]


def _candidates(source, potentials, lam, block, c) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``c`` best clusters under the plan and their log q(k | i) (comparable across rows)."""
    pot = torch.as_tensor(potentials, dtype=torch.float32)
    n = source.n
    top_logq = np.empty((n, c), dtype=np.float32)
    top_idx = np.empty((n, c), dtype=np.int32)  # 8 candidates a row: at 10 M rows int64 would hold 320 MB more
    for start in range(0, n, block):
        e = (source.block(start, start + block).float().cpu() * lam).add_(pot)
        e -= torch.logsumexp(e, dim=1, keepdim=True)
        values, idx = e.topk(c, dim=1)
        top_logq[start : start + block], top_idx[start : start + block] = values.numpy(), idx.numpy()
    return top_logq, top_idx


def _chunks(order: np.ndarray, scores: np.ndarray, size: int = 1 << 20):
    """(rows, their scores) of ``order``, as Python lists of ``size`` at a time."""
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        yield rows.tolist(), scores[rows].tolist()


def _log_q(source, rows: np.ndarray, potentials, lam) -> np.ndarray:
    """Full rows of log q(k | i) for a few ``rows``."""
    if len(rows) == 0:
        return np.zeros((0, source.k), dtype=np.float32)
    e = torch.cat([source.block(int(i), int(i) + 1).float().cpu() for i in rows]) * lam
    e += torch.as_tensor(potentials, dtype=torch.float32)
    return (e - torch.logsumexp(e, dim=1, keepdim=True)).numpy()


def _gather(group, *arrays):
    """Every rank's arrays (of equal length on a rank) concatenated in rank order, each array unchanged in one
    process. They go as tensors padded to the longest rank's, one array at a time, not pickled: at 10 M rows
    x 8 candidates, a pickled gather held the candidates several times over on every rank."""
    if group is None:
        return arrays
    counts = [int(c) for c in collectives.all_gather_tensors(torch.tensor([len(arrays[0])]), group)]
    gathered = []
    for array in arrays:
        mine = torch.from_numpy(array)
        padded = torch.zeros((max(counts), *array.shape[1:]), dtype=mine.dtype)
        padded[: len(array)] = mine
        parts = collectives.all_gather_tensors(padded, group) if max(counts) else [padded] * len(counts)
        del padded
        gathered.append(np.concatenate([part[:count].numpy() for part, count in zip(parts, counts)]))
        del parts
    return tuple(gathered)


def _greedy(top_logq: np.ndarray, top_idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, log-scores, capacity left) of the greedy walk over every row's candidates: rows without a place
    among theirs are left at -1."""
    n, c = top_logq.shape
    floor, extra = divmod(n, k)
    capacity = np.full(k, floor + (1 if extra else 0), dtype=np.int64)
    labels = np.full(n, -1, dtype=np.int64)
    scores = np.zeros(n, dtype=np.float32)
    at_ceiling = 0
    # The pairs in order of decreasing score (ties: by row, then rank), without walking all N x c of them: a
    # row's next candidate matters only once its previous one was refused, and scores fall along a row, so
    # the pairs are the rows' first candidates in sorted order merged with a heap of the refused rows' next.
    # The sorted rows and their scores become Python lists a chunk at a time: whole, at 10 M rows, the two
    # lists would hold about 0.7 GB.
    order = np.argsort(-top_logq[:, 0], kind="stable")
    firsts = _chunks(order, top_logq[:, 0])
    first, best = next(firsts, ([], []))
    pending: list[tuple[float, int, int]] = []  # (-score, row, rank) of next candidates
    i = 0
    while i < len(first) or pending:
        if pending and (i == len(first) or (pending[0][0], pending[0][1]) < (-best[i], first[i])):
            _, row, col = heapq.heappop(pending)
        else:
            row, col = first[i], 0
            i += 1
            if i == len(first):
                first, best = next(firsts, ([], []))
                i = 0
        cluster = int(top_idx[row, col])
        if capacity[cluster] == 0:
            if col + 1 < c:
                heapq.heappush(pending, (-float(top_logq[row, col + 1]), row, col + 1))
            continue
        labels[row] = cluster
        scores[row] = top_logq[row, col]
        capacity[cluster] -= 1
        if extra and capacity[cluster] == 0:
            at_ceiling += 1
            if at_ceiling == extra:  # the remaining clusters may only reach floor(N/K)
                capacity[capacity > 0] -= 1
                extra = 0
    return labels, scores, capacity


def balanced_labels(source, potentials, lam, block, candidates: int = 8, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round the transport plan to labels with every cluster holding floor(N/K) or ceil(N/K) samples; returns
    the labels of this rank's rows and their scores q(label | i).

    Greedy under capacities: (sample, cluster) pairs among each row's ``candidates`` best are taken in order
    of decreasing plan score; once N mod K clusters are at ceil(N/K) the others close at floor(N/K). Rows left
    without a place (rare, when all their candidates filled) go to the open clusters by score. Across ranks,
    every rank sends its rows' candidates (N x candidates, not N x K) and runs the same rounding.
    """
    if not isinstance(source, _Logits):
        source = _Logits(source, None, None, None, torch.device("cpu"), torch.float32)
    k = source.k
    c = min(candidates, k)
    local_logq, local_idx = _candidates(source, potentials, lam, block, c)
    sizes = _gather(group, np.array([source.n]))[0]
    offset = int(sizes[: collectives.rank(group)].sum())
    top_logq, top_idx = _gather(group, local_logq, local_idx)
    labels, scores, capacity = _greedy(top_logq, top_idx, k)
    mine = np.flatnonzero(labels[offset : offset + source.n] < 0)
    left, left_logq = _gather(group, mine + offset, _log_q(source, mine, potentials, lam))
    for row, logq in zip(left.tolist(), left_logq):
        open_clusters = np.flatnonzero(capacity > 0)
        cluster = open_clusters[np.argmax(logq[open_clusters])]
        labels[row] = cluster
        scores[row] = logq[cluster]
        capacity[cluster] -= 1
    window = slice(offset, offset + source.n)
    return torch.from_numpy(labels[window]), torch.from_numpy(np.exp(scores[window]))


def floored_labels(source, potentials, lam, block, labels: torch.Tensor, scores: torch.Tensor, minimum: np.ndarray,
                   candidates: int = 8, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The floor of relaxed balance at the level of labels: argmax labels can leave a cluster nearly empty even
    when the plan gives it its floor of mass (the mass spread thinly over many rows), so clusters holding fewer
    than ``minimum[k]`` samples take the rows that lose least by moving to them -- log q(label | i) - log q(k | i),
    smallest first, among each row's ``candidates`` best clusters -- from clusters above their own minimum.
    Returns this rank's labels and scores q(label | i); unchanged when every cluster holds its minimum.
    Across ranks every rank runs the same moves on the gathered candidates, as :func:`balanced_labels` does."""
    if not isinstance(source, _Logits):
        source = _Logits(source, None, None, None, torch.device("cpu"), torch.float32)
    k = source.k
    counts = collectives.all_reduce(torch.bincount(labels, minlength=k).to(torch.float64), group).cpu().numpy().astype(np.int64)
    if (counts >= minimum).all():
        return labels, scores
    local_logq, local_idx = _candidates(source, potentials, lam, block, min(candidates, k))
    sizes = _gather(group, np.array([source.n]))[0]
    offset = int(sizes[: collectives.rank(group)].sum())
    top_logq, top_idx, current, chosen = _gather(group, local_logq, local_idx, labels.cpu().numpy().astype(np.int64),
                                                 scores.cpu().numpy().astype(np.float32))
    current, chosen = current.copy(), chosen.copy()
    need = minimum - counts
    rows, cols = np.nonzero((need[top_idx] > 0) & (top_idx != current[:, None]))
    loss = np.log(np.maximum(chosen[rows], 1e-30)) - top_logq[rows, cols]
    moved = np.zeros(len(current), dtype=bool)
    for i in np.argsort(loss, kind="stable").tolist():
        row, col = int(rows[i]), int(cols[i])
        cluster, source_cluster = int(top_idx[row, col]), int(current[row])
        if need[cluster] <= 0 or moved[row] or counts[source_cluster] <= minimum[source_cluster]:
            continue
        current[row], chosen[row], moved[row] = cluster, math.exp(float(top_logq[row, col])), True
        counts[source_cluster] -= 1
        counts[cluster] += 1
        need[cluster] -= 1
    window = slice(offset, offset + source.n)
    return torch.from_numpy(current[window]), torch.from_numpy(chosen[window])
