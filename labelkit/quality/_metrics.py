"""Clustering metrics, exact and fast at ImageNet scale.

Everything is computed from the contingency table of two labellings (int64 counts), so memory is bounded by
the table, never by N x K. Definitions (natural logarithms; ``a_i`` row sums, ``b_j`` column sums, ``n_ij``
cells, N samples), matching scikit-learn where it defines the same quantity:

* MI = sum_ij n_ij/N log(N n_ij / (a_i b_j)); H(U) = -sum_i a_i/N log(a_i/N).
* NMI = MI / mean(H(U), H(V)) with the mean ``arithmetic`` (default), ``geometric``, ``min`` or ``max``.
* AMI = (MI - E[MI]) / (mean(H(U), H(V)) - E[MI]), E[MI] exact under the hypergeometric model (Vinh et al.
  2010). The expectation depends on a cell only through (a_i, b_j), so it is summed once per distinct pair
  of marginals and weighted by their multiplicities -- the same sum as scikit-learn's, in far fewer terms.
* ARI from exact integer pair counts.
* homogeneity = MI / H(truth), completeness = MI / H(clusters).
* accuracy: share of samples on the best one-to-one cluster->class match (Hungarian), when the number of
  clusters equals the number of classes; purity: share on each cluster's majority class (any K).
* per-cluster entropy: entropy (nats) of the true classes inside each non-empty cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import log

import numpy as np
from scipy import sparse
from scipy.special import gammaln

from ..errors import ConfigError

__all__ = [
    "Contingency",
    "contingency",
    "mutual_info",
    "entropy",
    "nmi",
    "ami",
    "ari",
    "expected_mutual_info",
    "compare",
    "agreement",
    "size_stats",
    "compare_table",
    "contingency_from_counts",
    "AVERAGES",
]

AVERAGES = ("arithmetic", "geometric", "min", "max")
_DENSE_LIMIT = 1 << 25  # cells; above this the table is kept sparse


@dataclass
class Contingency:
    """Counts ``table[i, j]`` of samples in row class i (first labelling) and column class j (second).

    Only classes that occur are kept. ``table`` is a dense int64 array or a scipy CSR matrix.
    """

    table: np.ndarray | sparse.csr_matrix
    rows: np.ndarray  # row sums a_i (int64)
    cols: np.ndarray  # column sums b_j (int64)
    n: int
    row_values: np.ndarray  # label value of each row
    col_values: np.ndarray

    def nonzero(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if sparse.issparse(self.table):
            coo = self.table.tocoo()
            return coo.row, coo.col, coo.data.astype(np.int64)
        i, j = np.nonzero(self.table)
        return i, j, self.table[i, j]

    def dense(self) -> np.ndarray:
        return self.table.toarray() if sparse.issparse(self.table) else self.table


def _codes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense codes 0..m-1 and the value of each code, without sorting when labels are small integers."""
    labels = np.asarray(labels)
    if labels.size and np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0 and labels.max() < 4 * labels.size + 1024:
        present = np.bincount(labels) > 0
        values = np.flatnonzero(present)
        remap = np.cumsum(present) - 1
        return remap[labels].astype(np.int64), values
    values, codes = np.unique(labels, return_inverse=True)
    return codes.astype(np.int64).ravel(), values


