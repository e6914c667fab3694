"""Checks of a whole artefact that stream its row groups: the ids once, then each head's column, never a whole
column in memory, so that ``validate --full`` and ``info --full`` take the same memory at 10 M rows as at 1 M.

The stream looks for any problem and hashes the artefact id as it goes. A valid artefact -- nearly every one --
is done in that one streamed pass; where the stream sees anything wrong, the whole-table check of
``_reading`` runs to name every problem exactly (a broken file is read whole once more: its messages matter
more than its memory)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import format as fmt
from .._util import remote
from ..errors import ArtefactError
from ._reading import (ArtefactHeader, _each_part, _id_column_problem, _name_column_problem,
                       _novel_problems, _open, _read_parts, _schema_problems, _shown, artefact_files)

__all__ = ["check_artefact", "scan_artefact", "iter_rows"]

_BATCH = 1 << 20  # rows a streamed read holds of one column: about a row group as labelkit writes them


class _Problem(Exception):
    """The stream saw something wrong; the whole-table check says what."""


@dataclass
class _Scan:
    header: ArtefactHeader | None
    problems: list[str] = field(default_factory=list)
    sizes: list[np.ndarray] = field(default_factory=list)


def check_artefact(path: str | os.PathLike, full: bool = True) -> list[str]:
    """Every problem found in the artefact at ``path`` (a file, run directory, Hub export or URL); empty means
    valid. With ``full=False`` only the footer is read: metadata, columns, types and row count, not the values."""
    from ._reading import read_header

    try:
        if not full:
            return list(read_header(path).problems)
        return _scan(artefact_files(path), _shown(path)).problems
    except ArtefactError as exc:
        return exc.problems or [str(exc)]
    except (pa.ArrowException, OSError) as exc:
        return [f"the file could not be read to the end (truncated or corrupt): {exc}"]


def scan_artefact(path: str | os.PathLike) -> tuple[ArtefactHeader, list[np.ndarray]]:
    """The footer of a valid artefact and each head's cluster sizes, from one streamed pass that checks every
    row as :func:`~labelkit.artefact.read_artefact` does (raising :class:`ArtefactError` alike) without holding
    the table."""
    scan = _scan(artefact_files(path), _shown(path))
    if scan.problems:
        more = f" (+{len(scan.problems) - 1} more; see `labelkit validate {_shown(path)}`)" \
            if len(scan.problems) > 1 else ""
        raise ArtefactError(f"{_shown(path)}: invalid label artefact: {scan.problems[0]}{more}", scan.problems)
    return scan.header, scan.sizes


def _scan(parts: list, shown: str) -> _Scan:
    """The problems of the artefact in ``parts`` and, when it has none, its header (``shown``: its path as
    messages show it) and cluster sizes. Files at a URL are fetched once and checked whole: a streamed check
    reads each column in its own pass, which over a network would fetch them again and again."""
    if any(remote.is_url(part) for part in parts):
        return _fetched(parts, shown)
    num_rows = size = 0
    for _, pfile, part_size, found, problems in _each_part(parts, remote.METADATA_BLOCK):
        if problems:
            return _Scan(None, problems)
        schema, meta = pfile.schema_arrow, found
        num_rows += pfile.metadata.num_rows
        size += part_size
    header = ArtefactHeader(shown, meta, num_rows, size, tuple(_schema_problems(schema, num_rows, meta)))
    if header.problems or _id_column_problem(schema):
        return _whole(parts)
    try:
        digest = fmt.ArtefactDigest()
        _scan_ids(parts, digest)
        sizes = [_scan_head(parts, h, head, digest, schema.names) for h, head in enumerate(meta["heads"])]
        _scan_novelty(parts, meta, schema)
    except (_Problem, pa.ArrowException, OSError):
        return _whole(parts)
    if digest.hexdigest() != meta["artefact_id"]:
        return _whole(parts)
    return _Scan(header, [], sizes)


def iter_rows(path: str | os.PathLike, columns: list[str], rows: int | None = None) -> Iterator[pa.Table]:
    """``columns`` of the artefact at ``path`` (any of its files), ``rows`` rows at a time (the last fewer):
    two artefacts read side by side this way meet row for row, whatever their row groups."""
    rows = rows or _BATCH
    pending, held = [], 0
    for batch in _batches(artefact_files(path), columns):
        pending.append(batch)
        held += batch.num_rows
        while held >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending)


def _fetched(parts: list, shown: str) -> _Scan:
    meta, table, problems = _read_parts(parts)
    if problems:
        return _Scan(None, problems)
    sizes = [np.bincount(table.column(head["name"]).to_numpy(), minlength=int(head["k"])) for head in meta["heads"]]
    return _Scan(ArtefactHeader(shown, meta, table.num_rows, 0, ()), [], sizes)


def _whole(parts: list) -> _Scan:
    return _Scan(None, _read_parts(parts)[2])


def _batches(parts: list, columns: list[str]) -> Iterator[pa.RecordBatch]:
    for part in parts:
        with _open(part) as (pfile, _):
            yield from pfile.iter_batches(batch_size=_BATCH, columns=columns)


def _scan_ids(parts: list, digest: fmt.ArtefactDigest) -> None:
    """Ids non-null, non-empty, without separators, strictly increasing (sorted and unique), across batches."""
    last = None
    for batch in _batches(parts, [fmt.ID_COLUMN]):
        ids = batch.column(0)
        if not len(ids):
            continue
        if ids.null_count or pc.any(pc.or_(pc.equal(pc.utf8_length(ids), 0),
                                           pc.match_substring_regex(ids, r"[\n\x00]"))).as_py():
            raise _Problem
        if len(ids) > 1 and pc.any(pc.less_equal(ids[1:], ids[:-1])).as_py():
            raise _Problem
        first = ids[0].as_py()
        if last is not None and first.encode() <= last.encode():
            raise _Problem
        last = ids[-1].as_py()
        digest.ids(ids)


def _scan_head(parts: list, h: int, head: dict, digest: fmt.ArtefactDigest, names: list[str]) -> np.ndarray:
    """One head's labels checked and hashed batch by batch (``names``: the file's columns); returns its cluster
    sizes."""
    name, k = head["name"], int(head["k"])
    named = fmt.name_column(h)
    columns = [name] + ([named] if named in names and head.get("names") is not None else [])
    sizes = np.zeros(k, dtype=np.int64)
    digest.head(name, k)
    for batch in _batches(parts, columns):
        column = batch.column(0)
        if column.null_count:
            raise _Problem
        labels = column.to_numpy()
        if len(labels) and (labels.min() < 0 or labels.max() >= k):
            raise _Problem
        if len(columns) > 1 and _name_column_problem(pa.Table.from_batches([batch]), h, head, labels):
            raise _Problem
        sizes += np.bincount(labels, minlength=k)
        digest.labels(labels)
    digest.curation(head)
    return sizes


def _scan_novelty(parts: list, meta: dict, schema: pa.Schema) -> None:
    columns = [fmt.NOVELTY_COLUMN, fmt.NOVEL_COLUMN]
    if not (meta.get("method") or {}).get("novelty") or not all(c in schema.names for c in columns):
        return
    for batch in _batches(parts, columns):
        if _novel_problems(pa.Table.from_batches([batch]), meta):
            raise _Problem
