import json

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn import metrics as sk

from labelkit.quality import _metrics as lk
from labelkit.artefact import Artefact
from labelkit.cli import main
from labelkit.errors import ConfigError, DataError
from labelkit.quality import score_artefact


def _cases():
    rng = np.random.default_rng(1)
    yield rng.integers(0, 5, 300), rng.integers(0, 4, 300)  # random
    truth = rng.integers(0, 10, 500)
    yield truth * 7 + 3, truth  # permuted/renamed labels
    yield np.zeros(50, int), rng.integers(0, 3, 50)  # single cluster
    yield np.arange(40), rng.integers(0, 3, 40)  # all distinct
    yield rng.integers(0, 200, 600), rng.integers(0, 5, 600)  # K >> classes
    yield np.array([4]), np.array([1])  # one sample
    yield np.zeros(9, int), np.zeros(9, int)  # both trivial
    digits_truth = np.asarray(__import__("sklearn.datasets", fromlist=["x"]).load_digits().target)
    yield np.where(rng.random(1797) < 0.7, digits_truth, rng.integers(0, 10, 1797)), digits_truth  # real labels
    yield rng.integers(-5, 5, 100) * 1000, rng.integers(0, 3, 100)  # negative and sparse label values


@pytest.mark.parametrize("case", list(range(9)))
@pytest.mark.parametrize("average", lk.AVERAGES)
def test_agrees_with_scikit_learn(case, average):
    pred, truth = list(_cases())[case]
    table = lk.contingency(pred, truth)
    assert lk.nmi(table, average) == pytest.approx(sk.normalized_mutual_info_score(truth, pred, average_method=average), abs=1e-9)
    if not (case == 3 and average == "min"):  # 0/0 there: see test_ami_zero_over_zero
        assert lk.ami(table, average) == pytest.approx(sk.adjusted_mutual_info_score(truth, pred, average_method=average), abs=1e-9)
    assert lk.ari(table) == pytest.approx(sk.adjusted_rand_score(truth, pred), abs=1e-9)
    h, c, _ = sk.homogeneity_completeness_v_measure(truth, pred)
    result = lk.compare(pred, truth)
    assert result["homogeneity"] == pytest.approx(h, abs=1e-9)
    assert result["completeness"] == pytest.approx(c, abs=1e-9)


def test_ami_zero_over_zero():
    # All-distinct clusters: MI = E[MI] = H(truth) = the 'min' normaliser, so AMI is 0/0. scikit-learn's
    # clamping means 1 (eps/eps) but its result is rounding noise that differs between runs of the same sum.
    truth = np.random.default_rng(5).integers(0, 3, 40)
    table = lk.contingency(np.arange(40), truth)
    assert lk.mutual_info(table) == pytest.approx(lk.expected_mutual_info(table.rows, table.cols, 40), abs=1e-12)
    assert lk.ami(table, "min") == 1.0
    assert abs(sk.adjusted_mutual_info_score(truth, np.arange(40), average_method="min") - 1.0) < 0.1


def test_sparse_table_gives_the_same_numbers(monkeypatch):
    rng = np.random.default_rng(2)
    pred, truth = rng.integers(0, 60, 2000), rng.integers(0, 40, 2000)
    dense = lk.compare(pred, truth)
    monkeypatch.setattr(lk, "_DENSE_LIMIT", 10)
    table = lk.contingency(pred, truth)
    assert not isinstance(table.table, np.ndarray)
    for key in ("nmi", "ami", "ari", "purity", "homogeneity"):
        assert lk.compare(pred, truth)[key] == pytest.approx(dense[key], abs=1e-12)


def test_no_overflow_in_pair_counts():
    # 200k samples in one cell: n^2 = 4e10 pairs fits int64, but products of pair counts do not
    pred = np.zeros(200_000, int)
    pred[:100] = 1
    truth = pred.copy()
    truth[-1] = 1
    assert lk.ari(lk.contingency(pred, truth)) == pytest.approx(sk.adjusted_rand_score(truth, pred), abs=1e-9)


