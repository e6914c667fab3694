"""From cluster ids to a data set: names (format 1.2), ids that stay put (align, diff), names through export,
import, the Hub card and predict."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import cli
from labelkit.artefact import Artefact, check_artefact, name_clusters, read_artefact
from labelkit.artefact import format as fmt
from labelkit.errors import ArtefactError, ConfigError
from labelkit.quality import align_artefact, compare_artefacts, match_clusters


def _ids(n):
    return [f"s{i:04d}" for i in range(n)]


@pytest.fixture
def labelled(tmp_path):
    rng = np.random.default_rng(0)
    art = Artefact.build(_ids(120), rng.integers(0, 4, (2, 120)), 4, scores=rng.random((2, 120)))
    path = tmp_path / "a.parquet"
    art.write(path)
    return art, path


# -- names -------------------------------------------------------------------------------------------------------


def test_names_are_a_new_version_with_the_same_labels(labelled):
    art, _ = labelled
    named = name_clusters(art, 0, {1: "cat", 3: "tabby cat"}, {1: "accepted"})
    assert named.metadata["parents"] == [art.artefact_id]
    assert named.artefact_id != art.artefact_id  # names are part of the labels' meaning
    assert np.array_equal(named.label_matrix(), art.label_matrix())
    assert np.array_equal(named.scores(1), art.scores(1))
    assert named.heads[0].names == (None, "cat", None, "tabby cat")
    assert named.heads[0].status == ("unreviewed", "accepted", "unreviewed", "unreviewed")
    assert named.heads[1].names is None and named.heads[1].status is None
    renamed = name_clusters(named, 0, {3: None, 2: "dog"})
    assert renamed.heads[0].names == (None, "cat", "dog", None)
    assert renamed.heads[0].status == named.heads[0].status


def test_an_artefact_without_names_keeps_its_format_1_1_id(labelled):
    art, _ = labelled
    heads = [(fmt.head_column(h), 4, art.labels(h)) for h in range(2)]
    ids = pa.array(art.sample_ids.tolist())
    assert fmt.compute_artefact_id(ids, heads) == art.artefact_id


def test_bad_names_are_refused(labelled):
    art, _ = labelled
    with pytest.raises(ConfigError, match="no cluster 4"):
        name_clusters(art, 0, {4: "x"})
    with pytest.raises(ConfigError, match="'x' would name clusters \\[0, 2\\]"):
        name_clusters(art, 0, {0: "x", 2: "x"})
    with pytest.raises(ConfigError, match="unknown status 'maybe'"):
        name_clusters(art, 0, status={0: "maybe"})
    with pytest.raises(ArtefactError, match="2 entries for K=4"):
        Artefact.build(_ids(4), [0, 1, 2, 3], 4, names=[["a", "b"]])


def test_the_reader_catches_edited_names_and_name_columns(labelled, tmp_path):
    art, _ = labelled
    named = name_clusters(art, 0, {0: "a", 1: "b"}).with_name_columns()
    named.write(tmp_path / "n.parquet")
    assert check_artefact(tmp_path / "n.parquet") == []
    table = pq.read_table(tmp_path / "n.parquet")
    meta = json.loads(table.schema.metadata[b"labelkit"])
    meta["heads"][0]["names"][1] = "c"  # a name changed behind the artefact id's back
    pq.write_table(table.replace_schema_metadata({"labelkit": json.dumps(meta)}), tmp_path / "edited.parquet")
    assert any("does not match the content" in p for p in check_artefact(tmp_path / "edited.parquet"))
    column = table.column("name_0").to_pylist()
    column[0] = "zzz"
    wrong = table.set_column(table.column_names.index("name_0"), "name_0", pa.array(column))
    pq.write_table(wrong, tmp_path / "wrong.parquet")
    assert any("column 'name_0' says 'zzz'" in p for p in check_artefact(tmp_path / "wrong.parquet"))


def test_name_command_by_hand_from_a_file_and_from_examples(labelled, tmp_path):
    art, path = labelled
    result = cli("name", path, "--set", "0=zero", "--set", "1=one", "--status", "0=accepted")
    assert result.exit_code == 0, result.output
    named = read_artefact(tmp_path / "a-named.parquet")
    assert named.heads[0].names[:2] == ("zero", "one")
    (tmp_path / "names.csv").write_text("cluster,name,status\n2,two,rejected\n3,three,\n")
    assert cli("name", tmp_path / "a-named.parquet", "--from", tmp_path / "names.csv").exit_code == 0
    again = read_artefact(tmp_path / "a-named.parquet")  # a named artefact is renamed in place
    assert again.heads[0].names == ("zero", "one", "two", "three")
    assert again.heads[0].status == ("accepted", "unreviewed", "rejected", "unreviewed")
    assert again.metadata["parents"] == [named.artefact_id]
    # three labelled samples per cluster of head 1, one of cluster 2's labelled wrongly
    labels = art.labels(1)
    rows = [np.flatnonzero(labels == c)[:3] for c in range(3)]  # cluster 3 gets no example
    lines = ["sample_id,name"] + [f"{art.sample_ids[r]},{'abc'[c]}" for c in range(3) for r in rows[c]]
    lines[-1] = lines[-1].rsplit(",", 1)[0] + ",a"
    lines.append("nowhere,b")
    (tmp_path / "examples.csv").write_text("\n".join(lines) + "\n")
    result = cli("name", path, "--head", "1", "--from-examples", tmp_path / "examples.csv", "--out", tmp_path / "e.parquet")
    assert result.exit_code == 0, result.output
    assert "1 example(s) are not samples of the artefact" in result.output
    assert "without an example stay unnamed: [3]" in result.output
    assert "cluster 2: its examples disagree (c 2, a 1)" in result.output
    assert read_artefact(tmp_path / "e.parquet").heads[1].names == ("a", "b", "c", None)


def test_name_command_refuses_bad_input(labelled, tmp_path):
    _, path = labelled
    (tmp_path / "bad.csv").write_text("cluster,name\n0,x\n9,y\n")
    result = cli("name", path, "--from", tmp_path / "bad.csv")
    assert result.exit_code == 2 and "no cluster 9" in result.output
    (tmp_path / "twice.csv").write_text("cluster,name\n0,x\n1,x\n")
    result = cli("name", path, "--from", tmp_path / "twice.csv")
    assert result.exit_code == 2 and "'x' would name clusters [0, 1]" in result.output
    (tmp_path / "header.csv").write_text("0,x\n")
    result = cli("name", path, "--from", tmp_path / "header.csv")
    assert result.exit_code == 2 and "cluster,name" in result.output
    result = cli("name", path, "--set", "three=cat")
    assert result.exit_code == 2 and "not CLUSTER=VALUE" in result.output
    assert cli("name", path).exit_code == 2
    assert not (tmp_path / "a-named.parquet").exists()


def test_examples_from_a_folder_of_class_folders(tmp_path):
    from conftest import write_image

    from labelkit.artefact import names_from_examples, read_examples

    ids = [f"img/{i:02d}.png" for i in range(20)]
    art = Artefact.build(ids, [i % 2 for i in range(20)], 2)
    for i in (0, 2, 4):
        write_image(tmp_path / "ex" / "even" / f"{i:02d}.png")
    write_image(tmp_path / "ex" / "odd" / "03.png")
    examples = read_examples(tmp_path / "ex", art.sample_ids)
    assert examples == {"img/00.png": "even", "img/02.png": "even", "img/04.png": "even", "img/03.png": "odd"}
    assert names_from_examples(art, 0, examples).names == {0: "even", 1: "odd"}


def test_names_travel_through_export_import_and_the_hub_card(labelled, tmp_path):
    art, _ = labelled
    named = name_clusters(art, 1, {0: "zero", 2: "two"})
    named.write(tmp_path / "n.parquet")
    assert cli("export", tmp_path / "n.parquet", "--format", "csv").exit_code == 0
    header = (tmp_path / "n.csv").read_text().splitlines()[0]
    assert header.endswith('"name_1"')
    assert cli("import", tmp_path / "n.csv", "--out", tmp_path / "back.parquet").exit_code == 0
    assert read_artefact(tmp_path / "back.parquet").heads[1].names == ("zero", None, "two", None)
    assert cli("export", tmp_path / "n.parquet", "--format", "npy").exit_code == 0
    assert json.loads((tmp_path / "n.names.json").read_text())["head_1"] == ["zero", None, "two", None]
    assert cli("export", tmp_path / "n.parquet", "--format", "json").exit_code == 0
    assert cli("import", tmp_path / "n.json", "--out", tmp_path / "j.parquet").exit_code == 0
    assert read_artefact(tmp_path / "j.parquet").metadata == named.metadata
    assert cli("export", tmp_path / "n.parquet", "--format", "hub", "--out", tmp_path / "hub").exit_code == 0
    card = (tmp_path / "hub" / "README.md").read_text().split("---")[1]
    features = {f["name"]: f["dtype"] for f in yaml.safe_load(card)["dataset_info"]["features"]}
    assert features["head_1"] == {"class_label": {"names": {"0": "zero", "1": "1", "2": "two", "3": "3"}}}
    assert features["head_0"] == "int32"
    info = cli("info", tmp_path / "n.parquet")
    assert "head_1: 2 of 4 named: 0=zero, 2=two" in info.output


# -- align and diff ----------------------------------------------------------------------------------------------


def test_match_clusters_classifies_every_transition():
    old = np.repeat(np.arange(5), 100)  # 5 clusters of 100
    new = np.array([3, 0, 4, 1, 2])[old]  # permuted ...
    new[:50] = 5  # ... old 0 split in two halves
    new[old == 4] = new[old == 3][0]  # old 3 and 4 merged
    new[-1] = 6  # one stray sample in a cluster of its own
    t = match_clusters(new, old, 7, 5)
    kinds = {e["kind"]: e for e in t.events if e["kind"] != "kept"}
    assert kinds["split"]["old"] == [0] and sorted(kinds["split"]["new"]) == [3, 5]
    assert kinds["merged"]["old"] == [3, 4] and kinds["merged"]["new"] == [1]
    assert kinds["born"]["new"] == [6] and kinds["born"]["new_size"] == 1
    assert t.counts() == {"kept": 2, "split": 1, "merged": 1, "born": 1, "died": 0}
    assert t.held_before == 0.0
    aligned = t.mapping[new]
    assert np.mean(aligned == old) == pytest.approx(t.held) and t.held == pytest.approx(350 / 500)  # 50 of old 0, all of old 1, 2 and 3
    assert t.mapping[5] >= 5 and t.mapping[6] >= 5 and t.mapping[5] != t.mapping[6]  # fresh ids, never reused


def test_align_keeps_ids_and_names_and_records_both_parents(tmp_path):
    rng = np.random.default_rng(1)
    old_labels = rng.integers(0, 6, 600)
    old = Artefact.build(_ids(600), old_labels, 6, names=[[f"c{i}" for i in range(6)]])
    perm = rng.permutation(6)
    keep = np.arange(60, 600)  # the new run lacks the first 60 samples and has 40 others
    new_ids = [_ids(600)[i] for i in keep] + [f"t{i:03d}" for i in range(40)]
    new = Artefact.build(new_ids, np.concatenate([perm[old_labels[keep]], rng.integers(0, 6, 40)]), 6)
    aligned, transitions = align_artefact(new, old)
    assert aligned.metadata["parents"] == [new.artefact_id, old.artefact_id]
    assert transitions[0].held == 1.0 and transitions[0].common == 540
    assert transitions[0].counts()["kept"] == 6
    assert aligned.heads[0].names == old.heads[0].names
    by_id = dict(zip(aligned.sample_ids, aligned.labels(0)))
    assert all(by_id[_ids(600)[i]] == old_labels[i] for i in keep)
    again = compare_artefacts(old, aligned)[0]
    assert again.held_before == 1.0 and again.scores["ari"] == pytest.approx(1.0)


def test_align_and_diff_commands(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, 200)
    Artefact.build(_ids(200), labels, 4).write(tmp_path / "old.parquet")
    new = (labels + 1) % 4
    new[labels == 3] = 4  # K differs: 5 clusters, old 3 became new 4 and new 0 is empty
    Artefact.build(_ids(200), new, 5).write(tmp_path / "new.parquet")
    result = cli("align", tmp_path / "new.parquet", "--to", tmp_path / "old.parquet")
    assert result.exit_code == 0, result.output
    assert "ids held on the common samples: 100.0% after alignment (0.0% before)" in result.output
    aligned = read_artefact(tmp_path / "new-aligned.parquet")
    assert np.array_equal(aligned.labels(0), labels)
    result = cli("diff", tmp_path / "old.parquet", tmp_path / "new.parquet", "--json")
    report = json.loads(result.output)["heads"][0]
    assert report["counts"]["kept"] == 4 and report["held_before"] == 0.0 and report["ari"] == pytest.approx(1.0)
    Artefact.build([f"x{i}" for i in range(10)], np.arange(10) % 4, 4).write(tmp_path / "other.parquet")
    result = cli("align", tmp_path / "other.parquet", "--to", tmp_path / "old.parquet")
    assert result.exit_code == 2 and "share no sample id" in result.output
    Artefact.build(_ids(200), np.stack([labels, labels]), 4).write(tmp_path / "two.parquet")
    result = cli("diff", tmp_path / "old.parquet", tmp_path / "two.parquet")
    assert result.exit_code == 2 and "--head H" in result.output
    assert cli("diff", tmp_path / "old.parquet", tmp_path / "two.parquet", "--head", "0").exit_code == 0
    result = cli("diff", tmp_path / "old.parquet", tmp_path / "two.parquet", "--head", "1")
    assert result.exit_code == 2 and "--head 1: A has heads 0..0" in result.output


def test_predict_writes_the_ids_and_names_of_the_newest_version(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 5
    y = rng.integers(0, 4, 400)
    np.savez(tmp_path / "t.npz", embeddings=(centres[y] + rng.normal(size=(400, 8))).astype("float32"))
    run = tmp_path / "run"
    assert cli("generate", "--data", tmp_path / "t.npz", "--clusters", "4", "--heads", "1", "--epochs", "4",
               "--quiet", "--out", run).exit_code == 0
    own = read_artefact(run / "labels.parquet")
    plain = cli("predict", run, "--data", tmp_path / "t.npz", "--out", tmp_path / "p0.parquet")
    assert plain.exit_code == 0, plain.output
    # another labelling's ids: a cyclic shift of the run's, as align would write, with names
    shifted = own.revise({"name": "align"}, labels=(own.label_matrix() + 1) % 4, names=[["a", "b", "c", "d"]])
    shifted.write(run / "labels-aligned.parquet")
    result = cli("predict", run, "--data", tmp_path / "t.npz", "--out", tmp_path / "p1.parquet")
    assert result.exit_code == 0, result.output
    before, after = read_artefact(tmp_path / "p0.parquet"), read_artefact(tmp_path / "p1.parquet")
    assert np.array_equal(after.labels(0), (before.labels(0) + 1) % 4)
    assert after.table.column("name_0").to_pylist() == ["abcd"[c] for c in after.labels(0)]
    assert check_artefact(tmp_path / "p1.parquet") == []
    other = Artefact.build(own.sample_ids, rng.integers(0, 4, own.num_samples), 4)
    other.write(tmp_path / "other.parquet")
    result = cli("predict", run, "--data", tmp_path / "t.npz", "--names", tmp_path / "other.parquet")
    assert result.exit_code == 2 and "not a renamed or aligned version" in result.output


def test_a_rerun_on_grown_data_starts_from_the_old_labels_and_keeps_their_ids(tmp_path):
    y = _overlapping_blobs(tmp_path, n=900, k=3, left_out=None)
    keep = np.random.default_rng(1).random(900) < 0.9  # the old run saw 90 % of the samples
    x = np.load(tmp_path / "all.npz")["embeddings"]
    np.savez(tmp_path / "part.npz", embeddings=x[keep], keys=np.array([f"{i:06d}" for i in np.flatnonzero(keep)]))
    common = ["generate", "--clusters", "3", "--heads", "2", "--epochs", "6", "--quiet"]
    assert cli(*common, "--data", tmp_path / "part.npz", "--out", tmp_path / "old", "--seed", "1").exit_code == 0
    old = read_artefact(tmp_path / "old")
    result = cli(*common, "--data", tmp_path / "all.npz", "--out", tmp_path / "new",
                 "--start-from", tmp_path / "old" / "labels.parquet")
    assert result.exit_code == 0, result.output
    new = read_artefact(tmp_path / "new")
    assert new.metadata["parents"] == [old.artefact_id]
    start = [json.loads(line) for line in (tmp_path / "new" / "history.jsonl").read_text().splitlines()
             if '"start"' in line]
    assert start[0]["from"] == old.artefact_id and start[0]["matched"] == keep.sum()
    assert start[0]["new"] == 900 - keep.sum() and start[0]["old_heads"] == [0, 1]
    # the same ids without aligning: a fresh start would number the clusters anew
    where = np.searchsorted(new.sample_ids, old.sample_ids)
    for h in range(2):
        assert (new.labels(h)[where] == old.labels(h)).mean() > 0.95
    assert (y[new.sample_ids.astype(int)] >= 0).all()
    # a K the old artefact has no head of, and an artefact of other samples, are refused
    wrong_k = cli(*common[:1], "--clusters", "4", "--heads", "1", "--epochs", "2", "--data", tmp_path / "all.npz",
                  "--out", tmp_path / "k4", "--start-from", tmp_path / "old")
    assert wrong_k.exit_code == 2 and "none of the run's K = [4]" in wrong_k.output
    Artefact.build(_ids(5), [0, 1, 2, 0, 1], 3).write(tmp_path / "other.parquet")
    other = cli(*common, "--data", tmp_path / "all.npz", "--out", tmp_path / "o",
                "--start-from", tmp_path / "other.parquet")
    assert other.exit_code == 2 and "none of its 5 sample ids" in other.output
    missing = cli(*common, "--data", tmp_path / "all.npz", "--out", tmp_path / "m", "--start-from", tmp_path / "nope")
    assert missing.exit_code != 0 and "nope" in missing.output


def test_predict_votes_the_runs_consensus_head_and_names_it(tmp_path):
    _overlapping_blobs(tmp_path, n=600, k=3)
    run = tmp_path / "run"
    assert cli("generate", "--data", tmp_path / "all.npz", "--clusters", "3", "--heads", "3", "--epochs", "4",
               "--consensus", "--quiet", "--out", run).exit_code == 0
    own = read_artefact(run)
    assert own.num_heads == 4 and own.primary_head == 3
    result = cli("name", run, "--set", "0=a", "--set", "1=b", "--set", "2=c")  # the primary head by default
    assert result.exit_code == 0 and "head 3 has 3 of 3 clusters named" in result.output, result.output
    result = cli("predict", run, "--data", tmp_path / "all.npz", "--out", tmp_path / "p.parquet")
    assert result.exit_code == 0, result.output
    predicted = read_artefact(tmp_path / "p.parquet")
    assert predicted.num_heads == 4 and predicted.primary_head == 3
    where = np.searchsorted(own.sample_ids, predicted.sample_ids)
    assert (predicted.labels(3) == own.labels(3)[where]).mean() > 0.95
    assert predicted.table.column("name_3").to_pylist() == ["abc"[c] for c in predicted.labels(3)]
    # the vote uses the training run's maps: one new sample alone gets the same consensus as among all of them
    np.savez(tmp_path / "one.npz", embeddings=np.load(tmp_path / "all.npz")["embeddings"][:1],
             keys=np.array([predicted.sample_ids[0]]))
    assert cli("predict", run, "--data", tmp_path / "one.npz", "--out", tmp_path / "one.parquet").exit_code == 0
    assert read_artefact(tmp_path / "one.parquet").labels(3)[0] == predicted.labels(3)[0]


def test_predict_takes_each_heads_argmax_chunk_by_chunk(monkeypatch):
    import torch

    from labelkit.training import SelaModel, create_backbone
    from labelkit.training._predict import _heads_argmax

    torch.manual_seed(0)
    model = SelaModel(create_backbone("labelkit_cnn", 16), [7, 5]).eval()
    features = torch.randn(1000, model.heads[0].in_features)
    expected = [torch.softmax(head(features), dim=1).max(dim=1) for head in model.heads]
    rows = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, *a: rows.append(len(x)) or linear(x, *a))
    labels, scores = _heads_argmax(model, features, torch.device("cpu"), chunk=64)
    assert max(rows) == 64 and sum(rows) == 2 * 1000  # never more than a chunk of logits at once
    for h, (score, label) in enumerate(expected):
        assert np.array_equal(labels[h], label.numpy())
        assert np.allclose(scores[h], score.detach().numpy(), atol=1e-6)


# -- confidence --------------------------------------------------------------------------------------------------


def test_the_solver_reports_the_networks_probability_of_each_label():
    import torch

    from labelkit.solver import solve

    logits = torch.randn(300, 6, generator=torch.Generator().manual_seed(0)) * 2
    result = solve(logits)
    expected = torch.softmax(logits, 1)[torch.arange(300), torch.from_numpy(result.labels).long()]
    assert np.allclose(result.posterior, expected.numpy(), atol=1e-5)
    assert result.posterior.std() > 0.05  # unlike q(label | i) at lambda 25, it tells rows apart


def test_consensus_confidence_counts_only_the_heads_that_agree():
    from labelkit.quality import consensus_labels

    labels = np.array([[0, 0, 1, 1], [0, 0, 1, 0], [1, 1, 0, 0]])  # head 2 is head 0 with the ids swapped
    scores = np.array([[0.9, 0.5, 0.8, 0.7], [0.6, 0.4, 0.2, 0.3], [1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    result = consensus_labels(labels, [2, 2, 2], scores=scores)
    assert result.labels.tolist() == [0, 0, 1, 1]
    assert np.allclose(result.confidence, [(0.9 + 0.6 + 1) / 3, (0.5 + 0.4 + 1) / 3, (0.8 + 0.2 + 1) / 3,
                                           (0.7 + 0 + 1) / 3])  # head 1 disagrees on the last sample


def _overlapping_blobs(tmp_path, n=900, k=3, left_out=None, spread=2.2):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(k, 6)) * spread  # close enough that some samples land in the wrong cluster
    y = rng.integers(0, k, n)
    x = (centres[y] + rng.normal(size=(n, 6))).astype(np.float32)
    keep = y != left_out
    np.savez(tmp_path / "all.npz", embeddings=x, labels=y)
    np.savez(tmp_path / "train.npz", embeddings=x[keep], labels=y[keep],
             keys=np.array([f"{i:06d}" for i in np.flatnonzero(keep)]))
    return y


def test_confidence_ranks_the_wrong_labels_low(tmp_path):
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import roc_auc_score

    # closer than the other tests' blobs: the table's spectral start labels those all but 0.3 % right
    y = _overlapping_blobs(tmp_path, spread=1.3)
    assert cli("generate", "--data", tmp_path / "all.npz", "--clusters", "3", "--heads", "1", "--quiet",
               "--out", tmp_path / "run").exit_code == 0
    art = read_artefact(tmp_path / "run")
    labels, confidence = art.labels(art.primary_head), art.confidence()
    table = np.zeros((3, 3))
    np.add.at(table, (labels, y), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    wrong = cols[np.argsort(rows)][labels] != y
    assert 0.02 < wrong.mean() < 0.3
    assert roc_auc_score(wrong, -confidence) > 0.8
    # export keeps the confident ones and says so in the Hub card
    result = cli("export", tmp_path / "run", "--format", "hub", "--min-confidence", "0.9", "--out", tmp_path / "hub")
    assert result.exit_code == 0, result.output
    kept = int((confidence >= 0.9).sum())
    assert f"{kept:,} of 900 samples" in result.output
    assert f"These are {kept:,} of the 900 samples" in (tmp_path / "hub" / "README.md").read_text()
    subset = read_artefact(tmp_path / "hub")
    assert subset.num_samples == kept and subset.metadata["parents"] == [art.artefact_id]
    assert subset.metadata["method"]["subset"] == {"min_confidence": 0.9, "kept": kept, "of": 900}


def test_transfer_trains_on_the_confident_labels_only():
    from labelkit.training._transfer import _trusted

    art = Artefact.build(_ids(5), [0, 1, 0, 1, 0], 2, scores=[[0.9, 0.2, 0.6, 0.95, 0.1]])
    rows = np.array([4, 0, -1, 1, 2, 3])  # the data's samples in the artefact (-1: no label)
    report = {}
    assert _trusted(art, rows, 0.5, report).tolist() == [False, True, False, False, True, True]
    assert report == {"confident": 3}
    assert _trusted(art, rows, None, {}).tolist() == [True, True, False, True, True, True]
    with pytest.raises(ConfigError, match="no label is that confident"):
        _trusted(art, rows, 0.99, {})


# -- none of these -----------------------------------------------------------------------------------------------


def test_predict_flags_samples_of_a_cluster_it_never_saw(tmp_path):
    from sklearn.metrics import roc_auc_score

    y = _overlapping_blobs(tmp_path, n=1200, k=4, left_out=3)
    run = tmp_path / "run"
    assert cli("generate", "--data", tmp_path / "train.npz", "--clusters", "3", "--heads", "1", "--quiet",
               "--out", run).exit_code == 0
    thresholds = {}
    for method in ("knn", "prototype"):
        out = tmp_path / f"{method}.parquet"
        result = cli("predict", run, "--data", tmp_path / "all.npz", "--novelty", method, "--out", out)
        assert result.exit_code == 0, result.output
        art = read_artefact(out)
        assert check_artefact(out) == []
        ids = art.sample_ids.astype(int)
        novel = y[ids] == 3
        score, flagged = art.table.column("novelty").to_numpy(), art.table.column("novel").to_numpy(False)
        assert roc_auc_score(novel, score) > 0.9, method
        assert flagged[novel].mean() > 0.5 and flagged[~novel].mean() < 0.15, method
        assert art.metadata["method"]["novelty"]["fpr"] == 0.05
        thresholds[method] = art.metadata["method"]["novelty"]["threshold"]
        assert (run / f"novelty-{method}.safetensors").is_file()
    (tmp_path / "train.npz").unlink()  # calibrated once: the training data is not read again
    result = cli("predict", run, "--data", tmp_path / "all.npz", "--novelty", "--novelty-fpr", "0.2",
                 "--out", tmp_path / "again.parquet")
    assert result.exit_code == 0, result.output
    again = read_artefact(tmp_path / "again.parquet").metadata["method"]["novelty"]
    assert again["method"] == "knn" and again["fpr"] == 0.2 and again["threshold"] < thresholds["knn"]
    table = pq.read_table(tmp_path / "again.parquet")
    flipped = table.column("novel").to_pylist()
    flipped[0] = not flipped[0]
    pq.write_table(table.set_column(table.column_names.index("novel"), "novel", pa.array(flipped)),
                   tmp_path / "edited.parquet")
    assert any("column 'novel' disagrees" in p for p in check_artefact(tmp_path / "edited.parquet"))
