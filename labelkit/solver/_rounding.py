"""Rounding the transport plan to labels under constraints: exact balance (every cluster floor(N/K) or ceil(N/K))
and the floor of relaxed balance."""

from __future__ import annotations

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


def _log_q(source, rows: np.ndarray, potentials, lam) -> np.ndarray:
    """Full rows of log q(k | i) for a few ``rows``."""
    if len(rows) == 0:
        return np.zeros((0, source.k), dtype=np.float32)
    e = torch.cat([source.block(int(i), int(i) + 1).float().cpu() for i in rows]) * lam
    e += torch.as_tensor(potentials, dtype=torch.float32)
    return (e - torch.logsumexp(e, dim=1, keepdim=True)).numpy()


def _rank_rows(n: int, group) -> tuple[int, int]:
    """(global row of this rank's first row, rows of every rank together), for a rank holding ``n`` rows."""
    sizes = collectives.gather_arrays(group, np.array([n]))[0]
    return int(sizes[: collectives.rank(group)].sum()), int(sizes.sum())


BAND = 1 << 20  # (row, candidate) pairs a band of the walk holds across the ranks, about: its lists stay this size


class _Pairs:
    """This rank's (row, candidate) pairs, handed to the greedy walk a band of scores at a time: a row's first
    candidate in order of score, its next ones only once the walk has refused the ones before (they wait in
    ``later``). A band holds every pair left at or above its score, with the further candidates of the band's
    rows that reach it too, so that a refusal in the band moves on to them in their place in the order."""

    def __init__(self, top_logq: np.ndarray, top_idx: np.ndarray, offset: int):
        self.logq, self.idx, self.offset = top_logq, top_idx, offset
        self.order = np.argsort(-top_logq[:, 0], kind="stable")  # rows by their best score, ties by row
        self.worst_first = -top_logq[self.order, 0]  # the best scores negated: ascending, for searchsorted
        self.at = 0  # rows of ``order`` handed out
        self.later = np.empty(0, dtype=np.int64)  # refused rows' next candidates, as row * c + candidate
        self.sent = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))  # the last band's rows, their last candidate

    def left(self) -> int:
        return len(self.order) - self.at + len(self.later)

    def threshold(self, size: int) -> float:
        """The score of this rank's ``size``-th best pair left, a band's own candidates counted (the lowest left
        when fewer are left, -inf when none): a band down to it holds about ``size`` of this rank's pairs."""
        c = self.logq.shape[1]
        scores = [self.logq[self.order[self.at : self.at + size]].reshape(-1)]
        if len(self.later):  # a refused row's candidates from its next on
            rows, cols = np.divmod(self.later, c)
            tail = self.logq[rows]
            tail[np.arange(c) < cols[:, None]] = -np.inf
            scores.append(tail[tail > -np.inf])
        scores = np.concatenate(scores)
        if len(scores) < size:
            return float(scores.min()) if len(scores) else -math.inf
        return float(-np.partition(-scores, size - 1)[size - 1])

    def band(self, threshold: float) -> tuple[np.ndarray, ...]:
        """(score, global row, candidate, cluster) of every pair left with a score of at least ``threshold``."""
        end = int(np.searchsorted(self.worst_first, -np.float32(threshold), side="right"))
        due = self.logq.reshape(-1)[self.later] >= threshold
        rows, cols = np.divmod(self.later[due], self.logq.shape[1])
        self.later = self.later[~due]
        rows = np.concatenate([self.order[self.at : end], rows])
        cols = np.concatenate([np.zeros(end - self.at, dtype=np.int64), cols])
        self.at = end
        parts, last, at = [(rows, cols)], cols.copy(), np.arange(len(rows))
        while len(at):
            col = last[at] + 1
            at, col = at[col < self.logq.shape[1]], col[col < self.logq.shape[1]]
            reach = self.logq[rows[at], col] >= threshold
            at, col = at[reach], col[reach]
            last[at] = col
            parts.append((rows[at], col))
        self.sent = (rows, last)
        rows, cols = (np.concatenate(part) for part in zip(*parts))
        return self.logq[rows, cols], rows + self.offset, cols, self.idx[rows, cols].astype(np.int64)

    def refused(self, labels: np.ndarray) -> None:
        """After the walk of the last band: its rows left without a place wait with their next candidate."""
        rows, last = self.sent
        c = self.logq.shape[1]
        waiting = (labels[rows] < 0) & (last + 1 < c)
        self.later = np.concatenate([self.later, rows[waiting] * c + last[waiting] + 1])


class _Walk:
    """The greedy walk's state, the same on every rank: what each cluster can still take."""

    def __init__(self, n: int, k: int):
        floor, self.extra = divmod(n, k)
        self.capacity = [floor + (1 if self.extra else 0)] * k
        self.at_ceiling = 0

    def take(self, pairs: tuple[np.ndarray, ...], labels: np.ndarray, scores: np.ndarray, offset: int) -> None:
        """Walk a band's pairs (every rank's) in order of decreasing score, ties by row, then candidate; label
        this rank's rows (``offset`` on)."""
        score, row, col, cluster = pairs
        order = np.lexsort((col, row, -score))
        taken, capacity, n = set(), self.capacity, len(labels)
        for s, i, k in zip(score[order].tolist(), row[order].tolist(), cluster[order].tolist()):
            if i in taken or capacity[k] == 0:
                continue
            taken.add(i)
            capacity[k] -= 1
            if 0 <= i - offset < n:
                labels[i - offset], scores[i - offset] = k, s
            if self.extra and capacity[k] == 0:
                self.at_ceiling += 1
                if self.at_ceiling == self.extra:  # the remaining clusters may only reach floor(N/K)
                    self.capacity = capacity = [max(room - 1, 0) for room in capacity]
                    self.extra = 0


