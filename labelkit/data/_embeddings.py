"""Embedding tables as data: vectors that users already computed (CLIP, DINOv2, ...), keyed by sample id.

Specs (``--data``):

* ``vectors.npy`` -- an (N, D) float array; ids from ``vectors.keys.txt`` (one per line) beside it when
  present, else the row numbers (``000042``). The array is memory-mapped, never read whole.
* ``table.npz`` -- an ``embeddings`` (or ``vectors``/``features``) array, optional ``keys`` and ``labels``.
* ``table.parquet`` -- a key column (``sample_id``, ``key`` or ``id``) and one list or fixed-size-list
  vector column (``embedding``, ``vector``, ``features``, or the only list column); an integer ``label``
  column, when present, is ground truth (measured only).
* ``laion/`` -- the LAION/clip-retrieval layout: numbered ``img_emb/img_emb_{i}.npy`` beside
  ``metadata/metadata_{i}.parquet``, whose ``key`` column names the rows of the array with the same number.

Rows whose vector holds NaN or inf are named in one error, or skipped (and recorded in the artefact) with
``--skip-bad``. Generating on such a source trains the heads only; commands that need pixels say so.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .._util.files import read_keys
from ..errors import DataError
from ._source import MapSource, _sorted_unique

__all__ = ["EmbeddingSource", "is_embedding_spec", "load_embeddings"]

_KEY_COLUMNS = ("sample_id", "key", "id")
_VECTOR_COLUMNS = ("embedding", "embeddings", "vector", "vectors", "features", "emb")
_NPZ_VECTORS = ("embeddings", "vectors", "features")
_MAX_EXAMPLES = 5


class EmbeddingSource(MapSource):
    """Precomputed vectors, one per sample id; no pixels.

    ``vectors(rows)`` returns float32 rows in id order; ``bad`` maps the id of every row with a non-finite
    value to the reason.
    """

    kind = "embeddings"
    has_pixels = False

    def __init__(self, spec: str, ids: list[str], vectors, targets: np.ndarray | None = None,
                 files: list[Path] | None = None):
        if vectors.ndim != 2 or vectors.shape[1] < 1:
            raise DataError(f"{spec}: vectors must be a 2-D (N, D) array, got shape {vectors.shape}")
        if not np.issubdtype(vectors.dtype, np.floating):
            raise DataError(f"{spec}: vectors must be floating point, got {vectors.dtype}")
        if len(ids) != len(vectors):
            raise DataError(f"{spec}: {len(ids)} keys for {len(vectors)} vectors; every vector needs one key")
        order = np.asarray(_sorted_unique(spec, ids), dtype=np.int64)
        self._array, self._files = vectors, files or []
        self._rows = None if np.array_equal(order, np.arange(len(order))) else order
        sorted_ids = [ids[i] for i in order]
        if targets is not None:
            targets = np.asarray(targets, dtype=np.int64)[order]
        classes = [str(c) for c in range(int(targets.max()) + 1)] if targets is not None and len(targets) else None
        super().__init__(spec, sorted_ids, targets, classes)
        self.dim = int(vectors.shape[1])
        self.bad = self._find_bad()

    def vectors(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """float32 vectors of samples ``rows`` (positions in id order; all when None)."""
        rows = np.arange(len(self)) if rows is None else np.arange(len(self))[rows] if isinstance(rows, slice) else rows
        stored = rows if self._rows is None else self._rows[rows]
        if len(stored) and np.all(np.diff(stored) == 1):  # a contiguous run: one slice of the (mapped) file
            return np.asarray(self._array[stored[0]:stored[-1] + 1], dtype=np.float32)
        return np.asarray(self._array[np.sort(stored)], dtype=np.float32)[np.argsort(np.argsort(stored))]

    def _find_bad(self) -> dict[str, str]:
        bad = {}
        block = 65536
        for start in range(0, len(self), block):
            chunk = self.vectors(slice(start, start + block))
            finite = np.isfinite(chunk).all(axis=1)
            for i in np.flatnonzero(~finite):
                kind = "NaN" if np.isnan(chunk[i]).any() else "inf"
                bad[self.ids[start + i]] = f"vector holds {kind}"
        return bad

    def check_finite(self, skip: bool) -> dict[str, str]:
        """The rows to skip; without ``skip`` any bad row is an error naming them."""
        if self.bad and not skip:
            names = list(self.bad)[:_MAX_EXAMPLES]
            raise DataError(f"{self.spec}: {len(self.bad)} vector(s) hold NaN or inf, e.g. rows {names}; "
                            "fix them or give --skip-bad to leave them out (they are recorded as skipped)")
        return dict(self.bad)

    def _content_into(self, digest) -> str:
        # the vectors' bytes are the content; files are hashed as stored (no float conversion)
        digest.update(repr((len(self), self.dim, str(self._array.dtype))).encode())
        if self._files:
            for path in self._files:
                with open(path, "rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 22), b""):
                        digest.update(chunk)
        else:
            digest.update(np.ascontiguousarray(self._array).data)
        return "bytes"

    def read(self, i: int) -> bytes:
        return self.vectors(np.array([i])).tobytes()

    def load(self, i: int):
        raise DataError(f"{self.spec} holds embedding vectors, not images; give an image spec with the same "
                        "sample ids (a folder or shards) where pixels are needed")

    def sizes(self) -> np.ndarray:
        return np.full(len(self), self.dim * 4, dtype=np.int64)


def is_embedding_spec(spec: str) -> bool:
    path = Path(spec)
    lower = spec.lower()
    return (lower.endswith((".npy", ".parquet", ".pq")) or (path.is_dir() and (path / "img_emb").is_dir())
            or (lower.endswith(".npz") and path.is_file() and _npz_holds_vectors(path)))


def _npz_holds_vectors(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return "images" not in archive.files and any(name in archive.files for name in _NPZ_VECTORS)
    except (ValueError, OSError):
        return False


def load_embeddings(spec: str) -> EmbeddingSource:
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{spec}: no such file or directory")
    if path.is_dir():
        return _load_laion(spec, path)
    lower = spec.lower()
    if lower.endswith(".npy"):
        return _load_npy(spec, path)
    if lower.endswith(".npz"):
        return _load_npz(spec, path)
    return _load_parquet(spec, path)


def _read_keys(path: Path) -> list[str]:
    try:
        return read_keys(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: {exc}; every vector needs a key") from None


def _row_ids(n: int) -> list[str]:
    width = max(6, len(str(max(n - 1, 0))))
    return [str(i).zfill(width) for i in range(n)]


def _load_npy(spec: str, path: Path) -> EmbeddingSource:
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{spec}: not a readable .npy array: {exc}") from None
    key_file = path.with_suffix(".keys.txt")
    ids = _read_keys(key_file) if key_file.is_file() else _row_ids(len(vectors))
    if len(ids) != len(vectors):
        raise DataError(f"{key_file}: {len(ids)} keys for the {len(vectors)} rows of {spec}; one key per row")
    return EmbeddingSource(spec, ids, vectors, files=[path])


def _load_npz(spec: str, path: Path) -> EmbeddingSource:
    try:
        with np.load(path, allow_pickle=False) as archive:
            name = next(n for n in _NPZ_VECTORS if n in archive.files)
            vectors = archive[name]
            keys = [str(k) for k in archive["keys"]] if "keys" in archive.files else _row_ids(len(vectors))
            labels = archive["labels"] if "labels" in archive.files else None
    except (ValueError, OSError) as exc:
        raise DataError(f"{spec}: not a readable .npz archive: {exc}") from None
    return EmbeddingSource(spec, keys, vectors, labels, files=[path])


def _vector_column(spec: str, schema) -> str:
    import pyarrow as pa

    lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)
             or pa.types.is_large_list(f.type)]
    named = [name for name in _VECTOR_COLUMNS if name in lists]
    if named:
        return named[0]
    if len(lists) == 1:
        return lists[0]
    if not lists:
        raise DataError(f"{spec}: no list column of vectors (columns: {schema.names}); an embedding table needs "
                        "one, e.g. 'embedding' as list<float>")
    raise DataError(f"{spec}: several list columns {lists}; name the vectors 'embedding'")


def _table_vectors(spec: str, column) -> np.ndarray:
    """(N, D) from a list or fixed-size-list column; rows of another length are named."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count:
        rows = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))
        raise DataError(f"{spec}: {len(rows)} row(s) have no vector, e.g. rows {rows[:_MAX_EXAMPLES].tolist()}")
    if pa.types.is_fixed_size_list(column.type):
        dim = column.type.list_size
    else:
        lengths = pc.list_value_length(column).to_numpy()
        dim = int(lengths[0]) if len(lengths) else 0
        odd = np.flatnonzero(lengths != dim)
        if len(odd):
            raise DataError(f"{spec}: vectors of mixed lengths: row 0 has {dim} values but rows "
                            f"{odd[:_MAX_EXAMPLES].tolist()} have {lengths[odd[:_MAX_EXAMPLES]].tolist()}")
    values = column.flatten().to_numpy(zero_copy_only=False)
    if not np.issubdtype(values.dtype, np.floating) and not np.issubdtype(values.dtype, np.integer):
        raise DataError(f"{spec}: vector values must be numbers, got {column.type}")
    return values.astype(np.float32, copy=False).reshape(len(column), dim)


