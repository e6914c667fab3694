"""The label artefact format, defined once.

A label artefact is a Parquet file with one row per sample, sorted by ``sample_id``:

* ``sample_id`` -- string, non-null, unique; a stable key such as a path relative to the data root;
* ``head_0`` … ``head_{T-1}`` -- int32 labels of each head, in ``[0, K_h)``;
* optionally ``score_0`` … -- float32 confidence of each assignment (SeLa labels written by format 1.2: the network's
  softmax probability of the label; for a consensus head: see ``method.consensus``);
* optionally ``name_0`` … -- string, each sample's cluster name (null where its cluster has none), for readers
  that join on names (format 1.2); it must agree with the head's ``names`` and is not part of the artefact id;
* optionally ``novelty`` (float32, higher = further from everything the model was trained on) and ``novel``
  (bool: ``novelty`` above ``method.novelty.threshold``), written by ``predict --novelty`` (format 1.2). A novel
  sample keeps its nearest cluster in the head columns, so every label stays in ``[0, K)``; "none of these" is
  ``novel``.

Each head's metadata may name its clusters (format 1.2): ``names`` holds K entries, a unique string or ``null`` for
a cluster not named yet, and ``status`` K review states (:data:`CLUSTER_STATUS`). Both are part of the labels'
meaning, so they enter the artefact id.

The schema-level metadata key ``labelkit`` holds a JSON object described by :data:`METADATA_SCHEMA`.
``schemas/artefact-metadata-v1.schema.json`` is generated from it (``python -m labelkit.artefact.format``) and a test
fails if the two drift.

Hashes:

* ``data.fingerprint`` -- sha256 of the sorted sample ids, each followed by ``\\n`` (UTF-8);
* ``artefact_id`` -- sha256 of ``labelkit-artefact-v1\\n``, that same id stream, then for each head
  ``{name}:{k}\\n`` and its labels as little-endian int32. Identical labels give identical ids whatever the
  Parquet bytes (compression, row groups, writer). A head with ``names`` or ``status`` adds, after its labels,
  ``names\n`` and the names as compact JSON (UTF-8) then ``\n``, and the same for ``status``; an artefact without
  them keeps the id it had under format 1.1.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "ArtefactDigest",
    "FORMAT_VERSION",
    "READABLE_MAJOR",
    "METADATA_KEY",
    "ID_COLUMN",
    "METADATA_SCHEMA",
    "CLUSTER_STATUS",
    "head_column",
    "score_column",
    "name_column",
    "NOVELTY_COLUMN",
    "NOVEL_COLUMN",
    "fingerprint_ids",
    "compute_artefact_id",
    "curation_problems",
    "json_schema_text",
]

FORMAT_VERSION = "1.2.0"  # 1.1: optional data.content and data.skipped; 1.2: cluster names and status
CLUSTER_STATUS = ("unreviewed", "accepted", "rejected")
READABLE_MAJOR = 1
METADATA_KEY = "labelkit"
ID_COLUMN = "sample_id"

_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}

METADATA_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "labelkit label artefact metadata, format v1",
    "description": "JSON stored under the Parquet schema metadata key 'labelkit' of a label artefact.",
    "type": "object",
    "required": [
        "format_version",
        "artefact_id",
        "num_samples",
        "heads",
        "data",
        "producer",
        "method",
        "parents",
        "created_at",
    ],
    "properties": {
        "format_version": {
            "type": "string",
            "pattern": r"^[0-9]+\.[0-9]+\.[0-9]+$",
            "description": "SemVer of the artefact format (not of the package).",
        },
        "artefact_id": {**_SHA256, "description": "sha256 over sample ids and label columns."},
        "num_samples": {"type": "integer", "minimum": 1},
        "heads": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "k"],
                "properties": {
                    "name": {"type": "string", "pattern": "^head_[0-9]+$"},
                    "k": {"type": "integer", "minimum": 1},
                    "names": {
                        "type": "array",
                        "description": "Name of each of the K clusters, null where not named (format 1.2); "
                                       "names are unique within a head.",
                        "items": {"type": ["string", "null"], "minLength": 1},
                    },
                    "status": {
                        "type": "array",
                        "description": "Review state of each of the K clusters (format 1.2).",
                        "items": {"enum": list(CLUSTER_STATUS)},
                    },
                },
            },
        },
        "data": {
            "type": "object",
            "required": ["spec", "fingerprint", "count"],
            "properties": {
                "spec": {"type": ["string", "null"], "description": "Data spec the labels were made on."},
                "fingerprint": {**_SHA256, "description": "sha256 of the sorted sample ids of the data."},
                "count": {"type": "integer", "minimum": 0},
                "content": {
                    "type": "object",
                    "required": ["method", "sha256"],
                    "description": "Cheap fingerprint of the samples' contents (format 1.1): 'sizes' of the files "
                                   "by id, or the 'bytes' of in-memory arrays.",
                    "properties": {"method": {"enum": ["sizes", "bytes"]}, "sha256": _SHA256},
                },
                "skipped": {
                    "type": "array",
                    "description": "Samples of the data that could not be decoded and so have no label (format 1.1).",
                    "items": {
                        "type": "object",
                        "required": ["sample_id", "reason"],
                        "properties": {"sample_id": {"type": "string"}, "reason": {"type": "string"}},
                    },
                },
            },
        },
        "producer": {
            "type": "object",
            "required": ["labelkit"],
            "properties": {
                "labelkit": {"type": "string"},
                "torch": {"type": ["string", "null"]},
                "timm": {"type": ["string", "null"]},
            },
        },
        "method": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "minLength": 1, "description": "sela, import, transfer, …"},
                "config": {"type": "object", "description": "Fully resolved configuration."},
                "source": {"type": "string", "description": "File name, or sela:NAME for a released SeLa label set, "
                           "that the labels were imported from."},
                "url": {"type": "string", "description": "Where an imported release was downloaded from (no "
                        "credentials or query string)."},
                "release": {"type": "string", "description": "What the imported release is (model, heads, K)."},
                "layout": {"type": "string", "description": "How an imported label file was laid out, as "
                           "detected (orientation, header, key or index column, delimiter)."},
                "recipe": {"type": "object", "description": "How the configuration was chosen (labelkit.training): "
                           "recipe name, the reason for each choice, the time budget and the estimates."},
                "quality": {
                    "type": "object",
                    "description": "Label-free quality (labelkit.quality): per head the agreement (AMI) with "
                                   "peers of the same K, stability against the previous label step, linear-probe "
                                   "generalisation and size balance; the recommended K when heads differ in K. "
                                   "A transfer keeps, per head, how its labels hold the source's (against_source: "
                                   "the share of samples that kept their id, NMI, ARI) and, where the data has "
                                   "classes, their scores against them (truth).",
                    "properties": {"heads": {"type": "array", "items": {"type": "object", "required": ["head", "k"]}},
                                   "recommended_k": {"type": "object", "required": ["k"]}},
                },
                "consensus": {
                    "type": "object",
                    "description": "How the consensus labels were voted (labelkit.quality): the head that holds "
                                   "them (in a generate artefact), the reference head, the voting heads and each "
                                   "one's NMI with the result. Its score column is the confidence (score: "
                                   "'confidence'): the mean over the voting heads of each head's probability of "
                                   "its label where it agrees with the consensus, 0 where not; without head "
                                   "scores, the share of heads that agree.",
                    "required": ["reference", "k", "heads"],
                },
                "solver": {
                    "type": "object",
                    "description": "How the label steps' Sinkhorn solves ended (labelkit.solver): how many there "
                                   "were, how many stopped at the iteration cap before reaching the tolerance, and "
                                   "the largest marginal error (share of misplaced mass) of those.",
                    "required": ["solves", "unconverged"],
                    "properties": {"solves": {"type": "integer", "minimum": 0},
                                   "unconverged": {"type": "integer", "minimum": 0},
                                   "worst_error": {"type": ["number", "null"]},
                                   "tolerance": {"type": "number"}},
                },
                "novelty": {"type": "object", "description": "How predict --novelty scored each sample (the "
                            "novelty column) and the threshold past which it is novel (the novel column).",
                            "required": ["method", "fpr", "threshold"]},
                "subset": {"type": "object", "description": "Why only some samples of the parent are here (e.g. "
                           "min_confidence), and how many were kept of how many.", "required": ["kept", "of"]},
                "sha256": _SHA256,
            },
        },
        "parents": {"type": "array", "items": _SHA256, "description": "Artefact ids this was derived from."},
        "created_at": {"type": "string", "description": "UTC time of writing, ISO 8601."},
    },
}


def head_column(index: int) -> str:
    return f"head_{index}"


def score_column(index: int) -> str:
    return f"score_{index}"


def name_column(index: int) -> str:
    return f"name_{index}"


NOVELTY_COLUMN, NOVEL_COLUMN = "novelty", "novel"


def _id_stream(ids: pa.Array) -> memoryview:
    """UTF-8 bytes of ``id + "\\n"`` for every id, concatenated, without a Python loop."""
    ids = ids.cast(pa.large_string())
    empty, newline = pa.scalar("", pa.large_string()), pa.scalar("\n", pa.large_string())
    joined = pc.binary_join_element_wise(ids, empty, newline)
    if isinstance(joined, pa.ChunkedArray):
        joined = joined.combine_chunks()
    if len(joined) == 0:
        return memoryview(b"")
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int64)[joined.offset : joined.offset + len(joined) + 1]
    return memoryview(joined.buffers()[2])[int(offsets[0]) : int(offsets[-1])]


def fingerprint_ids(sorted_ids) -> str:
    """sha256 of the (already sorted) sample ids -- an Arrow array, or its parts in order; the data fingerprint
    of the format."""
    digest = hashlib.sha256()
    for part in [sorted_ids] if isinstance(sorted_ids, (pa.Array, pa.ChunkedArray)) else sorted_ids:
        digest.update(_id_stream(part))
    return digest.hexdigest()


class ArtefactDigest:
    """:func:`compute_artefact_id` fed in parts, in this order: every id (:meth:`ids`, chunk by chunk), then for
    each head :meth:`head`, its labels (:meth:`labels`, chunk by chunk) and :meth:`curation`. What a reader that
    streams a file's row groups hashes, so that it never holds a whole column."""

    def __init__(self):
        self._digest = hashlib.sha256(b"labelkit-artefact-v1\n")

    def ids(self, sorted_ids: pa.Array) -> None:
        self._digest.update(_id_stream(sorted_ids))

    def head(self, name: str, k: int) -> None:
        self._digest.update(f"{name}:{k}\n".encode())

    def labels(self, labels: np.ndarray) -> None:
        self._digest.update(np.ascontiguousarray(labels, dtype="<i4").tobytes())

    def curation(self, entry: dict | None) -> None:
        """The ``names`` and ``status`` of the head's metadata entry, where given."""
        for key in ("names", "status"):
            value = (entry or {}).get(key)
            if value is not None:
                self._digest.update(f"{key}\n".encode() + json.dumps(value, ensure_ascii=False, separators=(",", ":"))
                                    .encode() + b"\n")

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def compute_artefact_id(sorted_ids: pa.Array, heads: list[tuple[str, int, np.ndarray]],
                        curation: list[dict] | None = None) -> str:
    """Content id of an artefact from its sorted ids, ``(name, k, labels)`` of each head and, per head, the
    ``names`` and ``status`` its metadata holds (``curation``: the metadata's head entries)."""
    digest = ArtefactDigest()
    digest.ids(sorted_ids)
    for h, (name, k, labels) in enumerate(heads):
        digest.head(name, k)
        digest.labels(labels)
        digest.curation(curation[h] if curation else None)
    return digest.hexdigest()


