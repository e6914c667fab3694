"""--train-rows: heads on fixed features train on a sample of the rows, and the last label step labels them all;
the plan takes a sample where no heads can train every epoch on every row within the budget."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from labelkit.artefact import read_artefact
from labelkit.errors import ConfigError
from labelkit.quality import agreement


def mixture(path, n=3000, k=4, d=16, seed=0):
    rng = np.random.default_rng(seed)
    truth = np.arange(n) % k
    vectors = (rng.normal(size=(k, d)) * 3)[truth] + rng.normal(size=(n, d))
    np.save(path, vectors.astype(np.float32))
    return truth


def history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_the_sample_is_seeded_drawn_from_the_kept_rows_and_none_when_it_covers_them():
    from labelkit.training._heads import training_sample

    keep = np.ones(1000, dtype=bool)
    keep[::3] = False
    sample = training_sample(200, keep, seed=5)
    assert sample.sum() == 200 and not (sample & ~keep).any()
    assert (training_sample(200, keep, seed=5) == sample).all()
    assert not (training_sample(200, keep, seed=6) == sample).all()
    assert training_sample(None, keep, 0) is None and training_sample(int(keep.sum()), keep, 0) is None


def test_heads_train_on_the_sample_and_the_last_label_step_labels_every_row(tmp_path):
    from labelkit.training import resolve_config, run_sela

    truth = mixture(tmp_path / "t.npy")
    config = resolve_config({"data": str(tmp_path / "t.npy"), "clusters": (4,), "heads": 2, "epochs": 6,
                             "label_steps": 4, "train_rows": 600, "start": "random", "out": str(tmp_path / "run"),
                             "workers": 0, "device": "cpu", "label_memory": "100000"})
    assert config.neighbours == 0  # the table recipe's neighbour term needs every row trained
    run_sela(config)
    steps = [r for r in history(tmp_path / "run") if r["type"] == "label_step"]
    assert [s["labelled"] for s in steps] == [600, 600, 600, 3000]
    # each solve covers the rows it labels: 4 equal clusters of the 600, then of all 3,000
    assert [{(h["size_min"], h["size_max"]) for h in s["heads"]} for s in steps] == [{(150, 150)}] * 3 + [{(750, 750)}]
    # 100 kB hold the kernel and features of the 600 rows of the sample, not of all 3,000: every step keeps its kernel
    # and features on disk, as the last does, so that the run's peak memory is the last step's
    assert all(s["features"] == "disk" and {h["kernel"] for h in s["heads"]} == {"disk"} for s in steps)
    # the last step's agreement with the step before, and the labels' stability, are measured on the rows both
    # labelled: the sample
    assert min(h["nmi_previous"] for h in steps[-1]["heads"]) > 0.9
    quality = next(r for r in history(tmp_path / "run") if r["type"] == "quality")
    assert min(h["stability"] for h in quality["heads"]) > 0.9
    epochs = [r for r in history(tmp_path / "run") if r["type"] == "epoch"]
    assert len(epochs) == 6
    labels = read_artefact(tmp_path / "run" / "labels.parquet").label_matrix()
    assert labels.shape == (2, 3000)
    for head in labels:  # equal sizes over every row, and the blobs found
        assert (np.bincount(head, minlength=4) == 750).all()
        assert agreement(head, truth)["nmi"] > 0.95


def test_a_run_that_stops_early_still_labels_every_row(tmp_path):
    from labelkit.training import resolve_config, run_sela

    mixture(tmp_path / "t.npy")
    config = resolve_config({"data": str(tmp_path / "t.npy"), "clusters": (4,), "heads": 1, "epochs": 12,
                             "label_steps": 6, "train_rows": 500, "settle": 0.01, "start": "random",
                             "out": str(tmp_path / "run"), "workers": 0, "device": "cpu"})
    run_sela(config)
    records = history(tmp_path / "run")
    stop = next(i for i, r in enumerate(records) if r["type"] == "settled")
    last = [r for r in records[stop:] if r["type"] == "label_step"]
    assert len(last) == 1 and last[0]["labelled"] == 3000 and last[0]["epoch"] == records[stop]["epoch"] < 12
    assert all(r["labelled"] == 500 for r in records[:stop] if r["type"] == "label_step")
    assert read_artefact(tmp_path / "run" / "labels.parquet").label_matrix().shape == (1, 3000)


def test_a_run_the_budget_stops_labels_every_row_once(tmp_path):
    import time

    from labelkit.training import resolve_config, run_sela

    mixture(tmp_path / "t.npy")
    config = resolve_config({"data": str(tmp_path / "t.npy"), "clusters": (4,), "heads": 1, "epochs": 12,
                             "label_steps": 3, "train_rows": 500, "start": "random", "out": str(tmp_path / "run"),
                             "workers": 0, "device": "cpu"})
    run_sela(config, plan={"deadline": time.time() - 1})  # as if the budget were spent already
    records = [r for r in history(tmp_path / "run") if r["type"] in ("label_step", "budget", "epoch")]
    assert [(r["type"], r.get("labelled")) for r in records] == [
        ("label_step", 500), ("epoch", None), ("budget", None), ("label_step", 3000)]


def test_train_rows_is_refused_where_it_cannot_apply(tmp_path):
    from labelkit.training import resolve_config

    np.save(tmp_path / "t.npy", np.zeros((50, 4), np.float32))
    table = {"data": str(tmp_path / "t.npy"), "clusters": (8,)}
    with pytest.raises(ConfigError, match="--train-rows samples the rows that heads on fixed features train on"):
        resolve_config({"data": "builtin:digits", "train_rows": 500})
    with pytest.raises(ConfigError, match="--train-rows 5 is fewer than the 8 clusters of a head"):
        resolve_config({**table, "train_rows": 5})
    with pytest.raises(ConfigError, match="--train-rows cannot go with --neighbours"):
        resolve_config({**table, "train_rows": 20, "neighbours": 5})
    assert resolve_config({**table, "train_rows": 20}).neighbours == 0
    assert resolve_config(table).neighbours == 10


def probed(monkeypatch, tmp_path, training: float, solve: float) -> dict:
    """The plan's probe of a 4,000 x 8 table replaced by fixed costs: heads train ``training`` / (heads x (hidden +
    100)) rows a second, a label step solves in ``solve`` s, reading and whitening are free. Returns the options."""
    import labelkit.training._timing as timing

    def rates(config, n, width):
        work = config.heads * ((config.head_hidden or 0) + 100)
        return {"train_rows_per_s": training / work, "label_rows_per_s": 1e6, "solve_s_per_step": solve,
                "feature_dim": config.head_hidden or width, "kernel": "stored"}

    def probe(config, source):
        return {**rates(config, len(source), 8), "rows_read_per_s": 1e12, "rows_whitened_per_s": 1e12,
                "random_read_s_per_row": 0.0, "width": 8, "whiten_fit_s": 0.3, "head_seed_s": 0.1,
                "head_check_s": 0.2, "probe_s": 0.0}

    monkeypatch.setattr(timing, "_head_rates", rates)
    monkeypatch.setattr(timing, "_table_probe", probe)
    np.save(tmp_path / "t.npy", np.random.default_rng(0).normal(size=(4000, 8)).astype(np.float32))
    return {"data": str(tmp_path / "t.npy"), "clusters": (4,), "out": str(tmp_path / "run"), "neighbours": 0}


def test_the_plan_trains_on_a_sample_where_no_heads_train_every_epoch_on_every_row(tmp_path, monkeypatch):
    """With the probed costs of test_frozen's leaner-heads test: where no rung trains all 50 epochs on all 4,000
    rows in 12 s, the plan trains on the largest sample it can (one linear head trains the most rows); where
    even SAMPLE_LEAST rows a cluster do not fit, it falls back to the rung that trains the most epochs."""
    from labelkit.training._plan import make_plan
    from labelkit.training._table_plan import SAMPLE_LEAST

    options = probed(monkeypatch, tmp_path, training=1e6, solve=1.0)
    plan = make_plan(options, budget="1h")  # everything fits: no sample
    assert plan.config.train_rows is None and "train_rows" not in plan.reasons
    plan = make_plan(options, budget="15s")
    rows = plan.config.train_rows
    assert (plan.config.heads, plan.config.head_hidden, plan.config.epochs) == (1, None, 50)
    assert SAMPLE_LEAST * 4 <= rows < 4000 and f"{rows:,} of 4,000 rows, at random" in plan.reasons["train_rows"]
    assert plan.estimate["per_epoch_s"] == pytest.approx(rows / 1e4, abs=0.005)  # rounded to 0.01 s
    # the probe's time (none) and 1 s to start and end, the whitening's fit (0.3 s), the graph start of 4,000 rows
    # (1.8 s for each of its two graphs: the vectors as they are and whitened), the one head's centroid start and
    # checks (0.1 + 0.2 s), 50 epochs of the sample, the 4 label steps of it that follow and a last one of all
    # 4,000 rows (a pass at 1e6 rows a second and a solve of 1 s per 4,000 rows), within the 12 s planned
    row = 1e-6 + 1.0 / 4000
    expected = 1.0 + 0.3 + 2 * 4.5e-4 * 4000 + 0.1 + 0.2 + 50 * rows / 1e4 + 4 * rows * row + 4000 * row
    assert plan.estimate["seconds"] == pytest.approx(expected, abs=0.1) and expected <= 12
    bigger = make_plan({**options, "train_rows": rows + 400}, budget="15s")  # given: kept, and not all epochs fit
    assert bigger.config.train_rows == rows + 400 and bigger.config.epochs < 50
    plan = make_plan({**options, "clusters": (40,)}, budget="15s")  # 100 rows a cluster is every row: no sample
    assert plan.config.train_rows is None and plan.config.heads == 1 and 1 < plan.config.epochs < 50


def test_the_plan_takes_a_sample_where_not_one_epoch_fits_on_every_row(tmp_path, monkeypatch):
    """A table whose label steps are dear (a slow solve) and training cheap: one epoch and two label steps of
    every row exceed the budget for every rung (the 10 M mixture with the heads' doubled width), yet 50 epochs
    on a sample and one last label step of every row fit. The plan takes the sample instead of refusing."""
    from labelkit.training._budget import BudgetError
    from labelkit.training._plan import make_plan

    # no graph start (as beyond its 100,000 rows): the first labels are a label step too
    options = {**probed(monkeypatch, tmp_path, training=1e7, solve=3.0), "start": "random"}
    # the leanest rung on every row: 1.6 s fixed, an epoch of 0.04 s and two label steps of 3.004 s each
    plan = make_plan(options, budget="9s")
    assert plan.estimate["seconds"] <= 0.8 * 9 < 1.6 + 0.04 + 2 * 3.004
    assert plan.config.train_rows < 4000 and plan.config.epochs == 50 and "at random" in plan.reasons["train_rows"]
    with pytest.raises(BudgetError, match="too short for one epoch"):  # where not even a sample fits: refused
        make_plan(options, budget="6s")


def test_a_sampled_table_under_torchrun_gives_the_labels_of_one_process(tmp_path):
    mixture(tmp_path / "t.npy", n=1200, k=6, d=24)
    options = ["generate", "--data", str(tmp_path / "t.npy"), "--clusters", "6", "--heads", "1", "--epochs", "3",
               "--label-steps", "3", "--train-rows", "500", "--device", "cpu", "--workers", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "labelkit"]
    for name, command in (("two", launcher), ("one", [sys.executable, "-m", "labelkit"])):
        done = subprocess.run([*command, *options, "--out", str(tmp_path / name)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    steps = [r for r in history(tmp_path / "two") if r["type"] == "label_step"]
    assert [s["labelled"] for s in steps][-2:] == [500, 1200]
    shared, alone = (read_artefact(tmp_path / name / "labels.parquet") for name in ("two", "one"))
    assert (shared.label_matrix() == alone.label_matrix()).all() and shared.artefact_id == alone.artefact_id
