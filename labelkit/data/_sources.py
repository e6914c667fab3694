"""Data sources keyed by stable sample ids: image folders, WebDataset shards, ``.npz`` arrays, built-ins.

``resolve(spec)`` turns one ``--data SPEC`` string into a :class:`Source`. Every source lists its samples in
one deterministic order -- sorted by sample id, the order of the artefact -- so that ``source.ids[i]`` and
``source.targets[i]`` describe sample ``i`` on every run and machine. Labels join to samples by id only.

Specs:

* ``builtin:digits`` -- scikit-learn's 1,797 handwritten digits (8x8, 10 classes); no download.
* ``path/to/images/`` -- a folder read recursively; ids are POSIX paths relative to it; first-level
  sub-folders are the classes (sorted, as torchvision's ImageFolder); images directly under it have none.
* ``shards/train-{000000..000146}.tar`` -- WebDataset shards (path, glob, brace pattern or URL); ids are
  ``__key__`` and must be unique across the set; ground truth from ``cls`` when present.
* ``arrays.npz`` -- ``images`` (N,H,W) or (N,H,W,C) uint8 and optional ``labels`` (N,); ids ``000042``.
* ``vectors.npy``, ``table.parquet``, an ``.npz`` of ``embeddings``, a LAION ``img_emb/`` folder --
  precomputed vectors, see :mod:`labelkit.data`.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import DataError

__all__ = [
    "Source",
    "FolderSource",
    "ArraySource",
    "ShardSource",
    "Manifest",
    "resolve",
    "register_builtin",
    "BUILTINS",
    "IMAGE_EXTENSIONS",
    "compare_to_data",
    "content_check",
    "describe_match",
    "decode_image",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
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


def decode_image(data: bytes | str | os.PathLike) -> "PIL.Image.Image":  # noqa: F821
    """Decode fully (truncated files fail here, not later) and convert to RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        image.load()
        return image.convert("RGB")


class Source:
    """A data set of images with stable, sorted, unique sample ids and optional ground-truth classes.

    Attributes:
        spec: the spec string it was resolved from.
        kind: ``folder``, ``shards``, ``arrays`` or ``builtin``.
        ids: sample ids, sorted (codepoint order, as in the artefact).
        targets: int64 class index per sample, -1 where unknown; ``None`` when the source has no classes.
        classes: class names, or ``None``.
    """

    kind = "abstract"
    has_pixels = True  # False: precomputed vectors (labelkit.data), no images to decode
    map_style = True  # samples can be loaded by index (False: streamed, as shards)

    def __init__(self, spec: str, ids: list[str], targets: np.ndarray | None, classes: list[str] | None):
        if not ids:
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
            import pyarrow as pa

            from ..artefact.format import fingerprint_ids

            self._fingerprint = fingerprint_ids(pa.array(self.ids, type=pa.string()))
        return self._fingerprint

    @property
    def content(self) -> dict:
        """A cheap fingerprint of what the samples hold, beside their ids -- for files, their sizes (``stat``,
        tar headers; nothing is read); for arrays, the bytes -- so that a copy with the same file names but
        other pictures is told apart: ``{"method": "sizes" | "bytes", "sha256": ...}``."""
        if self._content is None:
            import hashlib

            digest = hashlib.sha256()
            method = self._content_into(digest)
            self._content = {"method": method, "sha256": digest.hexdigest()}
        return self._content

    def _content_into(self, digest) -> str:
        sizes = self.sizes()
        for sample_id, size in zip(self.ids, sizes.tolist()):
            digest.update(f"{sample_id}\t{size}\n".encode())
        return "sizes"

    def sizes(self) -> np.ndarray:
        """Bytes of each sample's file (in id order)."""
        raise NotImplementedError

    def content_hash(self) -> str:
        """sha256 over every sample's bytes in id order: the thorough check, which reads everything."""
        import hashlib

        digest = hashlib.sha256()
        for sample_id, sample_digest in self.sample_digests():
            digest.update(sample_id.encode() + b"\t" + sample_digest)
        return digest.hexdigest()

    def sample_digests(self) -> Iterator[tuple[str, bytes]]:
        """(id, sha256 of the sample's bytes) in id order."""
        import hashlib

        for sample_id, data in self.iter_bytes():
            yield sample_id, hashlib.sha256(data).digest()

    def iter_bytes(self) -> Iterator[tuple[str, bytes]]:
        raise NotImplementedError

    def positions_in(self, ids) -> np.ndarray:
        """For every sample, its position in ``ids`` (an Arrow string array or column), -1 where absent."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        where = pc.index_in(pa.array(self.ids, type=pa.string()), value_set=ids.cast(pa.string()))
        return where.fill_null(-1).to_numpy().astype(np.int64)

    def manifest(self, skipped: list[dict] | None = None) -> Manifest:
        return Manifest(self.spec, self.kind, len(self), self.fingerprint, self.classes, list(skipped or []),
                        self.content)

    def load(self, i: int):
        """The PIL image of sample ``i`` (map-style sources)."""
        raise NotImplementedError

    def iter_samples(self, shard_urls: list[str] | None = None,
                     only: set[int] | None = None) -> Iterator[tuple[int, object, str | None]]:
        """Stream ``(index, PIL image or None, reason)``; the streaming path of shard sources."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, n={len(self)}, classes={len(self.classes or [])})"


