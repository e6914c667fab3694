"""Features off the heap: an (N, D) ``.npy`` file read by row blocks, nothing mapped and nothing held.

The label step only ever needs a block of rows at a time, so the features of 10 M samples (or of an embedding
table larger than RAM) can stay on disk. The file is a plain NumPy ``.npy`` (float16 by default: half the
bytes of float32, and the range of every feature a network produces), so ``np.load(path, mmap_mode="r")``
reads it too. Blocks are read with ``os.preadv`` into fresh buffers: thread-safe, and the pages stay in the
OS cache rather than in the process, so a solve's resident memory does not grow with N.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .._util.files import atomic_path, consecutive_runs, pread_into, publish, pwrite_all, temporary_beside
from ..errors import DataError

__all__ = ["FeatureFile", "FeatureWriter", "write_features"]

_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}
_FLOAT16_MAX = 65504.0


class FeatureFile:
    """Rows ``lo:hi`` of an (N, D) float16/float32 ``.npy`` file; ``ff[a:b]`` is a tensor of those rows.

    ``rows`` takes one rank's share without reading anything. Every problem with the file -- not a ``.npy``,
    not 2-D, another dtype, or fewer bytes than its header promises -- is one :class:`DataError` naming it.
    """

    def __init__(self, path: str | os.PathLike, rows: tuple[int, int] | None = None, expect_rows: int | None = None):
        self.path = Path(path)
        try:
            handle = open(self.path, "rb")
        except OSError as exc:
            raise DataError(f"features file {self.path}: {exc.strerror or exc}") from None
        with handle:
            try:
                version = np.lib.format.read_magic(handle)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(handle)
            except (ValueError, OSError) as exc:
                raise DataError(f"features file {self.path}: not a .npy array ({exc})") from None
            self._offset = handle.tell()
        if len(shape) != 2:
            raise DataError(f"features file {self.path}: must be 2-D (N x D), its header says shape {shape}")
        if fortran:
            raise DataError(f"features file {self.path}: stored column-major; rows must be contiguous (C order)")
        if dtype not in _DTYPES:
            raise DataError(f"features file {self.path}: dtype {dtype}; labelkit reads float16 or float32")
        self.dtype = dtype
        self.total, self.dim = int(shape[0]), int(shape[1])
        expected = self._offset + self.total * self.dim * dtype.itemsize
        actual = self.path.stat().st_size
        if actual != expected:
            what = "truncated: not written to the end" if actual < expected else "longer than its header says"
            raise DataError(f"features file {self.path}: its header says {self.total:,} x {self.dim} {dtype} "
                            f"({expected:,} bytes) but the file holds {actual:,} bytes ({what})")
        if expect_rows is not None and self.total != expect_rows:
            raise DataError(f"features file {self.path}: holds {self.total:,} rows; expected {expect_rows:,} "
                            "(one per sample)")
        self.lo, self.hi = rows if rows is not None else (0, self.total)
        if not 0 <= self.lo <= self.hi <= self.total:
            raise DataError(f"features file {self.path}: rows {self.lo}:{self.hi} outside 0:{self.total}")
        self._fd = os.open(self.path, os.O_RDONLY)

    def rows(self, lo: int, hi: int) -> "FeatureFile":
        """The rows lo:hi of this view (e.g. one rank's share), sharing nothing but the path."""
        return FeatureFile(self.path, (self.lo + lo, self.lo + hi))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.hi - self.lo, self.dim)

    ndim = 2

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("a FeatureFile is read by contiguous row ranges: ff[start:stop]")
        start, stop, _ = index.indices(len(self))
        count = max(0, stop - start)
        buffer = bytearray(count * self.dim * self.dtype.itemsize)
        offset = self._offset + (self.lo + start) * self.dim * self.dtype.itemsize
        done = pread_into(self._fd, buffer, offset)
        if done < len(buffer):
            raise DataError(f"features file {self.path}: ended early at byte {offset + done:,} (changed while read?)")
        if not buffer:
            return torch.empty((0, self.dim), dtype=_DTYPES[self.dtype])
        return torch.frombuffer(buffer, dtype=_DTYPES[self.dtype]).view(count, self.dim)

    def take(self, indices: np.ndarray) -> torch.Tensor:
        """The rows at ascending ``indices`` (of this view), read as runs of consecutive rows."""
        indices = np.asarray(indices, dtype=np.int64)
        out = torch.empty((len(indices), self.dim), dtype=_DTYPES[self.dtype])
        for lo, hi in consecutive_runs(indices):
            out[lo:hi] = self[int(indices[lo]):int(indices[hi - 1]) + 1]
        return out

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __getstate__(self):  # picklable for worker processes: each reopens the file
        return {"path": self.path, "rows": (self.lo, self.hi)}

    def __setstate__(self, state):
        self.__init__(state["path"], state["rows"])

    def __repr__(self) -> str:
        return f"FeatureFile({str(self.path)!r}, rows {self.lo}:{self.hi} of {self.total:,}, dim {self.dim}, {self.dtype})"


