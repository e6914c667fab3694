"""A Hugging Face Hub dataset folder from an artefact: Parquet files under ``data/``, a cluster-size figure and a
card whose YAML the Hub reads (configs, size category, licence) and whose body says how the labels were made."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import format as fmt
from .._util import remote
from .._util.figures import sizes_figure
from .._util.files import atomic_folder
from ..errors import ImportSourceError
from ._artefact import Artefact

__all__ = ["export_hub", "HUB_ROWS_PER_FILE"]


HUB_ROWS_PER_FILE = 5_000_000  # ~60 MB a file at ten heads: well under the Hub's advice of < 500 MB per Parquet


def _size_category(n: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    return next((name for bound, name in bounds if n < bound), "1B<n<10B")


def _hub_files(n: int, rows_per_file: int) -> list[tuple[int, int, str]]:
    count = max(1, -(-n // rows_per_file))
    return [(i * rows_per_file, min(n, (i + 1) * rows_per_file), f"data/train-{i:05d}-of-{count:05d}.parquet")
            for i in range(count)]


@dataclass
class _Rows:
    """What the card says of an artefact's rows, from an :class:`Artefact` in memory or from the pass that
    streamed a file's rows into the export."""

    metadata: dict
    heads: list
    num_samples: int
    schema: object  # the rows' pyarrow schema, and their size in memory as Arrow holds them: both filled in
    nbytes: int  # by the pass that writes the files
    sizes: list[np.ndarray]  # cluster sizes of every head

    @classmethod
    def of(cls, artefact: Artefact) -> "_Rows":
        return cls(artefact.metadata, artefact.heads, artefact.num_samples, None, 0,
                   [artefact.cluster_sizes(h) for h in range(artefact.num_heads)])


def _card_yaml(artefact: _Rows, files: list[tuple[str, int]], license: str, pretty_name: str,
               source_datasets: list[str]) -> str:
    import pyarrow as pa
    import yaml

    dtypes = {pa.string(): "string", pa.int32(): "int32", pa.float32(): "float32"}
    features = [{"name": field.name, "dtype": dtypes[field.type]} for field in artefact.schema]
    for h, head in enumerate(artefact.heads):
        if head.names is not None:  # 🤗 datasets then shows the names (ClassLabel.int2str)
            features[1 + h] = {"name": head.name, "dtype": {"class_label": {"names": _class_names(head)}}}
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
            "splits": [{"name": "train", "num_bytes": artefact.nbytes,
                        "num_examples": artefact.num_samples}],
            "download_size": int(sum(size for _, size in files)),
            "dataset_size": artefact.nbytes,
        },
    }
    return yaml.safe_dump(front, sort_keys=False, allow_unicode=True)


def _class_names(head) -> dict[str, str]:
    """A ClassLabel's names for every cluster: its name, else its number (``cluster N`` should a name be that
    number already)."""
    taken = {n for n in head.names if n is not None}
    return {str(c): head.names[c] if head.names[c] is not None else (str(c) if str(c) not in taken else f"cluster {c}")
            for c in range(head.k)}


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


