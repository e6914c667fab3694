"""The label artefact in memory: built (validated) from labels and provenance, and written atomically (a run's
rows can also be written a part at a time: :mod:`labelkit.artefact._writing`); the one reader is
:mod:`labelkit.artefact._reading`. The format itself is defined in
:mod:`labelkit.artefact.format`."""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import format as fmt
from .._util import remote
from ..errors import ArtefactError

__all__ = ["Artefact", "Head", "producer_versions"]

_MAX_LISTED = 5  # examples named in an error message


@dataclass(frozen=True)
class Head:
    """One labelling head: its column name, its number of clusters and, when given, each cluster's name (None
    where not named) and review status."""

    name: str
    k: int
    names: tuple[str | None, ...] | None = None
    status: tuple[str, ...] | None = None

    @classmethod
    def from_metadata(cls, entry: dict) -> "Head":
        names, status = entry.get("names"), entry.get("status")
        return cls(entry["name"], int(entry["k"]), tuple(names) if names is not None else None,
                   tuple(status) if status is not None else None)

    def cluster_name(self, cluster: int) -> str | None:
        """The name of one cluster, or None when it has none."""
        return self.names[cluster] if self.names is not None else None

    def label(self, cluster: int) -> str:
        """What to show for a cluster: its name, else its number."""
        name = self.cluster_name(cluster)
        return name if name is not None else str(cluster)


def producer_versions() -> dict[str, str | None]:
    """Versions of labelkit, torch and timm, read without importing torch."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"labelkit": version("labelkit") or "unknown", "torch": version("torch"), "timm": version("timm")}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _as_label_matrix(labels: Any) -> np.ndarray:
    if isinstance(labels, (list, tuple)) and labels and np.ndim(labels[0]) == 1:
        labels = np.stack([np.asarray(col) for col in labels])
    arr = np.asarray(labels)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ArtefactError(f"labels must have shape (N,) or (heads, N), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ArtefactError(f"labels must be integers, got dtype {arr.dtype}")
    return arr


def _id_problems(ids: pa.Array) -> list[str]:
    """Nulls, empty strings, separators and duplicates among sorted ids."""
    problems = []
    if ids.null_count:
        rows = np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[:_MAX_LISTED]
        problems.append(f"sample_id has {ids.null_count} null value(s), e.g. at rows {rows.tolist()}")
        ids = ids.drop_null()
    bad = pc.or_(pc.equal(pc.utf8_length(ids), 0), pc.match_substring_regex(ids, r"[\n\x00]"))
    if pc.any(bad).as_py():
        examples = ids.filter(bad)[:_MAX_LISTED].to_pylist()
        problems.append(f"sample_id must be non-empty without newline or NUL characters, got {examples!r}")
    if len(ids) > 1:
        dup = pc.equal(ids[1:], ids[:-1])
        if pc.any(dup).as_py():
            examples = sorted(set(ids[1:].filter(dup).to_pylist()))
            problems.append(
                f"sample_id has {len(examples)} duplicated value(s), e.g. {examples[:_MAX_LISTED]!r}"
            )
    return problems


def _check_count(ids: int, labels: int) -> None:
    if ids != labels:
        raise ArtefactError(f"{ids} sample ids but {labels} labels per head; they must match one to one")
    if labels == 0:
        raise ArtefactError("an artefact needs at least one sample")


def _checked_ids(sample_ids) -> pa.Array:
    ids = pa.array(sample_ids, type=pa.string()) if not isinstance(sample_ids, pa.Array) else sample_ids
    if not pa.types.is_string(ids.type) and not pa.types.is_large_string(ids.type):
        raise ArtefactError(f"sample_id must be strings, got {ids.type}")
    return ids


def _range_problem(name: str, k: int, labels: np.ndarray, ids: pa.Array, first_row: int = 0) -> str | None:
    """What is wrong with a head's labels outside [0, k), naming the first such row (``first_row`` is the row
    number of the first label given)."""
    if labels.size == 0:
        return None
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi < k:
        return None
    row = int(np.flatnonzero((labels < 0) | (labels >= k))[0])
    return (
        f"{name}: labels must lie in [0, {k}) but range over [{lo}, {hi}]; "
        f"first bad row {first_row + row} (sample_id {ids[row].as_py()!r}, label {int(labels[row])})"
    )


def _check_metadata(metadata: dict) -> None:
    errors = sorted(jsonschema.Draft202012Validator(fmt.METADATA_SCHEMA).iter_errors(metadata), key=str)
    if errors:
        raise ArtefactError(f"invalid artefact metadata: {_schema_message(errors[0])}")
    problems = fmt.curation_problems(metadata["heads"])
    if problems:
        raise ArtefactError(f"invalid artefact metadata: {problems[0]}", problems)


def _head_entries(ks: list[int], names, status) -> list[dict]:
    """The metadata's head entries: name and K, with each head's cluster names and status where given."""
    for given in (names, status):
        if given is not None and len(given) != len(ks):
            raise ArtefactError(f"{len(ks)} heads but names or status for {len(given)}")
    entries = []
    for h, k in enumerate(ks):
        entry = {"name": fmt.head_column(h), "k": k}
        for key, given in (("names", names), ("status", status)):
            value = given[h] if given is not None else None
            if value is not None:
                entry[key] = [None if v is None else str(v) for v in value] if key == "names" else list(value)
        entries.append(entry)
    return entries


def _head_ks(ks: Sequence[int] | int | None, matrix: np.ndarray) -> list[int]:
    """K of every head: as given (one int for all), or ``max + 1`` of each head's labels."""
    heads = len(matrix)
    if ks is None:
        ks = [int(matrix[h].max()) + 1 for h in range(heads)]
    elif isinstance(ks, (int, np.integer)):
        ks = [int(ks)] * heads
    ks = [int(k) for k in ks]
    if len(ks) != heads:
        raise ArtefactError(f"{heads} heads of labels but {len(ks)} values of K")
    if any(k < 1 for k in ks):
        raise ArtefactError(f"K must be at least 1 for every head, got {ks}")
    return ks


