"""What every data source is: samples with stable, sorted, unique ids, optional classes, and a fingerprint of
their ids and content. Map-style sources load a sample by index; stream sources (shards) yield them in order."""

from __future__ import annotations

import abc
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .._util.files import retrying
from ..errors import DataError
from ._ids import Ids, id_array

__all__ = ["Source", "MapSource", "StreamSource", "Manifest", "decode_image", "DecodeError", "ReadFailure",
           "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_MAX_EXAMPLES = 5


@dataclass
class Manifest:
    """What a job read: the count and fingerprint of the ids, the classes, and skipped samples."""

    spec: str
    kind: str
    count: int
    fingerprint: str
    classes: list[str] | None
    skipped: list[dict] = field(default_factory=list)
    content: dict | None = None

    def record(self) -> dict:
        """What an artefact keeps of the data it was made on (its ``data`` section)."""
        return {"spec": self.spec, "fingerprint": self.fingerprint, "count": self.count, "content": self.content,
                "skipped": self.skipped}

    def to_dict(self) -> dict:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "count": self.count,
            "fingerprint": self.fingerprint,
            "classes": self.classes,
            "skipped": self.skipped,
            "content": self.content,
        }


class DecodeError(DataError):
    """A sample's bytes were read but are not an image this build can decode: the sample is skipped (and
    recorded), unlike an I/O error, which stops the run."""


class ReadFailure(str):
    """The reason a sample could not be read (an I/O error, after retries), as a loader reports it from its
    worker processes; :class:`~labelkit.data.SkipLog` turns it into a :class:`DataError`, never a skip."""


def decode_image(data: bytes | str | os.PathLike) -> "PIL.Image.Image":  # noqa: F821
    """Decode fully (truncated files fail here, not later) and convert to RGB. A path is read first (its I/O
    errors are raised as they are); whatever fails in decoding raises :class:`DecodeError`."""
    from PIL import Image

    if not isinstance(data, bytes):
        data = Path(data).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except Exception as exc:  # PIL raises many types (OSError among them) for bytes that are no image
        raise DecodeError(str(exc) or type(exc).__name__) from None


