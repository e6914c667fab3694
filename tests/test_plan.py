"""The auto recipe, the time budget, the plan and --dry-run, and the graph start."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from labelkit.training import resolve_config
from labelkit.errors import ConfigError, DataError
from labelkit.training import BudgetError, Plan, auto_recipe, make_plan, parse_duration, profile_data
from labelkit.training._plan import check_memory
from labelkit.training import label_schedule

from conftest import write_image


def _digit_folder(root, count=120, size=20, seed=0):
    """Grey images of two kinds (a bar and a ring) with noise: a folder that is easy to cluster."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2
    shapes = [(np.abs(xx) < 2) * 200.0, (np.abs(np.hypot(xx, yy) - size / 3) < 1.5) * 200.0]
    for i in range(count):
        kind = i % 2
        pixels = np.roll(shapes[kind], rng.integers(-2, 3, 2), axis=(0, 1)) + rng.normal(0, 10, (size, size))
        path = root / str(kind) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return root


@pytest.mark.parametrize("text, seconds", [("15m", 900), ("2h", 7200), ("1h30m", 5400), ("90s", 90), ("10", 600),
                                           ("1.5h", 5400), (" 2 m ", 120)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "", "15 minutes please", "0m", "m", "-5m"])
def test_an_unreadable_budget_is_one_line_naming_the_option(text):
    with pytest.raises(ConfigError, match="--budget"):
        parse_duration(text)


def test_even_label_spacing_solves_after_every_epoch():
    assert label_schedule(10, 11, "even") == list(range(11))
    assert label_schedule(10, 11) != list(range(11))  # the paper's quadratic spacing is the default


def test_profile_sees_small_grey_images(tmp_path):
    from labelkit.data import resolve

    profile = profile_data(resolve(str(_digit_folder(tmp_path / "d", count=30))))
    assert profile["samples"] == 30 and profile["grey"] and profile["side_median"] == 20


def test_auto_recipe_fits_small_grey_images_and_colour_photos():
    cpu = {"device": "cpu", "cores": 2}
    small, why = auto_recipe({"samples": 10_000, "side_median": 28, "grey": True}, cpu, clusters_given=True)
    assert (small["arch"], small["image_size"], small["augment"], small["start"]) == ("labelkit_cnn", 16, "digits", "graph")
    assert set(why) >= {"arch", "image_size", "augment", "start"}
    photos, _ = auto_recipe({"samples": 5_000, "side_median": 375, "grey": False}, cpu, clusters_given=True)
    assert photos["augment"] == "paper" and photos["image_size"] < 224 and photos["arch"] != "labelkit_cnn"
    gpu, _ = auto_recipe({"samples": 5_000, "side_median": 375, "grey": False},
                         {"device": "cuda", "cores": 8}, clusters_given=True)
    assert gpu["image_size"] == 224
    huge, _ = auto_recipe({"samples": 2_000_000, "side_median": 375, "grey": False}, cpu, clusters_given=True)
    assert huge["start"] == "random"


def test_without_k_the_heads_over_cluster_and_truth_is_never_used():
    recipe, why = auto_recipe({"samples": 10_000, "side_median": 28, "grey": True}, {"device": "cpu", "cores": 2},
                              clusters_given=False)
    assert recipe["clusters"] == (10, 30, 100) and recipe["heads"] == 3 and "never" in why["clusters"]


def test_builtin_digits_keeps_its_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out, runs/digits, may hold the demo's finished run
    plan = make_plan({}, probe=False)
    assert plan.recipe == "digits" and plan.config == resolve_config({})
    assert plan.budget is None  # no default budget outside the auto recipe


def test_options_given_win_over_the_auto_recipe_and_need_no_reason(tmp_path):
    data = _digit_folder(tmp_path / "d")
    plan = make_plan({"data": str(data), "arch": "resnet18", "image_size": 24, "epochs": 2, "clusters": (2,),
                      "out": str(tmp_path / "run")}, budget="1h", probe=True)
    assert (plan.config.arch, plan.config.image_size, plan.config.epochs) == ("resnet18", 24, 2)
    assert "arch" not in plan.reasons and "augment" in plan.reasons
    assert plan.estimate["seconds"] > 0 and plan.probe["train_images_per_s"] > 0


