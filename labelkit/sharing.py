"""Moving labels in and out of labelkit: import released SeLa labels, export to plain formats, summaries."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from . import format as fmt
from ._io import atomic_path, sha256_file
from .artefact import Artefact
from .errors import ImportSourceError

__all__ = ["import_labels", "export_artefact", "summarize", "imagefolder_keys", "read_keys", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("csv", "npy", "json")


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
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ImportSourceError(f"--keys {path}: {exc}") from None
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise ImportSourceError(f"--keys {path}: line {blank[0]} is blank; every line must hold one sample id")
    return [line.strip() for line in lines]


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
        obj = torch.load(path, map_location="cpu", weights_only=True)
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


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _load_csv(path: Path) -> tuple[list[str] | None, np.ndarray]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with open(path, newline="") as handle:
        sample = handle.read(64 * 1024)
    if not sample.strip():
        raise ImportSourceError(f"{path}: empty CSV file")
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",;\t |")
        delimiter = dialect.delimiter
    except csv.Error:
        delimiter = ","  # a single column has no delimiter to sniff
    first = next(csv.reader(io.StringIO(sample), delimiter=delimiter))
    first = [cell.strip() for cell in first]
    # A header row has a non-integer where labels would stand (the first cell may be a key either way).
    label_cells = first[1:] if len(first) > 1 else first
    has_header = not all(_is_int(cell) for cell in label_cells)
    column_types = {}
    if has_header and re.search(r"id|key|path|file|name|image", first[0], re.IGNORECASE):
        column_types[first[0]] = pa.string()  # zero-padded numeric ids must stay strings
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(autogenerate_column_names=not has_header),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(column_types=column_types),
        )
    except Exception as exc:
        raise ImportSourceError(f"{path}: not a label CSV ({delimiter!r}-separated): {exc}") from None
    columns = table.column_names
    key_column = None
    int_columns = [c for c in columns if pa.types.is_integer(table.schema.field(c).type)]
    other = [c for c in columns if c not in int_columns]
    if len(other) == 1 and other[0] == columns[0]:
        key_column = other[0]
    elif other:
        raise ImportSourceError(
            f"{path}: expected an optional key column followed by integer label columns; "
            f"non-integer column(s) {other} found (header detected: {has_header})"
        )
    if not int_columns:
        raise ImportSourceError(f"{path}: no integer label column found")
    for name in int_columns:
        if table.column(name).null_count:
            row = int(np.flatnonzero(table.column(name).is_null().to_numpy(zero_copy_only=False))[0])
            row += 1 + int(has_header)
            raise ImportSourceError(f"{path}: column {name!r} has an empty value at line {row}")
    labels = np.stack([table.column(c).to_numpy() for c in int_columns])
    keys = table.column(key_column).to_pylist() if key_column else None
    if keys is not None and any(k is None for k in keys):
        raise ImportSourceError(f"{path}: key column {key_column!r} has empty values")
    return keys, labels


def _load_export_json(path: Path) -> tuple[list[str], np.ndarray, list[int]]:
    """Ids, labels (heads, N) and K per head from a file written by ``export --format json``."""
    try:
        document = json.loads(path.read_text())
        ids, heads = document["sample_ids"], document["heads"]
        names = [h["name"] for h in document["metadata"]["heads"]]
        ks = [int(h["k"]) for h in document["metadata"]["heads"]]
        labels = np.array([heads[name] for name in names], dtype=np.int64)
    except (ValueError, KeyError, TypeError) as exc:
        raise ImportSourceError(f"{path}: not a labelkit JSON export (sample_ids, heads, metadata.heads): "
                                f"{type(exc).__name__}: {exc}") from None
    if labels.ndim != 2 or labels.shape[1] != len(ids):
        raise ImportSourceError(f"{path}: {len(ids)} sample ids but head columns of other lengths")
    return [str(i) for i in ids], labels, ks


def import_labels(
    source: str | os.PathLike,
    *,
    keys: str | None = None,
    image_root: str | None = None,
    clusters: int | Sequence[int] | None = None,
    data_spec: str | None = None,
) -> Artefact:
    """Build an artefact from released SeLa labels (``.pth``/``.pt``), a label CSV or a ``.npy`` array.

    Checkpoints hold ``labels`` (or, in older files, ``L``) of shape (heads, N) in ImageFolder order with no
    file names, so the sample ids come from ``image_root`` or ``keys``; the counts must match exactly.
    """
    source = Path(source)
    if not source.is_file():
        raise ImportSourceError(f"{source}: no such file")
    suffix = source.suffix.lower()
    file_keys = None
    if suffix in (".pth", ".pt", ".tar"):
        labels = _load_checkpoint(source)
    elif suffix in (".csv", ".tsv", ".txt"):
        file_keys, labels = _load_csv(source)
    elif suffix == ".json":
        file_keys, labels, exported_k = _load_export_json(source)
        clusters = clusters if clusters is not None else exported_k
    elif suffix == ".npy":
        try:
            labels = np.load(source, allow_pickle=False)
        except ValueError as exc:
            raise ImportSourceError(f"{source}: not a plain numeric .npy array: {exc}") from None
        if not np.issubdtype(labels.dtype, np.integer):
            raise ImportSourceError(f"{source}: labels must be integers, got dtype {labels.dtype}")
    else:
        raise ImportSourceError(f"{source}: unknown label file type {suffix!r}; expected .pth, .pt, .csv, .json or .npy")

    if labels.ndim == 1:
        labels = labels[None, :]
    if labels.ndim != 2:
        raise ImportSourceError(f"{source}: labels must have shape (N,) or (heads, N), got {labels.shape}")
    if file_keys is None:
        ids = _keys(source, keys, image_root)
        if labels.shape[1] != len(ids) and labels.shape[0] == len(ids) and labels.shape[1] <= 64:
            labels = labels.T  # (N, heads) as some scripts save it
        if labels.shape[1] != len(ids):
            raise ImportSourceError(
                f"{source} has {labels.shape[1]} labels per head but the key list has {len(ids)} samples; "
                "they must match exactly (is this the same image tree, complete?)"
            )
    else:
        if keys or image_root:
            raise ImportSourceError(f"{source} carries its own key column; drop --keys/--image-root")
        ids = file_keys
    if labels.size and labels.min() < 0:
        raise ImportSourceError(f"{source}: negative label {int(labels.min())} found")
    method = {"name": "import", "source": source.name, "sha256": sha256_file(source)}
    return Artefact.build(ids, labels, clusters, data_spec=data_spec or image_root, method=method)


def export_artefact(artefact: Artefact, format: str, out: str | os.PathLike) -> Path:
    """Write the labels for tools outside labelkit: ``csv`` (sample_id + heads), ``npy`` ((heads, N) int32 in
    sample-id order) or ``json`` (metadata, sample ids and heads)."""
    out = Path(out)
    if format not in EXPORT_FORMATS:
        raise ImportSourceError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    with atomic_path(out) as tmp:
        if format == "csv":
            import pyarrow.csv as pacsv

            columns = [fmt.ID_COLUMN] + [h.name for h in artefact.heads]
            pacsv.write_csv(artefact.table.select(columns), tmp)
        elif format == "npy":
            with open(tmp, "wb") as handle:
                np.save(handle, artefact.label_matrix())
        else:
            document = {
                "metadata": artefact.metadata,
                "sample_ids": artefact.table.column(fmt.ID_COLUMN).to_pylist(),
                "heads": {h.name: artefact.labels(i).tolist() for i, h in enumerate(artefact.heads)},
            }
            tmp.write_text(json.dumps(document))
    return out


def summarize(artefact: Artefact) -> dict:
    """What ``labelkit info`` shows: identity, provenance and cluster sizes per head."""
    heads = []
    for i, head in enumerate(artefact.heads):
        sizes = artefact.cluster_sizes(i)
        heads.append(
            {
                "head": i,
                "name": head.name,
                "k": head.k,
                "size_min": int(sizes.min()),
                "size_max": int(sizes.max()),
                "size_mean": float(sizes.mean()),
                "empty": int((sizes == 0).sum()),
            }
        )
    meta = artefact.metadata
    return {
        "artefact_id": artefact.artefact_id,
        "format_version": meta["format_version"],
        "num_samples": artefact.num_samples,
        "num_heads": artefact.num_heads,
        "data": meta["data"],
        "method": meta["method"],
        "producer": meta["producer"],
        "parents": meta["parents"],
        "created_at": meta["created_at"],
        "heads": heads,
    }
