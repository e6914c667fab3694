"""Sample ids held as one Arrow string array instead of a list of Python strings: 10 M ids of 8 characters take
about 120 MB instead of about 650 MB (a str object and a list slot each), for the sources that reach that size
(embedding tables). It reads as the list it stands for: ``len``, ``ids[i]``, ``ids[a:b]``, iteration. A table's
rows that come without keys have :class:`RowIds`, made where they are read and never held whole."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["Ids", "RowIds", "id_array", "row_ids"]

_CHUNK = 65536


class Ids(Sequence):
    """Sorted sample ids in an Arrow string array (``arrow``); :meth:`take` gives some of them as Arrow."""

    def __init__(self, array):
        import pyarrow as pa

        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        self.arrow = array

    def __len__(self) -> int:
        return len(self.arrow)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return self.arrow.slice(start, max(0, stop - start)).to_pylist()
        return self.arrow[int(index)].as_py()

    def __iter__(self):
        for chunk in self.chunks():  # a chunk of Python strings at a time, never all N
            yield from chunk.to_pylist()

    def chunks(self):
        """The ids in order, as Arrow arrays of a few thousand."""
        for start in range(0, len(self), _CHUNK):
            yield self.arrow.slice(start, _CHUNK)

    def __eq__(self, other) -> bool:
        if isinstance(other, Ids):
            return self.arrow.equals(other.arrow)
        return isinstance(other, Sequence) and len(other) == len(self) and list(self) == list(other)

    __hash__ = None

    def take(self, rows: np.ndarray):
        """The ids at positions ``rows``, as an Arrow string array."""
        import pyarrow as pa

        return self.arrow.take(pa.array(np.asarray(rows, dtype=np.int64)))

    def __repr__(self) -> str:
        return f"Ids({len(self):,} ids)"


def id_array(ids):
    """``ids`` (an :class:`Ids` or a list of strings) as an Arrow string array: the one an :class:`Ids` holds."""
    import pyarrow as pa

    return ids.arrow if isinstance(ids, Ids) else pa.array(ids, type=pa.string())


def row_ids(n: int):
    """The ids of ``n`` rows that come without keys: their row numbers, zero-padded to at least 6 digits so that
    the ids sort as the rows do. An Arrow array, made without N Python strings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.utf8_lpad(pa.array(np.arange(n, dtype=np.int64)).cast(pa.string()), _row_width(n), padding="0")


def _row_width(n: int) -> int:
    return max(6, len(str(max(n - 1, 0))))


class RowIds(Ids):
    """The ids of ``n`` rows that come without keys (those of :func:`row_ids`), made where they are read: a
    table's rows then hold no ids (10 M of them: 110 MB of Arrow, and about 0.4 GB of the process's memory once
    checked for order). ``arrow`` makes them all, for the lookups by id that need them."""

    def __init__(self, n: int):
        self.n, self.width = n, _row_width(n)

    @property
    def arrow(self):
        return row_ids(self.n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [str(i).zfill(self.width) for i in range(*index.indices(self.n))]
        i = int(index) + (self.n if int(index) < 0 else 0)
        if not 0 <= i < self.n:
            raise IndexError(f"row {index} of {self.n}")
        return str(i).zfill(self.width)

    def chunks(self):
        for start in range(0, self.n, _CHUNK):
            yield self.take(np.arange(start, min(start + _CHUNK, self.n)))

    def take(self, rows: np.ndarray):
        import pyarrow as pa
        import pyarrow.compute as pc

        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"rows outside 0-{self.n - 1}")
        return pc.utf8_lpad(pa.array(rows).cast(pa.string()), self.width, padding="0")

    def __eq__(self, other) -> bool:
        return self.n == other.n if isinstance(other, RowIds) else super().__eq__(other)

    __hash__ = None
