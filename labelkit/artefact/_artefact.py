"""The label artefact: build, write (atomically), read and validate. The one reader and the one writer.

The format itself is defined in :mod:`labelkit.artefact.format`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import format as fmt
from .._util import remote
from .._util.files import atomic_path
from ..errors import ArtefactError

__all__ = ["Artefact", "ArtefactHeader", "Head", "read_artefact", "read_header", "check_artefact", "artefact_path",
           "artefact_files",
           "producer_versions"]

_MAX_LISTED = 5  # examples named in an error message


@dataclass(frozen=True)
class Head:
    """One labelling head: its column name and its number of clusters."""

    name: str
    k: int


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


def _range_problem(name: str, k: int, labels: np.ndarray, ids: pa.Array) -> str | None:
    if labels.size == 0:
        return None
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi < k:
        return None
    row = int(np.flatnonzero((labels < 0) | (labels >= k))[0])
    return (
        f"{name}: labels must lie in [0, {k}) but range over [{lo}, {hi}]; "
        f"first bad row {row} (sample_id {ids[row].as_py()!r}, label {int(labels[row])})"
    )


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
        data_spec: str | None = None,
        data_fingerprint: str | None = None,
        data_count: int | None = None,
        data_content: dict | None = None,
        data_skipped: list[dict] | None = None,
        method: dict | None = None,
        parents: Iterable[str] = (),
        producer: dict | None = None,
    ) -> "Artefact":
        """Validate and assemble an artefact; rows are sorted by sample id.

        Args:
            sample_ids: one stable id per sample.
            labels: (N,) or (heads, N) integer labels, or a list of per-head (N,) arrays.
            ks: clusters per head (one int for all heads); defaults to ``max + 1`` of each head.
            scores: optional (heads, N) assignment confidences.
            data_spec, data_fingerprint, data_count: what the labels were made on; the fingerprint and count
                default to those of ``sample_ids``.
            data_content: the data's content fingerprint (:attr:`labelkit.data.Source.content`).
            data_skipped: samples of the data that could not be decoded, ``{"sample_id", "reason"}`` each.
            method: how the labels were made, e.g. ``{"name": "sela", "config": {...}}``.
            parents: artefact ids this one derives from.
        """
        ids = pa.array(sample_ids, type=pa.string()) if not isinstance(sample_ids, pa.Array) else sample_ids
        if not pa.types.is_string(ids.type) and not pa.types.is_large_string(ids.type):
            raise ArtefactError(f"sample_id must be strings, got {ids.type}")
        matrix = _as_label_matrix(labels)
        heads_n, n = matrix.shape
        if n != len(ids):
            raise ArtefactError(f"{len(ids)} sample ids but {n} labels per head; they must match one to one")
        if n == 0:
            raise ArtefactError("an artefact needs at least one sample")
        if ks is None:
            ks = [int(matrix[h].max()) + 1 for h in range(heads_n)]
        elif isinstance(ks, (int, np.integer)):
            ks = [int(ks)] * heads_n
        ks = [int(k) for k in ks]
        if len(ks) != heads_n:
            raise ArtefactError(f"{heads_n} heads of labels but {len(ks)} values of K")
        if any(k < 1 for k in ks):
            raise ArtefactError(f"K must be at least 1 for every head, got {ks}")
        score_matrix = None
        if scores is not None:
            score_matrix = np.asarray(scores, dtype=np.float32).reshape(heads_n, n)

        order = pc.sort_indices(ids, sort_keys=[("", "ascending")]) if n > 1 else pa.array([0])
        ids_sorted = ids.take(order).cast(pa.string())
        problems = _id_problems(ids_sorted)
        if problems:
            raise ArtefactError("invalid sample ids: " + "; ".join(problems), problems)
        order_np = order.to_numpy()
        matrix = matrix[:, order_np]
        for h, k in enumerate(ks):
            problem = _range_problem(fmt.head_column(h), k, matrix[h], ids_sorted)
            if problem:
                raise ArtefactError(problem, [problem])

        columns = {fmt.ID_COLUMN: ids_sorted}
        fields = [pa.field(fmt.ID_COLUMN, pa.string(), nullable=False)]
        heads = []
        for h, k in enumerate(ks):
            name = fmt.head_column(h)
            columns[name] = pa.array(matrix[h].astype(np.int32))
            fields.append(pa.field(name, pa.int32(), nullable=False))
            heads.append((name, k, matrix[h]))
        if score_matrix is not None:
            score_matrix = score_matrix[:, order_np]
            for h in range(heads_n):
                columns[fmt.score_column(h)] = pa.array(score_matrix[h])
                fields.append(pa.field(fmt.score_column(h), pa.float32(), nullable=False))

        fingerprint = fmt.fingerprint_ids(ids_sorted)
        metadata = {
            "format_version": fmt.FORMAT_VERSION,
            "artefact_id": fmt.compute_artefact_id(ids_sorted, heads),
            "num_samples": n,
            "heads": [{"name": name, "k": k} for name, k, _ in heads],
            "data": {
                "spec": remote.redact(data_spec) if data_spec else data_spec,
                "fingerprint": data_fingerprint or fingerprint,
                "count": int(data_count if data_count is not None else n),
                **({"content": dict(data_content)} if data_content else {}),
                **({"skipped": list(data_skipped)} if data_skipped else {}),
            },
            "producer": producer or producer_versions(),
            "method": remote.redact_all(method or {"name": "unknown"}),
            "parents": list(parents),
            "created_at": _now(),
        }
        errors = sorted(jsonschema.Draft202012Validator(fmt.METADATA_SCHEMA).iter_errors(metadata), key=str)
        if errors:
            raise ArtefactError(f"invalid artefact metadata: {_schema_message(errors[0])}")
        table = pa.Table.from_pydict(columns, schema=pa.schema(fields))
        return cls(table, metadata)

    # -- accessors -------------------------------------------------------------------------------------------
    @property
    def table(self) -> pa.Table:
        """The Parquet table (no schema metadata attached)."""
        return self._table

    @property
    def heads(self) -> list[Head]:
        return [Head(h["name"], int(h["k"])) for h in self.metadata["heads"]]

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
    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically: the file appears complete under ``path`` or not at all."""
        path = Path(path)
        schema = self._table.schema.with_metadata({fmt.METADATA_KEY: json.dumps(self.metadata)})
        table = self._table.replace_schema_metadata(schema.metadata)
        with atomic_path(path) as tmp:
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