PROBE = {"train_images_per_s": 100.0, "label_images_per_s": 1000.0, "solve_s_per_step": 0.1, "startup_s": 2.0,
         "graph_s": 1.0, "feature_dim": 128, "thumbnail_pixels": 768, "checkpoint_bytes": 10**6}


def test_the_budget_sets_the_epochs(tmp_path, monkeypatch):
    import labelkit.training._plan

    monkeypatch.setattr(labelkit.training._plan, "_probe", lambda config, source: dict(PROBE))
    data = str(_digit_folder(tmp_path / "d"))  # 120 images: 1.2 s an epoch, 0.22 s a label step
    short = make_plan({"data": data, "clusters": (2,)}, budget="20s")
    long = make_plan({"data": data, "clusters": (2,)}, budget="10m")
    # 0.8 x 20 s, less start-up, graph start, the vote after the last epoch (a pass, like the graph start's) and
    # the last label step (11.78 s), over 1.2 s an epoch and the recipe's share of label steps (13 of 60 epochs
    # x 0.22 s): 9 epochs
    assert short.config.epochs == 9 and long.config.epochs == labelkit.training._plan.AUTO_MAX_EPOCHS
    assert long.config.label_steps == 13  # graph start: a label step every 5 epochs
    # 13 x 9 / 60 rounds to 2, but a run keeps the steps at the start, the middle and the end
    assert short.config.label_steps == 3 and short.estimate["label_steps"] == 2  # the start replaces the first
    assert short.estimate["seconds"] == pytest.approx(4 + 9 * 1.2 + 2 * 0.22, abs=0.05) and short.estimate["seconds"] <= 0.8 * 20
    # the larger of the label step (float32 features + bf16 kernel) and the graph start's thumbnails (twice)
    assert short.estimate["label_memory"] == max(120 * 128 * 4 + 120 * 2 * 2, 2 * 120 * 768 * 4)


def test_a_budget_too_short_for_one_epoch_is_one_line(tmp_path, monkeypatch):
    import labelkit.training._plan

    monkeypatch.setattr(labelkit.training._plan, "_probe", lambda config, source: dict(PROBE))
    data = str(_digit_folder(tmp_path / "d"))
    with pytest.raises(BudgetError, match="too short for one epoch"):
        make_plan({"data": data, "clusters": (2,)}, budget="4s")


def test_images_of_wildly_different_sizes_ask_for_an_image_size(tmp_path):
    root = tmp_path / "mixed"
    write_image(root / "a.png", size=(16, 16))
    write_image(root / "b.png", size=(600, 400), seed=1)
    with pytest.raises(DataError, match="wildly different sizes.*--image-size"):
        make_plan({"data": str(root)})
    assert make_plan({"data": str(root), "image_size": 32, "clusters": (2,)}, probe=False).config.image_size == 32


