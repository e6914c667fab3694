"""An artefact written a row group at a time from parts that arrive in sample-id order, so that the writer never
holds a whole column: how a run writes the labels of 10 M rows (building the table whole took about 0.7 GB
more than the run held at the time). The file is the one :meth:`Artefact.build` and :meth:`Artefact.write`
give for the same rows, artefact id and all.

The artefact id hashes every id before any label, and each head's labels before the next head's, so the parts
are read ``2 + heads`` times: once to check the ids and labels and hash the ids, once per head to hash its
labels, and once to write (and once more for the ids' fingerprint where the data section gives none)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import format as fmt
from .._util import remote
from ..errors import ArtefactError
from ._artefact import _data_section, _head_entries, _id_problems, _label_table, _new_metadata, _range_problem

__all__ = ["write_parts"]

Part = tuple[pa.Array, np.ndarray, np.ndarray | None]  # ids, (heads, n) labels, (heads, n) scores or None
ROW_GROUP = 1 << 20


def write_parts(path: str | os.PathLike, parts: Callable[[], Iterable[Part]], ks: list[int], *,
                data: dict | None = None, method: dict | None = None, parents: Iterable[str] = ()) -> dict:
    """Write the artefact of the rows that ``parts()`` gives -- each call the same parts, in sample-id order:
    (ids as an Arrow string array, (heads, n) integer labels, (heads, n) scores or None in every part) -- and
    return its metadata. Ids out of order, repeated, empty or null, and labels outside [0, K), raise
    :class:`ArtefactError` before anything is written; the file appears complete or not at all."""
    ks = [int(k) for k in ks]
    entries = _head_entries(ks, None, None)
    digest = fmt.ArtefactDigest()
    count = _check_parts(parts, ks, digest)
    for h, entry in enumerate(entries):  # the labels follow the ids in the artefact id, head by head
        digest.head(entry["name"], entry["k"])
        for _, labels, _ in parts():
            digest.labels(np.asarray(labels)[h])
        digest.curation(None)
    data = {**(data or {})}
    data["count"] = count if data.get("count") is None else data["count"]
    data["fingerprint"] = data.get("fingerprint") or fmt.fingerprint_ids(_strings(ids) for ids, _, _ in parts())
    metadata = _new_metadata(digest.hexdigest(), count, entries, _data_section(data, None), method, parents)
    _write(path, parts, ks, metadata)
    return metadata


def _check_parts(parts: Callable[[], Iterable[Part]], ks: list[int], digest: fmt.ArtefactDigest) -> int:
    """One pass over the parts: raises on any problem of the ids and labels, hashes the ids into ``digest``
    and returns the number of rows."""
    count, last = 0, None
    for ids, labels, _ in parts():
        ids, labels = _strings(ids), np.asarray(labels)
        if labels.shape != (len(ks), len(ids)):
            raise ArtefactError(f"a part of {len(ids)} ids has labels of shape {labels.shape}, not "
                                f"({len(ks)}, {len(ids)})")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ArtefactError(f"labels must be integers, got dtype {labels.dtype}")
        problems = _id_problems(ids)
        first = ids[0].as_py() if len(ids) else None
        if first is not None and last is not None and first <= last:
            problems.append(f"sample_id {first!r} is duplicated" if first == last else
                            f"sample_id {first!r} follows {last!r}: the parts must come in sample-id order")
        if len(ids) > 1 and not pc.all(pc.less_equal(ids[:-1], ids[1:])).as_py():
            problems.append(f"the part of rows {count}-{count + len(ids) - 1} is not in sample-id order")
        if problems:
            raise ArtefactError("invalid sample ids: " + "; ".join(problems), problems)
        problem = next(filter(None, (_range_problem(fmt.head_column(h), k, labels[h], ids, first_row=count)
                                     for h, k in enumerate(ks))), None)
        if problem:
            raise ArtefactError(problem, [problem])
        digest.ids(ids)
        count += len(ids)
        last = ids[-1].as_py() if len(ids) else last
    if count == 0:
        raise ArtefactError("an artefact needs at least one sample")
    return count


def _write(path, parts: Callable[[], Iterable[Part]], ks: list[int], metadata: dict) -> None:
    target = path if remote.is_url(path) else Path(path)
    with remote.atomic_output(target) as tmp:
        writer = None
        try:
            for ids, labels, scores in parts():
                table = _label_table(_strings(ids), np.asarray(labels), ks,
                                     None if scores is None else np.asarray(scores, dtype=np.float32))
                if writer is None:
                    schema = table.schema.with_metadata({fmt.METADATA_KEY: json.dumps(metadata)})
                    writer = pq.ParquetWriter(tmp, schema, compression="zstd", use_dictionary=[
                        c for c in table.column_names if c != fmt.ID_COLUMN])
                writer.write_table(table.replace_schema_metadata(writer.schema.metadata), row_group_size=ROW_GROUP)
        finally:
            if writer is not None:
                writer.close()


def _strings(ids) -> pa.Array:
    ids = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, type=pa.string())
    return (ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids).cast(pa.string())
