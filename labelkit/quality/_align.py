"""Ids that stay put across runs: match one labelling's clusters to another's on their common samples, relabel so
that each matched cluster keeps the old id (and name), and say what happened to every cluster -- kept, split,
merged, born or died.

A cluster pair *overlaps* when their common members are at least :data:`OVERLAP` of each of the two (on the
common samples): an old cluster that overlaps two new ones was split, a new one that overlaps two old ones is
a merge, and a new cluster that overlaps none was born (a handful of stray samples is no split). The ids come from one assignment (Hungarian, on the contingency table) restricted to
overlapping pairs; a new cluster that overlaps none of its old matches gets a fresh id, above every old id, so
an id never changes meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from ._metrics import ami, ari, contingency

__all__ = ["Transitions", "match_clusters", "align_artefact", "compare_artefacts", "OVERLAP"]

OVERLAP = 0.2


@dataclass
class Transitions:
    """How one head's clusters moved from ``old`` to ``new``: ``mapping[j]`` is the id new cluster ``j`` takes when
    aligned; ``events`` lists kept / split / merged / born / died clusters (by their ids in ``new``, or once
    aligned in the aligned artefact) with their sizes on the common samples."""

    head: int
    common: int
    mapping: np.ndarray
    events: list[dict] = field(default_factory=list)
    held: float = 0.0
    held_before: float = 0.0
    scores: dict = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        kinds = ("kept", "split", "merged", "born", "died")
        return {kind: sum(e["kind"] == kind for e in self.events) for kind in kinds}

    def as_dict(self) -> dict:
        return {"head": self.head, "common": self.common, "held": self.held, "held_before": self.held_before,
                **self.scores, "counts": self.counts(), "events": self.events}


def _contingency(new: np.ndarray, old: np.ndarray, k_new: int, k_old: int) -> np.ndarray:
    return np.bincount(new.astype(np.int64) * k_old + old, minlength=k_new * k_old).reshape(k_new, k_old)


def match_clusters(new: np.ndarray, old: np.ndarray, k_new: int, k_old: int, head: int = 0) -> Transitions:
    """Match ``new`` labels to ``old`` ones on the same samples (equal-length arrays) and classify each cluster."""
    from scipy.optimize import linear_sum_assignment

    table = _contingency(new, old, k_new, k_old)
    size_new, size_old = table.sum(1), table.sum(0)
    overlaps = (table > 0) & (table >= OVERLAP * size_new[:, None]) & (table >= OVERLAP * size_old[None, :])
    rows, cols = linear_sum_assignment(-table)
    mapping = np.full(k_new, -1, dtype=np.int64)
    for j, i in zip(rows, cols):
        if overlaps[j, i]:
            mapping[j] = i
    fresh = np.flatnonzero(mapping < 0)
    mapping[fresh] = k_old + np.arange(len(fresh))
    result = Transitions(head, int(len(new)), mapping)
    result.held_before = float(np.mean(new == old)) if len(new) else 0.0
    result.held = float(np.mean(mapping[new] == old)) if len(new) else 0.0
    counts = contingency(new, old)
    result.scores = {"ari": ari(counts), "ami": ami(counts)}
    result.events = _events(table, overlaps, mapping, size_new, size_old)
    return result


def _events(table, overlaps, mapping, size_new, size_old) -> list[dict]:
    """One record per transition, sizes counted on the common samples."""
    events = []

    def new_ids(js):
        return [int(j) for j in js]

    for i in range(table.shape[1]):
        parts = np.flatnonzero(overlaps[:, i])
        if len(parts) > 1:
            events.append({"kind": "split", "old": [i], "new": new_ids(parts), "old_size": int(size_old[i]),
                           "new_sizes": [int(size_new[j]) for j in parts],
                           "shared": [int(table[j, i]) for j in parts]})
        elif len(parts) == 0 and size_old[i]:  # its id is retired: no new cluster takes it
            events.append({"kind": "died", "old": [i], "new": [], "old_size": int(size_old[i])})
    for j in range(table.shape[0]):
        sources = np.flatnonzero(overlaps[j])
        if len(sources) > 1:
            events.append({"kind": "merged", "old": sources.tolist(), "new": new_ids([j]),
                           "old_sizes": [int(size_old[i]) for i in sources], "new_size": int(size_new[j]),
                           "shared": [int(table[j, i]) for i in sources]})
        elif len(sources) == 0 and size_new[j]:
            events.append({"kind": "born", "old": [], "new": new_ids([j]), "new_size": int(size_new[j])})
        elif len(sources) == 1 and overlaps[:, sources[0]].sum() == 1:
            i = int(sources[0])
            events.append({"kind": "kept", "old": [i], "new": new_ids([j]), "old_size": int(size_old[i]),
                           "new_size": int(size_new[j]), "shared": int(table[j, i])})
    return events


def _common(new, old) -> tuple[np.ndarray, np.ndarray]:
    ids_new, ids_old = new.sample_ids.astype(str), old.sample_ids.astype(str)
    _, rows_new, rows_old = np.intersect1d(ids_new, ids_old, assume_unique=True, return_indices=True)
    if not len(rows_new):
        raise ConfigError(f"the two artefacts share no sample id (e.g. {ids_new[:1].tolist()} and "
                          f"{ids_old[:1].tolist()}); align needs labels of the same samples")
    return rows_new, rows_old


def _heads(new, old, head: int | None, called=("NEW", "OLD")) -> list[int]:
    if head is not None:
        for art, which in zip((new, old), called):
            if head >= art.num_heads:
                raise ConfigError(f"--head {head}: {which} has heads 0..{art.num_heads - 1}")
        return [head]
    if new.num_heads != old.num_heads:
        raise ConfigError(f"{called[0]} has {new.num_heads} heads and {called[1]} {old.num_heads}; give --head H to "
                          "compare one")
    return list(range(new.num_heads))


def compare_artefacts(a, b, head: int | None = None, called=("A", "B")) -> list[Transitions]:
    """How ``b``'s clusters relate to ``a``'s (``a`` old, ``b`` new), per head, on their common samples;
    ``called`` names the two in messages."""
    rows_b, rows_a = _common(b, a)
    return [match_clusters(b.labels(h)[rows_b], a.labels(h)[rows_a], b.heads[h].k, a.heads[h].k, h)
            for h in _heads(b, a, head, called[::-1])]


def align_artefact(new, old, head: int | None = None):
    """``new`` relabelled so that each cluster keeps the id, name and review status of the ``old`` cluster it
    matches (a new version of ``new``; its parents are ``new`` and ``old``), and the transitions per head."""
    transitions = compare_artefacts(old, new, head, called=("OLD", "NEW"))
    matrix = new.label_matrix().astype(np.int64)
    ks = [h.k for h in new.heads]
    names, status = [None] * new.num_heads, [None] * new.num_heads
    for t in transitions:
        h, mapping = t.head, t.mapping
        matrix[h] = mapping[matrix[h]]
        ks[h] = int(max(old.heads[h].k, mapping.max() + 1))
        names[h], status[h] = _carried(old.heads[h], new.heads[h], mapping, ks[h])
    method = {"name": "align", "config": {"to": old.artefact_id, "heads": [t.head for t in transitions],
                                          "overlap": OVERLAP},
              "alignment": [{"head": t.head, "held": round(t.held, 6), "held_before": round(t.held_before, 6),
                             **t.counts()} for t in transitions]}
    aligned = new.revise(method, labels=matrix, ks=ks, names=names, status=status, parents=[old.artefact_id])
    for t in transitions:  # the events in the ids the aligned artefact has
        for event in t.events:
            event["new"] = [int(t.mapping[j]) for j in event["new"]]
    return aligned, transitions


def _carried(old_head, new_head, mapping: np.ndarray, k: int) -> tuple[list | None, list | None]:
    """Names and status under the aligned ids: a matched cluster takes the old cluster's, a dead cluster's id
    keeps its name (retired, never reused), a born one keeps its own name unless an old cluster holds it."""
    if old_head.names is None and new_head.names is None and old_head.status is None and new_head.status is None:
        return None, None
    names = [old_head.cluster_name(c) if c < old_head.k else None for c in range(k)]
    status = [old_head.status[c] if old_head.status is not None and c < old_head.k else "unreviewed"
              for c in range(k)]
    taken = {n for n in names if n is not None}
    for j in range(new_head.k):
        target = int(mapping[j])
        if target >= old_head.k:
            own = new_head.cluster_name(j)
            names[target] = own if own is not None and own not in taken else None
            status[target] = "unreviewed"
    has_status = old_head.status is not None or new_head.status is not None
    return (names if any(n is not None for n in names) else None), (status if has_status else None)
