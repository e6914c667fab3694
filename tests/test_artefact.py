import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labelkit.artefact import format as fmt
from labelkit.artefact import Artefact, check_artefact, read_artefact
from labelkit.errors import ArtefactError

FIXTURE = "tests/fixtures/artefact-v1.0.0.parquet"


def _art(n=50, heads=3, k=7, seed=0, **kw):
    rng = np.random.default_rng(seed)
    ids = [f"img/{i:04d}.png" for i in rng.permutation(n)]
    labels = rng.integers(0, k, size=(heads, n))
    return ids, labels, Artefact.build(ids, labels, k, method={"name": "test"}, **kw)


def test_round_trip_keeps_labels_by_id(tmp_path):
    ids, labels, art = _art()
    path = art.write(tmp_path / "labels.parquet")
    back = read_artefact(path)
    assert back.num_samples == 50 and back.num_heads == 3
    assert list(back.sample_ids) == sorted(ids)
    by_id = {sample_id: labels[:, i] for i, sample_id in enumerate(ids)}
    for row, sample_id in enumerate(back.sample_ids):
        assert [back.labels(h)[row] for h in range(3)] == list(by_id[sample_id])
    assert back.metadata == art.metadata
    assert back.labels(0).dtype == np.int32
    assert check_artefact(path) == []


def test_artefact_id_depends_on_content_not_bytes(tmp_path):
    ids, labels, art = _art()
    again = Artefact.build(list(reversed(ids)), labels[:, ::-1], 7, method={"name": "other"})
    assert again.artefact_id == art.artefact_id
    changed = labels.copy()
    changed[1, 3] = (changed[1, 3] + 1) % 7
    assert Artefact.build(ids, changed, 7).artefact_id != art.artefact_id
    # the same table written with other Parquet settings still validates under the same id
    path = tmp_path / "other.parquet"
    table = art.table.replace_schema_metadata({"labelkit": json.dumps(art.metadata)})
    pq.write_table(table, path, compression="snappy", row_group_size=7)
    assert read_artefact(path).artefact_id == art.artefact_id


def test_fingerprint_is_sha256_of_sorted_ids():
    ids, _, art = _art()
    expected = hashlib.sha256("".join(f"{i}\n" for i in sorted(ids)).encode()).hexdigest()
    assert art.fingerprint == expected == art.metadata["data"]["fingerprint"]
    sliced = pa.array(["zz", "a", "b"])[1:]
    assert fmt.fingerprint_ids(sliced) == hashlib.sha256(b"a\nb\n").hexdigest()


@pytest.mark.parametrize(
    "ids, labels, ks, message",
    [
        (["a", None, "c"], [0, 1, 0], 2, "null"),
        (["a", "b", "a"], [0, 1, 0], 2, "duplicated value(s), e.g. ['a']"),
        (["a", "b", "c"], [0, 2, 0], 2, "first bad row 1 (sample_id 'b', label 2)"),
        (["a", "b", "c"], [0, -1, 0], 2, "range over [-1, 0]"),
        (["a", "b"], [[0, 1], [1, 0]], [2], "2 heads of labels but 1 values of K"),
        (["a", "b", "c"], [0, 1], 2, "3 sample ids but 2 labels"),
        ([], [], 2, "at least one sample"),
        (["a", "b\nc"], [0, 1], 2, "without newline"),
        (["a", "b"], [0.5, 1.0], 2, "must be integers"),
        (["a", "b"], [0, 1], 0, "K must be at least 1"),
    ],
)
def test_writer_rejects_bad_input(tmp_path, ids, labels, ks, message):
    with pytest.raises(ArtefactError) as info:
        Artefact.build(ids, labels, ks).write(tmp_path / "x.parquet")
    assert message in str(info.value)
    assert not (tmp_path / "x.parquet").exists()


def test_failed_write_keeps_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    _, _, art = _art()
    path = art.write(tmp_path / "labels.parquet")
    before = path.read_bytes()

    def crash(table, where, **kwargs):
        with open(where, "wb") as handle:
            handle.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(OSError):
        _art(seed=1)[2].write(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["labels.parquet"]


def test_reader_reports_truncated_file(tmp_path):
    _, _, art = _art(n=2000)
    path = art.write(tmp_path / "labels.parquet")
    data = path.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtefactError, match="cut.parquet: not a readable Parquet file"):
        read_artefact(cut)
    assert any("not a readable Parquet" in p for p in check_artefact(cut))


