"""One command line that fits together (issue 36): transfer follows its source run, the artefact or run comes first
everywhere, help says what the plan decides, report and sharing use what the artefact knows, the resumed plan
tells the truth, usage errors exit 2."""

import json

import numpy as np
import pytest

from labelkit.artefact import read_artefact

from conftest import cli as _cli
from conftest import write_image
from test_sela import _blobs

GENERATE = ["generate", "--arch", "labelkit_cnn", "--clusters", "3", "--heads", "2", "--epochs", "2",
            "--label-steps", "2", "--image-size", "8", "--batch-size", "16", "--augment", "digits", "--workers", "0",
            "--quiet"]


@pytest.fixture
def run(tmp_path, shapes):
    out = tmp_path / "gen"
    result = _cli(*GENERATE, "--data", shapes, "--out", out)
    assert result.exit_code == 0, result.output
    return out


# -- 2. transfer follows the run it learns from ------------------------------------------------------------


def test_transfer_takes_the_source_runs_data_size_and_training_and_plans_beside_it(run, shapes):
    result = _cli("transfer", run, "--dry-run")
    assert result.exit_code == 0, result.output
    plan = result.output
    assert f"plan: transfer, recipe source, for {shapes} (48 samples)" in plan
    assert f"into {run}-transfer" in plan
    assert "alexnet at 8 px" in plan and "augment digits" in plan and "batch 16" in plan
    assert "the data the labels were made on" in plan
    assert "15:00 (the default on a CPU" in plan and "fit the 15:00 budget" in plan
    assert "estimate:" in plan and not (run.parent / "gen-transfer").exists()
    given = _cli("transfer", run, "--image-size", 12, "--epochs", 2, "--dry-run").output
    assert "alexnet at 12 px" in given and "2 epochs" in given and "fit the" not in given  # options given win
    paper = _cli("transfer", run, "--recipe", "paper", "--dry-run", "--arch", "labelkit_cnn").output
    assert "labelkit_cnn at 224 px" in paper and "90 epochs" in paper


def test_a_budget_too_short_for_one_transfer_epoch_is_refused_before_training(run):
    result = _cli("transfer", run, "--budget", "1s")
    assert result.exit_code == 2 and "--budget 0:01 is too short" in result.output
    assert not (run.parent / "gen-transfer").exists()


def test_transfer_ends_with_its_labels_against_the_source_and_the_truth(run, tmp_path):
    result = _cli("transfer", run, "--arch", "labelkit_cnn", "--epochs", 1, "--quiet", "--out", tmp_path / "t")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("head ")]
    assert len(lines) == 2 and all("keeps the source's label on" in line and "vs truth NMI" in line for line in lines)
    quality = read_artefact(tmp_path / "t").metadata["method"]["quality"]
    source = read_artefact(run)
    child = read_artefact(tmp_path / "t")
    rows = np.searchsorted(source.sample_ids, child.sample_ids)
    same = float((child.labels(0) == source.labels(0)[rows]).mean())
    assert quality["against_source"][0]["same"] == pytest.approx(same)
    assert f"{same:.1%}" in lines[0] and len(quality["truth"]) == 2
    assert read_artefact(tmp_path / "t").metadata["method"]["recipe"]["recipe"] == "source"


# -- 3. help and plan say what runs and where ---------------------------------------------------------------


def test_help_shows_what_the_plan_decides_from_beside_the_papers_value():
    from labelkit.training import TABLE_RECIPE
    from labelkit.training._recipe import AUTO_LABEL_EVERY, AUTO_MAX_EPOCHS, AUTO_SETTLE

    text = " ".join(_cli("generate", "--help").output.split())
    assert f"[auto: what fits --budget, at most {AUTO_MAX_EPOCHS}; tables: 50; builtin:digits: 40; paper: 400]" in text
    assert f"[auto: one every {AUTO_LABEL_EVERY} epochs;" in text
    assert f"[auto: {AUTO_SETTLE:g}; tables: {TABLE_RECIPE['settle']:g}; paper: 0, every epoch]" in text
    assert "[auto: runs/<the data's name>;" in text and "[auto: from the images' size" in text
    transfer = " ".join(_cli("transfer", "--help").output.split())
    assert "[source: the run that made the labels; builtin:digits: 16; paper: 224]" in transfer