def _label_table(ids: pa.Array, matrix: np.ndarray, ks: list[int], scores: np.ndarray | None) -> pa.Table:
    """The artefact's columns: sample ids, one int32 column per head, and the heads' scores when given."""
    columns = {fmt.ID_COLUMN: ids}
    fields = [pa.field(fmt.ID_COLUMN, pa.string(), nullable=False)]
    for h in range(len(ks)):
        columns[fmt.head_column(h)] = pa.array(matrix[h].astype(np.int32))
        fields.append(pa.field(fmt.head_column(h), pa.int32(), nullable=False))
    for h in range(len(ks) if scores is not None else 0):
        columns[fmt.score_column(h)] = pa.array(scores[h])
        fields.append(pa.field(fmt.score_column(h), pa.float32(), nullable=False))
    return pa.Table.from_pydict(columns, schema=pa.schema(fields))


def _data_section(data: dict, ids: pa.Array | None) -> dict:
    """The metadata's ``data`` section: what the labels were made on (see :meth:`Artefact.build`)."""
    unknown = set(data) - {"spec", "fingerprint", "count", "content", "skipped"}
    if unknown:
        raise ArtefactError(f"unknown keys in the data section: {sorted(unknown)}")
    spec, count = data.get("spec"), data.get("count")
    return {
        "spec": remote.redact(spec) if spec else spec,
        "fingerprint": data.get("fingerprint") or fmt.fingerprint_ids(ids),
        "count": int(count if count is not None else len(ids)),
        **({"content": dict(data["content"])} if data.get("content") else {}),
        **({"skipped": list(data["skipped"])} if data.get("skipped") else {}),
    }


def _new_metadata(artefact_id: str, n: int, entries: list[dict], data: dict, method: dict | None,
                  parents: Iterable[str]) -> dict:
    """The checked metadata of an artefact written now by this labelkit."""
    metadata = {
        "format_version": fmt.FORMAT_VERSION,
        "artefact_id": artefact_id,
        "num_samples": n,
        "heads": entries,
        "data": data,
        "producer": producer_versions(),
        "method": remote.redact_all(method or {"name": "unknown"}),
        "parents": list(parents),
        "created_at": _now(),
    }
    _check_metadata(metadata)
    return metadata