def test_reader_rejects_foreign_parquet_and_other_files(tmp_path):
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    with pytest.raises(ArtefactError, match="no 'labelkit' key"):
        read_artefact(foreign)
    text = tmp_path / "labels.csv"
    text.write_text("a,b\n1,2\n")
    with pytest.raises(ArtefactError, match="not a readable Parquet file"):
        read_artefact(text)
    with pytest.raises(ArtefactError, match="no such file"):
        read_artefact(tmp_path / "missing.parquet")


def _rewrite(art, path, table=None, **meta_changes):
    meta = {**art.metadata, **meta_changes}
    table = (table if table is not None else art.table).replace_schema_metadata({"labelkit": json.dumps(meta)})
    pq.write_table(table, path)
    return path


def test_reader_detects_tampered_labels(tmp_path):
    _, _, art = _art()
    column = art.table.column("head_1").to_numpy().copy()
    column[0] = (column[0] + 1) % 7
    table = art.table.set_column(2, pa.field("head_1", pa.int32(), nullable=False), pa.array(column))
    path = _rewrite(art, tmp_path / "t.parquet", table)
    problems = check_artefact(path)
    assert len(problems) == 1 and "does not match the content" in problems[0]
    with pytest.raises(ArtefactError, match="changed after writing"):
        read_artefact(path)


def test_reader_lists_every_problem(tmp_path):
    _, _, art = _art()
    table = art.table.set_column(1, "head_0", pa.array(art.labels(0).astype(np.int64)))
    table = table.append_column("extra", pa.array(np.zeros(50)))
    meta = {**art.metadata, "num_samples": 49, "heads": art.metadata["heads"][:2] + [{"name": "head_2", "k": 3}]}
    path = tmp_path / "bad.parquet"
    pq.write_table(table.replace_schema_metadata({"labelkit": json.dumps(meta)}), path)
    problems = check_artefact(path)
    text = "\n".join(problems)
    assert "num_samples=49" in text
    assert "'head_0' must be int32, found int64" in text
    assert "head_2: labels must lie in [0, 3)" in text
    assert "unexpected column(s) ['extra']" in text


def test_reader_checks_metadata_against_schema(tmp_path):
    _, _, art = _art()
    path = _rewrite(art, tmp_path / "m.parquet", artefact_id="not-a-hash", parents="x")
    problems = check_artefact(path)
    assert any("'artefact_id'" in p for p in problems)
    assert any("'parents'" in p for p in problems)
    meta = dict(art.metadata)
    del meta["data"]
    path2 = tmp_path / "m2.parquet"
    pq.write_table(art.table.replace_schema_metadata({"labelkit": json.dumps(meta)}), path2)
    assert any("'data' is a required property" in p for p in check_artefact(path2))


def test_version_rules(tmp_path):
    _, _, art = _art()
    with pytest.raises(ArtefactError, match="format version 2.0.0 is not readable .* reads 1.x"):
        read_artefact(_rewrite(art, tmp_path / "v2.parquet", format_version="2.0.0"))
    table = art.table.append_column("future_column", pa.array(np.ones(50, np.float32)))
    newer = read_artefact(_rewrite(art, tmp_path / "v1_9.parquet", table, format_version="1.9.0"))
    assert newer.num_samples == 50 and newer.metadata["format_version"] == "1.9.0"


def test_frozen_v1_fixture_still_reads():
    art = read_artefact(FIXTURE)
    assert art.metadata["format_version"] == "1.0.0"
    assert art.artefact_id == "17716b6a275f3becb154ec292b7b7eb7fa9e2bf1c9a12391af7d8dc1baba08d7"
    assert [(h.name, h.k) for h in art.heads] == [("head_0", 3), ("head_1", 4)]
    assert art.sample_ids[2] == "n01443537/n01443537_1000.JPEG"
    assert art.labels(0).tolist() == [2, 2, 0, 0, 1, 1]
    assert art.labels(1).tolist() == [0, 1, 3, 2, 0, 1]
    assert art.scores(0) is not None and art.scores(0).dtype == np.float32
    assert art.metadata["method"]["config"]["arch"] == "alexnet"


