"""Images held in arrays: ``.npz`` files and the built-in data sets (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from ._source import MapSource

__all__ = ["ArraySource", "register_builtin", "BUILTINS", "load_builtin", "load_npz"]


class ArraySource(MapSource):
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

    def sizes(self) -> np.ndarray:
        return np.full(len(self), self.images[0].nbytes, dtype=np.int64)

    def read(self, i: int) -> bytes:
        return self.images[i].tobytes()


def load_npz(spec: str) -> ArraySource:
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


def load_builtin(spec: str) -> ArraySource:
    name = spec.split(":", 1)[1]
    if name not in BUILTINS:
        raise DataError(f"{spec}: unknown built-in data set; available: {', '.join('builtin:' + b for b in BUILTINS)}")
    images, labels, classes = BUILTINS[name]()
    source = ArraySource(spec, images, labels, classes)
    source.kind = "builtin"
    return source
