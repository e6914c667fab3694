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

from ._io import atomic_path, pread_into
from .errors import DataError

__all__ = ["FeatureFile", "write_features"]

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
