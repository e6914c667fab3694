"""Embedding tables as data: vectors that users already computed (CLIP, DINOv2, ...), keyed by sample id.

Specs (``--data``):

* ``vectors.npy`` -- an (N, D) float array; ids from ``vectors.keys.txt`` (one per line) beside it when
  present, else the row numbers (``000042``). Rows are read on demand, never the file whole.
* ``table.npz`` -- an ``embeddings`` (or ``vectors``/``features``) array, optional ``keys`` and ``labels``.
* ``table.parquet`` -- a key column (``sample_id``, ``key`` or ``id``) and one list or fixed-size-list
  vector column (``embedding``, ``vector``, ``features``, or the only list column); an integer ``label``
  column, when present, is ground truth (measured only).
* ``laion/`` -- the LAION/clip-retrieval layout: numbered ``img_emb/img_emb_{i}.npy`` beside
  ``metadata/metadata_{i}.parquet``, whose ``key`` column names the rows of the array with the same number.
  Each part is read on demand by rows, never concatenated; a damaged part is named.

Files larger than :data:`HASHED_BYTES` in all are fingerprinted by their sizes and headers (as image folders are
by their sizes), not by every byte: the fingerprint tells a table from another, and reading 15 GB for it would
cost more than the run's first pass.

Rows whose vector holds NaN or inf are named in one error, or skipped (and recorded in the artefact) with
``--skip-bad``. Generating on such a source trains the heads only; commands that need pixels say so.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .._util.files import consecutive_runs, pread_into, read_keys
from ..errors import DataError
from ._ids import Ids, RowIds
from ._source import MapSource, _sorted_unique

__all__ = ["EmbeddingSource", "is_embedding_spec", "load_embeddings"]

_KEY_COLUMNS = ("sample_id", "key", "id")
_VECTOR_COLUMNS = ("embedding", "embeddings", "vector", "vectors", "features", "emb")
_NPZ_VECTORS = ("embeddings", "vectors", "features")
_MAX_EXAMPLES = 5
HASHED_BYTES = 256 << 20  # vector files up to this size are fingerprinted by every byte, larger ones by sizes
_HEAD_BYTES = 4096  # of each large file, what the fingerprint reads: the .npy header and the first rows


class _NpyRows:
    """The rows of an (N, D) ``.npy`` file, read on demand with positional reads: nothing is mapped, so a pass
    over a table larger than RAM leaves its pages in the OS cache and not in the process (a memory map counts
    every page it touched as the process's own). ``rows[a:b]`` reads one run; :meth:`take` reads ascending rows
    as runs of consecutive ones."""

    ndim = 2

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        try:
            with open(path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(handle)
                self.offset = handle.tell()
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{what}: not a readable .npy array: {exc}") from None
        if len(shape) != 2:
            raise DataError(f"{what}: vectors must be a 2-D (N, D) array, got shape {shape}")
        if fortran:
            raise DataError(f"{what}: stored column-major (Fortran order); save the vectors row by row")
        if dtype.hasobject or dtype.kind not in "fiu":
            raise DataError(f"{what}: vectors must be numbers, got {dtype}")
        self.shape, self.dtype = (int(shape[0]), int(shape[1])), dtype
        self.row_bytes = self.shape[1] * dtype.itemsize
        expected = self.offset + self.shape[0] * self.row_bytes
        actual = path.stat().st_size
        if actual != expected:
            raise DataError(f"{what}: its header says {self.shape[0]:,} x {self.shape[1]} {dtype} ({expected:,} "
                            f"bytes) but the file holds {actual:,} bytes ({'truncated' if actual < expected else 'too long'})")
        self._fd = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):  # worker processes open their own descriptor
        return {k: v for k, v in self.__dict__.items() if k != "_fd"} | {"_fd": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _read(self, lo: int, hi: int, out: np.ndarray) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        done = pread_into(self._fd, out, self.offset + lo * self.row_bytes)
        if done < out.nbytes:
            raise DataError(f"{self.what}: ended early at row {lo + done // self.row_bytes:,} (changed while read?)")

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise TypeError("rows are read as contiguous ranges")
        out = np.empty((max(0, stop - start), self.shape[1]), dtype=self.dtype)
        if len(out):
            self._read(start, stop, out)
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows at ascending positions ``rows``."""
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        for lo, hi in consecutive_runs(rows):
            self._read(int(rows[lo]), int(rows[hi - 1]) + 1, out[lo:hi])
        return out


class _Parts:
    """Numbered parts (the LAION layout's ``img_emb_<i>.npy``) as one (N, D) table that is never concatenated:
    a read goes to the parts that hold the rows asked for."""

    ndim = 2

    def __init__(self, parts: list[_NpyRows]):
        first = parts[0]
        for part in parts[1:]:
            if part.shape[1] != first.shape[1] or part.dtype != first.dtype:
                raise DataError(f"{part.what}: {part.shape[1]} x {part.dtype} vectors, but {first.what} holds "
                                f"{first.shape[1]} x {first.dtype}; every part must hold vectors of one width and type")
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape, self.dtype = (int(self.starts[-1]), first.shape[1]), first.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise TypeError("rows are read as contiguous ranges")
        return self.take(np.arange(start, stop))

    def take(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        bounds = np.searchsorted(part, np.arange(len(self.parts) + 1))  # rows ascend, so do their parts
        for p in np.flatnonzero(np.diff(bounds)).tolist():
            lo, hi = bounds[p], bounds[p + 1]
            out[lo:hi] = self.parts[p].take(rows[lo:hi] - self.starts[p])
        return out


class EmbeddingSource(MapSource):
    """Precomputed vectors, one per sample id; no pixels.

    ``vectors(rows)`` returns float32 rows in id order; ``bad`` maps the id of every row with a non-finite
    value to the reason.
    """

    kind = "embeddings"
    has_pixels = False

    def __init__(self, spec: str, ids, vectors, targets: np.ndarray | None = None,
                 files: list[Path] | None = None):
        import pyarrow as pa

        if vectors.ndim != 2 or vectors.shape[1] < 1:
            raise DataError(f"{spec}: vectors must be a 2-D (N, D) array, got shape {vectors.shape}")
        if not np.issubdtype(vectors.dtype, np.floating):
            raise DataError(f"{spec}: vectors must be floating point, got {vectors.dtype}")
        if len(ids) != len(vectors):
            raise DataError(f"{spec}: {len(ids)} keys for {len(vectors)} vectors; every vector needs one key")
        self._array, self._files = vectors, files or []
        if isinstance(ids, RowIds):  # row numbers: sorted and distinct as made, and never held whole
            self._rows, sorted_ids = None, ids
        else:
            ids = ids if isinstance(ids, pa.Array) else pa.array(ids, type=pa.string())
            order = _sorted_unique(spec, ids)
            self._rows = None if np.array_equal(order, np.arange(len(order))) else order
            sorted_ids = Ids(ids if self._rows is None else ids.take(pa.array(order)))  # not N Python strings
        if targets is not None:
            targets = np.asarray(targets, dtype=np.int64)
            targets = targets if self._rows is None else targets[self._rows]
        classes = [str(c) for c in range(int(targets.max()) + 1)] if targets is not None and len(targets) else None
        super().__init__(spec, sorted_ids, targets, classes)
        self.dim = int(vectors.shape[1])
        self._bad = None

    def vectors(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """float32 vectors of samples ``rows`` (positions in id order; all when None)."""
        rows = slice(None) if rows is None else rows
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if self._rows is None and step == 1:  # positions are rows of the file: one read
                return np.asarray(self._array[start:max(start, stop)], dtype=np.float32)
            rows = np.arange(start, stop, step)
        stored = np.asarray(rows, dtype=np.int64) if self._rows is None else self._rows[rows]
        if len(stored) and np.all(np.diff(stored) == 1):  # a contiguous run: one read
            return np.asarray(self._array[int(stored[0]):int(stored[-1]) + 1], dtype=np.float32)
        order = np.argsort(stored, kind="stable")
        ascending = stored[order]
        block = self._array.take(ascending) if isinstance(self._array, (_NpyRows, _Parts)) else self._array[ascending]
        out = np.empty((len(stored), self.dim), dtype=np.float32)
        out[order] = block
        return out

    @property
    def bad(self) -> dict[str, str]:
        """id -> reason for every row with a non-finite value (one pass over the table, on first use)."""
        if self._bad is None:
            self._bad = self.find_bad()
        return self._bad

    def find_bad(self, rows: slice = slice(None)) -> dict[str, str]:
        """id -> reason for every row among ``rows`` with a non-finite value (one pass over them)."""
        bad = {}
        block = 65536
        first, last, _ = rows.indices(len(self))
        for start in range(first, last, block):
            chunk = self.vectors(slice(start, min(start + block, last)))
            finite = np.isfinite(chunk).all(axis=1)
            for i in np.flatnonzero(~finite):
                kind = "NaN" if np.isnan(chunk[i]).any() else "inf"
                bad[self.ids[start + i]] = f"vector holds {kind}"
            del chunk  # before the next block is read: one block held at a time
        return bad

    def check_finite(self, skip: bool, bad: dict[str, str] | None = None) -> dict[str, str]:
        """The rows to skip (``bad``, or :attr:`bad` of the whole table); without ``skip`` any bad row is an
        error naming them."""
        bad = self.bad if bad is None else bad
        if bad and not skip:
            names = list(bad)[:_MAX_EXAMPLES]
            raise DataError(f"{self.spec}: {len(bad)} vector(s) hold NaN or inf, e.g. rows {names}; "
                            "fix them or give --skip-bad to leave them out (they are recorded as skipped)")
        return dict(bad)

    def _content_into(self, digest) -> str:
        # the vectors' bytes are the content; files are hashed as stored (no float conversion)
        digest.update(repr((len(self), self.dim, str(self._array.dtype))).encode())
        if self._files and sum(path.stat().st_size for path in self._files) > HASHED_BYTES:
            for path in self._files:  # as a folder's sizes: each file's size, its header and first rows
                with open(path, "rb") as handle:
                    digest.update(f"{path.name}\t{path.stat().st_size}\n".encode() + handle.read(_HEAD_BYTES))
            return "sizes"
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


def _load_npy(spec: str, path: Path) -> EmbeddingSource:
    vectors = _NpyRows(path, spec)
    key_file = path.with_suffix(".keys.txt")
    ids = _read_keys(key_file) if key_file.is_file() else RowIds(len(vectors))
    if len(ids) != len(vectors):
        raise DataError(f"{key_file}: {len(ids)} keys for the {len(vectors)} rows of {spec}; one key per row")
    return EmbeddingSource(spec, ids, vectors, files=[path])


def _load_npz(spec: str, path: Path) -> EmbeddingSource:
    try:
        with np.load(path, allow_pickle=False) as archive:
            name = next(n for n in _NPZ_VECTORS if n in archive.files)
            vectors = archive[name]
            keys = [str(k) for k in archive["keys"]] if "keys" in archive.files else RowIds(len(vectors))
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


def _key_column(spec: str, table):
    name = next((c for c in _KEY_COLUMNS if c in table.column_names), None)
    if name is None:
        raise DataError(f"{spec}: no key column (one of {', '.join(_KEY_COLUMNS)}); columns: {table.column_names}")
    column = table.column(name)
    if column.null_count:
        rows = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))
        raise DataError(f"{spec}: {len(rows)} row(s) without a {name}, e.g. rows {rows[:_MAX_EXAMPLES].tolist()}")
    import pyarrow as pa

    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_integer(column.type):
        return column.cast(pa.string()).combine_chunks()  # as str() writes them, without N Python strings
    return pa.array([str(k) for k in column.to_pylist()], type=pa.string())


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
    import pyarrow as pa
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
        part = _NpyRows(arrays[number], str(arrays[number]))
        try:
            table = pq.read_table(metadata[number], columns=["key"])
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{metadata[number]}: not a readable metadata part with a 'key' column: {exc}") from None
        keys = _key_column(str(metadata[number]), table)
        if len(keys) != len(part):
            raise DataError(f"{metadata[number]}: {len(keys)} keys for the {len(part)} rows of {arrays[number]}")
        ids.append(keys)
        parts.append(part)
    vectors = parts[0] if len(parts) == 1 else _Parts(parts)
    files = [arrays[n] for n in sorted(arrays)] + [metadata[n] for n in sorted(metadata)]
    return EmbeddingSource(spec, pa.concat_arrays(ids), vectors, files=files)
