"""Metrics of an artefact against ground truth or against another artefact, joined by sample id."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..artefact import format as fmt
from ..artefact import Artefact, read_artefact, read_label_table
from ..errors import ConfigError, DataError
from ._metrics import compare, size_stats

__all__ = ["load_truth", "score_artefact", "parse_heads", "label_free"]


def load_truth(spec: str) -> tuple[pa.Array, np.ndarray]:
    """Ground truth ``(sample ids, class index)`` from a data spec or a sample_id,label Parquet/CSV file."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in (".parquet", ".csv", ".tsv"):
        return read_label_table(path)
    from ..data import id_array, resolve

    source = resolve(spec)
    if not source.has_truth:
        raise DataError(f"{spec}: this data has no ground-truth classes (class folders, shard 'cls' or npz 'labels')")
    keep = source.targets >= 0
    ids = id_array(source.ids).filter(pa.array(keep))
    return ids, source.targets[keep]


def parse_heads(heads: str | None, available: int, option: str = "--head") -> list[int]:
    """``all``/None, or a comma-separated list like ``0,3``; errors name ``option``."""
    if heads is None or heads == "all":
        return list(range(available))
    try:
        chosen = [int(h) for h in str(heads).split(",") if h.strip()]
    except ValueError:
        raise ConfigError(f"{option} must be 'all' or numbers like 0,3; got {heads!r}") from None
    bad = [h for h in chosen if not 0 <= h < available]
    if bad or not chosen:
        raise ConfigError(f"{option} {heads}: the artefact has heads 0 to {available - 1}")
    return chosen


def label_free(artefact: Artefact | str | os.PathLike, heads: str | None = None) -> dict:
    """Per-head quality without ground truth (:mod:`labelkit.quality`): agreement between heads of the same K
    and size balance from the labels; stability, linear-probe generalisation and k-means agreement as the run
    that made the artefact recorded them (they need its features). A consensus head is no independent peer:
    it is left out of the agreement and of the choice of K."""
    from ._label_free import head_quality, recommend_k

    art = artefact if isinstance(artefact, Artefact) else read_artefact(artefact)
    ks = [h.k for h in art.heads]
    voted = (art.metadata["method"].get("consensus") or {}).get("head")
    own = [h for h in range(art.num_heads) if h != voted]
    rows = {h: row for h, row in zip(own, head_quality(art.label_matrix()[own], [ks[h] for h in own]))}
    recorded = {r["head"]: r for r in (art.metadata["method"].get("quality") or {}).get("heads", [])}
    for h, row in rows.items():
        row["head"] = h
        saved = recorded.get(h, {})
        for name in ("agreement_kmeans", "stability", "generalisation"):
            row[name] = saved.get(name)
        if row["agreement_kmeans"] is not None:  # judged as the run judged it, against k-means on its features
            row["agreement"] = row["agreement_kmeans"]
    if voted is not None:
        rows[voted] = head_quality(art.labels(voted)[None], [ks[voted]])[0]
        rows[voted]["head"] = voted
    chosen = parse_heads(heads, art.num_heads)
    return {"artefact_id": art.artefact_id, "n": art.num_samples, "heads": [rows[h] for h in chosen],
            "recommended_k": recommend_k([rows[h] for h in own])}