class Source(abc.ABC):
    """A data set of images with stable, sorted, unique sample ids and optional ground-truth classes.

    Attributes:
        spec: the spec string it was resolved from.
        kind: ``folder``, ``shards``, ``arrays`` or ``builtin``.
        ids: sample ids, sorted (codepoint order, as in the artefact).
        targets: int64 class index per sample, -1 where unknown; ``None`` when the source has no classes.
        classes: class names, or ``None``.
    """

    kind = "abstract"
    has_pixels = True  # False: precomputed vectors (embedding tables), no images to decode
    map_style = True  # samples can be loaded by index (False: streamed, as shards)

    def __init__(self, spec: str, ids: list[str] | Ids, targets: np.ndarray | None, classes: list[str] | None):
        if not len(ids):
            raise DataError(f"{spec}: no samples found")
        self.spec = spec
        self.ids = ids
        self.targets = targets
        self.classes = classes
        self._index: dict[str, int] | None = None
        self._fingerprint: str | None = None
        self._content: dict | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def index(self) -> dict[str, int]:
        """sample id -> position in :attr:`ids`."""
        if self._index is None:
            self._index = {sample_id: i for i, sample_id in enumerate(self.ids)}
        return self._index

    @property
    def has_truth(self) -> bool:
        return self.targets is not None and bool((self.targets >= 0).any())

    @property
    def fingerprint(self) -> str:
        """sha256 of the sorted ids (computed once: the ids never change)."""
        if self._fingerprint is None:
            from ..artefact.format import fingerprint_ids

            self._fingerprint = fingerprint_ids(self.ids.chunks() if isinstance(self.ids, Ids) else id_array(self.ids))
        return self._fingerprint

    @property
    def content(self) -> dict:
        """A cheap fingerprint of what the samples hold, beside their ids -- for files, their sizes (``stat``,
        tar headers; nothing is read); for arrays, the bytes -- so that a copy with the same file names but
        other pictures is told apart: ``{"method": "sizes" | "bytes", "sha256": ...}``."""
        if self._content is None:
            digest = hashlib.sha256()
            method = self._content_into(digest)
            self._content = {"method": method, "sha256": digest.hexdigest()}
        return self._content

    def _content_into(self, digest) -> str:
        sizes = self.sizes()
        for sample_id, size in zip(self.ids, sizes.tolist()):
            digest.update(f"{sample_id}\t{size}\n".encode())
        return "sizes"

    @abc.abstractmethod
    def sizes(self) -> np.ndarray:
        """Bytes of each sample (in id order)."""

    def content_hash(self) -> str:
        """sha256 over every sample's bytes in id order: the thorough check, which reads everything."""
        digest = hashlib.sha256()
        for sample_id, sample_digest in self.sample_digests():
            digest.update(sample_id.encode() + b"\t" + sample_digest)
        return digest.hexdigest()

    @abc.abstractmethod
    def sample_digests(self) -> Iterator[tuple[str, bytes]]:
        """(id, sha256 of the sample's bytes) in id order."""

    def positions_in(self, ids) -> np.ndarray:
        """For every sample, its position in ``ids`` (an Arrow string array or column), -1 where absent."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        where = pc.index_in(id_array(self.ids), value_set=ids.cast(pa.string()))
        return where.fill_null(-1).to_numpy().astype(np.int64)

    def positions_of(self, ids: list[str]) -> np.ndarray:
        """The positions of ``ids`` (distinct, each one of this source's) among the samples. Ids held as Arrow are looked up
        by one scan of them, not through a dict of every id (10 M ids: about 1.5 GB)."""
        if not isinstance(self.ids, Ids):
            return np.array([self.index[i] for i in ids], dtype=np.int64)
        if not ids:
            return np.zeros(0, dtype=np.int64)
        import pyarrow as pa
        import pyarrow.compute as pc

        found = pc.index_in(self.ids.arrow, value_set=pa.array(ids, type=pa.string()))
        rows = np.flatnonzero(found.is_valid().to_numpy(zero_copy_only=False))  # the samples among ``ids``
        at = found.drop_null().to_numpy()  # ... and where each stands in ``ids``
        if len(rows) != len(ids):
            raise KeyError(sorted(set(ids) - set(self.ids.take(rows).to_pylist()))[0])
        out = np.empty(len(ids), dtype=np.int64)
        out[at] = rows
        return out

    def ids_at(self, rows: np.ndarray):
        """The ids of the samples at positions ``rows``, as an Arrow string array (what an artefact is built from)."""
        import pyarrow as pa

        if isinstance(self.ids, Ids):
            return self.ids.take(rows)
        return pa.array([self.ids[i] for i in np.asarray(rows).tolist()], type=pa.string())

    def manifest(self, skipped: list[dict] | None = None) -> Manifest:
        return Manifest(self.spec, self.kind, len(self), self.fingerprint, self.classes, list(skipped or []),
                        self.content)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, n={len(self)}, classes={len(self.classes or [])})"


def _sorted_unique(spec: str, ids) -> np.ndarray:
    """The positions of ``ids`` in sorted order (int64), refusing duplicates by name. Sorted by Arrow: an index
    array, not a list of Python ints (10 M ids: 80 MB instead of about 1 GB); UTF-8 byte order is Python's
    code point order."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = ids if isinstance(ids, pa.Array) else pa.array(ids, type=pa.string())
    order = pc.sort_indices(array)
    ordered = array.take(order)
    if len(ordered) > 1:
        same = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1)).to_numpy(zero_copy_only=False)
        duplicates = sorted({ordered[int(i)].as_py() for i in np.flatnonzero(same)})
        if duplicates:
            raise DataError(
                f"{spec}: {len(duplicates)} duplicate sample id(s), e.g. {duplicates[:_MAX_EXAMPLES]}; "
                "sample ids (WebDataset __key__) must be unique across the whole data set"
            )
    return order.to_numpy().astype(np.int64)


class MapSource(Source):
    """A source whose samples load by index, in any order (folders, arrays, tables)."""

    map_style = True

    @abc.abstractmethod
    def read(self, i: int) -> bytes:
        """The bytes of sample ``i`` as stored (I/O errors raise ``OSError``)."""

    def load(self, i: int):
        """The PIL image of sample ``i``: read (tried again on I/O errors), then decoded."""
        return decode_image(retrying(lambda: self.read(i)))

    def iter_bytes(self) -> Iterator[tuple[str, bytes]]:
        """(id, the sample's bytes as stored) in id order."""
        for i, sample_id in enumerate(self.ids):
            yield sample_id, self.read(i)

    def sample_digests(self) -> Iterator[tuple[str, bytes]]:
        for sample_id, data in self.iter_bytes():
            yield sample_id, hashlib.sha256(data).digest()


class StreamSource(Source):
    """A source read as a stream of its parts (WebDataset shards): no random access."""

    map_style = False

    @abc.abstractmethod
    def iter_samples(self, parts: list[str] | None = None,
                     only: set[int] | None = None) -> Iterator[tuple[int, object, str | None]]:
        """Stream ``(index, PIL image or None, reason)`` from the given parts (default: all); with ``only``,
        just those sample indices."""
