"""Labels from outside labelkit into an artefact: the released SeLa labels, checkpoints, label CSVs and ``.npy``
arrays, joined to sample ids by a key column, a key file or an ImageFolder tree; and labelkit's own JSON exports
and artefacts (a file, a run directory, a Hub export folder) back whole, with their id and metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import format as fmt
from . import released
from .._util import remote
from .._util.files import read_keys as _read_key_file
from .._util.files import sha256_file
from ..errors import ImportSourceError
from ._artefact import Artefact
from ._reading import read_artefact
from ._tables import _load_csv

__all__ = ["import_labels", "imagefolder_keys", "read_keys"]


def imagefolder_keys(root: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of the images under ``root`` in torchvision ``ImageFolder`` order.

    The released SeLa labels are columns in that order, without file names; this recovers the names.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(root)
    if not root.is_dir():
        raise ImportSourceError(f"--image-root {root}: not a directory")
    try:
        _, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as exc:
        raise ImportSourceError(f"--image-root {root}: {exc}") from None
    return [Path(path).relative_to(root).as_posix() for path, _ in samples]


def read_keys(path: str | os.PathLike) -> list[str]:
    """One sample id a line; blank lines are not allowed (they would shift every later label)."""
    try:
        return _read_key_file(path)
    except (OSError, ValueError) as exc:
        raise ImportSourceError(f"--keys {path}: {exc}") from None


def _keys(source: Path, keys: str | None, image_root: str | None) -> list[str]:
    if keys and image_root:
        raise ImportSourceError("give either --keys or --image-root, not both")
    if keys:
        return read_keys(keys)
    if image_root:
        return imagefolder_keys(image_root)
    raise ImportSourceError(
        f"{source.name} has labels by position only: give --image-root DIR (ImageFolder order) or --keys FILE"
    )


def _load_checkpoint(path: Path) -> np.ndarray:
    import torch

    try:
        try:  # memory-mapped: only the pages of the labels are read, not the weights beside them
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # the pre-1.6 format cannot be mapped
    except Exception as exc:  # torch raises many types for foreign or unsafe pickles
        raise ImportSourceError(
            f"{path}: cannot be loaded as a tensor checkpoint with weights_only=True "
            f"(labelkit never runs code from a file): {str(exc).splitlines()[0]}"
        ) from None
    if isinstance(obj, dict):
        for key in ("labels", "L"):
            if key in obj:
                obj = obj[key]
                break
        else:
            raise ImportSourceError(f"{path}: no 'labels' or 'L' entry; found keys {sorted(map(str, obj))[:10]}")
    if not isinstance(obj, torch.Tensor):
        raise ImportSourceError(f"{path}: labels must be a tensor, got {type(obj).__name__}")
    if obj.is_floating_point() or obj.is_complex():
        raise ImportSourceError(f"{path}: labels must be an integer tensor, got {obj.dtype}")
    return obj.numpy()


def _load_export_json(path: Path) -> tuple[list[str], np.ndarray, list[int], dict, np.ndarray | None]:
    """Ids, labels (heads, N), K per head, the artefact's metadata and its scores (heads, N) or None, from a file
    written by ``export --format json``."""
    try:
        document = json.loads(path.read_text())
        ids, heads, metadata = document["sample_ids"], document["heads"], document["metadata"]
        names = [h["name"] for h in metadata["heads"]]
        ks = [int(h["k"]) for h in metadata["heads"]]
        labels = np.array([heads[name] for name in names], dtype=np.int64)
        kept = document.get("scores") or {}
        scores = np.array([kept[fmt.score_column(h)] for h in range(len(names))], dtype=np.float32) if kept else None
    except (ValueError, KeyError, TypeError) as exc:
        raise ImportSourceError(f"{path}: not a labelkit JSON export (sample_ids, heads, metadata.heads): "
                                f"{type(exc).__name__}: {exc}") from None
    if labels.ndim != 2 or labels.shape[1] != len(ids) or (scores is not None and scores.shape != labels.shape):
        raise ImportSourceError(f"{path}: {len(ids)} sample ids but head or score columns of other lengths")
    return [str(i) for i in ids], labels, ks, metadata, scores


def _from_export_json(path: Path) -> Artefact:
    """The artefact a JSON export was written from, whole: the same id, data, method, parents and scores. Labels
    edited since the export make a new artefact whose parent is the exported one."""
    ids, labels, ks, metadata, scores = _load_export_json(path)
    curation = {key: [head.get(key) for head in metadata["heads"]] for key in ("names", "status")}
    artefact = Artefact.build(ids, labels, ks, scores=scores, method=metadata.get("method"),
                              parents=metadata.get("parents", ()), data=metadata.get("data"), **curation)
    if artefact.artefact_id == metadata.get("artefact_id"):
        return artefact.restamped(metadata.get("producer") or artefact.metadata["producer"],
                                  metadata.get("created_at", artefact.metadata["created_at"]))
    method = {"name": "import", "source": path.name, "sha256": sha256_file(path),
              "note": "labels changed since the export; the exported artefact is the parent"}
    data = {k: v for k, v in (metadata.get("data") or {}).items() if k in ("spec", "content")}
    return Artefact.build(ids, labels, ks, scores=scores, method=method, data=data,
                          parents=[metadata["artefact_id"]] if metadata.get("artefact_id") else [], **curation)


def _is_artefact(path: Path) -> bool:
    """A label artefact as every other command reads it: a Parquet file, a run directory or a Hub export."""
    return path.suffix.lower() == ".parquet" or (path.is_dir() and (
        (path / "labels.parquet").is_file() or any((path / "data").glob("*.parquet"))))


def import_labels(
    source: str | os.PathLike,
    *,
    keys: str | None = None,
    image_root: str | None = None,
    clusters: int | Sequence[int] | None = None,
    data_spec: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> Artefact:
    """Build an artefact from released SeLa labels (``sela:NAME``, or a downloaded ``.pth``/``.pt``), a label
    CSV, an ``export --format json`` file or a ``.npy`` array.

    Checkpoints hold ``labels`` (or, in older files, ``L``) of shape (heads, N) in ImageFolder order with no
    file names, so the sample ids come from ``image_root`` or ``keys``; the counts must match exactly.
    ``sela:NAME`` (see :data:`labelkit.artefact.released.RELEASES`) is downloaded to the cache once, with
    ``progress(done, total)`` called as bytes arrive, and checked against the release's known shape.
    """
    item, path, digest = None, Path(source), None
    if str(source).startswith("sela:"):
        item = released.release(str(source))
        path, digest = released.fetch(item, progress=progress)
    elif path.exists() and _is_artefact(path):
        if keys or image_root or clusters:
            raise ImportSourceError(f"{path} is a label artefact with its own ids and K; drop --keys, --image-root "
                                    "and --clusters")
        return read_artefact(path)  # the same artefact, whole (e.g. a Hub export folder as one file)
    elif not path.exists():
        raise ImportSourceError(f"{path}: no such file or folder")
    elif not path.is_file():
        raise ImportSourceError(f"{path}: a folder without labels.parquet or data/*.parquet; give a label file, a "
                                "run directory or a Hub export")
    elif path.suffix.lower() == ".json":
        if keys or image_root or clusters:
            raise ImportSourceError(f"{path} is a labelkit JSON export with its own ids and K; drop --keys, "
                                    "--image-root and --clusters")
        return _from_export_json(path)
    file_keys, labels, layout, extras = _read_labels(path, item.samples if item else None)
    if clusters is None and item is not None:
        clusters = item.k
    if item is not None:
        labels = _check_release(item, path, labels, layout)
        file_keys = None if file_keys is None else _imagenet_ids(file_keys)
    ids, labels = _join_ids(path, labels, file_keys, keys, image_root)
    if labels.size and labels.min() < 0:
        raise ImportSourceError(f"{path}: negative label {int(labels.min())} found")
    method = {"name": "import", "source": f"sela:{item.name}" if item else path.name,
              "sha256": digest or sha256_file(path)}
    if item is not None:
        method.update(url=remote.redact(item.url), release=item.description)
    if layout:
        method["layout"] = layout
    named = extras.get("names")
    if named:
        ks = [clusters or int(labels[h].max()) + 1 for h in range(len(labels))]
        named = [None if pairs is None else [pairs.get(c) for c in range(ks[h])] for h, pairs in enumerate(named)]
    return Artefact.build(ids, labels, clusters, scores=extras.get("scores"), data={"spec": data_spec or image_root},
                          method=method, names=named)


def _read_labels(path: Path, samples: int | None) -> tuple[list[str] | None, np.ndarray, str | None, dict]:
    """(keys or None, labels (heads, N), the CSV layout found, the scores and cluster names of a labelkit CSV
    export (``{"scores": …, "names": …}``, empty otherwise)) from
    a label file of any supported type; ``samples``, when known, tells the orientation of small CSV files."""
    suffix = path.suffix.lower()
    file_keys, layout, extras = None, None, {}
    if suffix in (".pth", ".pt", ".tar"):
        labels = _load_checkpoint(path)
    elif suffix in (".csv", ".tsv", ".txt"):
        file_keys, labels, layout, extras = _load_csv(path, samples)
        extras = extras or {}
    elif suffix == ".npy":
        try:
            labels = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ImportSourceError(f"{path}: not a plain numeric .npy array: {exc}") from None
        if not np.issubdtype(labels.dtype, np.integer):
            raise ImportSourceError(f"{path}: labels must be integers, got dtype {labels.dtype}")
    else:
        raise ImportSourceError(f"{path}: unknown label file type {suffix!r}; expected .pth, .pt, .csv, .json, "
                                ".npy, or an artefact (.parquet, a run directory, a Hub export)")
    if labels.ndim == 1:
        labels = labels[None, :]
    if labels.ndim != 2:
        raise ImportSourceError(f"{path}: labels must have shape (N,) or (heads, N), got {labels.shape}")
    return file_keys, labels, layout, extras


def _join_ids(path: Path, labels: np.ndarray, file_keys: list[str] | None, keys: str | None,
              image_root: str | None) -> tuple[list[str], np.ndarray]:
    """The sample id of every label column: the file's own keys, or a key file / ImageFolder tree in order."""
    if file_keys is not None:
        if keys or image_root:
            raise ImportSourceError(f"{path} carries its own key column; drop --keys/--image-root")
        return file_keys, labels
    ids = _keys(path, keys, image_root)
    if labels.shape[1] != len(ids) and labels.shape[0] == len(ids) and labels.shape[1] <= 64:
        labels = labels.T  # (N, heads) as some scripts save it
    if labels.shape[1] != len(ids):
        raise ImportSourceError(
            f"{path} has {labels.shape[1]} labels per head but the key list has {len(ids)} samples; "
            "they must match exactly (is this the same image tree, complete?)"
        )
    return ids, labels