def test_accuracy_purity_entropy_and_sizes():
    truth = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([2, 2, 2, 0, 0, 1, 1, 1, 0])
    result = lk.compare(pred, truth, k=4)
    # best match 2->0, 0->1, 1->2: 3 + 2 + 2 of 9
    assert result["accuracy"] == pytest.approx(7 / 9)
    assert result["purity"] == pytest.approx(7 / 9)
    p = np.array([2 / 3, 1 / 3])
    h = float(-(p * np.log(p)).sum())
    assert result["entropy_mean"] == pytest.approx((0 + h + h) / 3)
    assert (result["size_min"], result["size_max"], result["empty"]) == (0, 3, 1)
    assert lk.compare(np.arange(9) % 4, truth)["accuracy"] is None  # 4 clusters vs 3 classes: no one-to-one match


def test_errors():
    with pytest.raises(ConfigError, match="differ in length"):
        lk.contingency([0, 1], [0])
    with pytest.raises(ConfigError, match="average method"):
        lk.nmi(lk.contingency([0, 1], [0, 1]), "median")


def _digits_artefact(tmp_path, drop=0):
    from labelkit.data import resolve

    source = resolve("builtin:digits")
    ids = source.ids[drop:]
    truth = source.targets[drop:]
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random(len(ids)) < 0.8, truth, rng.integers(0, 10, len(ids)))
    art = Artefact.build(ids, np.stack([noisy, truth * 2 + rng.integers(0, 2, len(ids))]), [10, 20])
    return art, str(art.write(tmp_path / "labels.parquet")), noisy, truth


def test_score_against_builtin_truth_and_files(tmp_path):
    art, path, noisy, truth = _digits_artefact(tmp_path)
    result = score_artefact(path, truth="builtin:digits")
    assert result["matched"] == 1797 and len(result["heads"]) == 2
    assert result["heads"][0]["nmi"] == pytest.approx(sk.normalized_mutual_info_score(truth, noisy), abs=1e-12)
    csv = tmp_path / "truth.csv"
    csv.write_text("sample_id,label\n" + "".join(f"{i},{t}\n" for i, t in zip(art.sample_ids, truth)))
    from_csv = score_artefact(path, truth=str(csv), heads="1")
    assert [h["head"] for h in from_csv["heads"]] == [1] and from_csv["heads"][0]["homogeneity"] == pytest.approx(1.0)


def test_coverage_threshold(tmp_path):
    _, path, _, _ = _digits_artefact(tmp_path)
    csv = tmp_path / "truth.csv"
    csv.write_text("sample_id,label\n000000,0\n000001,1\n")
    with pytest.raises(DataError, match=r"only 2 of 1,797 samples \(0.1%\)"):
        score_artefact(path, truth=str(csv))
    assert score_artefact(path, truth=str(csv), min_coverage=0.0)["matched"] == 2
    csv.write_text("sample_id,label\nzzz,0\n")
    with pytest.raises(DataError, match="no sample id"):
        score_artefact(path, truth=str(csv), min_coverage=0.0)


def test_against_another_artefact_is_label_stability(tmp_path):
    art, path, noisy, truth = _digits_artefact(tmp_path)
    same = score_artefact(path, against=path)
    assert all(h["nmi"] == 1.0 and h["ari"] == 1.0 for h in same["heads"])
    with pytest.raises(ConfigError, match="give one of --truth SPEC or --against ARTEFACT, not both"):
        score_artefact(path)
    with pytest.raises(ConfigError, match="not both"):
        score_artefact(path, truth="builtin:digits", against=path)


