"""``--data SPEC`` to a :class:`Source`, through one registry of the kinds of data.

Each kind says which specs it takes; the first kind, in the order below, whose test accepts a spec loads it.
The order goes from the most specific test to the least: a ``builtin:`` name, an embedding table, an
``.npz`` of images, a shard pattern, a folder at a URL, and last any local folder.

Specs:

* ``builtin:digits`` -- scikit-learn's 1,797 handwritten digits (8x8, 10 classes); no download.
* ``path/to/images/`` -- a folder read recursively; ids are POSIX paths relative to it; first-level
  sub-folders are the classes (sorted, as torchvision's ImageFolder); images directly under it have none.
* ``shards/train-{000000..000146}.tar`` -- WebDataset shards (path, glob, brace pattern or URL); ids are
  ``__key__`` and must be unique across the set; ground truth from ``cls`` when present.
* ``arrays.npz`` -- ``images`` (N,H,W) or (N,H,W,C) uint8 and optional ``labels`` (N,); ids ``000042``.
* ``vectors.npy``, ``table.parquet``, an ``.npz`` of ``embeddings``, a LAION ``img_emb/`` folder --
  precomputed vectors (embedding tables).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from .._util.remote import is_url
from ..errors import DataError
from ._arrays import load_builtin, load_npz
from ._embeddings import is_embedding_spec, load_embeddings
from ._folder import FolderSource, RemoteFolderSource
from ._shards import ShardSource
from ._source import Source

__all__ = ["resolve", "register_source", "SOURCE_KINDS"]


@dataclass(frozen=True)
class SourceKind:
    """One kind of data: its name, which specs it takes, and how to load one."""

    name: str
    matches: Callable[[str], bool]
    load: Callable[[str], Source]


def _is_shards(spec: str) -> bool:
    """A shard path, pattern or command; never an existing folder (``v1.target/``, ``run{1}/`` are folders)."""
    lower = spec.lower()
    return (".tar" in lower or "{" in spec or lower.startswith("pipe:")) and not os.path.isdir(spec)


SOURCE_KINDS: list[SourceKind] = [
    SourceKind("builtin", lambda spec: spec.startswith("builtin:"), load_builtin),
    SourceKind("embeddings", is_embedding_spec, load_embeddings),
    SourceKind("arrays", lambda spec: spec.lower().endswith(".npz"), load_npz),
    SourceKind("shards", _is_shards, ShardSource),
    SourceKind("remote folder", is_url, RemoteFolderSource),
    SourceKind("folder", lambda spec: True, FolderSource),
]


def register_source(name: str, matches: Callable[[str], bool], load: Callable[[str], Source]) -> None:
    """Add a kind of data, tried before the built-in kinds (a new kind is more specific than a folder)."""
    SOURCE_KINDS.insert(0, SourceKind(name, matches, load))


def resolve(spec: str) -> Source:
    """Turn a ``--data`` spec into a :class:`Source` (see the module docstring for the forms)."""
    spec = str(spec)
    if not spec:
        raise DataError("empty data spec; give a folder, shard pattern, .npz file or builtin:NAME")
    kind = next(kind for kind in SOURCE_KINDS if kind.matches(spec))
    return kind.load(spec)