def _card_body(artefact: _Rows, repo: str, pretty_name: str, files: list[tuple[str, int]],
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
        named = sum(n is not None for n in head.names or ())
        lines.append(f"| `{head.name}` | int32 | cluster of head {i}, 0 … {head.k - 1}"
                     + (f"; {named} of them named (the ClassLabel names in the front matter)" if named else "") + " |")
    for i in range(len(heads)):
        if fmt.score_column(i) in artefact.schema.names:
            lines.append(f"| `{fmt.score_column(i)}` | float32 | confidence of head {i}'s label |")
    subset = meta["method"].get("subset")
    if subset:
        why = ", ".join(f"{k} {v}" for k, v in subset.items() if k not in ("kept", "of"))
        lines += ["", f"These are {subset['kept']:,} of the {subset['of']:,} samples of the parent artefact "
                  f"`{meta['parents'][0][:16]}…`, those with {why.replace('_', ' ')} "
                  f"({subset['kept'] / subset['of']:.1%} pass)."]
    lines += ["", "Rows are sorted by `sample_id`; the artefact's full metadata (provenance, configuration, lineage) "
              f"is in each Parquet file's schema metadata under the key `{fmt.METADATA_KEY}`.", "",
              "## Provenance", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in _provenance_rows(meta)]
    lines += ["", "## Label quality", ""] + _quality_section(meta, truth)
    lines += ["## Cluster sizes", "", "![cluster sizes of every head, largest first](images/cluster_sizes.png)", "",
              "| head | K | smallest | median | largest | empty |", "|---|---|---|---|---|---|"]
    for i, head in enumerate(heads):
        sizes = artefact.sizes[i]
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


def export_hub(artefact: Artefact | str | os.PathLike, out: str | os.PathLike, *, repo: str | None = None,
               license: str = "unknown", pretty_name: str | None = None, source_datasets: Sequence[str] | None = None,
               truth: dict | None = None, rows_per_file: int = HUB_ROWS_PER_FILE) -> Path:
    """Write ``out`` as a Hugging Face Hub dataset repository: ``data/train-0000i-of-0000N.parquet`` (the
    artefact's rows, each file carrying the full metadata) and a ``README.md`` dataset card whose YAML
    front matter the Hub reads and whose body is generated from the artefact.

    ``artefact`` is an :class:`Artefact`, or the path of a local artefact file, whose rows are then checked and
    copied a batch at a time (memory does not grow with its size). ``repo`` (``user/name``) fills in the loading
    snippets; ``truth`` is a :func:`labelkit.quality.score_artefact` result to show beside the recorded quality.
    The folder is built beside ``out`` and renamed into place, so an existing export is replaced whole or not
    at all.
    """
    from ._scan import scan_artefact

    remote.refuse_url(out, "--out", "--format hub writes a local folder; upload it with "
                      "`huggingface-cli upload USER/NAME FOLDER --repo-type dataset`")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ImportSourceError(f"--out {out}: a file; --format hub writes a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "README.md").is_file():
        raise ImportSourceError(f"--out {out}: a non-empty folder that is not a hub export; give a new folder")
    if isinstance(artefact, Artefact):
        rows, pieces = _Rows.of(artefact), iter([artefact.table])
    else:
        from ._scan import iter_rows

        header, sizes = scan_artefact(artefact)
        rows, pieces = _Rows(header.metadata, header.heads, header.num_rows, None, 0, sizes), iter_rows(artefact, None)
    meta = rows.metadata
    repo = repo or "USER/" + re.sub(r"[^A-Za-z0-9._-]+", "-", out.resolve().name).strip("-")
    pretty_name = pretty_name or f"Self-labels {meta['artefact_id'][:12]}"
    spec = meta["data"].get("spec") or ""
    if source_datasets is None:
        source_datasets = [f"extended|{spec.split(':', 1)[1]}"] if spec.startswith("builtin:") else ["original"]
    with atomic_folder(out) as staging:
        (staging / "data").mkdir()
        files = _write_files(rows, pieces, staging, rows_per_file)
        sizes_figure(rows.sizes, staging / "images" / "cluster_sizes.png")
        card = ("---\n" + _card_yaml(rows, files, license, pretty_name, list(source_datasets)) + "---\n\n"
                + _card_body(rows, repo, pretty_name, files, truth))
        (staging / "README.md").write_text(card)
    return out


def _write_files(rows: _Rows, pieces: Iterator, staging: Path, rows_per_file: int) -> list[tuple[str, int]]:
    """The data files, from ``pieces`` (tables of consecutive rows), each with the full metadata; fills in the
    rows' schema and size in memory. Returns (name, bytes) of each file."""
    import pyarrow.parquet as pq

    metadata = {fmt.METADATA_KEY: json.dumps(rows.metadata)}
    files, held = [], None
    for start, stop, name in _hub_files(rows.num_samples, rows_per_file):
        writer = None
        while start < stop:
            if held is None or not held.num_rows:
                held = next(pieces).replace_schema_metadata(metadata)
                rows.schema = held.replace_schema_metadata(None).schema
                rows.nbytes += int(held.nbytes)
            part, held = held.slice(0, stop - start), held.slice(stop - start)
            if writer is None:
                writer = pq.ParquetWriter(staging / name, part.schema, compression="zstd",
                                          use_dictionary=[c for c in part.column_names if c != fmt.ID_COLUMN])
            writer.write_table(part)
            start += part.num_rows
        writer.close()
        files.append((name, (staging / name).stat().st_size))
    return files