def _sorted_unique(spec: str, ids: list[str]) -> list[int]:
    order = sorted(range(len(ids)), key=ids.__getitem__)
    duplicates = sorted({ids[a] for a, b in zip(order, order[1:]) if ids[a] == ids[b]})
    if duplicates:
        raise DataError(
            f"{spec}: {len(duplicates)} duplicate sample id(s), e.g. {duplicates[:_MAX_EXAMPLES]}; "
            "sample ids (WebDataset __key__) must be unique across the whole data set"
        )
    return order


class FolderSource(Source):
    kind = "folder"

    def __init__(self, spec: str):
        root = Path(spec)
        if not root.exists():
            raise DataError(f"{spec}: no such file or directory")
        if not root.is_dir():
            raise DataError(f"{spec}: not a directory, .npz, shard pattern or builtin:NAME")
        self.root = root
        classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir(follow_symlinks=True))
        class_index = {name: i for i, name in enumerate(classes)}
        ids = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            rel = Path(dirpath).relative_to(root).as_posix()
            for name in filenames:
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    ids.append(name if rel == "." else f"{rel}/{name}")
        if not ids:
            raise DataError(f"{spec}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in this folder")
        ids.sort()
        targets = None
        if classes:
            targets = np.array([class_index.get(i.split("/", 1)[0], -1) if "/" in i else -1 for i in ids], np.int64)
        super().__init__(spec, ids, targets, classes or None)

    def load(self, i: int):
        return decode_image(self.root / self.ids[i])

    def sizes(self) -> np.ndarray:
        return np.array([os.stat(self.root / sample_id).st_size for sample_id in self.ids], dtype=np.int64)

    def iter_bytes(self):
        for sample_id in self.ids:
            yield sample_id, (self.root / sample_id).read_bytes()


class RemoteFolderSource(Source):
    """An image folder at an fsspec URL (``s3://bucket/train/``, ``gs://…``, ``hf://datasets/…``, ``file://``,
    or an http server with index pages): the same ids, classes and content fingerprint as a local copy."""

    kind = "folder"

    def __init__(self, spec: str):
        from .._util import remote

        try:
            fs, root = remote.filesystem(spec)
        except ImportError as exc:
            raise DataError(str(exc)) from None
        self._fs = (os.getpid(), fs)
        self.root = root.rstrip("/")
        shown = remote.redact(spec)
        try:
            found = fs.find(self.root, detail=True)
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"{shown}: cannot list this folder: {exc}") from None
        files = {}
        for path, entry in found.items():
            rel = path.split(self.root, 1)[-1].lstrip("/")  # http listings give full URLs, others paths
            if rel.lower().endswith(IMAGE_EXTENSIONS) and entry.get("type", "file") == "file":
                files[rel] = path, entry.get("size")
        if not files:
            raise DataError(f"{shown}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in this folder")
        ids = sorted(files)
        self._paths = [files[i][0] for i in ids]
        self._sizes = [files[i][1] for i in ids]
        classes = sorted({i.split("/", 1)[0] for i in ids if "/" in i})
        class_index = {name: c for c, name in enumerate(classes)}
        targets = None
        if classes:
            targets = np.array([class_index[i.split("/", 1)[0]] if "/" in i else -1 for i in ids], np.int64)
        super().__init__(spec, ids, targets, classes or None)

    @property
    def fs(self):
        """This process's filesystem: a loader worker forked from the parent opens its own connections."""
        if self._fs[0] != os.getpid():
            from .._util import remote

            self._fs = (os.getpid(), remote.filesystem(self.spec)[0])
        return self._fs[1]

    def load(self, i: int):
        return decode_image(self.fs.cat_file(self._paths[i]))

    def sizes(self) -> np.ndarray:
        missing = [i for i, size in enumerate(self._sizes) if size is None]
        for i in missing:  # some listings (http) carry no sizes
            self._sizes[i] = self.fs.size(self._paths[i])
        return np.array(self._sizes, dtype=np.int64)

    def iter_bytes(self):
        for sample_id, path in zip(self.ids, self._paths):
            yield sample_id, self.fs.cat_file(path)