def test_a_label_step_larger_than_memory_stops_up_front():
    plan = Plan(config=resolve_config({}), recipe="auto", machine={"device": "cpu", "ram_available": 10**9})
    with pytest.raises(BudgetError, match="--clusters"):
        check_memory(plan, 2 * 10**9)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    from labelkit.cli import main as cli

    data = _digit_folder(tmp_path / "d")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["generate", "--data", str(data), "--clusters", "2", "--dry-run", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "plan: recipe auto" in result.output and "estimate:" in result.output and "start: graph" in result.output
    assert "(120 samples, 20 px grey)" in result.output
    assert "settle: 0.97" in result.output and "wall time for every epoch" in result.output  # it may end sooner
    assert "vote: 10" in result.output  # small images in the graph start's range get the neighbour vote
    assert not out.exists()
    bad = CliRunner().invoke(cli, ["generate", "--data", str(data), "--budget", "soon", "--out", str(out)])
    assert bad.exit_code != 0 and "--budget 'soon'" in bad.output and not out.exists()


def test_spectral_labels_beat_kmeans_on_the_pixels_of_digits():
    from sklearn.cluster import KMeans
    from sklearn.datasets import load_digits
    from sklearn.metrics import normalized_mutual_info_score

    from labelkit.training import spectral_labels

    x, truth = load_digits(return_X_y=True)
    kmeans = normalized_mutual_info_score(truth, KMeans(10, n_init=3, random_state=0).fit_predict(x))  # 0.74
    scores = []
    for seed in range(3):
        labels, info = spectral_labels(x, [10, 20], seed=seed)
        assert labels.shape == (2, len(x)) and labels[1].max() == 19 and info["neighbours"] == 10
        scores.append(normalized_mutual_info_score(truth, labels[0]))
    assert min(scores) > kmeans and np.mean(scores) > kmeans + 0.05  # measured: 0.867, 0.844, 0.775


def test_the_vector_start_reads_k_eigenvectors_and_smooths_its_labels_on_the_graph():
    from sklearn.datasets import load_digits
    from sklearn.metrics import normalized_mutual_info_score

    from labelkit.training import spectral_labels
    from labelkit.training._graph import _smoothed

    x, truth = load_digits(return_X_y=True)
    scores = {}
    for seed in range(3):
        for per_k, smooth in ((2, False), (1, False), (1, True)):
            labels, info = spectral_labels(x, [10], seed=seed, per_k=per_k, smooth=smooth)
            assert info["dims"] == 10 * per_k and info["smoothed"] == smooth
            scores.setdefault((per_k, smooth), []).append(normalized_mutual_info_score(truth, labels[0]))
    # measured (seeds 0-2): 2K eigenvectors 0.867 / 0.844 / 0.775, K 0.877 / 0.892 / 0.892, smoothed 0.889 / 0.905 / 0.905
    assert all(k > two for k, two in zip(scores[1, False], scores[2, False]))
    assert all(after > before for after, before in zip(scores[1, True], scores[1, False]))
    assert min(scores[1, True]) > 0.88
    # two groups of four joined by one weak edge, one member of each mislabelled: each moves to its group's label
    import itertools

    import scipy.sparse as sp

    edges = [*itertools.combinations(range(4), 2), *itertools.combinations(range(4, 8), 2), (3, 4)]
    weights = [1.0] * (len(edges) - 1) + [0.1]
    graph = sp.coo_matrix((weights, tuple(zip(*edges))), shape=(8, 8)).tocsr()
    graph = graph.maximum(graph.T)
    assert _smoothed(graph, np.array([0, 0, 0, 1, 1, 1, 1, 0]), 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_each_scaling_finds_its_kind_of_classes_and_both_find_either():
    """Features of a network often hold the classes in directions of little variance beside a few large ones
    (bench/suite.py's feature tables): whitening the principal directions finds them. Pixels often hold them
    in the large directions, beside many small ones that whitening scales up to noise as large. "both" joins the
    two graphs' eigenvectors and finds either kind."""
    from sklearn.metrics import normalized_mutual_info_score

    from labelkit.training import spectral_labels

    rng = np.random.default_rng(0)
    two = rng.integers(0, 2, 600)
    small = np.concatenate([(2.0 * two - 1)[:, None] + 0.2 * rng.normal(size=(600, 1)),
                            20 * rng.normal(size=(600, 3)), rng.normal(size=(600, 4))], axis=1)
    three = rng.integers(0, 3, 600)
    large = np.concatenate([10.0 * (three[:, None] - 1) + rng.normal(size=(600, 1)),
                            0.3 * rng.normal(size=(600, 30))], axis=1)
    scores = {}
    for name, x, classes in (("small", small, two), ("large", large, three)):
        for whiten in ("no", "yes", "both"):
            labels, info = spectral_labels(x, [int(classes.max()) + 1], seed=0, per_k=1, smooth=True, whiten=whiten)
            assert info["whiten"] == whiten
            scores[name, whiten] = normalized_mutual_info_score(classes, labels[0])
    # measured: small 0.000 / 1.000 / 0.728, large 1.000 / 0.074 / 1.000
    assert scores["small", "yes"] > 0.95 and scores["small", "no"] < 0.1, scores
    assert scores["large", "no"] > 0.95 and scores["large", "yes"] < 0.2, scores
    assert scores["small", "both"] > 0.6 and scores["large", "both"] > 0.95, scores


def test_a_graph_in_pieces_is_bridged_so_separate_groups_stay_separate():
    from sklearn.datasets import make_moons
    from sklearn.metrics import normalized_mutual_info_score

    from labelkit.training import spectral_labels

    x, truth = make_moons(600, noise=0.05, random_state=0)  # two clean moons: a 10-NN graph in two pieces
    labels, info = spectral_labels(x, [2], seed=0)
    assert info["components"] == 1
    assert normalized_mutual_info_score(truth, labels[0]) > 0.99  # k-means on x itself gives about 0.19


def test_a_large_graph_start_takes_lobpcg_and_finds_the_groups_a_small_one_finds_with_arpack():
    from sklearn.metrics import normalized_mutual_info_score

    from labelkit.training import spectral_labels
    from labelkit.training._graph import LOBPCG_ROWS

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 32)) * 0.8
    for n, solver in ((LOBPCG_ROWS - 1000, "arpack"), (LOBPCG_ROWS + 1000, "lobpcg")):
        truth = rng.integers(0, 8, n)
        x = (centres[truth] + rng.normal(size=(n, 32))).astype(np.float32)
        labels, info = spectral_labels(x, [8], seed=0, per_k=1, smooth=True, whiten="both")
        assert info["eigen_solver"] == solver  # the history's start record says which solver ran
        assert normalized_mutual_info_score(truth, labels[0]) > 0.95, (n, solver)