def score_artefact(
    artefact: Artefact | str | os.PathLike,
    *,
    truth: str | None = None,
    against: Artefact | str | os.PathLike | None = None,
    heads: str | None = None,
    min_coverage: float = 0.99,
    average: str = "arithmetic",
    per_cluster: bool = False,
) -> dict:
    """Per-head metrics of ``artefact`` against ground truth (``truth``) or another artefact (``against``).

    Samples are joined by id; fails when fewer than ``min_coverage`` of the artefact's samples match. Against
    another artefact, head h is compared with its head h (or its only head). ``per_cluster``: :func:`cluster_rows`.
    """
    if (truth is None) == (against is None):
        raise ConfigError("give one of --truth SPEC or --against ARTEFACT, not both (neither: label_free)")
    if not 0.0 <= min_coverage <= 1.0:
        raise ConfigError(f"--min-coverage must lie in [0, 1], got {min_coverage}")
    if against is not None and not per_cluster and _local_file(artefact) and _local_file(against):
        # two local files: read side by side where their ids are the same (a URL is fetched once, whole)
        from ._streamed import streamed_scores

        found = streamed_scores(artefact, against, lambda count: parse_heads(heads, count), average)
        if found is not None:
            return found
    art = artefact if isinstance(artefact, Artefact) else read_artefact(artefact)
    ids = art.table.column(fmt.ID_COLUMN).combine_chunks()
    chosen = parse_heads(heads, art.num_heads)
    truth_ids, truth_labels, other_columns, reference = _reference(art, truth, against)
    position = pc.index_in(ids, value_set=truth_ids)
    matched_mask = position.is_valid().to_numpy(zero_copy_only=False)
    matched = int(matched_mask.sum())
    coverage = matched / art.num_samples
    if matched == 0:
        raise DataError(f"no sample id of the artefact ({art.num_samples:,}) is in the reference "
                        f"({len(truth_ids):,}): the artefact has e.g. {ids[0].as_py()!r}, the reference e.g. "
                        f"{truth_ids[0].as_py()!r}; is it the same data?")
    if coverage < min_coverage:
        raise DataError(
            f"only {matched:,} of {art.num_samples:,} samples ({coverage:.1%}) have a reference label, below "
            f"--min-coverage {min_coverage:g}; lower it to score the matched part"
        )
    where = position.to_numpy(zero_copy_only=False)[matched_mask].astype(np.int64)
    results = []
    for h in chosen:
        reference_labels = truth_labels[where] if other_columns is None else other_columns[h][where]
        labels = art.labels(h)
        row = compare(labels[matched_mask], reference_labels, average=average)
        row.update({"head": h, "k": art.heads[h].k})
        row.update(size_stats(labels, art.heads[h].k))
        if per_cluster:
            row["clusters"] = cluster_rows(labels[matched_mask], reference_labels, art.heads[h])
        results.append(row)
    return {"artefact_id": art.artefact_id, "n": art.num_samples, "matched": matched, "coverage": coverage,
            **reference, "average": average, "heads": results}


def _local_file(artefact) -> bool:
    from .._util.remote import is_url

    return not isinstance(artefact, Artefact) and not is_url(artefact)


def _reference(art: Artefact, truth: str | None, against) -> tuple:
    """(ids, class labels or None, per-head labels of the other artefact or None, the result's reference entry)
    of ``--truth`` or ``--against``."""
    if truth is not None:
        truth_ids, truth_labels = load_truth(truth)
        return truth_ids, truth_labels, None, {"truth": truth}
    other = against if isinstance(against, Artefact) else read_artefact(against)
    if other.num_heads not in (1, art.num_heads):
        raise ConfigError(f"--against artefact has {other.num_heads} heads; need 1 or {art.num_heads}")
    columns = [other.labels(h if other.num_heads > 1 else 0) for h in range(art.num_heads)]
    return other.table.column(fmt.ID_COLUMN).combine_chunks(), None, columns, {"against": other.artefact_id}


def cluster_rows(labels: np.ndarray, reference: np.ndarray, head) -> list[dict]:
    """One row per cluster of ``head`` (a :class:`labelkit.artefact.Head`): its name, its size among the matched
    samples, the reference label most of its members have, the share that do (purity) and the entropy of their
    reference labels (nats)."""
    reference = np.asarray(reference)
    values, codes = np.unique(reference, return_inverse=True)
    counts = np.zeros((head.k, len(values)), dtype=np.int64)
    np.add.at(counts, (labels.astype(np.int64), codes.ravel()), 1)
    sizes = counts.sum(1)
    rows = []
    for c in range(head.k):
        size = int(sizes[c])
        p = counts[c][counts[c] > 0] / max(size, 1)
        rows.append({"cluster": c, "name": head.cluster_name(c), "size": size,
                     "majority": values[counts[c].argmax()].item() if size else None,
                     "purity": float(counts[c].max() / size) if size else None,
                     "entropy": float(-(p * np.log(p)).sum()) + 0.0 if size else None})  # + 0.0: no -0.0
    return rows
