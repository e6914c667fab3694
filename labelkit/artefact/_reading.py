"""Reading label artefacts: one file, a run directory, or a Hub export's parts, local or at a URL; the footer
alone (``info``), everything (``read_artefact``), or a full validation that lists every problem found."""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import format as fmt
from .._util import remote
from ..errors import ArtefactError
from ._artefact import Artefact, Head, _id_problems, _range_problem, _schema_message

__all__ = ["ArtefactHeader", "read_artefact", "read_header", "artefact_path", "artefact_files",
           "output_beside"]


def artefact_files(path: str | os.PathLike) -> list[Path | str]:
    """The Parquet file(s) that ``path`` names: the file itself, a run directory's ``labels.parquet``, or the
    ``data/*.parquet`` files of a Hub export (``export --format hub``, e.g. ``hf://datasets/user/repo``).
    URLs (``https://``, ``s3://``, ``hf://``, …) stay strings; an http URL ending in ``/`` names a run
    directory (plain http cannot list a folder)."""
    try:
        if not remote.is_dir(path):
            return [path if remote.is_url(path) else Path(path)]
        if remote.is_url(path):
            if remote.is_http(path):
                return [remote.join(path, "labels.parquet")]
            fs, root = remote.filesystem(path)
            if fs.isfile(f"{root.rstrip('/')}/labels.parquet"):
                return [remote.join(path, "labels.parquet")]
            parts = [fs.unstrip_protocol(p) for p in sorted(fs.glob(f"{root.rstrip('/')}/data/*.parquet"))]
        else:
            if (Path(path) / "labels.parquet").is_file():
                return [Path(path) / "labels.parquet"]
            parts = sorted((Path(path) / "data").glob("*.parquet"))
    except ImportError as exc:
        raise ArtefactError(str(exc)) from None
    if not parts:
        raise ArtefactError(f"{_shown(path)}: a directory without labels.parquet or data/*.parquet; give a label "
                            "artefact, a finished run directory or a Hub export")
    return parts


def output_beside(path: str | os.PathLike, suffix: str) -> Path:
    """Where a command that reads the artefact ``path`` writes when no ``--out`` is given: the artefact's stem
    and ``suffix``, in its folder (``runs/x`` or ``runs/x/labels.parquet``, ``.csv`` -> ``runs/x/labels.csv``).
    An artefact at a URL gets it in the current folder: a default never writes anywhere remote."""
    if remote.is_url(path):
        name = str(path).rstrip("/").rsplit("/", 1)[-1] or "labels"
        return Path(name.removesuffix(".parquet") + suffix)
    path = Path(path)
    if path.is_dir():
        path = path / "labels.parquet" if (path / "labels.parquet").is_file() or not (path / "data").is_dir() \
            else path.with_suffix(".parquet")  # a Hub export folder: beside the folder, not inside it
    return path.parent / (path.name.removesuffix(".parquet") + suffix)


def artefact_path(path: str | os.PathLike) -> Path | str:
    """The one artefact file that ``path`` names (see :func:`artefact_files`)."""
    parts = artefact_files(path)
    if len(parts) > 1:
        raise ArtefactError(f"{_shown(path)}: {len(parts)} Parquet files; read it with read_artefact")
    return parts[0]


def _shown(path: Path | str | os.PathLike) -> str:
    return remote.redact(path) if remote.is_url(path) else str(path)


@contextlib.contextmanager
def _open(path: Path | str, block_size: int = remote.STREAM_BLOCK) -> Iterator[tuple[pq.ParquetFile, int]]:
    """The Parquet file at a path or URL (footer read; column data is fetched only when asked for) and its
    size in bytes."""
    try:
        with remote.open_input(path, block_size) as handle:
            try:
                pfile = pq.ParquetFile(handle)
            except (pa.ArrowInvalid, OSError) as exc:
                raise ArtefactError(
                    f"{_shown(path)}: not a readable Parquet file (truncated, or not a label artefact): {exc}",
                    [f"not a readable Parquet file: {exc}"],
                ) from None
            yield pfile, handle.seek(0, os.SEEK_END)
    except FileNotFoundError:
        raise ArtefactError(f"{_shown(path)}: no such file") from None
    except ImportError as exc:
        raise ArtefactError(str(exc)) from None
    except PermissionError as exc:
        raise ArtefactError(f"{_shown(path)}: access denied ({type(exc).__name__}); check the credentials "
                            "this filesystem reads (environment, config file or login)") from None


