"""Moving labels in and out of labelkit: import released SeLa labels, export to plain formats, summaries."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import format as fmt
from . import released
from .._util import remote
from .._util.files import atomic_path, sha256_file
from ._artefact import Artefact, ArtefactHeader
from ..errors import ImportSourceError

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


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


_WIDE = 1000  # more fields than this on one line: heads are rows (no one saves a thousand heads as columns)
_SNIFF_BYTES = 256 * 1024


def _is_header(first: list[str], second: list[str] | None) -> bool:
    """Whether the first CSV line names columns rather than holding labels."""
    if first and first[0] == "":
        return True  # pandas' header over an unnamed index column: ",0,1,..."
    if not all(_is_int(cell) for cell in first[1:]):
        return True
    # "0,1,...,m-1" as column names (pandas, index=False): a real row equal to it is vanishingly unlikely
    counting = [str(i) for i in range(len(first))]
    return len(first) >= 3 and first == counting and second is not None and second != counting


def _is_index(values) -> bool:
    values = np.asarray(values)
    return len(values) > 1 and (np.array_equal(values, np.arange(len(values)))
                                or np.array_equal(values, np.arange(1, len(values) + 1)))


def _sniff(path: Path) -> tuple[str, list[str], list[str] | None, bool]:
    """(delimiter, first line's cells, second line's cells or None, wide) from the head of a CSV file."""
    with open(path, newline="") as handle:
        sample = handle.read(_SNIFF_BYTES)
    if not sample.strip():
        raise ImportSourceError(f"{path}: empty CSV file")
    lines = sample.splitlines()
    try:
        delimiter = csv.Sniffer().sniff("\n".join(line[:4096] for line in lines[:5]), delimiters=",;\t |").delimiter
    except csv.Error:
        delimiter = ","  # a single column has no delimiter to sniff
    rows = list(csv.reader(io.StringIO("\n".join(lines[:2])), delimiter=delimiter))
    first = [cell.strip() for cell in rows[0]]
    cut = "\n" not in sample  # the sample ends inside the first line
    if cut and len(first) > 1:
        first = first[:-1]  # its last field may be cut short
    second = [cell.strip() for cell in rows[1]] if len(rows) > 1 and not cut else None
    wide = len(first) > _WIDE or (cut and len(sample) >= _SNIFF_BYTES)
    return delimiter, first, second, wide


def _load_wide_csv(path: Path, delimiter: str, header: bool) -> tuple[None, np.ndarray, str]:
    """One head a line, one label a field; a leading head-name or head-index column is dropped."""
    rows, names = [], []
    with open(path, newline="") as handle:
        for number, line in enumerate(handle, start=1):
            if header and number == 1 or not line.strip():
                continue
            cells = line.rstrip("\r\n").split(delimiter)
            if not _is_int(cells[0].strip()):
                names.append(cells[0])
                cells = cells[1:]
            try:
                rows.append(np.array(cells, dtype=np.int64))
            except ValueError:
                bad = next(c for c in cells if not _is_int(c.strip()))
                raise ImportSourceError(f"{path}: line {number} holds {bad[:20]!r} where labels should be") from None
    if not rows:
        raise ImportSourceError(f"{path}: no label line found")
    if not header and len(rows) > 1 and _is_index(rows[0]) and len(rows[0]) == len(rows[1]) + (not names):
        rows, header = rows[1:], True  # column numbers 0..N-1 as a header line: labels < K never count up to N
    if len({len(r) for r in rows}) > 1:
        raise ImportSourceError(f"{path}: the label lines have different lengths {sorted({len(r) for r in rows})}")
    labels = np.stack(rows)
    layout = f"one head per line ({delimiter!r}-separated{', with a header line' if header else ''})"
    if names:
        layout += ", head names in the first field"
    elif _is_index(labels[:, 0]) and labels.shape[1] > 1 and header:
        labels = labels[:, 1:]
        layout += ", a row-index column dropped"
    return None, labels, layout


def _load_csv(path: Path, samples: int | None = None) -> tuple[list[str] | None, np.ndarray, str]:
    """Keys (or None), labels (heads, N) and a description of the layout found, from a label CSV of any
    common layout: one sample a line or one head a line; with or without a header; with a key column of file
    names, a row-index column, or neither; comma, semicolon, tab, space or bar separated. ``samples``, when
    known, also tells the orientation of small files: a first line of that many fields (+1) is one head."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    delimiter, first, second, wide = _sniff(path)
    wide = wide or (samples is not None and samples > 1 and len(first) in (samples, samples + 1))
    has_header = _is_header(first, second)
    if wide:
        return _load_wide_csv(path, delimiter, has_header)
    column_types = {}
    data_row = second if has_header else first
    # a key column: its values are not integers; read as strings so that zero-padded numeric ids stay ids
    named = has_header and re.search(r"id|key|path|file|name|image", first[0], re.IGNORECASE)
    if data_row and data_row[0] and (named or not _is_int(data_row[0])):
        column_types[first[0] if has_header else "f0"] = pa.string()
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(autogenerate_column_names=not has_header, block_size=1 << 24),
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
    layout = f"one sample per line ({delimiter!r}-separated{', with a header line' if has_header else ''})"
    if key_column is None and len(int_columns) > 1 and _is_index(table.column(int_columns[0]).to_numpy()):
        int_columns = int_columns[1:]
        layout += ", a row-index column dropped"
    labels = np.stack([table.column(c).to_numpy() for c in int_columns])
    keys = table.column(key_column).to_pylist() if key_column else None
    if keys is not None:
        if any(k is None or k == "" for k in keys):
            raise ImportSourceError(f"{path}: key column {key_column!r} has empty values")
        layout += f", keys in column {key_column!r}"
    return keys, labels, layout


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
    progress: Callable[[int, int | None], None] | None = None,
) -> Artefact:
    """Build an artefact from released SeLa labels (``sela:NAME``, or a downloaded ``.pth``/``.pt``), a label
    CSV, an ``export --format json`` file or a ``.npy`` array.

    Checkpoints hold ``labels`` (or, in older files, ``L``) of shape (heads, N) in ImageFolder order with no
    file names, so the sample ids come from ``image_root`` or ``keys``; the counts must match exactly.
    ``sela:NAME`` (see :data:`labelkit.artefact.released.RELEASES`) is downloaded to the cache once, with
    ``progress(done, total)`` called as bytes arrive, and checked against the release's known shape.
    """
    item = None
    if str(source).startswith("sela:"):
        item = released.release(str(source))
        path, digest = released.fetch(item, progress=progress)
    else:
        path, digest = Path(source), None
        if not path.is_file():
            raise ImportSourceError(f"{path}: no such file")
    suffix = path.suffix.lower()
    file_keys, layout = None, None
    if suffix in (".pth", ".pt", ".tar"):
        labels = _load_checkpoint(path)
    elif suffix in (".csv", ".tsv", ".txt"):
        file_keys, labels, layout = _load_csv(path, item.samples if item else None)
    elif suffix == ".json":
        file_keys, labels, exported_k = _load_export_json(path)
        clusters = clusters if clusters is not None else exported_k
    elif suffix == ".npy":
        try:
            labels = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ImportSourceError(f"{path}: not a plain numeric .npy array: {exc}") from None
        if not np.issubdtype(labels.dtype, np.integer):
            raise ImportSourceError(f"{path}: labels must be integers, got dtype {labels.dtype}")
    else:
        raise ImportSourceError(f"{path}: unknown label file type {suffix!r}; expected .pth, .pt, .csv, .json or .npy")

    if labels.ndim == 1:
        labels = labels[None, :]
    if labels.ndim != 2:
        raise ImportSourceError(f"{path}: labels must have shape (N,) or (heads, N), got {labels.shape}")
    if item is not None:
        labels = _check_release(item, path, labels, layout)
        clusters = item.k if clusters is None else clusters
        if file_keys is not None:
            file_keys = _imagenet_ids(file_keys)
    if file_keys is None:
        ids = _keys(path, keys, image_root)
        if labels.shape[1] != len(ids) and labels.shape[0] == len(ids) and labels.shape[1] <= 64:
            labels = labels.T  # (N, heads) as some scripts save it
        if labels.shape[1] != len(ids):
            raise ImportSourceError(
                f"{path} has {labels.shape[1]} labels per head but the key list has {len(ids)} samples; "
                "they must match exactly (is this the same image tree, complete?)"
            )
    else:
        if keys or image_root:
            raise ImportSourceError(f"{path} carries its own key column; drop --keys/--image-root")
        ids = file_keys
    if labels.size and labels.min() < 0:
        raise ImportSourceError(f"{path}: negative label {int(labels.min())} found")
    method = {"name": "import", "source": f"sela:{item.name}" if item else path.name,
              "sha256": digest or sha256_file(path)}
    if item is not None:
        method.update(url=remote.redact(item.url), release=item.description)
    if layout:
        method["layout"] = layout
    return Artefact.build(ids, labels, clusters, data_spec=data_spec or image_root, method=method)


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


