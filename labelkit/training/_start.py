"""What SeLa carries between label steps, and a run that starts from an earlier artefact (``--start-from``).

Rerunning SeLa on grown or cleaned data from random or graph labels finds clusters anew, and ``align`` can only
rename them afterwards. Starting from the earlier labels instead keeps what was found: the network first learns
the old clusters, the samples the old artefact lacks start at random, and every label step after that is the
usual solve. A head takes the old head of the same index and K, else the old artefact's primary head (its
consensus) where that has the head's K; a head with neither starts at random.

A reviewed version (``labelkit review``, or an import from a labelling tool) steers every later solve of the
heads that take its reviewed head (every head of that head's K):

* pinned samples -- the members of accepted clusters and the samples a person moved or gave as examples -- keep
  their labels as fixed rows of the transport problem: the free rows are solved for the cluster sizes less
  what the pinned rows already hold;
* the cluster sizes are the reviewed ones (a merge doubles a cluster, a split's parts keep their sizes, a
  merged-away cluster stays empty), not equal ones;
* removed samples and the members of rejected clusters leave the run: no training, no label step, no label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._util import collectives
from ..artefact import Artefact, read_artefact
from ..errors import ConfigError

__all__ = ["SelaState", "artefact_start", "started_from", "pinned_balance", "store_labels", "with_pins"]

_EMPTY = 1e-6  # the share of a cluster's size a merged-away (empty) cluster is solved for: the solver needs > 0


@dataclass
class SelaState:
    """What SeLa carries between label steps besides the network, per head: the current label of every
    sample, its score q(label | sample), and the Sinkhorn potentials that warm-start the next solve; after a
    reviewed start, also the pinned labels (-1: free), the reviewed cluster sizes, and the samples left out."""

    labels: torch.Tensor  # (T, N) int64
    scores: torch.Tensor  # (T, N) float32
    potentials: list  # T tensors of shape (K_h,), None before a head's first solve
    pinned: torch.Tensor | None = None  # (T, N) int64, -1 where the solve decides
    sizes: list | None = None  # T tensors of K_h target sizes (shares), or None for the run's own balance
    left_out: torch.Tensor | None = None  # (N,) bool: removed by a person, or in a rejected cluster

    @classmethod
    def initial(cls, n: int, ks: list[int], seed: int) -> "SelaState":
        """A random equipartition for every head: the labels before the first label step."""
        rng = np.random.default_rng(seed)
        labels = torch.from_numpy(np.stack([rng.permutation(n) % k for k in ks]).astype(np.int64))
        return cls(labels, torch.zeros(labels.shape, dtype=torch.float32), [None] * len(ks))

    def keep(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` less the samples a review left out."""
        return mask if self.left_out is None else mask & ~self.left_out.numpy()

    def state_dict(self) -> dict:
        saved = {"labels": self.labels.to(torch.int32), "scores": self.scores, "potentials": list(self.potentials)}
        if self.pinned is not None:
            saved.update(pinned=self.pinned.to(torch.int32), sizes=list(self.sizes), left_out=self.left_out)
        return saved

    def load_state_dict(self, saved: dict) -> None:
        self.labels, self.scores = saved["labels"].long(), saved["scores"]
        self.potentials = list(saved["potentials"])
        if saved.get("pinned") is not None:
            self.pinned, self.sizes, self.left_out = saved["pinned"].long(), list(saved["sizes"]), saved["left_out"]


def _review(old: Artefact) -> dict | None:
    method = old.metadata["method"]
    return method if method.get("name") == "review" else None


def _old_head(old: Artefact, h: int, k: int) -> int | None:
    review = _review(old)
    if review is not None and old.heads[review["head"]].k == k:  # the reviewed head steers every head of its K
        return review["head"]
    if h < old.num_heads and old.heads[h].k == k:
        return h
    primary = old.primary_head
    return primary if old.heads[primary].k == k else None


def artefact_start(job, state: SelaState, ks: list[int]) -> dict:
    """The first labels of every head, written into ``state``, from ``job.config.start_from``; for a reviewed
    version also its pins, sizes and left-out samples. Returns the start's record."""
    path = job.config.start_from
    old = read_artefact(path)
    heads = [_old_head(old, h, k) for h, k in enumerate(ks)]
    if all(h is None for h in heads):
        raise ConfigError(f"--start-from {path}: its heads have K = {[head.k for head in old.heads]}, none of the "
                          f"run's K = {ks}; give --clusters to match, or start without it")
    rows = job.source.positions_in(old.table.column("sample_id"))
    known = rows >= 0
    if not known.any():
        raise ConfigError(f"--start-from {path}: none of its {old.num_samples:,} sample ids is in "
                          f"{job.config.data}; it labels other data")
    where = torch.from_numpy(np.flatnonzero(known))
    for h, o in enumerate(heads):
        if o is not None:
            state.labels[h, where] = torch.from_numpy(old.labels(o)[rows[known]].astype(np.int64))
    record = {"from": old.artefact_id, "path": str(path), "matched": int(known.sum()),
              "new": int((~known).sum()), "old_heads": heads}
    if _review(old) is not None:
        record["review"] = _reviewed_start(job, old, state, heads, rows)
    return record