def _read_metadata(pfile: pq.ParquetFile) -> tuple[dict | None, list[str]]:
    raw = (pfile.schema_arrow.metadata or {}).get(fmt.METADATA_KEY.encode())
    if raw is None:
        return None, [f"no '{fmt.METADATA_KEY}' key in the Parquet schema metadata: not a labelkit artefact"]
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        return None, [f"the '{fmt.METADATA_KEY}' metadata is not valid JSON: {exc}"]
    if not isinstance(meta, dict):
        return None, [f"the '{fmt.METADATA_KEY}' metadata must be a JSON object"]
    version = meta.get("format_version")
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", str(version))
    if not match:
        return None, [f"metadata key 'format_version' is missing or not SemVer: {version!r}"]
    if int(match.group(1)) != fmt.READABLE_MAJOR:
        raise ArtefactError(
            f"format version {version} is not readable by this labelkit, which reads "
            f"{fmt.READABLE_MAJOR}.x; upgrade labelkit (pip install -U labelkit)"
        )
    validator = jsonschema.Draft202012Validator(fmt.METADATA_SCHEMA)
    problems = [_schema_message(e) for e in sorted(validator.iter_errors(meta), key=str)]
    return meta, problems or fmt.curation_problems(meta["heads"])


def _newer_minor(meta: dict) -> bool:
    have = tuple(int(x) for x in meta["format_version"].split("."))
    ours = tuple(int(x) for x in fmt.FORMAT_VERSION.split("."))
    return have[:2] > ours[:2]


def _id_column_problem(schema: pa.Schema) -> str | None:
    if fmt.ID_COLUMN not in schema.names:
        return f"missing column '{fmt.ID_COLUMN}'"
    id_type = schema.field(fmt.ID_COLUMN).type
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        return f"column '{fmt.ID_COLUMN}' must be string, found {id_type}"
    return None


def _schema_problems(schema: pa.Schema, num_rows: int, meta: dict) -> list[str]:
    """What the footer alone can tell: columns, their types and the row count against the metadata."""
    names = schema.names
    problem = _id_column_problem(schema)
    if problem:
        return [problem]
    problems = []
    if num_rows != meta.get("num_samples"):
        problems.append(f"metadata says num_samples={meta.get('num_samples')} but the file has {num_rows} rows")
    expected = {fmt.ID_COLUMN}
    for i, head in enumerate(meta.get("heads", [])):
        name = head["name"]
        if name != fmt.head_column(i):
            problems.append(f"heads[{i}] is named {name!r}; expected {fmt.head_column(i)!r}")
        expected.add(name)
        if name not in names:
            problems.append(f"missing column {name!r} declared in metadata 'heads'")
        elif schema.field(name).type != pa.int32():
            problems.append(f"column {name!r} must be int32, found {schema.field(name).type}")
        score = fmt.score_column(i)
        if score in names:
            expected.add(score)
            if schema.field(score).type != pa.float32():
                problems.append(f"column {score!r} must be float32, found {schema.field(score).type}")
        named = fmt.name_column(i)
        if named in names and head.get("names") is not None:
            expected.add(named)
            if not pa.types.is_string(schema.field(named).type):
                problems.append(f"column {named!r} must be string, found {schema.field(named).type}")
    if fmt.NOVELTY_COLUMN in names and (meta.get("method") or {}).get("novelty"):
        expected |= {fmt.NOVELTY_COLUMN, fmt.NOVEL_COLUMN}
        for column, kind in ((fmt.NOVELTY_COLUMN, pa.float32()), (fmt.NOVEL_COLUMN, pa.bool_())):
            if column not in names or schema.field(column).type != kind:
                problems.append(f"column {column!r} must be there, of type {kind}, with method.novelty")
    extra = [c for c in names if c not in expected]
    if extra and not _newer_minor(meta):
        problems.append(f"unexpected column(s) {extra}: not part of format {meta['format_version']}")
    return problems


def _column_problems(table: pa.Table, meta: dict) -> list[str]:
    problems = _schema_problems(table.schema, table.num_rows, meta)
    names = table.column_names
    if _id_column_problem(table.schema):
        return problems
    ids = table.column(fmt.ID_COLUMN).combine_chunks()
    problems += _id_problems(ids)
    if table.num_rows > 1 and not ids.null_count:
        unsorted = pc.less(ids[1:], ids[:-1])
        if pc.any(unsorted).as_py():
            row = int(np.flatnonzero(unsorted.to_numpy(zero_copy_only=False))[0]) + 1
            problems.append(f"rows are not sorted by sample_id (first out of order at row {row})")
    heads = []
    for head in meta.get("heads", []):
        name, k = head["name"], int(head["k"])
        if name not in names or table.schema.field(name).type != pa.int32():
            continue  # reported by _schema_problems
        col = table.column(name)
        if col.null_count:
            problems.append(f"column {name!r} has {col.null_count} null value(s)")
            continue
        labels = col.to_numpy()
        problem = _range_problem(name, k, labels, ids)
        if problem:
            problems.append(problem)
        heads.append((name, k, labels))
        problem = _name_column_problem(table, len(heads) - 1, head, labels)
        if problem:
            problems.append(problem)
    problems += _novel_problems(table, meta)
    if heads and len(heads) == len(meta.get("heads", [])) and not ids.null_count:
        actual = fmt.compute_artefact_id(ids.cast(pa.string()), heads, meta["heads"])
        if actual != meta["artefact_id"]:
            problems.append(
                f"artefact_id in metadata ({meta['artefact_id'][:12]}…) does not match the content "
                f"({actual[:12]}…): ids or labels were changed after writing"
            )
    return problems