def contingency(first: np.ndarray, second: np.ndarray) -> Contingency:
    """The contingency table of two labellings of the same samples."""
    first, second = np.asarray(first).ravel(), np.asarray(second).ravel()
    if first.shape != second.shape:
        raise ConfigError(f"labellings differ in length: {first.size} vs {second.size}")
    if first.size == 0:
        raise ConfigError("no samples to compare")
    a, row_values = _codes(first)
    b, col_values = _codes(second)
    r, c = len(row_values), len(col_values)
    if r * c <= _DENSE_LIMIT:
        table = np.bincount(a * c + b, minlength=r * c).reshape(r, c).astype(np.int64)
        rows, cols = table.sum(1), table.sum(0)
    else:
        cells, counts = np.unique(a * c + b, return_counts=True)
        table = sparse.csr_matrix((counts.astype(np.int64), (cells // c, cells % c)), shape=(r, c))
        rows = np.bincount(a, minlength=r).astype(np.int64)
        cols = np.bincount(b, minlength=c).astype(np.int64)
    return Contingency(table, rows, cols, int(first.size), row_values, col_values)


def contingency_from_counts(counts: np.ndarray | sparse.spmatrix) -> Contingency:
    """The contingency table of ``counts[i, j]`` (label value i of the first labelling, j of the second; dense or
    sparse), as :func:`contingency` makes it from the labels themselves: what a pass that counts batch by batch
    ends with."""
    counts = sparse.csr_matrix(counts) if sparse.issparse(counts) else np.asarray(counts, dtype=np.int64)
    all_rows = np.asarray(counts.sum(1)).ravel().astype(np.int64)
    all_cols = np.asarray(counts.sum(0)).ravel().astype(np.int64)
    row_values, col_values = np.flatnonzero(all_rows), np.flatnonzero(all_cols)
    if not len(row_values):
        raise ConfigError("no samples to compare")
    kept = counts[row_values][:, col_values]
    r, c = len(row_values), len(col_values)
    if r * c <= _DENSE_LIMIT:
        # C order, as contingency() makes it: the row sums below then add in the same order
        table = np.ascontiguousarray(kept.toarray() if sparse.issparse(kept) else kept, dtype=np.int64)
    else:
        table = sparse.csr_matrix(kept, dtype=np.int64)
    return Contingency(table, all_rows[row_values], all_cols[col_values], int(all_rows.sum()), row_values,
                       col_values)


def entropy(counts: np.ndarray) -> float:
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts > 0]
    total = counts.sum()
    if counts.size <= 1:
        return 0.0
    p = counts / total
    return float(-(p * (np.log(counts) - log(total))).sum())


def mutual_info(table: Contingency) -> float:
    if len(table.rows) == 1 or len(table.cols) == 1:
        return 0.0
    i, j, nij = table.nonzero()
    n = table.n
    outer = table.rows[i].astype(np.float64) * table.cols[j].astype(np.float64)
    terms = nij / n * (np.log(nij) - log(n) - np.log(outer) + 2 * log(n))
    terms = np.where(np.abs(terms) < np.finfo(np.float64).eps, 0.0, terms)
    return float(max(terms.sum(), 0.0))


def _average(u: float, v: float, method: str) -> float:
    if method == "arithmetic":
        return (u + v) / 2
    if method == "geometric":
        return float(np.sqrt(u * v))
    if method == "min":
        return min(u, v)
    if method == "max":
        return max(u, v)
    raise ConfigError(f"average method must be one of {', '.join(AVERAGES)}, got {method!r}")


def nmi(table: Contingency, average: str = "arithmetic") -> float:
    _average(0.0, 0.0, average)
    if len(table.rows) == len(table.cols) == 1:
        return 1.0  # neither labelling splits the data: a perfect match
    mi = mutual_info(table)
    if mi == 0:
        return 0.0
    return mi / _average(entropy(table.rows), entropy(table.cols), average)


def expected_mutual_info(rows: np.ndarray, cols: np.ndarray, n: int, block: int = 1 << 20) -> float:
    """E[MI] under the hypergeometric model, summed once per distinct (a_i, b_j) pair. Memory is bounded by the
    block of terms and the largest cluster, not by ``n``: log k! is tabulated only where it is read, near 0 (up
    to the largest a_i or b_j) and near n."""
    a_values, a_mult = np.unique(rows, return_counts=True)
    b_values, b_mult = np.unique(cols, return_counts=True)
    a = np.repeat(a_values, len(b_values)).astype(np.int64)
    b = np.tile(b_values, len(a_values)).astype(np.int64)
    weight = np.repeat(a_mult, len(b_values)).astype(np.float64) * np.tile(b_mult, len(a_values))
    start = np.maximum(1, a + b - n)
    stop = np.minimum(a, b) + 1  # exclusive
    length = np.maximum(stop - start, 0)
    largest = int(max(a_values.max(), b_values.max()))
    small = gammaln(np.arange(largest + 1, dtype=np.float64) + 1)  # log(k!) for k <= the largest cluster
    near_n = max(0, n - 2 * largest)  # every k read above ``largest`` lies in [n - a - b, n]
    large = gammaln(np.arange(near_n, n + 1, dtype=np.float64) + 1)

    def lfact(k: np.ndarray, top: bool = False) -> np.ndarray:  # log(k!), from the table that holds k
        return large[k - near_n] if top else small[k]

    const = lfact(a) + lfact(b) + lfact(n - a, True) + lfact(n - b, True) - lfact(np.array(n), True)
    log_ab = np.log(a.astype(np.float64)) + np.log(b.astype(np.float64))
    total = 0.0
    ends = np.cumsum(length)
    begin = 0
    while begin < len(a):
        # pairs [begin, end) whose terms fit in one block
        end = int(np.searchsorted(ends, (ends[begin - 1] if begin else 0) + block, side="right"))
        end = max(end, begin + 1)
        sel = slice(begin, end)
        counts = length[sel]
        pair = np.repeat(np.arange(end - begin), counts)
        offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        nij = start[sel][pair] + offset
        ap, bp = a[sel][pair], b[sel][pair]
        log_p = const[sel][pair] - lfact(nij) - lfact(ap - nij) - lfact(bp - nij) - lfact(n - ap - bp + nij, True)
        term = nij / n * (np.log(n * nij.astype(np.float64)) - log_ab[sel][pair]) * np.exp(log_p)
        total += float(np.bincount(pair, weights=term, minlength=end - begin) @ weight[sel])
        begin = end
    return total


def ami(table: Contingency, average: str = "arithmetic") -> float:
    _average(0.0, 0.0, average)
    r, c = len(table.rows), len(table.cols)
    if r == c == 1:
        return 1.0
    if r == 1 or c == 1:
        return 0.0
    mi = mutual_info(table)
    emi = expected_mutual_info(table.rows, table.cols, table.n)
    normalizer = _average(entropy(table.rows), entropy(table.cols), average)
    eps = np.finfo(np.float64).eps
    denominator = normalizer - emi
    numerator = mi - emi
    tolerance = 1e-10 * max(1.0, normalizer)
    if abs(denominator) < tolerance and abs(numerator) < tolerance:
        # MI, E[MI] and the normaliser coincide (e.g. all-distinct clusters with the 'min' average): 0/0 in
        # exact arithmetic, which scikit-learn means to read as 1 (eps/eps) but returns as rounding noise.
        return 1.0
    denominator = min(denominator, -eps) if denominator < 0 else max(denominator, eps)
    numerator = min(numerator, -eps) if numerator < 0 else max(numerator, eps)
    return float(numerator / denominator)


def ari(table: Contingency) -> float:
    """Adjusted Rand index from exact (Python int) pair counts."""
    _, _, nij = table.nonzero()
    n = table.n
    sum_squares = int((nij.astype(np.int64) ** 2).sum())
    rows_dot = int((table.rows.astype(np.int64) ** 2).sum())
    cols_dot = int((table.cols.astype(np.int64) ** 2).sum())
    tp = sum_squares - n
    fp = cols_dot - sum_squares
    fn = rows_dot - sum_squares
    tn = n * n - tp - fp - fn - n
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def size_stats(labels: np.ndarray, k: int, sizes: np.ndarray | None = None) -> dict:
    """Cluster sizes of one head with K clusters (``sizes``, or counted from ``labels``): min, max, empty
    clusters, entropy of sizes vs log K."""
    sizes = np.bincount(np.asarray(labels), minlength=k) if sizes is None else sizes
    return {
        "size_min": int(sizes.min()),
        "size_max": int(sizes.max()),
        "size_mean": float(sizes.mean()),
        "empty": int((sizes == 0).sum()),
        "size_entropy": entropy(sizes),
        "size_entropy_max": log(k),
    }


def _cluster_entropies(table: Contingency) -> np.ndarray:
    """Entropy of the truth classes inside each cluster (clusters are rows)."""
    counts = table.dense().astype(np.float64)
    totals = counts.sum(1, keepdims=True)
    p = counts / totals
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(counts > 0, -p * np.log(np.where(counts > 0, p, 1.0)), 0.0)
    return terms.sum(1)


def _accuracy(table: Contingency, counts: np.ndarray | None) -> float | None:
    """Hungarian accuracy when there are as many clusters as classes (and the table is dense)."""
    if counts is None or len(table.rows) != len(table.cols):
        return None
    from scipy import optimize

    rows, cols = optimize.linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / table.n)


def agreement(clusters: np.ndarray, reference: np.ndarray, *, accuracy: bool = False) -> dict:
    """NMI, ARI and purity of two labellings (and Hungarian accuracy if asked) from one contingency table:
    the figures a training log needs, without the exact AMI's expectation sum that :func:`compare` pays for."""
    table = contingency(clusters, reference)
    majority = table.table.max(axis=1)
    majority = np.asarray(majority.todense()).ravel() if sparse.issparse(majority) else majority
    result = {"nmi": nmi(table), "ari": ari(table), "purity": float(majority.sum() / table.n)}
    if accuracy:
        small = len(table.rows) * len(table.cols) <= _DENSE_LIMIT
        result["accuracy"] = _accuracy(table, table.dense() if small else None)
    return result


def compare(clusters: np.ndarray, truth: np.ndarray, *, k: int | None = None, average: str = "arithmetic",
            entropy_bins: int = 20) -> dict:
    """All metrics of one head's ``clusters`` against ``truth`` (ground truth or another labelling)."""
    result = compare_table(contingency(clusters, truth), k=k, average=average, entropy_bins=entropy_bins)
    if k is not None:
        result.update(size_stats(clusters, k))
    return result


def compare_table(table: Contingency, *, k: int | None = None, average: str = "arithmetic",
                  entropy_bins: int = 20) -> dict:
    """:func:`compare` from the contingency table (no size statistics: they need every label of the head)."""
    h_truth, h_clusters = entropy(table.cols), entropy(table.rows)
    mi = mutual_info(table)
    counts = table.dense() if len(table.rows) * len(table.cols) <= _DENSE_LIMIT else None
    accuracy = _accuracy(table, counts)
    majority = np.asarray(table.table.max(axis=1).todense()).ravel() if counts is None else counts.max(1)
    per_cluster = _cluster_entropies(table) if counts is not None else None
    result = {
        "k": int(k if k is not None else len(table.rows)),
        "n": table.n,
        "clusters_used": len(table.rows),
        "classes": len(table.cols),
        "nmi": nmi(table, average),
        "ami": ami(table, average),
        "ari": ari(table),
        "homogeneity": mi / h_truth if h_truth else 1.0,
        "completeness": mi / h_clusters if h_clusters else 1.0,
        "accuracy": accuracy,
        "purity": float(majority.sum() / table.n),
    }
    if per_cluster is not None:
        hist, edges = np.histogram(per_cluster, bins=entropy_bins, range=(0.0, max(log(len(table.cols)), 1e-9)))
        result.update(
            entropy_mean=float(per_cluster.mean()),
            entropy_median=float(np.median(per_cluster)),
            entropy_hist={"counts": hist.tolist(), "edges": edges.tolist()},
        )
    else:
        result.update(entropy_mean=None, entropy_median=None, entropy_hist=None)
    return result