class ArraySource(Source):
    """In-memory uint8 images: ``.npz`` files and the built-ins."""

    kind = "arrays"

    def __init__(self, spec: str, images: np.ndarray, labels: np.ndarray | None, classes: list[str] | None = None):
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (3, 4)):
            raise DataError(f"{spec}: 'images' must be (N,H,W) or (N,H,W,C) with C in 1,3,4; got {images.shape}")
        if images.dtype != np.uint8:
            raise DataError(f"{spec}: 'images' must be uint8, got {images.dtype}")
        n = len(images)
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"{spec}: 'labels' must be ({n},) integers, got {labels.shape} {labels.dtype}")
        self.images = images
        width = max(6, len(str(max(n - 1, 0))))
        ids = [str(i).zfill(width) for i in range(n)]  # zero-padded, so sorted order is index order
        targets = labels.astype(np.int64) if labels is not None else None
        if classes is None and labels is not None:
            classes = [str(c) for c in range(int(labels.max()) + 1)]
        super().__init__(spec, ids, targets, classes)

    def load(self, i: int):
        from PIL import Image

        array = self.images[i]
        return Image.fromarray(array).convert("RGB")

    def _content_into(self, digest) -> str:
        digest.update(repr(self.images.shape).encode())
        digest.update(np.ascontiguousarray(self.images).data)  # in memory already: hashing is cheap
        return "bytes"

    def iter_bytes(self):
        for sample_id, image in zip(self.ids, self.images):
            yield sample_id, image.tobytes()


def _load_npz(spec: str) -> ArraySource:
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{spec}: no such file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive:
                raise DataError(f"{spec}: no 'images' array (found {sorted(archive.files)})")
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive else None
    except (ValueError, OSError) as exc:
        raise DataError(f"{spec}: not a readable .npz archive: {exc}") from None
    source = ArraySource(spec, images, labels)
    source.kind = "arrays"
    return source


# -- built-ins ---------------------------------------------------------------------------------------------------
BUILTINS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]] = {}


def register_builtin(name: str):
    """Register a loader ``() -> (images uint8, labels, class names)`` as ``builtin:NAME``."""

    def decorate(loader):
        BUILTINS[name] = loader
        return loader

    return decorate


@register_builtin("digits")
def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()  # shipped inside scikit-learn: no download
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64), [str(c) for c in range(10)]


def _load_builtin(spec: str) -> ArraySource:
    name = spec.split(":", 1)[1]
    if name not in BUILTINS:
        raise DataError(f"{spec}: unknown built-in data set; available: {', '.join('builtin:' + b for b in BUILTINS)}")
    images, labels, classes = BUILTINS[name]()
    source = ArraySource(spec, images, labels, classes)
    source.kind = "builtin"
    return source