def curation_problems(heads: list[dict]) -> list[str]:
    """What the schema cannot say about the heads' ``names`` and ``status``: K entries each, names unique."""
    problems = []
    for h, head in enumerate(heads):
        for key in ("names", "status"):
            value = head.get(key)
            if value is not None and len(value) != head["k"]:
                problems.append(f"heads[{h}].{key} has {len(value)} entries for K={head['k']} clusters")
        named = [n for n in head.get("names") or [] if n is not None]
        if len(set(named)) < len(named):
            twice = sorted({n for n in named if named.count(n) > 1})
            problems.append(f"heads[{h}].names must be unique; {twice[:5]!r} name several clusters")
    return problems


def json_schema_text() -> str:
    """The JSON Schema file text that ``schemas/`` must hold."""
    return json.dumps(METADATA_SCHEMA, indent=2, sort_keys=False) + "\n"


def _write_schema_file() -> Path:
    from importlib import resources

    from .. import schemas

    path = Path(str(resources.files(schemas.__name__).joinpath(schemas.ARTEFACT_METADATA_V1)))
    path.write_text(json_schema_text())
    return path


if __name__ == "__main__":  # regenerate schemas/ after changing METADATA_SCHEMA
    sys.stdout.write(f"wrote {_write_schema_file()}\n")