def test_metrics_command_json_and_plot(tmp_path):
    _, path, noisy, truth = _digits_artefact(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["metrics", path, "--truth", "builtin:digits", "--json", "--plot", str(tmp_path / "m.png")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"n", "matched", "heads"} <= set(data)
    head = data["heads"][0]
    for key in ("head", "k", "nmi", "ami", "ari", "accuracy", "purity", "entropy_mean", "size_min", "size_max", "empty"):
        assert key in head
    assert head["ari"] == pytest.approx(sk.adjusted_rand_score(truth, noisy), abs=1e-12)
    assert data["heads"][1]["accuracy"] is None
    from PIL import Image

    assert Image.open(tmp_path / "m.png").size[0] > 500
    table = runner.invoke(main, ["metrics", path, "--truth", "builtin:digits"])
    assert table.exit_code == 0 and "NMI" in table.output
    label_free = runner.invoke(main, ["metrics", path])  # no reference: the label-free table
    assert label_free.exit_code == 0 and "label-free quality" in label_free.output
    both = runner.invoke(main, ["metrics", path, "--truth", "builtin:digits", "--against", path])
    assert both.exit_code == 2 and "not both" in both.output


def test_truth_that_is_an_artefact_or_its_export_is_refused_not_scored_against_itself(tmp_path):
    from click.testing import CliRunner

    from labelkit.artefact import export_artefact, read_artefact
    from labelkit.cli import main

    ids = [f"s{i:03d}" for i in range(60)]
    two = Artefact.build(ids, np.stack([np.arange(60) % 3, np.arange(60) % 5]), [3, 5]).write(tmp_path / "a.parquet")
    one = Artefact.build(ids, np.arange(60) % 3, 3).write(tmp_path / "one.parquet")
    export_artefact(read_artefact(two), "csv", tmp_path / "two.csv")
    export_artefact(read_artefact(one), "csv", tmp_path / "one.csv")
    for truth in ("two.csv", "one.csv", "one.parquet"):  # each scored NMI 1.0 "vs truth" before
        result = CliRunner().invoke(main, ["metrics", str(two), "--truth", str(tmp_path / truth)])
        assert result.exit_code == 1, result.output
        assert "not ground truth" in result.output and "--against" in result.output
        assert len(result.output.strip().splitlines()) == 1
    (tmp_path / "truth.csv").write_text("sample_id,label\n" + "".join(f"{i},{n % 3}\n" for n, i in enumerate(ids)))
    result = CliRunner().invoke(main, ["metrics", str(two), "--truth", str(tmp_path / "truth.csv"), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["heads"][0]["nmi"] == pytest.approx(1.0)


@pytest.mark.parametrize("dense", [True, False])
def test_against_an_artefact_file_reads_batches_and_gives_the_whole_table_numbers(tmp_path, monkeypatch, dense):
    """Two artefact files with the same ids are compared a batch of rows at a time (here 256 rows; counted densely or
    sparsely): every number equals the whole-table join's, to the last bit, and the tables are never read whole.
    Ids that differ fall back to the join."""
    import pyarrow.parquet as pq

    from labelkit.artefact import _scan, read_artefact
    from labelkit.quality import _streamed

    monkeypatch.setattr(_scan, "_BATCH", 256)
    if not dense:
        monkeypatch.setattr(_streamed, "_DENSE_CELLS", 10)
    rng = np.random.default_rng(0)
    n = 5000
    ids = [f"s{i:05d}" for i in range(n)]
    truth = rng.integers(0, 12, n)
    mine = np.stack([np.where(rng.random(n) < 0.3, truth, rng.integers(0, 20, n)) for _ in range(3)])
    path = Artefact.build(ids, mine, 20, method={"name": "test"}).write(tmp_path / "a.parquet")
    other = Artefact.build(ids, np.stack([truth, truth, rng.integers(0, 12, n)]), 12,
                           method={"name": "t"}).write(tmp_path / "b.parquet")
    single = Artefact.build(ids, truth, 12, method={"name": "t"}).write(tmp_path / "c.parquet")
    for reference, heads in ((other, None), (single, "0,2")):
        whole = score_artefact(read_artefact(path), against=read_artefact(reference), heads=heads)
        with monkeypatch.context() as never_whole:
            never_whole.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read the whole table"))
            streamed = score_artefact(path, against=reference, heads=heads)
        assert streamed == whole
    fewer = Artefact.build(ids[:4500], truth[:4500], 12, method={"name": "t"}).write(tmp_path / "d.parquet")
    joined = score_artefact(path, against=fewer, min_coverage=0.5)
    assert joined == score_artefact(read_artefact(path), against=read_artefact(fewer), min_coverage=0.5)
    assert joined["matched"] == 4500
