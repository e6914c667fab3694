"""Label quality without ground truth, and which K to keep.

With no truth to score against, a labelling can still be judged by what it does:

* **agreement** -- adjusted mutual information (AMI, chance-corrected so that it means the same at every K)
  with an independent labelling of the same K: k-means with K clusters on the features the labels were
  solved on, or (from an artefact alone) the other heads of that K. Clusters that the data has are found again by every
  method; a K that the data does not have forces arbitrary splits or merges that each method makes
  differently. This is clustering stability (Ben-Hur et al. 2002; Lange et al. 2004).
* **stability** -- NMI with the same head's labels at the previous label step: has SeLa settled?
* **generalisation** -- cross-validated accuracy of a linear probe that predicts the labels from the features
  they were solved on (the score TURTLE maximises): labels that a simple classifier cannot learn are noise.
* **balance** -- entropy of the cluster sizes over log K (1: equal sizes).
* **neighbour agreement** -- how often a sample shares its label with its nearest neighbours in the space the
  labels were made from, corrected for chance (Cohen's kappa against labels drawn at random with the same
  cluster sizes). Clusters that follow the data's dense regions cut few neighbour pairs. On the pixel tables
  of bench/suite.py it rose and fell with the NMI to the classes over every label step of every head.

The K recommended is the one whose labels agree most with an independent clustering; K whose agreements lie
within 0.01 of the best are told apart by the linear probe (merging or splitting true classes under equal
sizes makes labels that a linear classifier learns less well).
"""

from __future__ import annotations

import numpy as np

from ._kmeans import kmeans
from ._metrics import ami, contingency, entropy, nmi

__all__ = ["head_quality", "recommend_k", "probe_accuracy", "neighbour_agreement", "QUALITY_ROWS"]

_PROBE_ROWS = 10_000  # a linear probe on more rows says the same, slower
_KMEANS_ROWS = 20_000
QUALITY_ROWS = _KMEANS_ROWS  # rows that head_quality reads at most: callers may keep just that many
# multiply-adds a figure may cost (rows x K x D, times the iterations or folds it takes) before it is left out:
# the quality check of a [3000 x 10] ImageNet run must not take longer than a label step
_WORK = 1e10
_TIE = 0.01  # agreements closer than this do not rank two K


def probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int = 0, folds: int = 3) -> float | None:
    """Mean held-out accuracy of a ridge-regression classifier on standardised ``features`` (``folds``-fold,
    fewer when the smallest cluster is smaller), leaving out clusters of one row, which no fold can hold out
    (at K = 1000 a sample of 10,000 rows has a few); None when fewer than half the rows, or fewer than two
    clusters, remain."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    common = np.bincount(labels)[labels] >= 2
    if common.sum() < len(labels) / 2 or len(np.unique(labels[common])) < 2:
        return None
    features, labels = features[common], labels[common]
    counts = np.bincount(labels)
    folds = int(min(folds, counts[counts > 0].min()))
    model = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0))
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(cross_val_score(model, features, labels, cv=split).mean())


def neighbour_agreement(labels: np.ndarray, near: np.ndarray, rows: np.ndarray | None = None) -> float:
    """Chance-corrected share of neighbour pairs with the same label: ``labels`` (N,), ``near`` (N, k) the
    indices of each sample's nearest neighbours; only ``rows`` (default all) and their neighbours among
    ``rows`` count. 1: every neighbour agrees; 0: no more than random labels of the same sizes would."""
    labels, near = np.asarray(labels), np.asarray(near)
    counted = np.ones(len(labels), bool)
    if rows is not None:
        counted[:] = False
        counted[rows] = True
    own = labels[counted]
    neighbours = near[counted]
    valid = counted[neighbours]
    observed = float((labels[neighbours] == own[:, None])[valid].mean()) if valid.any() else 0.0
    shares = np.bincount(own[own >= 0]) / max(int((own >= 0).sum()), 1)
    expected = float((shares**2).sum())
    return (observed - expected) / (1 - expected) if expected < 1 else 0.0


def head_quality(labels, ks: list[int], *, features=None, previous=None, seed: int = 0) -> list[dict]:
    """Label-free quality of each head of ``labels`` (T, N) with ``ks`` clusters.

    Args:
        features: (N, D) features the labels were solved on: enables the agreement with k-means and the
            linear-probe generalisation score; large inputs are subsampled, and a figure whose cost would
            pass about 1e10 multiply-adds (k-means at K = 3000 on 2048-d features) is left out.
        previous: (T, N) labels of the previous label step: enables stability.

    Each row has ``agreement_heads`` (mean AMI with the other heads of its K), ``agreement_kmeans`` (AMI with
    k-means of K clusters on the features), ``agreement`` (the k-means one when there are features, so that
    every K is judged against the same kind of peer; else the heads one), ``stability``, ``generalisation``
    and ``balance``; a figure that cannot be computed is None.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[1]
    rng = np.random.default_rng(seed)
    probe_rows = np.sort(rng.choice(n, min(n, _PROBE_ROWS), replace=False))
    kmeans_rows = np.sort(rng.choice(n, min(n, _KMEANS_ROWS), replace=False))
    if features is not None:
        features = np.asarray(features, dtype=np.float32)
    out = []
    for h, k in enumerate(ks):
        sizes = np.bincount(labels[h], minlength=k)
        row = {"head": h, "k": k, "agreement": None, "agreement_heads": None, "agreement_kmeans": None,
               "stability": None, "generalisation": None, "balance": float(entropy(sizes) / np.log(k)) if k > 1 else 1.0}
        peers = [o for o in range(len(ks)) if o != h and ks[o] == k]
        if peers:
            row["agreement_heads"] = float(np.mean([ami(contingency(labels[h], labels[o])) for o in peers]))
        d = features.shape[1] if features is not None else 0
        # k-means on as many rows as the work allows (about 100 rounds), but at least 20 per cluster
        fits = int(min(len(kmeans_rows), _WORK / (100 * k * max(d, 1))))
        if features is not None and fits >= min(n, 20 * k) and k < fits:
            some = kmeans_rows[:: max(1, len(kmeans_rows) // fits)][:fits]
            found = kmeans(features[some], k, seed + h)[0]
            row["agreement_kmeans"] = ami(contingency(labels[h][some], found))
        row["agreement"] = row["agreement_kmeans"] if features is not None else row["agreement_heads"]
        if previous is not None:
            row["stability"] = nmi(contingency(labels[h], np.asarray(previous)[h]))
        if features is not None and 3 * len(probe_rows) * d * (d + k) <= _WORK:
            row["generalisation"] = probe_accuracy(features[probe_rows], labels[h][probe_rows], seed)
        out.append(row)
    return out


def _mean(rows: list[dict], name: str) -> float | None:
    values = [r[name] for r in rows if r[name] is not None]
    return float(np.mean(values)) if values else None


def recommend_k(quality: list[dict]) -> dict | None:
    """The K whose heads agree most, with one row per K (mean of its heads); None with fewer than two K."""
    by_k: dict[int, list[dict]] = {}
    for row in quality:
        by_k.setdefault(row["k"], []).append(row)
    if len(by_k) < 2:
        return None
    table = []
    for k, rows in sorted(by_k.items()):
        table.append({"k": k, "heads": [r["head"] for r in rows],
                      **{name: _mean(rows, name) for name in ("agreement", "agreement_heads", "agreement_kmeans",
                                                               "stability", "generalisation", "balance")}})
    if any(row["agreement"] is None for row in table):  # K judged against different peers cannot be ranked
        return None
    top = max(row["agreement"] for row in table)
    # agreements this close are one figure measured twice; the linear probe then says which labels are learnable
    tied = [row for row in table if row["agreement"] >= top - _TIE]
    if len(tied) > 1 and all(row["generalisation"] is not None for row in tied):
        best = max(tied, key=lambda row: row["generalisation"])
        return {"k": best["k"], "by": f"agreement, then generalisation among K within {_TIE} of the best", "table": table}
    best = max(tied, key=lambda row: row["agreement"])
    return {"k": best["k"], "by": "agreement", "table": table}