# -- WebDataset shards -------------------------------------------------------------------------------------------
_URL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def _expand_shards(spec: str) -> list[str]:
    from braceexpand import braceexpand

    urls = []
    for part in braceexpand(spec):
        if _URL.match(part) and not part.lower().startswith("file:"):
            if glob.has_magic(part) and not part.lower().startswith("pipe:"):
                urls.extend(_glob_url(spec, part))
            else:
                urls.append(part)
            continue
        part = part[5:] if part.lower().startswith("file:") else part
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        missing = [m for m in matches if not os.path.isfile(m)]
        if missing:
            raise DataError(f"{spec}: shard {missing[0]} does not exist")
        urls.extend(matches)
    if not urls:
        raise DataError(f"{spec}: the pattern matches no shard")
    return urls


def _glob_url(spec: str, pattern: str) -> list[str]:
    from .._util import remote

    try:
        fs, path = remote.filesystem(pattern)
    except ImportError as exc:
        raise DataError(str(exc)) from None
    try:
        matches = sorted(fs.glob(path))
    except NotImplementedError:
        raise DataError(f"{remote.redact(spec)}: this filesystem cannot list files; give the shards as a brace "
                        "pattern, e.g. train-{000000..000146}.tar") from None
    return [fs.unstrip_protocol(m) for m in matches]


def _split_key(name: str) -> tuple[str | None, str | None]:
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


def _open_shard(url: str):
    """A binary stream of a local shard, a ``pipe:`` command (webdataset's ``gopen``), or any fsspec URL
    (read through fsspec: no curl subprocess, the filesystem's own credentials)."""
    if url.lower().startswith("pipe:"):
        from webdataset import gopen

        return gopen(url, "rb")
    if _URL.match(url):  # file: specs were turned into paths by _expand_shards
        from .._util import remote

        fs, path = remote.filesystem(url)
        return fs.open(path, "rb", block_size=remote.STREAM_BLOCK)
    return open(url, "rb")