def test_an_auto_run_starts_from_the_graph_and_records_its_plan(tmp_path):
    from labelkit.artefact import read_artefact
    from labelkit.cli import main as cli

    data = _digit_folder(tmp_path / "d")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["generate", "--data", str(data), "--clusters", "2", "--epochs", "2",
                                      "--budget", "10m", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    start = next(r for r in history if r["type"] == "start")
    assert start["grey"] and start["heads"][0]["nmi"] > 0.9  # bars and rings are apart in the pixels already
    steps = [r["epoch"] for r in history if r["type"] == "label_step"]
    assert steps == [1, 2]  # the start replaced the label step at epoch 0
    record = json.loads((out / "config.json").read_text())
    assert record["plan"]["recipe"] == "auto" and record["config"]["start"] == "graph"
    method = read_artefact(out / "labels.parquet").metadata["method"]
    assert method["recipe"]["recipe"] == "auto" and "augment" in method["recipe"]["reasons"]


def test_a_run_past_its_deadline_stops_between_epochs_and_says_so(tmp_path):
    from labelkit.artefact import read_artefact
    from labelkit.training import run_sela

    data = _digit_folder(tmp_path / "d")
    plan = make_plan({"data": str(data), "clusters": (2,), "epochs": 5, "out": str(tmp_path / "run")}, budget="1h")
    record = plan.record()
    record["deadline"] = plan.started  # as if the budget ran out during the first epoch (it always runs)
    run = run_sela(plan.config, plan=record)
    history = [json.loads(line) for line in run.history.read_text().splitlines()]
    assert [r["epoch"] for r in history if r["type"] == "epoch"] == [1]
    assert [r for r in history if r["type"] == "budget"][0]["epochs"] == 5
    assert read_artefact(run.artefact).metadata["method"]["recipe"]["stopped_after_epoch"] == 1


def _settling_plan(tmp_path, settle: float, name: str = "run"):
    data = _digit_folder(tmp_path / "d")  # bars and rings: two clusters whose labels settle within a few steps
    return make_plan({"data": str(data), "clusters": (2, 2), "epochs": 8, "label_steps": 9, "label_spacing": "even",
                      "settle": settle, "out": str(tmp_path / f"{name}-{settle}")})


def _history(run) -> list[dict]:
    return [json.loads(line) for line in run.history.read_text().splitlines()]


def test_a_run_whose_labels_settle_stops_at_the_first_settled_label_step_and_says_so(tmp_path):
    from labelkit.artefact import read_artefact
    from labelkit.training import run_sela

    plan = _settling_plan(tmp_path, 0.97)
    run = run_sela(plan.config, plan=plan.record())
    history = _history(run)
    steps = [r for r in history if r["type"] == "label_step"]
    agreement = [np.mean([h["nmi_previous"] for h in r["heads"]]) for r in steps]
    # from the third label step on, the first whose labels agree with the previous step's at 0.97 ends training
    assert agreement[-1] >= 0.97 and all(a < 0.97 for a in agreement[2:-1]) and len(steps) >= 3
    last = steps[-1]["epoch"]
    assert last < 8 and [r["epoch"] for r in history if r["type"] == "epoch"] == list(range(1, last + 1))
    settled = [r for r in history if r["type"] == "settled"]
    assert len(settled) == 1 and settled[0]["agreement"] == pytest.approx(agreement[-1], abs=1e-4)
    recipe = read_artefact(run.artefact).metadata["method"]["recipe"]
    assert recipe["stopped_after_epoch"] == last and recipe["stopped_because"] == "settled"

    full = _settling_plan(tmp_path, 0.0)  # --settle 0: every planned epoch, as the paper
    history = _history(run_sela(full.config, plan=full.record()))
    assert [r["epoch"] for r in history if r["type"] == "epoch"] == list(range(1, 9))
    assert not [r for r in history if r["type"] == "settled"]


def test_the_command_says_where_and_why_training_stopped(tmp_path):
    from labelkit.cli import main as cli

    data = _digit_folder(tmp_path / "d")
    result = CliRunner().invoke(cli, ["generate", "--data", str(data), "--clusters", "2", "--epochs", "8",
                                      "--label-steps", "9", "--settle", "0.97", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert re.search(r"stopped after epoch \d of 8: the labels settled \(NMI (0\.9[7-9]\d|1\.000) to the previous label "
                     r"step, mean over heads; --settle 0.97\)", result.output), result.output
    assert "(mean over heads " in result.output  # each label step's line shows what --settle reads


def test_settle_judges_from_the_third_label_step_on_by_the_mean_over_heads():
    from types import SimpleNamespace

    from labelkit.training._job import Job

    job = SimpleNamespace(config=SimpleNamespace(settle=0.97), label_schedule={2, 4, 6, 8},
                          dist=SimpleNamespace(broadcast=lambda value: value))
    step = {"heads": [{"nmi_previous": 0.99}, {"nmi_previous": 0.96}]}  # mean 0.975
    assert Job._settled(job, step, 2) is None and Job._settled(job, step, 4) is None  # one and two steps
    assert Job._settled(job, step, 6) == pytest.approx(0.975)
    assert Job._settled(job, {"heads": [{"nmi_previous": 0.99}, {"nmi_previous": 0.94}]}, 6) is None
    job.label_schedule = {0, 2, 4}  # a label step before training counts for nothing
    assert Job._settled(job, step, 4) is None
    job.config.settle = 0.0
    assert Job._settled(job, step, 8) is None


def test_a_settled_run_killed_before_its_artefact_resumes_to_the_same_labels_without_training_on(tmp_path,
                                                                                                 monkeypatch):
    from labelkit.training import _sela, run_sela

    reference = run_sela(_settling_plan(tmp_path, 0.97, "reference").config)
    plan = _settling_plan(tmp_path, 0.97)
    finish = _sela._finish
    monkeypatch.setattr(_sela, "_finish", lambda *args: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        run_sela(plan.config, plan=plan.record())
    monkeypatch.setattr(_sela, "_finish", finish)
    run = run_sela(plan.config, resume=True)
    epochs = [r["epoch"] for r in _history(run) if r["type"] == "epoch"]
    assert epochs == [r["epoch"] for r in _history(reference) if r["type"] == "epoch"] and epochs[-1] < 8
    assert run.labels.metadata["method"]["recipe"]["stopped_because"] == "settled"
    assert np.array_equal(run.labels.labels(0), reference.labels.labels(0))


@pytest.mark.parametrize("settle", [-0.1, 1.5])
def test_settle_outside_0_1_is_refused(settle):
    with pytest.raises(ConfigError, match="--settle"):
        resolve_config({"settle": settle})


def test_transfer_dry_run_prints_its_plan_and_writes_nothing(tmp_path):
    from labelkit.artefact import Artefact
    from labelkit.cli import main as cli
    from labelkit.data import resolve

    data = _digit_folder(tmp_path / "d", count=40)
    source = resolve(str(data))
    labels = tmp_path / "labels.parquet"
    Artefact.build(source.ids, np.arange(40) % 2, [2], method={"name": "test"}).write(labels)
    out = tmp_path / "transfer"
    result = CliRunner().invoke(cli, ["transfer", str(labels), "--data", str(data), "--arch", "labelkit_cnn",
                                      "--image-size", "16", "--epochs", "3", "--dry-run", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "plan: transfer" in result.output and "3 epochs" in result.output and "prediction pass" in result.output
    assert not out.exists()