def _key_column(spec: str, table) -> list[str]:
    name = next((c for c in _KEY_COLUMNS if c in table.column_names), None)
    if name is None:
        raise DataError(f"{spec}: no key column (one of {', '.join(_KEY_COLUMNS)}); columns: {table.column_names}")
    column = table.column(name)
    if column.null_count:
        rows = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))
        raise DataError(f"{spec}: {len(rows)} row(s) without a {name}, e.g. rows {rows[:_MAX_EXAMPLES].tolist()}")
    return [str(k) for k in column.to_pylist()]


def _load_parquet(spec: str, path: Path) -> EmbeddingSource:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{spec}: not a readable Parquet file: {exc}") from None
    vector = _vector_column(spec, schema)
    truth = "label" if "label" in schema.names and pa.types.is_integer(schema.field("label").type) else None
    columns = [c for c in (*_KEY_COLUMNS, vector, truth) if c and c in schema.names]
    table = pq.read_table(path, columns=list(dict.fromkeys(columns)))
    ids = _key_column(spec, table)
    vectors = _table_vectors(spec, table.column(vector))
    targets = table.column(truth).to_numpy(zero_copy_only=False) if truth else None
    return EmbeddingSource(spec, ids, vectors, targets, files=[path])


def _numbered(folder: Path, pattern: str) -> dict[int, Path]:
    found = {}
    for entry in folder.iterdir():
        match = re.fullmatch(pattern, entry.name)
        if match:
            found[int(match.group(1))] = entry
    return found