def _scan_shard(path: str, records: dict, order: list[str]) -> None:
    """One pass over tar headers (and the small ``cls`` entries) to list the keys of a shard."""
    try:
        with _open_shard(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if key is None or key.startswith("__"):
                    continue
                if key not in records:
                    records[key] = {"shard": path, "exts": set(), "cls": None, "size": 0}
                    order.append(key)
                elif records[key]["shard"] != path or ext in records[key]["exts"]:
                    raise DataError(f"{path}: duplicate sample id {key!r} (__key__ must be unique across the set)")
                records[key]["exts"].add(ext.lower())
                records[key]["size"] += member.size
                if ext.lower() in ("cls", "cls.txt", "cls.id"):
                    handle = tar.extractfile(member)
                    text = handle.read().decode().strip() if handle else ""
                    records[key]["cls"] = int(text) if re.fullmatch(r"-?\d+", text) else None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable tar shard: {exc}") from None


class ShardSource(Source):
    kind = "shards"
    map_style = False

    def __init__(self, spec: str):
        self.urls = _expand_shards(spec)
        records: dict[str, dict] = {}
        order: list[str] = []
        for url in self.urls:
            _scan_shard(url, records, order)
        if not records:
            raise DataError(f"{spec}: the shards hold no samples")
        ids = sorted(order)
        classes = None
        targets = None
        if any(records[k]["cls"] is not None for k in ids):
            targets = np.array([records[k]["cls"] if records[k]["cls"] is not None else -1 for k in ids], np.int64)
            classes = [str(c) for c in range(int(targets.max()) + 1)]
        self.records = records
        super().__init__(spec, ids, targets, classes)
        # each shard's sample indices in the order a stream yields them (tar order)
        members: dict[str, list[int]] = {url: [] for url in self.urls}
        for key in order:
            members[records[key]["shard"]].append(self.index[key])
        self.members = {url: np.asarray(rows, dtype=np.int64) for url, rows in members.items()}

    def sizes(self) -> np.ndarray:
        return np.array([self.records[sample_id]["size"] for sample_id in self.ids], dtype=np.int64)

    def sample_digests(self):
        import hashlib

        from webdataset.tariterators import group_by_keys, tar_file_expander

        found = {}  # shards are read in their own order; 32 bytes a sample are kept, not the samples
        for url in self.urls:
            with _open_shard(url) as stream:
                for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                    digest = hashlib.sha256()
                    for name, value in sorted((k, v) for k, v in sample.items() if not k.startswith("__")):
                        digest.update(name.encode() + b"\0" + (value if isinstance(value, bytes) else str(value).encode()))
                    found[sample["__key__"]] = digest.digest()
        for sample_id in self.ids:
            yield sample_id, found[sample_id]

    def iter_samples(self, shard_urls: list[str] | None = None, only: set[int] | None = None):
        """Stream the given shards (default: all) as ``(index, image or None, reason)``; with ``only``, just
        those sample indices are decoded and yielded."""
        from webdataset.tariterators import tar_file_expander, group_by_keys

        index = self.index
        for url in shard_urls if shard_urls is not None else self.urls:
            with _open_shard(url) as stream:
                for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                    key = sample["__key__"]
                    if key not in index or (only is not None and index[key] not in only):
                        continue
                    data = next((sample[k] for k in sample if k.lower() in _SHARD_IMAGE_KEYS), None)
                    if data is None:
                        yield index[key], None, "no jpg/jpeg/png/webp entry"
                        continue
                    try:
                        yield index[key], decode_image(data), None
                    except Exception as exc:  # PIL raises many types for bad bytes
                        yield index[key], None, f"cannot decode: {exc}"


def resolve(spec: str) -> Source:
    """Turn a ``--data`` spec into a :class:`Source` (see the module docstring for the forms)."""
    spec = str(spec)
    if not spec:
        raise DataError("empty data spec; give a folder, shard pattern, .npz file or builtin:NAME")
    if spec.startswith("builtin:"):
        return _load_builtin(spec)
    from ._embeddings import is_embedding_spec, load_embeddings

    if is_embedding_spec(spec):
        return load_embeddings(spec)
    if spec.lower().endswith(".npz"):
        return _load_npz(spec)
    if ".tar" in spec.lower() or "{" in spec or spec.lower().startswith("pipe:"):
        return ShardSource(spec)
    from .._util.remote import is_url

    if is_url(spec):
        return RemoteFolderSource(spec)
    return FolderSource(spec)


def compare_to_data(artefact, spec: str) -> dict:
    """How the sample ids of an artefact and of a local copy of the data overlap."""
    import pyarrow as pa
    import pyarrow.compute as pc

    source = resolve(spec)
    art_ids = artefact.table.column("sample_id").combine_chunks()
    data_ids = pa.array(source.ids, type=pa.string())
    in_data = pc.is_in(art_ids, value_set=data_ids)
    in_art = pc.is_in(data_ids, value_set=art_ids)
    only_art = art_ids.filter(pc.invert(in_data))
    only_data = data_ids.filter(pc.invert(in_art))
    return {
        "data_count": len(source),
        "artefact_count": artefact.num_samples,
        "in_both": int(pc.sum(in_data.cast(pa.int64())).as_py() or 0),
        "only_in_artefact": len(only_art),
        "only_in_data": len(only_data),
        "examples_only_in_artefact": only_art[:_MAX_EXAMPLES].to_pylist(),
        "examples_only_in_data": only_data[:_MAX_EXAMPLES].to_pylist(),
        "fingerprint_match": artefact.metadata["data"]["fingerprint"] == source.fingerprint,
        "data_fingerprint": source.fingerprint,
        **content_check(artefact, source),
    }


def content_check(artefact, source: Source) -> dict:
    """Whether the data holds what the artefact was made on, as far as its content fingerprint tells:
    ``content_match`` is None when the artefact records none (format 1.0) or the ids differ anyway."""
    recorded = artefact.metadata["data"].get("content")
    if recorded is None or artefact.metadata["data"]["fingerprint"] != source.fingerprint:
        return {"content_match": None, "content_method": recorded["method"] if recorded else None}
    return {"content_match": recorded == source.content, "content_method": recorded["method"]}


def describe_match(report: dict) -> str:
    """What was compared, in words: ids, and the contents where the artefact allows."""
    if not report["fingerprint_match"]:
        return "ids differ (not the same list of samples)"
    what = {"sizes": "file sizes", "bytes": "contents"}.get(report["content_method"], "contents")
    if report["content_match"] is None:
        return "ids match; contents not checked (the artefact records no content fingerprint)"
    if report["content_match"]:
        return f"ids match; {what} match"
    return f"ids match but {what} differ: the same names hold other data"
