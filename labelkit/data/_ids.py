"""Sample ids held as one Arrow string array instead of a list of Python strings: 10 M ids of 8 characters take
about 120 MB instead of about 650 MB (a str object and a list slot each), for the sources that reach that size
(embedding tables). It reads as the list it stands for: ``len``, ``ids[i]``, ``ids[a:b]``, iteration."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["Ids", "id_array", "row_ids"]

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
        for start in range(0, len(self), _CHUNK):  # a chunk of Python strings at a time, never all N
            yield from self.arrow.slice(start, _CHUNK).to_pylist()

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

    width = max(6, len(str(max(n - 1, 0))))
    return pc.utf8_lpad(pa.array(np.arange(n, dtype=np.int64)).cast(pa.string()), width, padding="0")
