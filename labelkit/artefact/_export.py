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

__all__ = ["export_artefact", "summarize", "EXPORT_FORMATS"]


EXPORT_FORMATS = ("csv", "npy", "json")


def export_artefact(artefact: Artefact, format: str, out: str | os.PathLike) -> Path | str:
    """Write the labels for tools outside labelkit: ``csv`` (sample_id, the heads, then their scores), ``npy``
    ((heads, N) int32 in sample-id order) or ``json`` (metadata, sample ids, heads and scores: ``import`` turns it
    back into the same artefact), to a local path or an fsspec URL."""
    out = out if remote.is_url(out) else Path(out)
    if format not in EXPORT_FORMATS:
        raise ImportSourceError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    with remote.atomic_output(out) as tmp:
        if format == "csv":
            import pyarrow.csv as pacsv

            names = artefact.table.column_names
            scores = [fmt.score_column(h) for h in range(artefact.num_heads) if fmt.score_column(h) in names]
            pacsv.write_csv(artefact.table.select([fmt.ID_COLUMN] + [h.name for h in artefact.heads] + scores), tmp)
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
