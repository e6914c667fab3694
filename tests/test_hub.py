"""`export --format hub`: a folder the Hugging Face Hub shows and loads as it is, read back by every reader."""

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from labelkit.artefact import Artefact, read_artefact, read_header
from labelkit.cli import main
from labelkit.artefact import export_hub


def _artefact(n=1797):
    from sklearn.datasets import load_digits

    truth = load_digits().target[:n]
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random(n) < 0.1, rng.integers(0, 10, n), truth)
    ids = [f"{i:06d}" for i in range(n)]
    method = {"name": "sela", "config": {"arch": "resnet18", "clusters": [10, 20], "lam": 25.0, "seed": 0},
              "quality": {"heads": [{"head": 0, "k": 10, "agreement": 0.91, "stability": 0.97,
                                     "generalisation": 0.95, "balance": 0.99},
                                    {"head": 1, "k": 20, "agreement": 0.80, "stability": None,
                                     "generalisation": 0.90, "balance": 0.98}],
                          "recommended_k": {"k": 10, "by": "agreement", "table": []}}}
    return Artefact.build(ids, [noisy, (noisy * 2 + rng.integers(0, 2, n)) % 20], [10, 20],
                          scores=rng.random((2, n)).astype(np.float32), data={"spec": "builtin:digits"}, method=method)


def _card(folder):
    text = (folder / "README.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert match, "the card must open with YAML front matter between --- lines"
    return yaml.safe_load(match.group(1)), match.group(2)


def test_card_yaml_parses_and_matches_the_files(tmp_path):
    art = _artefact()
    out = export_hub(art, tmp_path / "hub", repo="me/digits-labels", license="cc-by-4.0", rows_per_file=700)
    front, body = _card(out)
    files = sorted(p.relative_to(out).as_posix() for p in (out / "data").glob("*.parquet"))
    assert files == ["data/train-00000-of-00003.parquet", "data/train-00001-of-00003.parquet",
                     "data/train-00002-of-00003.parquet"]
    assert front["license"] == "cc-by-4.0" and front["annotations_creators"] == ["machine-generated"]
    assert front["size_categories"] == ["1K<n<10K"] and front["task_categories"] == ["image-classification"]
    assert front["source_datasets"] == ["extended|digits"] and front["pretty_name"] and front["tags"]
    (config,) = front["configs"]
    pattern = config["data_files"][0]["path"]
    assert config["data_files"][0]["split"] == "train"
    assert sorted(str(p.relative_to(out)) for p in out.glob(pattern)) == files
    info = front["dataset_info"]
    schema = pq.read_schema(out / files[0])
    dtypes = {"string": "string", "int32": "int32", "float": "float32"}
    assert [(f["name"], f["dtype"]) for f in info["features"]] == [(f.name, dtypes[str(f.type)]) for f in schema]
    assert [f["name"] for f in info["features"]] == ["sample_id", "head_0", "head_1", "score_0", "score_1"]
    assert info["splits"][0]["num_examples"] == sum(pq.read_metadata(out / f).num_rows for f in files) == 1797
    assert info["download_size"] == sum((out / f).stat().st_size for f in files)
    # the body is generated from the artefact
    assert art.artefact_id in body and "resnet18" in body and "hf://datasets/me/digits-labels" in body
    assert "| 0 | 10 | 0.910 | 0.970 | 0.950 | 0.990 |" in body and "Recommended K (label-free): **10**" in body
    sizes = art.cluster_sizes(1)
    assert f"| 1 | 20 | {sizes.min():,} | {int(np.median(sizes)):,} | {sizes.max():,} | 0 |" in body
    for reader in ("DuckDB", "polars", "pandas", "load_dataset", "sample_id"):
        assert reader in body
    figure = re.search(r"!\[[^\]]*\]\(([^)]+)\)", body).group(1)
    assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the card's figure is in the folder


def test_hub_folder_reads_back_as_the_same_artefact_everywhere(tmp_path):
    art = _artefact()
    out = export_hub(art, tmp_path / "hub", rows_per_file=1000)
    back = read_artefact(out)
    assert back.artefact_id == art.artefact_id and back.num_samples == 1797
    assert (back.label_matrix() == art.label_matrix()).all()
    assert read_header(out).num_rows == 1797
    assert read_artefact(f"file://{out}").artefact_id == art.artefact_id
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"SELECT count(*), sum(head_0) FROM '{out}/data/*.parquet'").fetchall()[0]
    assert rows == (1797, int(art.labels(0).sum()))
    import polars as pl

    assert pl.read_parquet(f"{out}/data/*.parquet").height == 1797


