"""Metrics of an artefact against another read a batch of rows at a time, when both hold the same ids in the same
order (the common case: two runs on one data set, or a run and the truth written as an artefact). The heads'
contingency tables are counted batch by batch, so memory does not grow with N; where the ids differ anywhere,
this says so and the caller joins the whole tables by id."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
from scipy import sparse

from ..artefact import format as fmt
from ..artefact import iter_rows, scan_artefact
from ..errors import ConfigError
from ._metrics import compare_table, contingency_from_counts, size_stats

__all__ = ["streamed_scores"]

# dense counts of all heads together up to this many cells (64 MB); beyond, each head's counts are sparse
# (10 heads of 3,000 x 3,000 dense would hold 720 MB)
_DENSE_CELLS = 1 << 23


class _Counts:
    """The contingency counts of one head (of ``heads`` counted together) against its reference, K x K_ref: dense
    where all of them are small, else sparse (summed batch by batch)."""

    def __init__(self, k: int, k_ref: int, heads: int):
        self.k, self.k_ref = k, k_ref
        self.dense = np.zeros(k * k_ref, dtype=np.int64) if heads * k * k_ref <= _DENSE_CELLS else None
        self.sparse = sparse.csr_matrix((k, k_ref), dtype=np.int64)
        self.sizes = np.zeros(k, dtype=np.int64)

    def add(self, labels: np.ndarray, reference: np.ndarray) -> None:
        labels, reference = labels.astype(np.int64), reference.astype(np.int64)
        self.sizes += np.bincount(labels, minlength=self.k)
        if self.dense is not None:
            self.dense += np.bincount(labels * self.k_ref + reference, minlength=self.k * self.k_ref)
        else:
            self.sparse = self.sparse + sparse.csr_matrix(
                (np.ones(len(labels), dtype=np.int64), (labels, reference)), shape=(self.k, self.k_ref))

    def table(self):
        return self.dense.reshape(self.k, self.k_ref) if self.dense is not None else self.sparse


def streamed_scores(path: str | os.PathLike, against: str | os.PathLike, choose: Callable[[int], list[int]],
                    average: str) -> dict | None:
    """:func:`~labelkit.quality.score_artefact` of the artefact at ``path`` against the one at ``against`` (the
    heads ``choose(number of heads)`` picks), both checked in full as they are read; None when their ids differ
    (join them whole instead)."""
    header, _ = scan_artefact(path)
    other, _ = scan_artefact(against)
    mine, theirs = header.heads, other.heads
    if len(theirs) not in (1, len(mine)):
        raise ConfigError(f"--against artefact has {len(theirs)} heads; need 1 or {len(mine)}")
    if header.num_rows != other.num_rows:
        return None
    chosen = choose(len(mine))
    reference = {h: h if len(theirs) > 1 else 0 for h in chosen}
    counts = {h: _Counts(mine[h].k, theirs[reference[h]].k, len(chosen)) for h in chosen}
    columns = [fmt.ID_COLUMN] + [fmt.head_column(h) for h in chosen]
    ref_columns = [fmt.ID_COLUMN] + sorted({fmt.head_column(r) for r in reference.values()})
    for left, right in zip(iter_rows(path, columns), iter_rows(against, ref_columns)):
        if not left.column(0).equals(right.column(0)):
            return None
        for h in chosen:
            counts[h].add(left.column(fmt.head_column(h)).to_numpy(),
                          right.column(fmt.head_column(reference[h])).to_numpy())
    results = []
    for h in chosen:
        row = compare_table(contingency_from_counts(counts[h].table()), average=average)
        row.update({"head": h, "k": mine[h].k})
        row.update(size_stats(None, mine[h].k, sizes=counts[h].sizes))
        results.append(row)
    n = header.num_rows
    return {"artefact_id": header.metadata["artefact_id"], "n": n, "matched": n, "coverage": 1.0,
            "against": other.metadata["artefact_id"], "average": average, "heads": results}