class Artefact:
    """Labels of T heads for N samples, keyed by sample id, with provenance.

    Build one with :meth:`Artefact.build`, save it with :meth:`write`, load one with :func:`read_artefact`.
    """

    def __init__(self, table: pa.Table, metadata: dict):
        self._table = table
        self.metadata = metadata
        self._ids_np: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        sample_ids: Sequence[str] | pa.Array | np.ndarray,
        labels: Any,
        ks: Sequence[int] | int | None = None,
        *,
        scores: Any = None,
        data: dict | None = None,
        method: dict | None = None,
        parents: Iterable[str] = (),
        names: Sequence[Sequence[str | None] | None] | None = None,
        status: Sequence[Sequence[str] | None] | None = None,
    ) -> "Artefact":
        """Validate and assemble an artefact; rows are sorted by sample id.

        Args:
            sample_ids: one stable id per sample.
            labels: (N,) or (heads, N) integer labels, or a list of per-head (N,) arrays.
            ks: clusters per head (one int for all heads); defaults to ``max + 1`` of each head.
            scores: optional (heads, N) assignment confidences.
            data: the ``data`` section (what the labels were made on, see :meth:`labelkit.data.Manifest.record`):
                ``spec``, ``fingerprint`` and ``count`` (default: those of ``sample_ids``), ``content``, ``skipped``.
            method: how the labels were made, e.g. ``{"name": "sela", "config": {...}}``.
            parents: artefact ids this one derives from.
            names, status: per head, None or the K cluster names (None for a cluster not named) and review
                states (``unreviewed``, ``accepted``, ``rejected``).
        """
        ids, matrix = _checked_ids(sample_ids), _as_label_matrix(labels)
        heads_n, n = matrix.shape
        _check_count(len(ids), n)
        ks = _head_ks(ks, matrix)
        order = pc.sort_indices(ids, sort_keys=[("", "ascending")]) if n > 1 else pa.array([0])
        ids_sorted = ids.take(order).cast(pa.string())
        problems = _id_problems(ids_sorted)
        if problems:
            raise ArtefactError("invalid sample ids: " + "; ".join(problems), problems)
        matrix = matrix[:, order.to_numpy()]
        problem = next(filter(None, (_range_problem(fmt.head_column(h), k, matrix[h], ids_sorted)
                                     for h, k in enumerate(ks))), None)
        if problem:
            raise ArtefactError(problem, [problem])
        if scores is not None:
            scores = np.asarray(scores, dtype=np.float32).reshape(heads_n, n)[:, order.to_numpy()]
        heads = [(fmt.head_column(h), k, matrix[h]) for h, k in enumerate(ks)]
        entries = _head_entries(ks, names, status)
        metadata = _new_metadata(fmt.compute_artefact_id(ids_sorted, heads, entries), n, entries,
                                 _data_section(data or {}, ids_sorted), method, parents)
        return cls(_label_table(ids_sorted, matrix, ks, scores), metadata)

    def restamped(self, producer: dict, created_at: str) -> "Artefact":
        """The same artefact as recorded by another writer at another time (an import of a labelkit export keeps
        the original's); neither enters the artefact id."""
        metadata = {**self.metadata, "producer": producer, "created_at": created_at}
        _check_metadata(metadata)
        return Artefact(self._table, metadata)

    # -- accessors -------------------------------------------------------------------------------------------
    @property
    def table(self) -> pa.Table:
        """The Parquet table (no schema metadata attached)."""
        return self._table

    @property
    def heads(self) -> list[Head]:
        return [Head.from_metadata(h) for h in self.metadata["heads"]]

    def revise(self, method: dict, *, labels: np.ndarray | None = None, ks: Sequence[int] | None = None,
               names=None, status=None, parents: Iterable[str] = ()) -> "Artefact":
        """A new version of these labels whose parent is this artefact: the same sample ids, data and scores,
        with the labels, K, names or status given replacing this one's (per head lists; None keeps a head's)."""
        old = self.heads
        matrix = self.label_matrix() if labels is None else labels
        ks = [h.k for h in old] if ks is None else list(ks)

        def merged(given, key):
            given = given or [None] * len(old)
            return [given[h] if given[h] is not None else getattr(old[h], key) for h in range(len(old))]

        scores = None
        if all(self.scores(h) is not None for h in range(self.num_heads)):
            scores = np.stack([self.scores(h) for h in range(self.num_heads)])
        voted = self.metadata["method"].get("consensus")
        if voted and "consensus" not in method:  # which head is the consensus (the primary head) outlives revisions
            method = {**method, "consensus": voted}
        return Artefact.build(self._table.column(fmt.ID_COLUMN).combine_chunks(), matrix, ks, scores=scores,
                              data=self.metadata["data"], method=method, parents=[self.artefact_id, *parents],
                              names=merged(names, "names"), status=merged(status, "status"))

    @property
    def num_heads(self) -> int:
        return len(self.metadata["heads"])

    @property
    def num_samples(self) -> int:
        return self._table.num_rows

    @property
    def artefact_id(self) -> str:
        return self.metadata["artefact_id"]

    @property
    def fingerprint(self) -> str:
        """sha256 of this artefact's own sorted sample ids."""
        return fmt.fingerprint_ids(self._table.column(fmt.ID_COLUMN).combine_chunks())

    @property
    def sample_ids(self) -> np.ndarray:
        """Sample ids as a numpy object array, sorted."""
        if self._ids_np is None:
            self._ids_np = self._table.column(fmt.ID_COLUMN).to_numpy()
        return self._ids_np

    def labels(self, head: int = 0) -> np.ndarray:
        """int32 labels of one head, in sample-id order."""
        self._check_head(head)
        return self._table.column(fmt.head_column(head)).to_numpy().astype(np.int32, copy=False)

    @property
    def primary_head(self) -> int:
        """The head that holds the artefact's main labels: the consensus head where there is one, else head 0."""
        voted = (self.metadata["method"].get("consensus") or {}).get("head")
        return int(voted) if voted is not None else 0

    def confidence(self) -> np.ndarray:
        """Each sample's confidence: the score of the primary head (see :mod:`labelkit.artefact.format`: the
        network's probability of the label, or for a consensus head that of the agreeing heads)."""
        scores = self.scores(self.primary_head)
        if scores is None:
            raise ArtefactError(f"artefact {self.artefact_id[:12]} has no score columns, so no confidence; "
                                "labels from generate, transfer, predict or consensus have them")
        return scores

    def subset(self, keep: np.ndarray, why: dict) -> "Artefact":
        """The samples where ``keep`` (a boolean mask in sample-id order) holds, as a new artefact whose parent is
        this one: the same heads, K, names, data and method, with ``why`` recorded as ``method.subset``."""
        keep = np.asarray(keep, dtype=bool)
        rows = np.flatnonzero(keep)
        scores = None
        if all(self.scores(h) is not None for h in range(self.num_heads)):
            scores = np.stack([self.scores(h)[rows] for h in range(self.num_heads)])
        heads = self.heads
        return Artefact.build(self.sample_ids[rows].tolist(), self.label_matrix()[:, rows], [h.k for h in heads],
                              scores=scores, data=self.metadata["data"], parents=[self.artefact_id],
                              method={**self.metadata["method"], "subset": {**why, "kept": len(rows),
                                                                            "of": self.num_samples}},
                              names=[h.names for h in heads], status=[h.status for h in heads])

    def with_novelty(self, novelty: np.ndarray, record: dict) -> "Artefact":
        """The same artefact with each sample's ``novelty`` score (sample-id order) and ``novel`` flag (past
        ``record["threshold"]``), and ``record`` as ``method.novelty``; not part of the artefact id."""
        novelty = np.asarray(novelty, dtype=np.float32)
        table = self._table.append_column(pa.field(fmt.NOVELTY_COLUMN, pa.float32()), pa.array(novelty))
        table = table.append_column(pa.field(fmt.NOVEL_COLUMN, pa.bool_()), pa.array(novelty > record["threshold"]))
        metadata = {**self.metadata, "method": {**self.metadata["method"], "novelty": record}}
        _check_metadata(metadata)
        return Artefact(table, metadata)

    def with_name_columns(self) -> "Artefact":
        """The same artefact with a ``name_H`` column (each sample's cluster name) for every named head, so that
        SQL and dataframes read names without the metadata."""
        table = self._table
        for h, head in enumerate(self.heads):
            column = fmt.name_column(h)
            if head.names is not None and column not in table.column_names:
                lookup = pa.array(list(head.names), pa.string())
                table = table.append_column(pa.field(column, pa.string()), lookup.take(pa.array(self.labels(h))))
        return Artefact(table, self.metadata)

    def scores(self, head: int = 0) -> np.ndarray | None:
        self._check_head(head)
        name = fmt.score_column(head)
        if name not in self._table.column_names:
            return None
        return self._table.column(name).to_numpy()

    def label_matrix(self) -> np.ndarray:
        """All heads as one (heads, N) int32 array."""
        return np.stack([self.labels(h) for h in range(self.num_heads)])

    def cluster_sizes(self, head: int = 0) -> np.ndarray:
        return np.bincount(self.labels(head), minlength=self.heads[head].k)

    def _check_head(self, head: int) -> None:
        if not 0 <= head < self.num_heads:
            raise ArtefactError(f"head {head} does not exist: this artefact has heads 0..{self.num_heads - 1}")

    # -- writing ---------------------------------------------------------------------------------------------
    def write(self, path: str | os.PathLike) -> Path | str:
        """Write atomically: the file appears complete under ``path`` (a local path or an fsspec URL such as
        ``s3://bucket/labels.parquet``) or not at all."""
        path = path if remote.is_url(path) else Path(path)
        schema = self._table.schema.with_metadata({fmt.METADATA_KEY: json.dumps(self.metadata)})
        table = self._table.replace_schema_metadata(schema.metadata)
        with remote.atomic_output(path) as tmp:
            pq.write_table(
                table,
                tmp,
                compression="zstd",
                use_dictionary=[c for c in table.column_names if c != fmt.ID_COLUMN],
                row_group_size=1 << 20,
            )
        return path

    def __repr__(self) -> str:
        heads = ", ".join(f"{h.name}:K={h.k}" for h in self.heads)
        return f"Artefact(n={self.num_samples}, heads=[{heads}], id={self.artefact_id[:12]})"


def _schema_message(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    return f"metadata key {where!r}: {error.message}"