def artefact_files(path: str | os.PathLike) -> list[Path | str]:
    """The Parquet file(s) that ``path`` names: the file itself, a run directory's ``labels.parquet``, or the
    ``data/*.parquet`` files of a Hub export (``export --format hub``, e.g. ``hf://datasets/user/repo``).
    URLs (``https://``, ``s3://``, ``hf://``, …) stay strings; an http URL ending in ``/`` names a run
    directory (plain http cannot list a folder)."""
    try:
        if not remote.is_dir(path):
            return [path if remote.is_url(path) else Path(path)]
        if remote.is_url(path):
            if remote.is_http(path):
                return [remote.join(path, "labels.parquet")]
            fs, root = remote.filesystem(path)
            if fs.isfile(f"{root.rstrip('/')}/labels.parquet"):
                return [remote.join(path, "labels.parquet")]
            parts = [fs.unstrip_protocol(p) for p in sorted(fs.glob(f"{root.rstrip('/')}/data/*.parquet"))]
        else:
            if (Path(path) / "labels.parquet").is_file():
                return [Path(path) / "labels.parquet"]
            parts = sorted((Path(path) / "data").glob("*.parquet"))
    except ImportError as exc:
        raise ArtefactError(str(exc)) from None
    if not parts:
        raise ArtefactError(f"{_shown(path)}: a directory without labels.parquet or data/*.parquet; give a label "
                            "artefact, a finished run directory or a Hub export")
    return parts


def artefact_path(path: str | os.PathLike) -> Path | str:
    """The one artefact file that ``path`` names (see :func:`artefact_files`)."""
    parts = artefact_files(path)
    if len(parts) > 1:
        raise ArtefactError(f"{_shown(path)}: {len(parts)} Parquet files; read it with read_artefact")
    return parts[0]


def _shown(path: Path | str | os.PathLike) -> str:
    return remote.redact(path) if remote.is_url(path) else str(path)


@contextlib.contextmanager
def _open(path: Path | str, block_size: int = remote.STREAM_BLOCK) -> Iterator[tuple[pq.ParquetFile, int]]:
    """The Parquet file at a path or URL (footer read; column data is fetched only when asked for) and its
    size in bytes."""
    try:
        with remote.open_input(path, block_size) as handle:
            try:
                pfile = pq.ParquetFile(handle)
            except (pa.ArrowInvalid, OSError) as exc:
                raise ArtefactError(
                    f"{_shown(path)}: not a readable Parquet file (truncated, or not a label artefact): {exc}",
                    [f"not a readable Parquet file: {exc}"],
                ) from None
            yield pfile, handle.seek(0, os.SEEK_END)
    except FileNotFoundError:
        raise ArtefactError(f"{_shown(path)}: no such file") from None
    except ImportError as exc:
        raise ArtefactError(str(exc)) from None
    except PermissionError as exc:
        raise ArtefactError(f"{_shown(path)}: access denied ({type(exc).__name__}); check the credentials "
                            "this filesystem reads (environment, config file or login)") from None