def test_one_shard_of_a_hub_export_alone_is_not_passed_off_as_the_whole(tmp_path):
    out = export_hub(_artefact(), tmp_path / "hub", rows_per_file=1000)
    with pytest.raises(Exception, match="num_samples=1797 but the file has 1000 rows"):
        read_artefact(out / "data" / "train-00000-of-00002.parquet")


def test_cli_hub_export_with_truth_and_safe_rewrites(tmp_path):
    art_path = _artefact().write(tmp_path / "labels.parquet")
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(art_path), "--format", "hub", "--out", str(tmp_path / "hub"),
                                  "--repo", "me/x", "--truth", "builtin:digits"])
    assert result.exit_code == 0, result.output
    assert "hf upload me/x" in result.output
    front, body = _card(tmp_path / "hub")
    assert "Against ground truth (`builtin:digits`" in body
    nmi = float(re.search(r"\| 0 \| 10 \| ([0-9.]+) \|", body).group(1))
    assert 0.7 < nmi < 1.0
    again = runner.invoke(main, ["export", str(art_path), "--format", "hub", "--out", str(tmp_path / "hub")])
    assert again.exit_code == 0, again.output  # an export is replaced whole
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    refused = runner.invoke(main, ["export", str(art_path), "--format", "hub", "--out", str(tmp_path / "mine")])
    assert refused.exit_code == 1 and "not a hub export" in refused.output
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_hub_folder_follows_the_umask_and_a_failed_export_leaves_the_old_one(tmp_path, monkeypatch):
    import os
    import stat

    out = export_hub(_artefact(), tmp_path / "hub", rows_per_file=1000)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # was 0o700: a staging folder made by mkdtemp
    before = sorted(p.name for p in out.rglob("*"))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    import labelkit.artefact._hub as hub

    monkeypatch.setattr(hub, "sizes_figure", broken)
    with pytest.raises(OSError, match="disk full"):
        export_hub(_artefact(), out, rows_per_file=1000)
    assert sorted(p.name for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["hub"]  # no staging folder left beside it


def test_a_file_is_exported_a_batch_at_a_time_to_the_same_rows_and_card(tmp_path, monkeypatch):
    """From a file, the rows are checked and copied a batch at a time (here 64 rows a batch, 500 a data file, so
    files begin inside batches), never read whole: the data files hold the rows and metadata that an export of the
    artefact in memory writes, and the card says the same (its byte counts aside: Arrow counts a column's offsets
    once per batch)."""
    from labelkit.artefact import _scan

    monkeypatch.setattr(_scan, "_BATCH", 64)
    art = _artefact()
    path = art.write(tmp_path / "labels.parquet")
    export_hub(art, tmp_path / "memory", rows_per_file=500, repo="me/labels")
    with monkeypatch.context() as never_whole:
        never_whole.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read the whole table"))
        export_hub(path, tmp_path / "streamed", rows_per_file=500, repo="me/labels")
    names = sorted(p.name for p in (tmp_path / "memory" / "data").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "streamed" / "data").iterdir()) and len(names) == 4
    for name in names:
        a, b = (pq.read_table(tmp_path / run / "data" / name) for run in ("memory", "streamed"))
        assert a.equals(b) and a.schema.metadata == b.schema.metadata
    assert read_artefact(tmp_path / "streamed").artefact_id == art.artefact_id

    def card(run):
        text = (tmp_path / run / "README.md").read_text()
        return re.sub(r"(num_bytes|dataset_size|download_size): \d+", r"\1: N", text)

    assert card("streamed") == card("memory")
    sizes = yaml.safe_load(card("streamed").split("---")[1])["dataset_info"]
    assert sizes["splits"][0]["num_examples"] == 1797