def summarize(artefact: Artefact | ArtefactHeader) -> dict:
    """What ``labelkit info`` shows: identity, provenance and, when the labels were read, cluster sizes per
    head (an :class:`ArtefactHeader` -- footer only -- has no sizes: ``size_*`` are ``None``)."""
    heads = []
    for i, head in enumerate(artefact.heads):
        entry = {"head": i, "name": head.name, "k": head.k,
                 "size_min": None, "size_max": None, "size_mean": None, "empty": None}
        if isinstance(artefact, Artefact):
            sizes = artefact.cluster_sizes(i)
            entry.update(size_min=int(sizes.min()), size_max=int(sizes.max()), size_mean=float(sizes.mean()),
                         empty=int((sizes == 0).sum()))
        heads.append(entry)
    meta = artefact.metadata
    summary = {
        "artefact_id": meta["artefact_id"],
        "format_version": meta["format_version"],
        "num_samples": meta["num_samples"],
        "num_heads": len(meta["heads"]),
        "data": meta["data"],
        "method": meta["method"],
        "producer": meta["producer"],
        "parents": meta["parents"],
        "created_at": meta["created_at"],
        "heads": heads,
    }
    if isinstance(artefact, ArtefactHeader):
        summary["read"] = {"footer_only": True, "file_bytes": artefact.file_bytes}
    return summary