def _reviewed_start(job, old: Artefact, state: SelaState, heads: list, rows: np.ndarray) -> dict:
    """Pins, sizes and left-out samples of a reviewed version, for the heads that take its reviewed head."""
    review = _review(old)
    reviewed = review["head"]
    if job.dist.world > 1:
        raise ConfigError("a start from a reviewed version solves with pinned rows in one process; run it "
                          "without torchrun")
    n = len(job.source)
    ids = np.array(list(job.source.ids), dtype=object)
    labels = old.labels(reviewed).astype(np.int64)
    status = old.heads[reviewed].status or ["unreviewed"] * old.heads[reviewed].k
    accepted = np.array([s == "accepted" for s in status])
    rejected = np.array([s == "rejected" for s in status])
    known = rows >= 0
    left_out = np.isin(ids, np.array(review.get("removed_ids", []), dtype=object))
    left_out[known] |= rejected[labels[rows[known]]]
    pinned_rows = np.zeros(n, dtype=bool)
    pinned_rows[known] = accepted[labels[rows[known]]]
    pinned_rows |= np.isin(ids, np.array(review.get("moved_ids", []), dtype=object))
    pinned_rows &= known & ~left_out
    k = old.heads[reviewed].k
    counts = np.bincount(labels[~rejected[labels]], minlength=k).astype(np.float64)
    shares = np.maximum(counts, _EMPTY * counts.max()) / counts.sum()
    state.pinned = torch.full(state.labels.shape, -1, dtype=torch.int64)
    state.sizes = [torch.from_numpy(shares) if o == reviewed else None for o in heads]
    for h, o in enumerate(heads):
        if o == reviewed:
            state.pinned[h, torch.from_numpy(np.flatnonzero(pinned_rows))] = state.labels[h, pinned_rows]
    state.left_out = torch.from_numpy(left_out)
    return {"head": reviewed, "pinned": int(pinned_rows.sum()), "left_out": int(left_out.sum()),
            "steered_heads": [h for h, o in enumerate(heads) if o == reviewed]}


def pinned_balance(state: SelaState, h: int, rows: torch.Tensor, balance):
    """For a head a review steers: the rows the solve decides (the others keep their pinned label) and the
    balance for them, the reviewed sizes less what the pinned rows hold. ``(None, balance)`` otherwise."""
    from dataclasses import replace

    if state.sizes is None or state.sizes[h] is None:
        return None, balance
    pinned = state.pinned[h, rows].numpy()
    free = np.flatnonzero(pinned < 0)
    if len(free) == 0:  # a person fixed every label: the solve (of all rows) only keeps the potentials warm
        return torch.from_numpy(free), balance
    k = len(state.sizes[h])
    target = state.sizes[h].numpy() * len(rows) - np.bincount(pinned[pinned >= 0], minlength=k)
    target = np.maximum(target, _EMPTY * max(target.max(), 1.0))
    return torch.from_numpy(free), replace(balance, prior=target * (len(free) / target.sum()), exact=False)


def store_labels(dist, state: SelaState, h: int, rows: torch.Tensor, labels: np.ndarray, posterior: np.ndarray):
    """Head ``h``'s new labels and posteriors of this rank's ``rows`` into ``state``, with every other rank's,
    gathered a chunk at a time (:func:`~labelkit._util.collectives.gather_chunks`)."""
    chunks = collectives.gather_chunks(dist.group, rows.numpy(), np.asarray(labels, dtype=np.int64),
                                       np.asarray(posterior, dtype=np.float32))
    for where, assigned, scored in chunks:
        where = torch.from_numpy(where)
        state.labels[h, where] = torch.from_numpy(assigned)
        state.scores[h, where] = torch.from_numpy(scored)


def with_pins(state: SelaState, h: int, rows: torch.Tensor, free, labels: np.ndarray, posterior: np.ndarray):
    """Every row's label and score: the solve's for the free rows, the pinned label (score 1: a person chose
    it) for the others."""
    if free is None:
        return labels, posterior
    if len(free) == 0:
        return state.pinned[h, rows].numpy().copy(), np.ones(len(rows), dtype=np.float64)
    all_labels = state.pinned[h, rows].numpy().copy()
    all_scores = np.ones(len(rows), dtype=np.float64)
    all_labels[free.numpy()] = labels
    all_scores[free.numpy()] = posterior
    return all_labels, all_scores


def started_from(history: Path) -> str | None:
    """The artefact id a run started from, from its history (so that a resumed run knows it too)."""
    if not history.exists():
        return None
    for line in history.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("type") == "start" and record.get("from"):
                return record["from"]
    return None