def _read_metadata(pfile: pq.ParquetFile) -> tuple[dict | None, list[str]]:
    raw = (pfile.schema_arrow.metadata or {}).get(fmt.METADATA_KEY.encode())
    if raw is None:
        return None, [f"no '{fmt.METADATA_KEY}' key in the Parquet schema metadata: not a labelkit artefact"]
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        return None, [f"the '{fmt.METADATA_KEY}' metadata is not valid JSON: {exc}"]
    if not isinstance(meta, dict):
        return None, [f"the '{fmt.METADATA_KEY}' metadata must be a JSON object"]
    version = meta.get("format_version")
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", str(version))
    if not match:
        return None, [f"metadata key 'format_version' is missing or not SemVer: {version!r}"]
    if int(match.group(1)) != fmt.READABLE_MAJOR:
        raise ArtefactError(
            f"format version {version} is not readable by this labelkit, which reads "
            f"{fmt.READABLE_MAJOR}.x; upgrade labelkit (pip install -U labelkit)"
        )
    validator = jsonschema.Draft202012Validator(fmt.METADATA_SCHEMA)
    return meta, [_schema_message(e) for e in sorted(validator.iter_errors(meta), key=str)]


def _newer_minor(meta: dict) -> bool:
    have = tuple(int(x) for x in meta["format_version"].split("."))
    ours = tuple(int(x) for x in fmt.FORMAT_VERSION.split("."))
    return have[:2] > ours[:2]


def _id_column_problem(schema: pa.Schema) -> str | None:
    if fmt.ID_COLUMN not in schema.names:
        return f"missing column '{fmt.ID_COLUMN}'"
    id_type = schema.field(fmt.ID_COLUMN).type
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        return f"column '{fmt.ID_COLUMN}' must be string, found {id_type}"
    return None


def _schema_problems(schema: pa.Schema, num_rows: int, meta: dict) -> list[str]:
    """What the footer alone can tell: columns, their types and the row count against the metadata."""
    names = schema.names
    problem = _id_column_problem(schema)
    if problem:
        return [problem]
    problems = []
    if num_rows != meta.get("num_samples"):
        problems.append(f"metadata says num_samples={meta.get('num_samples')} but the file has {num_rows} rows")
    expected = {fmt.ID_COLUMN}
    for i, head in enumerate(meta.get("heads", [])):
        name = head["name"]
        if name != fmt.head_column(i):
            problems.append(f"heads[{i}] is named {name!r}; expected {fmt.head_column(i)!r}")
        expected.add(name)
        if name not in names:
            problems.append(f"missing column {name!r} declared in metadata 'heads'")
        elif schema.field(name).type != pa.int32():
            problems.append(f"column {name!r} must be int32, found {schema.field(name).type}")
        score = fmt.score_column(i)
        if score in names:
            expected.add(score)
            if schema.field(score).type != pa.float32():
                problems.append(f"column {score!r} must be float32, found {schema.field(score).type}")
    extra = [c for c in names if c not in expected]
    if extra and not _newer_minor(meta):
        problems.append(f"unexpected column(s) {extra}: not part of format {meta['format_version']}")
    return problems


def _column_problems(table: pa.Table, meta: dict) -> list[str]:
    problems = _schema_problems(table.schema, table.num_rows, meta)
    names = table.column_names
    if _id_column_problem(table.schema):
        return problems
    ids = table.column(fmt.ID_COLUMN).combine_chunks()
    problems += _id_problems(ids)
    if table.num_rows > 1 and not ids.null_count:
        unsorted = pc.less(ids[1:], ids[:-1])
        if pc.any(unsorted).as_py():
            row = int(np.flatnonzero(unsorted.to_numpy(zero_copy_only=False))[0]) + 1
            problems.append(f"rows are not sorted by sample_id (first out of order at row {row})")
    heads = []
    for head in meta.get("heads", []):
        name, k = head["name"], int(head["k"])
        if name not in names or table.schema.field(name).type != pa.int32():
            continue  # reported by _schema_problems
        col = table.column(name)
        if col.null_count:
            problems.append(f"column {name!r} has {col.null_count} null value(s)")
            continue
        labels = col.to_numpy()
        problem = _range_problem(name, k, labels, ids)
        if problem:
            problems.append(problem)
        heads.append((name, k, labels))
    if heads and len(heads) == len(meta.get("heads", [])) and not ids.null_count:
        actual = fmt.compute_artefact_id(ids.cast(pa.string()), heads)
        if actual != meta["artefact_id"]:
            problems.append(
                f"artefact_id in metadata ({meta['artefact_id'][:12]}…) does not match the content "
                f"({actual[:12]}…): ids or labels were changed after writing"
            )
    return problems