# -- Hugging Face Hub ------------------------------------------------------------------------------------------
HUB_ROWS_PER_FILE = 5_000_000  # ~60 MB a file at ten heads: well under the Hub's advice of < 500 MB per Parquet


def _size_category(n: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    return next((name for bound, name in bounds if n < bound), "1B<n<10B")


def _hub_files(n: int, rows_per_file: int) -> list[tuple[int, int, str]]:
    count = max(1, -(-n // rows_per_file))
    return [(i * rows_per_file, min(n, (i + 1) * rows_per_file), f"data/train-{i:05d}-of-{count:05d}.parquet")
            for i in range(count)]


def _card_yaml(artefact: Artefact, files: list[tuple[str, int]], license: str, pretty_name: str,
               source_datasets: list[str]) -> str:
    import pyarrow as pa
    import yaml

    dtypes = {pa.string(): "string", pa.int32(): "int32", pa.float32(): "float32"}
    features = [{"name": field.name, "dtype": dtypes[field.type]} for field in artefact.table.schema]
    front = {
        "license": license,
        "annotations_creators": ["machine-generated"],
        "source_datasets": source_datasets,
        "task_categories": ["image-classification"],
        "size_categories": [_size_category(artefact.num_samples)],
        "pretty_name": pretty_name,
        "tags": ["labelkit", "self-labelling", "pseudo-labels", "clustering", "sela"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
        "dataset_info": {
            "features": features,
            "splits": [{"name": "train", "num_bytes": int(artefact.table.nbytes),
                        "num_examples": artefact.num_samples}],
            "download_size": int(sum(size for _, size in files)),
            "dataset_size": int(artefact.table.nbytes),
        },
    }
    return yaml.safe_dump(front, sort_keys=False, allow_unicode=True)


def _provenance_rows(meta: dict) -> list[tuple[str, str]]:
    method, data = meta["method"], meta["data"]
    rows = [("artefact id", f"`{meta['artefact_id']}`"), ("format", f"labelkit artefact v{meta['format_version']}"),
            ("method", method["name"])]
    config = method.get("config") or {}
    for key, label in (("arch", "backbone"), ("clusters", "clusters (K)"), ("heads", "heads"), ("epochs", "epochs"),
                       ("lam", "λ (Sinkhorn)"), ("prior", "cluster prior"), ("balance", "balance τ"),
                       ("seed", "seed")):
        if config.get(key) not in (None, ""):
            rows.append((label, f"`{config[key]}`"))
    if method.get("source"):
        rows.append(("imported from", f"`{method['source']}`" + (f" ({method['url']})" if method.get("url") else "")))
        rows.append(("source sha256", f"`{method.get('sha256', '-')}`"))
    rows.append(("data", f"`{data.get('spec') or '-'}`, {data['count']:,} samples"))
    rows.append(("data fingerprint", f"`{data['fingerprint']}` (sha256 of the sorted sample ids)"))
    if data.get("skipped"):
        rows.append(("skipped samples", f"{len(data['skipped']):,} (undecodable; listed in the metadata)"))
    producer = meta["producer"]
    rows.append(("produced by", ", ".join(f"{k} {v}" for k, v in producer.items() if v)))
    rows.append(("created", meta["created_at"]))
    parents = meta.get("parents") or []
    rows.append(("parents (lineage)", ", ".join(f"`{p}`" for p in parents) if parents else "none: made from the data"))
    return rows


def _quality_section(meta: dict, truth: dict | None) -> list[str]:
    def cell(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = []
    if truth:
        lines += [f"Against ground truth (`{truth['truth']}`, measured at export):", "",
                  "| head | K | NMI | adjusted NMI | ARI | accuracy |", "|---|---|---|---|---|---|"]
        for h in truth["heads"]:
            lines.append(f"| {h['head']} | {h['k']} | " + " | ".join(cell(h.get(name), 4) for name in
                                                                    ("nmi", "ami", "ari", "accuracy")) + " |")
        lines.append("")
    quality = (meta["method"].get("quality") or {}).get("heads")
    if quality:
        lines += ["Label-free quality recorded by the run (no ground truth used):", "",
                  "| head | K | agreement | stability | linear probe | balance |", "|---|---|---|---|---|---|"]
        for row in quality:
            lines.append(f"| {row['head']} | {row['k']} | {cell(row.get('agreement'))} | "
                         f"{cell(row.get('stability'))} | {cell(row.get('generalisation'))} | {cell(row.get('balance'))} |")
        which = meta["method"]["quality"].get("recommended_k")
        if which:
            lines.append(f"\nRecommended K (label-free): **{which['k']}**.")
        lines.append("")
    consensus = meta["method"].get("consensus")
    if consensus and consensus.get("head") is not None:
        lines.append(f"Head {consensus['head']} is the consensus of the other heads (the primary labels).\n")
    return lines or ["No quality figures are recorded in this artefact "
                     "(`labelkit metrics ARTEFACT --truth SPEC` measures them where ground truth exists).", ""]


def _card_body(artefact: Artefact, repo: str, pretty_name: str, files: list[tuple[str, int]],
               truth: dict | None) -> str:
    meta = artefact.metadata
    heads = artefact.heads
    first = files[0][0]
    lines = [f"# {pretty_name}", "",
             f"Self-labels (pseudo-labels that a network assigned to unlabelled images by itself) for "
             f"{artefact.num_samples:,} samples: {len(heads)} labelling(s) (\"heads\") of "
             f"{', '.join(str(h.k) for h in heads)} clusters, made with "
             "labelkit. Cluster numbers are arbitrary names, not classes.",
             "", "## Files", "",
             "| column | type | meaning |", "|---|---|---|",
             "| `sample_id` | string | the sample's stable id (its path relative to the image root, or its shard key) |"]
    for i, head in enumerate(heads):
        lines.append(f"| `{head.name}` | int32 | cluster of head {i}, 0 … {head.k - 1} |")
    for i in range(len(heads)):
        if fmt.score_column(i) in artefact.table.column_names:
            lines.append(f"| `{fmt.score_column(i)}` | float32 | confidence of head {i}'s label |")
    lines += ["", "Rows are sorted by `sample_id`; the artefact's full metadata (provenance, configuration, lineage) "
              f"is in each Parquet file's schema metadata under the key `{fmt.METADATA_KEY}`.", "",
              "## Provenance", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in _provenance_rows(meta)]
    lines += ["", "## Label quality", ""] + _quality_section(meta, truth)
    lines += ["## Cluster sizes", "", "![cluster sizes of every head, largest first](images/cluster_sizes.png)", "",
              "| head | K | smallest | median | largest | empty |", "|---|---|---|---|---|---|"]
    for i, head in enumerate(heads):
        sizes = artefact.cluster_sizes(i)
        lines.append(f"| {i} | {head.k} | {int(sizes.min()):,} | {int(np.median(sizes)):,} | {int(sizes.max()):,} | "
                     f"{int((sizes == 0).sum()):,} |")
    hf = f"hf://datasets/{repo}"
    spec = meta["data"].get("spec") or "path/to/images"
    lines += ["", "## Joining labels to images", "",
              f"Each `sample_id` names one sample of `{spec}` (data fingerprint `{meta['data']['fingerprint'][:16]}…`): "
              "for an image folder the path relative to its root, for WebDataset shards the `__key__`. "
              "Join on it, never on row order. To check that a local copy holds the same samples:", "",
              "```bash", f"labelkit validate {hf} --data /path/to/your/copy", "```", "",
              "## Loading", "", "labelkit (validated, with provenance):", "", "```bash", f"labelkit info {hf}",
              f"labelkit transfer --labels {hf} --data /path/to/images --arch resnet18 --out runs/transfer", "```",
              "", "```python", "from labelkit import read_artefact", f'art = read_artefact("{hf}")',
              "labels = art.labels(0)  # head 0, in art.sample_ids order", "```", "",
              "DuckDB:", "", "```sql", f"SELECT sample_id, head_0 FROM '{hf}/data/*.parquet';", "```", "",
              "Polars:", "", "```python", "import polars as pl",
              f'df = pl.read_parquet("{hf}/data/*.parquet")', "```", "",
              "pandas:", "", "```python", "import pandas as pd", f'df = pd.read_parquet("{hf}/{first}")', "```", "",
              "🤗 datasets:", "", "```python", "from datasets import load_dataset",
              f'ds = load_dataset("{repo}", split="train")', "```", ""]
    return "\n".join(lines)


def export_hub(artefact: Artefact, out: str | os.PathLike, *, repo: str | None = None, license: str = "unknown",
               pretty_name: str | None = None, source_datasets: Sequence[str] | None = None,
               truth: dict | None = None, rows_per_file: int = HUB_ROWS_PER_FILE) -> Path:
    """Write ``out`` as a Hugging Face Hub dataset repository: ``data/train-0000i-of-0000N.parquet`` (the
    artefact's rows, each file carrying the full metadata) and a ``README.md`` dataset card whose YAML
    front matter the Hub reads and whose body is generated from the artefact.

    ``repo`` (``user/name``) fills in the loading snippets; ``truth`` is a :func:`labelkit.quality.score_artefact`
    result to show beside the recorded quality. The folder is built beside ``out`` and renamed into place,
    so an existing export is replaced whole or not at all.
    """
    import shutil
    import tempfile

    import pyarrow.parquet as pq

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ImportSourceError(f"--out {out}: a file; --format hub writes a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "README.md").is_file():
        raise ImportSourceError(f"--out {out}: a non-empty folder that is not a hub export; give a new folder")
    repo = repo or "USER/" + re.sub(r"[^A-Za-z0-9._-]+", "-", out.resolve().name).strip("-")
    pretty_name = pretty_name or f"Self-labels {artefact.artefact_id[:12]}"
    spec = artefact.metadata["data"].get("spec") or ""
    if source_datasets is None:
        source_datasets = [f"extended|{spec.split(':', 1)[1]}"] if spec.startswith("builtin:") else ["original"]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (staging / "data").mkdir()
        table = artefact.table.replace_schema_metadata({fmt.METADATA_KEY: json.dumps(artefact.metadata)})
        files = []
        for start, stop, name in _hub_files(artefact.num_samples, rows_per_file):
            pq.write_table(table.slice(start, stop - start), staging / name, compression="zstd",
                           use_dictionary=[c for c in table.column_names if c != fmt.ID_COLUMN])
            files.append((name, (staging / name).stat().st_size))
        from ..report._figures import sizes_figure

        sizes_figure([artefact.cluster_sizes(h) for h in range(artefact.num_heads)],
                     staging / "images" / "cluster_sizes.png")
        card = ("---\n" + _card_yaml(artefact, files, license, pretty_name, list(source_datasets)) + "---\n\n"
                + _card_body(artefact, repo, pretty_name, files, truth))
        (staging / "README.md").write_text(card)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
