"""Labels out of labelkit: plain CSV, ``.npy`` and JSON exports, and the summary ``info`` shows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import format as fmt
from .._util import remote
from ..errors import ImportSourceError
from ._artefact import Artefact
from ._reading import ArtefactHeader

__all__ = ["export_artefact", "summarize", "EXPORT_FORMATS", "cluster_names", "names_sidecar"]


EXPORT_FORMATS = ("csv", "npy", "json")


def export_artefact(artefact: Artefact, format: str, out: str | os.PathLike) -> Path | str:
    """Write the labels for tools outside labelkit: ``csv`` (sample_id, the heads, their scores, then a
    ``name_H`` column for each named head), ``npy`` ((heads, N) int32 in sample-id order, and the cluster names
    in ``OUT.names.json`` beside it when there are any) or ``json`` (metadata, sample ids, heads and scores: ``import`` turns it
    back into the same artefact), to a local path or an fsspec URL."""
    out = out if remote.is_url(out) else Path(out)
    if format not in EXPORT_FORMATS:
        raise ImportSourceError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    with remote.atomic_output(out) as tmp:
        if format == "csv":
            import pyarrow.csv as pacsv

            columns = artefact.table.column_names
            scores = [fmt.score_column(h) for h in range(artefact.num_heads) if fmt.score_column(h) in columns]
            table = artefact.table.select([fmt.ID_COLUMN] + [h.name for h in artefact.heads] + scores)
            for h, head in enumerate(artefact.heads):
                if head.names is not None:
                    table = table.append_column(f"name_{h}", cluster_names(artefact, h))
            pacsv.write_csv(table, tmp)
        elif format == "npy":
            with open(tmp, "wb") as handle:
                np.save(handle, artefact.label_matrix())
        else:
            document = {
                "metadata": artefact.metadata,
                "sample_ids": artefact.table.column(fmt.ID_COLUMN).to_pylist(),
                "heads": {h.name: artefact.labels(i).tolist() for i, h in enumerate(artefact.heads)},
            }
            if artefact.scores(0) is not None:
                document["scores"] = {fmt.score_column(i): artefact.scores(i).tolist()
                                      for i in range(artefact.num_heads)}
            tmp.write_text(json.dumps(document))
    if format == "npy" and any(head.names is not None for head in artefact.heads):
        _write_names_sidecar(artefact, out)
    return out


def names_sidecar(out: str | os.PathLike) -> str:
    """The JSON file beside a ``.npy`` export that holds each head's cluster names."""
    return str(out).removesuffix(".npy") + ".names.json"


def _write_names_sidecar(artefact: Artefact, out) -> None:
    sidecar = names_sidecar(out)
    with remote.atomic_output(sidecar if remote.is_url(sidecar) else Path(sidecar)) as tmp:
        tmp.write_text(json.dumps({head.name: list(head.names) if head.names is not None else None
                                   for head in artefact.heads}, ensure_ascii=False, indent=1))


def cluster_names(artefact: Artefact, head: int):
    """Each sample's cluster name for one head (an Arrow string array, null where the cluster has none)."""
    import pyarrow as pa

    names = artefact.heads[head].names
    lookup = pa.array(list(names) if names is not None else [None] * artefact.heads[head].k, pa.string())
    return lookup.take(pa.array(artefact.labels(head)))


def summarize(artefact: Artefact | ArtefactHeader, sizes: list[np.ndarray] | None = None) -> dict:
    """What ``labelkit info`` shows: identity, provenance and, when the labels were read, cluster sizes per
    head (an :class:`ArtefactHeader` -- footer only -- has no sizes: ``size_*`` are ``None``, unless
    ``sizes`` gives them, as :func:`~labelkit.artefact.scan_artefact` does)."""
    heads = []
    for i, head in enumerate(artefact.heads):
        entry = {"head": i, "name": head.name, "k": head.k,
                 "size_min": None, "size_max": None, "size_mean": None, "empty": None,
                 "names": list(head.names) if head.names is not None else None,
                 "status": list(head.status) if head.status is not None else None}
        counts = artefact.cluster_sizes(i) if isinstance(artefact, Artefact) else None if sizes is None else sizes[i]
        if counts is not None:
            entry.update(size_min=int(counts.min()), size_max=int(counts.max()), size_mean=float(counts.mean()),
                         empty=int((counts == 0).sum()))
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
    if isinstance(artefact, ArtefactHeader) and sizes is None:
        summary["read"] = {"footer_only": True, "file_bytes": artefact.file_bytes}
    return summary