def _greedy(top_logq: np.ndarray, top_idx: np.ndarray, k: int, offset: int, total: int, group,
            band: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, log-scores) of this rank's rows and the capacity left after the greedy walk over every rank's
    candidates: rows without a place among theirs are left at -1.

    The walk visits the pairs in order of decreasing score without holding all N x c of them: a row's next
    candidate matters only once its previous one was refused, and scores fall along a row. The ranks hand it
    their pairs a band of scores at a time (the band's lowest score: the largest of the ranks' ``band /
    ranks``-th best left), and each rank walks the gathered band alike: no rank holds every row's candidates."""
    pairs, walk = _Pairs(top_logq, top_idx, offset), _Walk(total, k)
    labels = np.full(len(top_logq), -1, dtype=np.int64)
    scores = np.zeros(len(top_logq), dtype=np.float32)
    share = max(1, band // collectives.world_size(group))
    while True:
        threshold, left = collectives.gather_arrays(group, np.array([pairs.threshold(share), pairs.left()]))[0].reshape(-1, 2).T
        if not left.sum():
            return labels, scores, np.array(walk.capacity, dtype=np.int64)
        walk.take(collectives.gather_arrays(group, *pairs.band(float(threshold.max()))), labels, scores, offset)
        pairs.refused(labels)


def balanced_labels(source, potentials, lam, block, candidates: int = 8, group=None,
                    band: int = BAND) -> tuple[torch.Tensor, torch.Tensor]:
    """Round the transport plan to labels with every cluster holding floor(N/K) or ceil(N/K) samples; returns
    the labels of this rank's rows and their scores q(label | i).

    Greedy under capacities: (sample, cluster) pairs among each row's ``candidates`` best are taken in order
    of decreasing plan score; once N mod K clusters are at ceil(N/K) the others close at floor(N/K). Rows left
    without a place (rare, when all their candidates filled) go to the open clusters by score. Across ranks,
    the ranks walk the pairs together, a band of ``band`` at a time (see :func:`_greedy`).
    """
    if not isinstance(source, _Logits):
        source = _Logits(source, None, None, None, torch.device("cpu"), torch.float32)
    k = source.k
    c = min(candidates, k)
    top_logq, top_idx = _candidates(source, potentials, lam, block, c)
    offset, total = _rank_rows(source.n, group)
    labels, scores, capacity = _greedy(top_logq, top_idx, k, offset, total, group, band)
    del top_logq, top_idx
    mine = np.flatnonzero(labels < 0)
    left, left_logq = collectives.gather_arrays(group, mine + offset, _log_q(source, mine, potentials, lam))
    for row, logq in zip(left.tolist(), left_logq):  # every rank alike: the capacity stays the same on each
        open_clusters = np.flatnonzero(capacity > 0)
        cluster = open_clusters[np.argmax(logq[open_clusters])]
        if 0 <= row - offset < source.n:
            labels[row - offset], scores[row - offset] = cluster, logq[cluster]
        capacity[cluster] -= 1
    return torch.from_numpy(labels), torch.from_numpy(np.exp(scores))


def floored_labels(source, potentials, lam, block, labels: torch.Tensor, scores: torch.Tensor, minimum: np.ndarray,
                   candidates: int = 8, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The floor of relaxed balance at the level of labels: argmax labels can leave a cluster nearly empty even
    when the plan gives it its floor of mass (the mass spread thinly over many rows), so clusters holding fewer
    than ``minimum[k]`` samples take the rows that lose least by moving to them -- log q(label | i) - log q(k | i),
    smallest first, among each row's ``candidates`` best clusters -- from clusters above their own minimum.
    Returns this rank's labels and scores q(label | i); unchanged when every cluster holds its minimum.
    Across ranks every rank gathers the moves toward those clusters and runs them alike."""
    if not isinstance(source, _Logits):
        source = _Logits(source, None, None, None, torch.device("cpu"), torch.float32)
    k = source.k
    counts = collectives.all_reduce(torch.bincount(labels, minlength=k).to(torch.float64), group).cpu().numpy().astype(np.int64)
    if (counts >= minimum).all():
        return labels, scores
    top_logq, top_idx = _candidates(source, potentials, lam, block, min(candidates, k))
    offset, _ = _rank_rows(source.n, group)
    current, chosen = labels.cpu().numpy().astype(np.int64), scores.cpu().numpy().astype(np.float32)
    need = minimum - counts
    # the moves that can help: a row's candidate in a cluster below its minimum (few, and gathered from every
    # rank: no rank holds every row's candidates)
    rows, cols = np.nonzero((need[top_idx] > 0) & (top_idx != current[:, None]))
    loss = np.log(np.maximum(chosen[rows], 1e-30)) - top_logq[rows, cols]
    moves = collectives.gather_arrays(group, loss, rows + offset, cols, top_idx[rows, cols].astype(np.int64), current[rows],
                    top_logq[rows, cols])
    del top_logq, top_idx
    moved = set()
    for _, row, _, cluster, source_cluster, logq in zip(*(m[np.lexsort(moves[2::-1])].tolist() for m in moves)):
        if need[cluster] <= 0 or row in moved or counts[source_cluster] <= minimum[source_cluster]:
            continue
        moved.add(row)
        counts[source_cluster] -= 1
        counts[cluster] += 1
        need[cluster] -= 1
        if 0 <= row - offset < source.n:
            current[row - offset], chosen[row - offset] = cluster, math.exp(logq)
    return torch.from_numpy(current), torch.from_numpy(chosen)