@dataclass(frozen=True)
class ArtefactHeader:
    """What an artefact's footer holds -- its metadata, row count and size -- read without its columns."""

    path: str
    metadata: dict
    num_rows: int
    file_bytes: int
    problems: tuple[str, ...]

    @property
    def heads(self) -> list[Head]:
        return [Head(h["name"], int(h["k"])) for h in self.metadata["heads"]]


def _each_part(parts: list, block_size: int) -> Iterator[tuple[Path | str, pq.ParquetFile, int, dict | None, list[str]]]:
    """(part, Parquet file, its bytes, metadata, problems) of each file of one artefact, open while it is
    handled; ``problems`` says when a file's metadata is invalid or differs from the first file's."""
    first = None
    for part in parts:
        with _open(part, block_size) as (pfile, size):
            meta, problems = _read_metadata(pfile)
            if meta is not None and not problems and first is not None and meta != first:
                problems = [f"{_shown(part)}: its metadata differs from {_shown(parts[0])}'s; the files of one "
                            "artefact must all carry the same metadata"]
            first = first or meta
            yield part, pfile, size, meta, problems


def read_header(path: str | os.PathLike) -> ArtefactHeader:
    """Metadata and footer-level checks of an artefact, reading only the Parquet footer(s) (for a URL: a few
    small range requests, whatever the file's size). Raises :class:`ArtefactError` when there is no valid
    labelkit metadata; ``problems`` lists what the footer shows wrong with the columns."""
    num_rows = size = 0
    for part, pfile, part_size, meta, problems in _each_part(artefact_files(path), remote.METADATA_BLOCK):
        if problems:
            raise ArtefactError(f"{_shown(part)}: invalid label artefact: {problems[0]}", problems)
        schema, metadata = pfile.schema_arrow, meta
        num_rows += pfile.metadata.num_rows
        size += part_size
    problems = _schema_problems(schema, num_rows, metadata)
    return ArtefactHeader(_shown(path), metadata, num_rows, size, tuple(problems))


def _read_parts(parts: list) -> tuple[dict | None, pa.Table | None, list[str]]:
    """(metadata, table, problems) of the file(s) of one artefact; the table is None when the metadata is bad."""
    tables = []
    for part, pfile, _, meta, problems in _each_part(parts, remote.STREAM_BLOCK):
        if problems:
            return None, None, problems
        try:
            tables.append(pfile.read())
        except (pa.ArrowException, OSError) as exc:
            where = f"{_shown(part)} " if len(parts) > 1 else ""
            return meta, None, [f"{where}could not be read to the end (truncated or corrupt): {exc}"]
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    return meta, table, _column_problems(table, meta)


def check_artefact(path: str | os.PathLike, full: bool = True) -> list[str]:
    """Every problem found in the artefact at ``path`` (a file, run directory, Hub export or URL); empty means
    valid. With ``full=False`` only the footer is read: metadata, columns, types and row count, not the values."""
    try:
        if not full:
            return list(read_header(path).problems)
        return _read_parts(artefact_files(path))[2]
    except ArtefactError as exc:
        return exc.problems or [str(exc)]
    except (pa.ArrowException, OSError) as exc:
        return [f"the file could not be read to the end (truncated or corrupt): {exc}"]


def read_artefact(path: str | os.PathLike) -> Artefact:
    """Read and fully validate a label artefact (a file, a run directory's ``labels.parquet``, a Hub export's
    ``data/*.parquet``, at a path or an fsspec URL, streamed once); raises :class:`ArtefactError` naming
    what is wrong."""
    shown = _shown(path)
    meta, table, problems = _read_parts(artefact_files(path))
    if problems:
        more = f" (+{len(problems) - 1} more; see `labelkit validate {shown}`)" if len(problems) > 1 else ""
        raise ArtefactError(f"{shown}: invalid label artefact: {problems[0]}{more}", problems)
    table = table.replace_schema_metadata(None)
    return Artefact(table, meta)