def _load_laion(spec: str, root: Path) -> EmbeddingSource:
    import pyarrow.parquet as pq

    arrays = _numbered(root / "img_emb", r"img_emb_(\d+)\.npy")
    metadata = _numbered(root / "metadata", r"metadata_(\d+)\.parquet") if (root / "metadata").is_dir() else {}
    if not arrays:
        raise DataError(f"{spec}: no img_emb/img_emb_<i>.npy files")
    unmatched = sorted(set(arrays) ^ set(metadata))
    if unmatched:
        raise DataError(f"{spec}: embedding and metadata files do not pair up at number(s) {unmatched[:_MAX_EXAMPLES]}"
                        "; every img_emb/img_emb_<i>.npy needs metadata/metadata_<i>.parquet with its keys")
    ids, parts = [], []
    for number in sorted(arrays):
        part = np.load(arrays[number], mmap_mode="r", allow_pickle=False)
        keys = _key_column(str(metadata[number]), pq.read_table(metadata[number], columns=["key"]))
        if len(keys) != len(part):
            raise DataError(f"{metadata[number]}: {len(keys)} keys for the {len(part)} rows of {arrays[number]}")
        ids += keys
        parts.append(part)
    vectors = parts[0] if len(parts) == 1 else np.concatenate(parts)
    files = [arrays[n] for n in sorted(arrays)] + [metadata[n] for n in sorted(metadata)]
    return EmbeddingSource(spec, ids, vectors, files=files)