def test_a_run_into_a_finished_run_directory_is_refused_before_the_probe(run, shapes, monkeypatch):
    import labelkit.training._plan as plan

    def no_probe(*args, **kwargs):
        raise AssertionError("probed")

    monkeypatch.setattr(plan, "_probe", no_probe)
    result = _cli("generate", "--data", shapes, "--clusters", 3, "--out", run)
    assert result.exit_code == 2 and "holds a finished run" in result.output
    resumed = _cli("generate", "--out", run, "--resume")
    assert resumed.exit_code == 2 and "nothing to resume" in resumed.output


def test_the_plan_says_where_the_run_writes(shapes):
    result = _cli("generate", "--data", shapes, "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].endswith(", into runs/shapes")


# -- 4. one argument style -----------------------------------------------------------------------------------


def test_the_run_or_artefact_comes_first_and_old_spellings_warn(run, shapes, tmp_path):
    result = _cli("predict", run, "--data", shapes, "--workers", 0, "--quiet")
    assert result.exit_code == 0, result.output
    predicted = run / "predicted-shapes.parquet"
    assert predicted.is_file() and read_artefact(predicted).metadata["parents"] == [read_artefact(run).artefact_id]
    old = _cli("predict", "--model", run, "--data", shapes, "--workers", 0, "--quiet", "--out", tmp_path / "p.parquet")
    assert old.exit_code == 0 and "--model is deprecated" in old.output
    assert read_artefact(tmp_path / "p.parquet").artefact_id == read_artefact(predicted).artefact_id
    both = _cli("predict", run, "--model", tmp_path, "--data", shapes)
    assert both.exit_code == 2 and "give the run once" in both.output
    new = _cli("eval", run, "--data", shapes, "--json", "--k", 5)
    legacy = _cli("eval", "knn", "--model", run, "--data", shapes, "--json", "--k", 5)
    assert new.exit_code == 0 and legacy.exit_code == 0, new.output + legacy.output
    assert json.loads(new.output) == json.loads(legacy.output.splitlines()[-1])
    assert "deprecated" in legacy.output
    assert _cli("consensus", run).exit_code == 0 and (run / "labels-consensus.parquet").is_file()
    assert _cli("export", run, "--format", "csv").exit_code == 0 and (run / "labels.csv").is_file()


# -- 5. report uses what the artefact knows ------------------------------------------------------------------


def test_report_needs_only_the_run_and_shows_each_cluster_once(run):
    result = _cli("report", run)
    assert result.exit_code == 0, result.output
    page = (run / "labels-report" / "index.html").read_text()
    assert "training.png" in page  # the run's curves, found from the artefact's folder
    for cluster in range(3):
        assert page.count(f"cluster_{cluster:05d}.png") == 1
    assert "All 3 clusters" in page and "Random clusters" not in page


# -- 6. sharing keeps what it has ----------------------------------------------------------------------------


def test_exports_and_imports_keep_scores_and_metadata(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # import writes into the current folder by default
    original = read_artefact(run)
    assert _cli("export", run, "--format", "csv", "--out", tmp_path / "l.csv").exit_code == 0
    header = (tmp_path / "l.csv").read_text().splitlines()[0]
    assert header == '"sample_id","head_0","head_1","score_0","score_1"'
    back = _cli("import", tmp_path / "l.csv", "--out", tmp_path / "from-csv.parquet")
    assert back.exit_code == 0, back.output
    from_csv = read_artefact(tmp_path / "from-csv.parquet")
    assert from_csv.artefact_id == original.artefact_id
    np.testing.assert_allclose(from_csv.scores(1), original.scores(1), rtol=1e-6)

    assert _cli("export", run, "--format", "json", "--out", tmp_path / "l.json").exit_code == 0
    assert _cli("import", tmp_path / "l.json", "--out", tmp_path / "from-json.parquet").exit_code == 0
    from_json = read_artefact(tmp_path / "from-json.parquet")
    assert from_json.metadata == original.metadata  # id, data spec and fingerprint, method, parents, created_at
    np.testing.assert_array_equal(from_json.scores(0), original.scores(0))

    document = json.loads((tmp_path / "l.json").read_text())
    document["heads"]["head_0"][0] = (document["heads"]["head_0"][0] + 1) % 3
    (tmp_path / "edited.json").write_text(json.dumps(document))
    assert _cli("import", tmp_path / "edited.json", "--out", tmp_path / "edited.parquet").exit_code == 0
    edited = read_artefact(tmp_path / "edited.parquet")
    assert edited.artefact_id != original.artefact_id and edited.metadata["parents"] == [original.artefact_id]
    assert edited.metadata["data"]["spec"] == original.metadata["data"]["spec"]

    assert _cli("export", run, "--format", "hub", "--out", tmp_path / "hub").exit_code == 0
    for src in (tmp_path / "hub", next((tmp_path / "hub" / "data").glob("*.parquet"))):
        result = _cli("import", src, "--out", tmp_path / "from-hub.parquet")
        assert result.exit_code == 0, result.output
        assert read_artefact(tmp_path / "from-hub.parquet").artefact_id == original.artefact_id
    onto_itself = _cli("import", "from-hub.parquet")
    assert onto_itself.exit_code == 2 and "is the file being imported" in onto_itself.output
    assert _cli("import", tmp_path / "hub").exit_code == 0 and read_artefact("hub.parquet").artefact_id == \
        original.artefact_id


# -- 8. the resumed plan -------------------------------------------------------------------------------------


def test_the_resumed_plan_names_the_machine_and_the_steps_that_run(tmp_path):
    data = _blobs(tmp_path / "b.npz", n=120)
    out = tmp_path / "r"
    options = ["generate", "--data", data, "--clusters", 3, "--epochs", 3, "--image-size", 8, "--workers", 0, "--quiet"]
    assert _cli(*options, "--out", out).exit_code == 0
    steps = sum(json.loads(line)["type"] == "label_step" for line in (out / "history.jsonl").read_text().splitlines())
    (out / "labels.parquet").unlink()  # as if stopped before its end
    result = _cli("generate", "--out", out, "--resume", "--dry-run")
    assert result.exit_code == 0, result.output
    first, second = result.output.splitlines()[:2]
    assert first.startswith(f"plan: recipe auto (resumed) for {data}") and " on cpu (" in first and "?" not in first
    assert f", {steps} label steps," in second


def test_auto_reasons_state_what_was_chosen():
    from labelkit.training import auto_recipe, create_backbone

    profile = {"samples": 2800, "side_median": 64, "grey": False}
    options, why = auto_recipe(profile, {"device": "cpu", "cores": 2}, clusters_given=True)
    assert options["image_size"] == 32 and "down from the images' 64 px" in why["image_size"]
    weights = sum(p.numel() for p in create_backbone("labelkit_cnn", 32).parameters())
    assert f"({weights / 1e6:.1f} M parameters before the heads)" in why["arch"]


# -- 9. exit codes and wording -------------------------------------------------------------------------------


def test_usage_errors_exit_2_and_a_lone_image_is_not_blamed_on_a_k_nobody_gave(tmp_path):
    assert _cli("generate", "--clusters", "abc", "--dry-run").exit_code == 2
    zero = _cli("generate", "--clusters", "0", "--dry-run")
    assert zero.exit_code == 2 and zero.output.startswith("Error: ")
    write_image(tmp_path / "one" / "a.png", size=(28, 28))
    lone = _cli("generate", "--data", tmp_path / "one", "--dry-run")
    assert lone.exit_code == 1 and "holds 1 sample" in lone.output and "no --clusters was given" in lone.output
    assert "K=2" not in lone.output
    many = _cli("generate", "--data", tmp_path / "one", "--clusters", 5, "--dry-run")
    assert many.exit_code == 2 and "K = 5 clusters but" in many.output
