"""Image folders, local or at an fsspec URL: ids are POSIX paths relative to the root, first-level sub-folders
are the classes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from ._source import IMAGE_EXTENSIONS, MapSource

__all__ = ["FolderSource", "RemoteFolderSource"]


class FolderSource(MapSource):
    kind = "folder"

    def __init__(self, spec: str):
        root = Path(spec)
        if not root.exists():
            raise DataError(f"{spec}: no such file or directory")
        if not root.is_dir():
            raise DataError(f"{spec}: not a directory, .npz, shard pattern or builtin:NAME")
        self.root = root
        ids = _image_ids(root)
        if not ids:
            raise DataError(f"{spec}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in this folder")
        ids.sort()
        # first-level folders are the classes (as torchvision's ImageFolder), but a link to a folder walked
        # under its own name already is no class of its own
        walked = {i.split("/", 1)[0] for i in ids if "/" in i}
        classes = sorted(entry.name for entry in os.scandir(root)
                         if entry.is_dir(follow_symlinks=True) and (not entry.is_symlink() or entry.name in walked))
        class_index = {name: i for i, name in enumerate(classes)}
        targets = None
        if classes:
            targets = np.array([class_index.get(i.split("/", 1)[0], -1) if "/" in i else -1 for i in ids], np.int64)
        super().__init__(spec, ids, targets, classes or None)

    def read(self, i: int) -> bytes:
        return (self.root / self.ids[i]).read_bytes()

    def sizes(self) -> np.ndarray:
        return np.array([os.stat(self.root / sample_id).st_size for sample_id in self.ids], dtype=np.int64)


def _image_ids(root: Path) -> list[str]:
    """The image files under ``root`` as ids (POSIX paths relative to it). Links are followed, but no folder is
    walked twice: a link back up the tree (``a/up -> ..``) or a second link to one folder adds nothing. A link
    to nothing and a name that is not UTF-8 (ids are text) are errors naming the file."""
    ids, walked = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        status = os.stat(dirpath)
        if (status.st_dev, status.st_ino) in walked:
            dirnames[:] = []
            continue
        walked.add((status.st_dev, status.st_ino))
        dirnames.sort(key=lambda name: (os.path.islink(os.path.join(dirpath, name)), name))  # real folders first
        rel = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(dirpath, name)
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{os.fsencode(path)!r}: the file name is not UTF-8; sample ids are text, so "
                                "rename it (e.g. with convmv)") from None
            if not os.path.exists(path):
                raise DataError(f"{path}: a link to nothing ({os.readlink(path)}); remove it or restore its target")
            ids.append(name if rel == "." else f"{rel}/{name}")
    return ids


class RemoteFolderSource(MapSource):
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

    def read(self, i: int) -> bytes:
        return self.fs.cat_file(self._paths[i])

    def sizes(self) -> np.ndarray:
        missing = [i for i, size in enumerate(self._sizes) if size is None]
        for i in missing:  # some listings (http) carry no sizes
            self._sizes[i] = self.fs.size(self._paths[i])
        return np.array(self._sizes, dtype=np.int64)


