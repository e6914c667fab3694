"""--precision: the network's forward passes in bfloat16 on CUDA or when asked, in float32 on the CPU by default."""

import re

import pytest
import torch
from click.testing import CliRunner

from labelkit.errors import ConfigError
from labelkit.training import SelaModel, autocast, compute_dtype, create_backbone, resolve_config, train_step

from test_plan import _digit_folder

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_bfloat16_on_cuda_and_float32_on_the_cpu():
    assert compute_dtype(CUDA, "auto") == compute_dtype(CPU, "bfloat16") == compute_dtype(CUDA, "bfloat16") \
        == torch.bfloat16
    assert compute_dtype(CPU, "auto") == compute_dtype(CPU, "float32") == compute_dtype(CUDA, "float32") \
        == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_the_plan_says_when_this_cpu_would_emulate_bfloat16(tmp_path, monkeypatch, native):
    from labelkit.training import _plan, make_plan

    monkeypatch.setattr(_plan, "native_bfloat16", lambda: native)
    data = _digit_folder(tmp_path / "d", count=40)
    plan = make_plan({"data": str(data), "clusters": (2,), "epochs": 1, "precision": "bfloat16",
                      "out": str(tmp_path / "run")})
    assert ("bfloat16 emulated by this CPU, slower than float32" in plan.lines()[0]) == (not native)
    assert plan.precision == "bfloat16"


def test_an_unknown_precision_is_one_line_naming_the_option(tmp_path):
    with pytest.raises(ConfigError, match="--precision"):
        resolve_config({"precision": "half", "out": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="--precision"):
        compute_dtype(CPU, "half")


def test_a_bfloat16_step_computes_in_bfloat16_and_keeps_float32_weights():
    images, labels = torch.rand(16, 3, 16, 16), torch.randint(0, 3, (2, 16))
    losses, outputs, features = {}, {}, {}
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = SelaModel(create_backbone("labelkit_cnn", 16), [3, 3])
        with torch.no_grad(), autocast(CPU, precision):
            features[precision] = model.features(images)
            outputs[precision] = model(images)[0]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses[precision] = float(train_step(model, optimizer, images, labels, CPU, precision))
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert features["float32"].dtype == torch.float32 and features["bfloat16"].dtype == torch.bfloat16
    # the same network: bfloat16 keeps about 3 significant digits of the float32 logits
    assert torch.allclose(outputs["bfloat16"], outputs["float32"], atol=0.05, rtol=0.02)
    assert not torch.equal(outputs["bfloat16"], outputs["float32"])
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)


def test_under_bfloat16_on_the_cpu_the_heads_compute_in_float32():
    torch.manual_seed(0)
    model = SelaModel(create_backbone("labelkit_cnn", 16), [3, 5])
    images = torch.rand(8, 3, 16, 16)
    with torch.no_grad(), autocast(CPU, "bfloat16"):
        features = model.features(images)
        logits = model(images)
    assert features.dtype == torch.bfloat16
    for h, out in enumerate(logits):
        weight, bias = model.heads[h].weight, model.heads[h].bias
        assert out.dtype == torch.float32
        # exactly the float32 product of the bfloat16 features, not a bfloat16 product rounded to 8 bits
        assert torch.allclose(out, features.float() @ weight.T + bias, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(out, (features @ weight.T.bfloat16() + bias.bfloat16()).float(), rtol=1e-4, atol=1e-5)


def test_a_run_says_and_records_what_it_computed_in(tmp_path, monkeypatch):
    from labelkit.artefact import read_artefact
    from labelkit.cli import main as cli
    from labelkit.training import _predict, run_predict

    data = _digit_folder(tmp_path / "d", count=40)
    asked = []  # predict computes as the run did
    monkeypatch.setattr(_predict, "autocast", lambda device, how: asked.append(how) or autocast(device, how))
    for precision in ("float32", "bfloat16"):
        asked.clear()
        out = tmp_path / precision
        result = CliRunner().invoke(cli, ["generate", "--data", str(data), "--clusters", "2", "--epochs", "1",
                                          "--precision", precision, "--out", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
        assert re.search(rf"with labelkit_cnn \(.* parameters with the heads, {precision}\)", result.output)
        assert read_artefact(out / "labels.parquet").metadata["method"]["precision"] == precision
        planned = CliRunner().invoke(cli, ["generate", "--data", str(data), "--clusters", "2", "--budget", "1m",
                                           "--precision", precision, "--out", str(tmp_path / "plan"), "--dry-run"])
        assert re.search(rf"plan: .* on cpu \(\d+ cores?, {precision}\)", planned.output), planned.output
        run_predict(out, str(data), tmp_path / f"predicted-{precision}.parquet")
        assert asked == [precision]


def test_a_planned_run_keeps_its_precision_in_the_plan(tmp_path):
    from labelkit.training import make_plan

    data = _digit_folder(tmp_path / "d", count=40)
    plan = make_plan({"data": str(data), "clusters": (2,), "precision": "float32", "out": str(tmp_path / "run")},
                     budget="1m")
    assert plan.precision == "float32" and plan.record()["precision"] == "float32"


def test_heads_on_a_table_have_no_network_and_record_no_precision(tmp_path):
    import numpy as np

    from labelkit.artefact import read_artefact
    from labelkit.training import make_plan, run_sela

    rng = np.random.default_rng(0)
    table = tmp_path / "vectors.npy"
    np.save(table, np.concatenate([rng.normal(0, 1, (60, 8)), rng.normal(6, 1, (60, 8))]).astype(np.float32))
    plan = make_plan({"data": str(table), "clusters": (2,), "epochs": 1, "heads": 1, "out": str(tmp_path / "run")})
    assert plan.precision is None and "cores)" in plan.lines()[0]
    run = run_sela(plan.config, plan=plan.record())
    assert read_artefact(run.artefact).metadata["method"]["precision"] is None