def _novel_problems(table: pa.Table, meta: dict) -> list[str]:
    """``novel`` must say what ``novelty`` and the recorded threshold say."""
    record = (meta.get("method") or {}).get("novelty")
    names = table.column_names
    if not record or fmt.NOVELTY_COLUMN not in names or fmt.NOVEL_COLUMN not in names:
        return []
    expected = table.column(fmt.NOVELTY_COLUMN).to_numpy() > record["threshold"]
    differs = np.flatnonzero(expected != table.column(fmt.NOVEL_COLUMN).to_numpy(zero_copy_only=False))
    if len(differs):
        return [f"column 'novel' disagrees with novelty > {record['threshold']} at {len(differs)} row(s), first "
                f"row {int(differs[0])}"]
    return []


def _name_column_problem(table: pa.Table, h: int, head: dict, labels: np.ndarray) -> str | None:
    """A ``name_H`` column must say what the head's names say of each sample's cluster."""
    column = fmt.name_column(h)
    if column not in table.column_names or head.get("names") is None \
            or not pa.types.is_string(table.schema.field(column).type):
        return None
    expected = pa.array(head["names"], pa.string()).take(pa.array(labels))
    actual = table.column(column).combine_chunks()
    differs = pc.invert(pc.fill_null(pc.equal(actual, expected), False))
    differs = pc.and_not(differs, pc.and_(actual.is_null(), expected.is_null()))
    if pc.any(differs).as_py():
        row = int(np.flatnonzero(differs.to_numpy(zero_copy_only=False))[0])
        return (f"column {column!r} says {actual[row].as_py()!r} at row {row} but cluster {int(labels[row])} is named "
                f"{expected[row].as_py()!r} in the metadata")
    return None


@dataclass(frozen=True)
class ArtefactHeader:
    """What an artefact's footer holds -- its metadata, row count and size -- read without its columns."""

    path: str
    metadata: dict
    num_rows: int
    file_bytes: int
    problems: tuple[str, ...]

    @property
    def heads(self) -> list[Head]:
        return [Head.from_metadata(h) for h in self.metadata["heads"]]


def _each_part(parts: list, block_size: int) -> Iterator[tuple[Path | str, pq.ParquetFile, int, dict | None, list[str]]]:
    """(part, Parquet file, its bytes, metadata, problems) of each file of one artefact, open while it is
    handled; ``problems`` says when a file's metadata is invalid or differs from the first file's."""
    first = None
    for part in parts:
        with _open(part, block_size) as (pfile, size):
            meta, problems = _read_metadata(pfile)
            if meta is not None and not problems and first is not None and meta != first:
                problems = [f"{_shown(part)}: its metadata differs from {_shown(parts[0])}'s; the files of one "
                            "artefact must all carry the same metadata"]
            first = first or meta
            yield part, pfile, size, meta, problems


def read_header(path: str | os.PathLike) -> ArtefactHeader:
    """Metadata and footer-level checks of an artefact, reading only the Parquet footer(s) (for a URL: a few
    small range requests, whatever the file's size). Raises :class:`ArtefactError` when there is no valid
    labelkit metadata; ``problems`` lists what the footer shows wrong with the columns."""
    num_rows = size = 0
    for part, pfile, part_size, meta, problems in _each_part(artefact_files(path), remote.METADATA_BLOCK):
        if problems:
            raise ArtefactError(f"{_shown(part)}: invalid label artefact: {problems[0]}", problems)
        schema, metadata = pfile.schema_arrow, meta
        num_rows += pfile.metadata.num_rows
        size += part_size
    problems = _schema_problems(schema, num_rows, metadata)
    return ArtefactHeader(_shown(path), metadata, num_rows, size, tuple(problems))


def _read_parts(parts: list) -> tuple[dict | None, pa.Table | None, list[str]]:
    """(metadata, table, problems) of the file(s) of one artefact; the table is None when the metadata is bad."""
    tables = []
    for part, pfile, _, meta, problems in _each_part(parts, remote.STREAM_BLOCK):
        if problems:
            return None, None, problems
        try:
            tables.append(pfile.read())
        except (pa.ArrowException, OSError) as exc:
            where = f"{_shown(part)} " if len(parts) > 1 else ""
            return meta, None, [f"{where}could not be read to the end (truncated or corrupt): {exc}"]
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    return meta, table, _column_problems(table, meta)


def read_artefact(path: str | os.PathLike) -> Artefact:
    """Read and fully validate a label artefact (a file, a run directory's ``labels.parquet``, a Hub export's
    ``data/*.parquet``, at a path or an fsspec URL, streamed once); raises :class:`ArtefactError` naming
    what is wrong."""
    shown = _shown(path)
    meta, table, problems = _read_parts(artefact_files(path))
    if problems:
        more = f" (+{len(problems) - 1} more; see `labelkit validate {shown}`)" if len(problems) > 1 else ""
        raise ArtefactError(f"{shown}: invalid label artefact: {problems[0]}{more}", problems)
    table = table.replace_schema_metadata(None)
    return Artefact(table, meta)
