import json

import numpy as np
import pytest
from click.testing import CliRunner

from labelkit.artefact import Artefact, read_artefact
from labelkit.cli import main
from labelkit.training import resolve_config
from labelkit.errors import DataError
from labelkit.training import EvalConfig, evaluate, knn_accuracy, linear_accuracy
from labelkit.training import TRANSFER_RECIPES, TransferConfig, run_transfer

from test_sela import _blobs


def _artefact(tmp_path, data_path, drop=0, heads=((0, 3), (1, 5))):
    data = np.load(data_path)
    n = len(data["images"])
    ids = [f"{i:06d}" for i in range(drop, n)]
    truth = data["labels"][drop:]
    labels = np.stack([truth % 3, (truth * 2 + np.arange(len(ids)) % 2) % 5])
    art = Artefact.build(ids, labels, [3, 5], method={"name": "sela"}, data={"spec": str(data_path)})
    return art, str(art.write(tmp_path / "labels.parquet"))


def _config(tmp_path, labels, data, **over):
    options = dict(labels=labels, data=data, arch="labelkit_cnn", epochs=2, batch_size=32, image_size=8,
                   workers=0, device="cpu", augment="none", out=str(tmp_path / "transfer"))
    options.update(over)
    return resolve_config(options, cls=TransferConfig, recipes=TRANSFER_RECIPES)


def test_transfer_trains_on_joined_labels_and_records_lineage(tmp_path):
    data = _blobs(tmp_path / "blobs.npz")
    parent, path = _artefact(tmp_path, data)
    run = run_transfer(_config(tmp_path, path, data, heads="1"))
    child = read_artefact(run.artefact)
    assert child.metadata["parents"] == [parent.artefact_id]
    assert child.metadata["method"]["name"] == "transfer"
    assert [h.k for h in child.heads] == [5]  # only the selected head
    assert run.matched == 120 and run.fingerprint_match
    record = json.loads((tmp_path / "transfer" / "config.json").read_text())
    assert record["heads"] == [1] and record["parents"] == [parent.artefact_id]
    info = CliRunner().invoke(main, ["info", str(run.artefact), "--json"])
    assert json.loads(info.output)["parents"] == [parent.artefact_id]


def test_transfer_coverage_errors_name_both_counts(tmp_path):
    data = _blobs(tmp_path / "blobs.npz")
    _, path = _artefact(tmp_path, data, drop=30)
    with pytest.raises(DataError, match="30 samples of .* have no label and 0 labels have no sample"):
        run_transfer(_config(tmp_path, path, data))
    run = run_transfer(_config(tmp_path, path, data, min_coverage=0.5))
    assert run.matched == 90 and run.missing_labels == 30 and not run.fingerprint_match


def test_interrupted_transfer_resumes_to_the_same_model(tmp_path):
    import torch

    from labelkit.training import Reporter

    class Interrupt(Reporter):
        def record(self, record):
            if record.get("type") == "epoch" and record["epoch"] == 3:
                raise KeyboardInterrupt  # like Ctrl-C after epoch 2's checkpoint

    data = _blobs(tmp_path / "blobs.npz")
    _, path = _artefact(tmp_path, data)
    full = run_transfer(_config(tmp_path, path, data, epochs=4, augment="digits", out=str(tmp_path / "a")))
    with pytest.raises(KeyboardInterrupt):
        run_transfer(_config(tmp_path, path, data, epochs=4, augment="digits", out=str(tmp_path / "b")),
                     reporter=Interrupt())
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    resumed = run_transfer(_config(tmp_path, path, data, epochs=4, augment="digits", out=str(tmp_path / "b")),
                           resume=True)
    assert resumed.labels.artefact_id == full.labels.artefact_id
    records = [json.loads(line) for line in (tmp_path / "b" / "history.jsonl").read_text().splitlines()]
    assert [(r["type"], r.get("epoch")) for r in records] == [("join", None), ("decoded", None),
                                                              *[("epoch", e) for e in range(1, 5)],
                                                              ("quality", None)]  # each epoch once


def test_knn_and_linear_know_the_answer():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 5
    y = np.repeat(np.arange(4), 50)
    x = centres[y] + rng.normal(size=(200, 16))
    order = rng.permutation(200)
    train, test = order[:150], order[150:]
    assert knn_accuracy(x[train], y[train], x[test], y[test], k=10) == (1.0, 1.0)
    assert linear_accuracy(x[train], y[train], x[test], y[test])[0] == 1.0
    noise = rng.normal(size=(200, 16))
    top1, top5 = knn_accuracy(noise[train], y[train], noise[test], y[test], k=10)
    assert top1 < 0.6 and top5 == 1.0  # 4 classes: top-5 always holds the answer


def test_eval_on_a_run_caches_features_and_splits_disjointly(tmp_path):
    data = _blobs(tmp_path / "blobs.npz")
    _, path = _artefact(tmp_path, data)
    run_transfer(_config(tmp_path, path, data))
    result = evaluate(EvalConfig("knn", data=data, model=str(tmp_path / "transfer"), split=0.25, k=5))
    assert result["n_train"] == 90 and result["n_test"] == 30 and result["protocol"] == "knn"
    assert list((tmp_path / "transfer").glob("features-*.npz"))
    assert result["top1"] > 0.9  # bright corner blobs are linearly obvious
    cli = CliRunner().invoke(main, ["eval", str(tmp_path / "transfer"), "--protocol", "linear", "--data", data, "--json"])
    assert cli.exit_code == 0, cli.output
    assert set(json.loads(cli.output)) == {"protocol", "top1", "top5", "n_train", "n_test"}
    with pytest.raises(DataError, match="must be disjoint"):
        evaluate(EvalConfig("knn", data=data, model=str(tmp_path / "transfer"), test=data))
    untrained = evaluate(EvalConfig("knn", data=data, arch="labelkit_cnn", image_size=8, k=5))
    # a random network's features still tell bright corner blobs apart, well above chance
    assert untrained["n_test"] == 24 and untrained["top1"] > 0.5


def test_knn_at_a_low_temperature_neither_overflows_nor_breaks_ties_by_class_index():
    import math

    from labelkit.errors import ConfigError

    # one class-1 neighbour at cosine 0.99 and three class-0 ones at 0.98: at temperature 0.005 the closer one
    # outweighs the three (e^2 > 3), where exp(0.99 / 0.005) is inf in float32 and every class would tie
    angle = lambda c: [c, math.sqrt(1 - c * c)]  # noqa: E731
    train = np.array([angle(0.99), angle(0.98), angle(0.98), angle(0.98)], dtype=np.float32)
    train[2, 1] *= -1  # the same cosine to the query, another point
    test = np.array([[1.0, 0.0]], dtype=np.float32)
    top1, _ = knn_accuracy(train, np.array([1, 0, 0, 0]), test, np.array([1]), k=4, temperature=0.005)
    assert top1 == 1.0
    top1, _ = knn_accuracy(train, np.array([1, 0, 0, 0]), test, np.array([0]), k=4, temperature=0.1)
    assert top1 == 1.0  # warmer, the three win
    with pytest.raises(ConfigError, match="--temperature must be a positive number"):
        knn_accuracy(train, np.array([1, 0, 0, 0]), test, np.array([1]), temperature=0.0)