def write_features(path: str | os.PathLike, blocks: Iterable, rows: int, dim: int,
                   dtype: np.dtype = np.float16) -> Path:
    """Write ``rows`` x ``dim`` features block by block (each an (r, dim) array or tensor) as a ``.npy`` file,
    atomically: the file appears complete or not at all. Values outside float16's range are an error, not
    a silent inf."""
    dtype = np.dtype(dtype)
    if dtype not in _DTYPES:
        raise DataError(f"features file dtype must be float16 or float32, got {dtype}")
    path = Path(path)
    written = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, dim)}
            np.lib.format.write_array_header_1_0(handle, header)
            for block in blocks:
                array = block.detach().cpu().numpy() if isinstance(block, torch.Tensor) else np.asarray(block)
                if array.ndim != 2 or array.shape[1] != dim:
                    raise DataError(f"features file {path}: a block of shape {array.shape}; expected (rows, {dim})")
                if not np.isfinite(array).all():
                    bad = written + int(np.flatnonzero(~np.isfinite(array).all(1))[0])
                    raise DataError(f"features file {path}: row {bad} is not finite (NaN or inf)")
                if dtype == np.float16 and np.abs(array).max(initial=0.0) > _FLOAT16_MAX:
                    raise DataError(f"features file {path}: values beyond float16's range ({_FLOAT16_MAX:g}); "
                                    "write float32 or scale the features")
                handle.write(np.ascontiguousarray(array, dtype=dtype).tobytes())
                written += len(array)
        if written != rows:
            raise DataError(f"features file {path}: {written:,} rows written but {rows:,} announced")
    return path


_HEADER_BYTES = 128  # a 2-D float16/float32 .npy header of any realistic shape fits, padded, in 128 bytes


def _npy_header(rows: int, dim: int, dtype: np.dtype) -> bytes:
    """A version 1.0 ``.npy`` header of exactly :data:`_HEADER_BYTES` bytes (the dict padded with spaces, as the
    format allows), so that the shape can be written last, over the space reserved for it."""
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, dim)})
    size = _HEADER_BYTES - len(np.lib.format.MAGIC_PREFIX) - 2 - 2
    text = text.ljust(size - 1) + "\n"
    if len(text) != size:
        raise DataError(f"features file: a shape of ({rows}, {dim}) does not fit the reserved .npy header")
    return np.lib.format.magic(1, 0) + len(text).to_bytes(2, "little") + text.encode("latin1")


class FeatureWriter:
    """An (N, D) features file filled by a labelling pass: rows appended in the order samples arrive, each
    the mean of its views, with positional writes (the rows never sit on the heap). :meth:`finish` writes
    the header and publishes the file atomically; until then only a temporary file exists.

    ``add(samples, block, views)`` adds ``block / views`` to the rows of ``samples`` (new samples get new
    rows), so a pass per view gives each row the mean of that sample's views.
    """

    def __init__(self, path: str | os.PathLike, samples: int, dim: int, dtype: np.dtype = np.float16):
        self.path, self.dim, self.dtype = Path(path), dim, np.dtype(dtype)
        if self.dtype not in _DTYPES:
            raise DataError(f"features file dtype must be float16 or float32, got {self.dtype}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temporary_beside(self.path)
        self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self._row = np.full(samples, -1, dtype=np.int64)  # sample -> row of the file
        self.samples: list[np.ndarray] = []  # sample of each row, in row order
        self.rows = 0

    def _offset(self, row: int) -> int:
        return _HEADER_BYTES + row * self.dim * self.dtype.itemsize

    def add(self, samples: np.ndarray, block: torch.Tensor, views: int = 1) -> None:
        samples = np.asarray(samples, dtype=np.int64)
        values = block.detach().float().cpu() / views
        if values.shape != (len(samples), self.dim):
            raise DataError(f"features file {self.path}: a block of shape {tuple(values.shape)} for {len(samples)} "
                            f"samples of width {self.dim}")
        if not len(samples):
            return
        # NaN stays NaN (the solver names it); a finite value beyond float16 would become inf, so it is an error
        if self.dtype == np.float16 and values.nan_to_num(nan=0.0).abs().max().item() * views > _FLOAT16_MAX:
            raise DataError(f"features file {self.path}: features beyond float16's range ({_FLOAT16_MAX:g}); "
                            "the label step cannot keep them on disk as float16")
        new = self._row[samples] < 0
        self._row[samples[new]] = np.arange(self.rows, self.rows + int(new.sum()))
        if new.any():
            self.samples.append(samples[new])
            self.rows += int(new.sum())
        where = self._row[samples]
        for lo, hi in consecutive_runs(where):
            first, count = int(where[lo]), hi - lo
            chunk = values[lo:hi]
            if not new[lo:hi].all():  # rows that a view before this one wrote: add to them
                old = bytearray(count * self.dim * self.dtype.itemsize)
                pread_into(self._fd, old, self._offset(first))
                chunk = chunk + torch.frombuffer(old, dtype=_DTYPES[self.dtype]).view(count, self.dim).float()
            pwrite_all(self._fd, chunk.to(_DTYPES[self.dtype]).numpy(), self._offset(first))

    def finish(self) -> tuple[FeatureFile, np.ndarray]:
        """Publish the file; returns it and the sample of each of its rows."""
        os.ftruncate(self._fd, self._offset(self.rows))
        pwrite_all(self._fd, _npy_header(self.rows, self.dim, self.dtype), 0)
        os.close(self._fd)
        self._fd = None
        publish(self._tmp, self.path)
        samples = np.concatenate(self.samples) if self.samples else np.zeros(0, dtype=np.int64)
        return FeatureFile(self.path), samples

    def abandon(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tmp.unlink(missing_ok=True)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            self.abandon()
