"""An artefact written a part at a time (``write_parts``, how a run writes its labels) is the file that
``Artefact.build`` + ``write`` give for the same rows, refuses what ``build`` refuses, and never holds the table."""

import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labelkit.artefact import Artefact, check_artefact, read_artefact, write_parts
from labelkit.data import RowIds
from labelkit.errors import ArtefactError


def _rows(n: int, heads: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ks = [7, 300][:heads]
    labels = np.stack([rng.integers(0, k, n) for k in ks])
    scores = rng.random((heads, n)).astype(np.float32)
    return RowIds(n), labels, scores, ks


def _parts(ids, labels, scores, bounds):
    def parts():
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            yield ids.take(np.arange(lo, hi)), labels[:, lo:hi], None if scores is None else scores[:, lo:hi]
    return parts


@pytest.mark.parametrize("heads,scored", [(1, True), (2, True), (2, False)])
def test_parts_write_the_file_that_build_writes(tmp_path, heads, scored):
    ids, labels, scores, ks = _rows(5003, heads)
    scores = scores if scored else None
    data = {"spec": "table.npy", "count": 6000, "skipped": [{"sample_id": "x", "reason": "NaN"}]}
    method, parents = {"name": "sela", "config": {"lam": 25}}, ["a" * 64]
    built = Artefact.build(ids.arrow, labels, ks, scores=scores, data=data, method=method, parents=parents)
    built.write(tmp_path / "built.parquet")
    written = write_parts(tmp_path / "parts.parquet", _parts(ids, labels, scores, [0, 1, 2000, 2001, 5003]), ks,
                          data=data, method=method, parents=parents)
    again = read_artefact(tmp_path / "parts.parquet")
    assert written == again.metadata
    assert {**again.metadata, "created_at": None} == {**built.metadata, "created_at": None}
    assert again.artefact_id == built.artefact_id and again.table.equals(built.table)
    assert check_artefact(tmp_path / "parts.parquet") == []
    groups = pq.ParquetFile(tmp_path / "parts.parquet").metadata
    assert [groups.row_group(g).num_rows for g in range(groups.num_row_groups)] == [1, 1999, 1, 3002]


def test_parts_without_a_fingerprint_or_count_get_those_of_their_ids(tmp_path):
    ids, labels, scores, ks = _rows(300, 1)
    built = Artefact.build(ids.arrow, labels, ks, scores=scores)
    written = write_parts(tmp_path / "a.parquet", _parts(ids, labels, scores, [0, 100, 300]), ks)
    assert written["data"] == built.metadata["data"] and written["artefact_id"] == built.artefact_id


@pytest.mark.parametrize("change,message", [
    (lambda ids: ids[:150] + [ids[149]] + ids[151:], "duplicated"),   # a repeat across the parts' boundary
    (lambda ids: ids[:100] + [ids[101], ids[100]] + ids[102:], "not in sample-id order"),
    (lambda ids: ids[:149] + [ids[151], ids[150], ids[149]] + ids[152:], "follows"),
    (lambda ids: ids[:10] + [""] + ids[11:], "non-empty"),
    (lambda ids: ids[:10] + [None] + ids[11:], "null"),
])
def test_parts_refuse_ids_that_build_would_refuse_and_write_nothing(tmp_path, change, message):
    ids, labels, scores, ks = _rows(300, 1)
    bad = pa.array(change(list(RowIds(300))), pa.string())

    def parts():
        for lo, hi in [(0, 150), (150, 300)]:
            yield bad[lo:hi], labels[:, lo:hi], scores[:, lo:hi]

    with pytest.raises(ArtefactError, match=message):
        write_parts(tmp_path / "a.parquet", parts, ks)
    assert list(tmp_path.iterdir()) == []


def test_parts_refuse_labels_outside_k_naming_the_row(tmp_path):
    ids, labels, scores, ks = _rows(300, 2)
    labels[1, 250] = 300
    with pytest.raises(ArtefactError, match=r"head_1: labels must lie in \[0, 300\).*first bad row 250 \(sample_id '000250'"):
        write_parts(tmp_path / "a.parquet", _parts(ids, labels, scores, [0, 200, 300]), ks)
    with pytest.raises(ArtefactError, match="at least one sample"):
        write_parts(tmp_path / "a.parquet", lambda: iter(()), ks)
    assert list(tmp_path.iterdir()) == []


def test_parts_hold_one_part_not_the_table(tmp_path):
    """800,000 rows of two heads, whose table would hold 16 MB (20 bytes a row), written with a few MB: numpy's
    peak (traced) and Arrow's (its pool, read between parts)."""
    n = 800_000
    ids, labels, scores, ks = _rows(n, 2)
    write_parts(tmp_path / "warm.parquet", _parts(ids, labels, scores, [0, 10]), ks)  # imports and caches
    arrow = []

    def parts():
        for lo in range(0, n, 20_000):
            arrow.append(pa.total_allocated_bytes())
            yield ids.take(np.arange(lo, min(n, lo + 20_000))), labels[:, lo:lo + 20_000], scores[:, lo:lo + 20_000]

    tracemalloc.start()
    try:
        write_parts(tmp_path / "a.parquet", parts, ks)
        numpy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert numpy_peak < 3_000_000 and max(arrow) - min(arrow) < 3_000_000, (numpy_peak, arrow)
    assert read_artefact(tmp_path / "a.parquet").num_samples == n
