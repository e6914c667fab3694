"""Label tables as people save them: CSV of any common layout (one sample or one head a line, header or not, a
key or row-index column or neither, any usual separator), read once here for imports and for ground truth."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

from ..errors import DataError, ImportSourceError

__all__ = ["read_label_table"]


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


def _check_complete(path: Path, table, columns: list[str], has_header: bool) -> None:
    """Refuse a label column with an empty value, naming the line."""
    for name in columns:
        if table.column(name).null_count:
            row = int(np.flatnonzero(table.column(name).is_null().to_numpy(zero_copy_only=False))[0])
            raise ImportSourceError(f"{path}: column {name!r} has an empty value at line {row + 1 + int(has_header)}")


def _load_csv(path: Path, samples: int | None = None) -> tuple[list[str] | None, np.ndarray, str, dict | None]:
    """Keys (or None), labels (heads, N), a description of the layout found and what else a labelkit export
    holds (``scores``: the ``score_*`` columns (heads, N) or None; ``names``: per head the clusters' names), from a label CSV of any common layout: one sample a line or one head
    a line; with or without a header; with a key column of file names, a row-index column, or neither; comma,
    semicolon, tab, space or bar separated. ``samples``, when known, also tells the orientation of small
    files: a first line of that many fields (+1) is one head."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    delimiter, first, second, wide = _sniff(path)
    wide = wide or (samples is not None and samples > 1 and len(first) in (samples, samples + 1))
    has_header = _is_header(first, second)
    if wide:
        return (*_load_wide_csv(path, delimiter, has_header), None)
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
    score_columns = [c for c in columns if has_header and re.fullmatch(r"score_\d+", c)]  # labelkit's export
    scores = np.stack([table.column(c).to_numpy().astype(np.float32) for c in score_columns]) if score_columns else None
    name_columns = [c for c in columns if has_header and re.fullmatch(r"name_\d+", c)]  # cluster names, ditto
    columns = [c for c in columns if c not in score_columns and c not in name_columns]
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
    _check_complete(path, table, int_columns, has_header)
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
    if scores is not None and len(scores) != len(labels):
        raise ImportSourceError(f"{path}: {len(labels)} label columns but {len(scores)} score columns")
    return keys, labels, layout, {"scores": scores, "names": _cluster_names(path, table, int_columns, name_columns)}


def _cluster_names(path: Path, table, label_columns: list[str], name_columns: list[str]) -> list[dict] | None:
    """Per head, ``{cluster: name}`` from the ``name_H`` columns of a labelkit CSV export (one name per cluster)."""
    if not name_columns:
        return None
    names = []
    for h, column in enumerate(label_columns):
        if f"name_{h}" not in name_columns:
            names.append(None)
            continue
        pairs = {}
        for cluster, name in zip(table.column(column).to_pylist(), table.column(f"name_{h}").to_pylist()):
            if name is None or name == "":
                continue
            if pairs.setdefault(cluster, name) != name:
                raise ImportSourceError(f"{path}: cluster {cluster} of head {h} has two names, "
                                        f"{pairs[cluster]!r} and {name!r}")
        names.append(pairs)
    return names


def read_label_table(path: str | Path) -> tuple["pa.Array", np.ndarray]:  # noqa: F821
    """``(sample ids, class index)`` from a Parquet or CSV/TSV file with ``sample_id`` and ``label`` columns (or
    an id column then a label column); class names are numbered in sorted order, as class folders are."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from . import format as fmt

    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    else:
        import pyarrow.csv as pacsv

        delimiter = _sniff(path)[0]
        table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter),
                               convert_options=pacsv.ConvertOptions(column_types={fmt.ID_COLUMN: pa.string()}))
    names = table.column_names
    heads = [n for n in names if re.fullmatch(r"head_\d+|score_\d+", n)]
    if heads or (table.schema.metadata or {}).get(fmt.METADATA_KEY.encode()):
        raise DataError(f"{path}: labels (a label artefact or its export, columns {', '.join(names[:4])}"
                        f"{', …' if len(names) > 4 else ''}), not ground truth; compare two sets of labels with "
                        "--against, or give truth as a sample_id,label table or a data spec with classes")
    id_col = fmt.ID_COLUMN if fmt.ID_COLUMN in names else names[0]
    label_col = "label" if "label" in names else next((n for n in names if n != id_col), None)
    if label_col is None:
        raise DataError(f"{path}: expected columns sample_id,label; found {names}")
    if table.column(label_col).null_count or table.column(id_col).null_count:
        raise DataError(f"{path}: empty sample_id or label values")
    labels = table.column(label_col).combine_chunks()
    if pa.types.is_integer(labels.type):
        labels = labels.to_numpy()
    elif pa.types.is_string(labels.type) or pa.types.is_large_string(labels.type):
        labels = pc.index_in(labels, value_set=pc.unique(labels).sort()).to_numpy().astype(np.int64)
    else:
        raise DataError(f"{path}: column {label_col!r} holds {labels.type}; labels must be integers or class names")
    return table.column(id_col).combine_chunks().cast(pa.string()), labels