def test_schema_file_is_generated_from_the_library():
    from labelkit import schemas

    assert schemas.read_text() == fmt.json_schema_text(), "run: python -m labelkit.artefact.format"
    assert json.loads(schemas.read_text()) == fmt.METADATA_SCHEMA


def test_other_tools_read_the_file_as_it_is(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    polars = pytest.importorskip("polars")
    pandas = pytest.importorskip("pandas")
    ids, labels, art = _art()
    path = str(art.write(tmp_path / "labels.parquet"))
    rows = duckdb.sql(f"select sample_id, head_0, head_2 from '{path}' order by sample_id").fetchall()
    assert rows[0] == (art.sample_ids[0], int(art.labels(0)[0]), int(art.labels(2)[0]))
    assert duckdb.sql(f"select count(*) from '{path}'").fetchall()[0][0] == 50
    frame = polars.read_parquet(path)
    assert frame.columns == ["sample_id", "head_0", "head_1", "head_2"]
    assert frame["head_1"].to_list() == art.labels(1).tolist()
    assert str(frame.schema["head_1"]) == "Int32"
    pdf = pandas.read_parquet(path)
    assert pdf["sample_id"].tolist() == list(art.sample_ids)


def test_full_checks_stream_the_rows_and_find_what_the_whole_table_check_finds(tmp_path, monkeypatch):
    """validate --full and info --full read an artefact a batch at a time (here 8 rows; the file has row groups of
    7): a valid one is never read whole and gives the cluster sizes of the whole table; a fault anywhere -- across a
    batch boundary too -- gives exactly the whole-table check's messages."""
    from labelkit.artefact import _reading, _scan, artefact_files, scan_artefact

    monkeypatch.setattr(_scan, "_BATCH", 8)
    _, _, art = _art()
    path = tmp_path / "ok.parquet"
    pq.write_table(art.table.replace_schema_metadata({"labelkit": json.dumps(art.metadata)}), path, row_group_size=7)
    with monkeypatch.context() as never_whole:
        never_whole.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read the whole table"))
        header, sizes = scan_artefact(path)
        assert check_artefact(path) == []
    assert header.num_rows == 50 and header.metadata["artefact_id"] == art.artefact_id
    assert [s.tolist() for s in sizes] == [art.cluster_sizes(h).tolist() for h in range(3)]

    ids = art.table.column("sample_id").to_pylist()
    swapped, repeated = list(ids), list(ids)
    swapped[15], swapped[16] = ids[16], ids[15]  # the 2nd and 3rd batches meet between rows 15 and 16
    repeated[16] = ids[15]
    out_of_range = art.labels(2).copy()
    out_of_range[41] = 7
    changed = art.labels(1).copy()
    changed[33] = (changed[33] + 1) % 7
    id_field, int32 = art.table.schema.field("sample_id"), pa.int32()
    cases = {"unsorted": art.table.set_column(0, id_field, pa.array(swapped)),
             "duplicate": art.table.set_column(0, id_field, pa.array(repeated)),
             "range": art.table.set_column(3, pa.field("head_2", int32, nullable=False), pa.array(out_of_range)),
             "changed": art.table.set_column(2, pa.field("head_1", int32, nullable=False), pa.array(changed))}
    for name, table in cases.items():
        # the id of the tampered content, so that only the check under test can see the fault ("changed" keeps
        # the old one: the hash is what finds it)
        heads = [(f"head_{h}", 7, table.column(f"head_{h}").to_numpy()) for h in range(3)]
        content = fmt.compute_artefact_id(table.column("sample_id").combine_chunks(), heads, art.metadata["heads"])
        broken = _rewrite(art, tmp_path / f"{name}.parquet", table,
                          artefact_id=art.artefact_id if name == "changed" else content)
        whole = _reading._read_parts(artefact_files(broken))[2]
        assert whole and check_artefact(broken) == whole, name
        with pytest.raises(ArtefactError, match="invalid label artefact"):
            scan_artefact(broken)