def _check_release(item: released.Release, path: Path, labels: np.ndarray, layout: str | None) -> np.ndarray:
    """The labels as (heads, N), or a clear error when the file is not the release it is named for."""
    if labels.shape == (item.samples, item.heads) and item.samples != item.heads:
        labels = labels.T
    found = f"found shape {labels.shape}" + (f" read as {layout}" if layout else "")
    if labels.shape != (item.heads, item.samples):
        raise ImportSourceError(f"{path}: sela:{item.name} should hold {item.heads} head(s) x {item.samples:,} "
                                f"samples; {found}. Is the download complete and the right file?")
    if labels.size and (labels.min() < 0 or labels.max() >= item.k):
        raise ImportSourceError(f"{path}: sela:{item.name} labels must lie in 0..{item.k - 1}; found "
                                f"{int(labels.min())}..{int(labels.max())} ({found})")
    return labels


def _imagenet_ids(keys: list[str]) -> list[str]:
    """ImageNet file ids as an image folder gives them (``n01440764/n01440764_10026.JPEG``), from the absolute or
    relative paths a release may carry."""
    out = []
    for key in keys:
        parts = key.replace("\\", "/").rstrip("/").split("/")
        out.append("/".join(parts[-2:]) if len(parts) >= 2 else key)
    return out
