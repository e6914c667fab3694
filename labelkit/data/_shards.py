"""WebDataset shards (paths, globs, brace patterns, URLs, ``pipe:``): streamed, keyed by ``__key__``."""

from __future__ import annotations

import glob
import os
import re
import tarfile

import numpy as np

from ..errors import DataError
from ._source import DecodeError, StreamSource, decode_image

__all__ = ["ShardSource"]

_SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


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


class ShardSource(StreamSource):
    kind = "shards"

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

    def iter_samples(self, parts: list[str] | None = None, only: set[int] | None = None):
        """Stream the given shards (default: all) as ``(index, image or None, reason)``; with ``only``, just
        those sample indices are decoded and yielded."""
        from webdataset.tariterators import tar_file_expander, group_by_keys

        index = self.index
        for url in parts if parts is not None else self.urls:
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
                    except DecodeError as exc:  # only undecodable bytes are skipped; a failing read stops the run
                        yield index[key], None, f"cannot decode: {exc}"
