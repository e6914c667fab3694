import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from labelkit.artefact import Artefact
from labelkit.cli import main


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def artefact_path(tmp_path):
    art = Artefact.build([f"{i:03d}" for i in range(30)], np.arange(60).reshape(2, 30) % 5, 5, data={"spec": "builtin:x"},
                         method={"name": "sela", "config": {"arch": "alexnet", "clusters": 5}})
    return str(art.write(tmp_path / "labels.parquet"))


def test_every_command_has_help_with_an_example(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for name, command in main.commands.items():
        assert command.help and "Example" in command.help, name
        assert name in result.output
        sub = runner.invoke(main, [name, "--help"])
        assert sub.exit_code == 0 and "Example" in sub.output


def test_help_is_instant_without_torch():
    code = "import sys; from labelkit.cli import main; main(['--help'], standalone_mode=False); " \
           "assert 'torch' not in sys.modules and 'timm' not in sys.modules and 'pyarrow' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_python_dash_m_is_the_same_command(artefact_path):
    done = subprocess.run([sys.executable, "-m", "labelkit", "info", artefact_path, "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["num_samples"] == 30


def test_info_table_and_json(runner, artefact_path):
    result = runner.invoke(main, ["info", artefact_path])
    assert result.exit_code == 0
    assert "samples    30" in result.output and "arch=alexnet" in result.output and "head_1" in result.output
    summary = json.loads(runner.invoke(main, ["info", artefact_path, "--json"]).output)
    assert summary["heads"][1]["k"] == 5 and summary["method"]["name"] == "sela"


def test_user_errors_are_one_line_and_exit_1(runner, tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("nope")
    result = runner.invoke(main, ["info", str(bad)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "bad.parquet" in lines[0]
    assert "Traceback" not in result.output


def test_usage_errors_exit_2(runner, artefact_path):
    assert runner.invoke(main, ["export", artefact_path, "--format", "xml", "--out", "x"]).exit_code == 2
    assert runner.invoke(main, ["info"]).exit_code == 2
    assert runner.invoke(main, ["no-such-command"]).exit_code == 2


def test_validate_exit_codes_and_problem_list(runner, artefact_path, tmp_path):
    ok = runner.invoke(main, ["validate", artefact_path])
    assert ok.exit_code == 0 and "valid label artefact" in ok.output
    import pyarrow.parquet as pq

    table = pq.read_table(artefact_path)
    meta = json.loads(table.schema.metadata[b"labelkit"])
    meta["num_samples"] = 3
    broken = tmp_path / "broken.parquet"
    pq.write_table(table.slice(0, 29).replace_schema_metadata({"labelkit": json.dumps(meta)}), broken)
    result = runner.invoke(main, ["validate", str(broken)])
    assert result.exit_code == 1
    assert "INVALID (2 problems)" in result.output
    assert "num_samples=3 but the file has 29 rows" in result.output and "does not match the content" in result.output


def test_validate_against_data(runner, tmp_path):
    art = Artefact.build(["000000", "000001", "999999"], [0, 1, 1], 2)
    path = str(art.write(tmp_path / "l.parquet"))
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 3, 3), np.uint8))
    result = runner.invoke(main, ["validate", path, "--data", str(tmp_path / "d.npz")])
    assert result.exit_code == 0
    assert "in both            2" in result.output and "only in artefact   1" in result.output
    assert "compared           ids differ" in result.output


def test_export_and_import_round_trip(runner, artefact_path, tmp_path):
    out = tmp_path / "l.csv"
    assert runner.invoke(main, ["export", artefact_path, "--format", "csv", "--out", str(out)]).exit_code == 0
    imported = tmp_path / "again.parquet"
    result = runner.invoke(main, ["import", str(out), "--out", str(imported), "--clusters", "5"])
    assert result.exit_code == 0, result.output
    a = json.loads(runner.invoke(main, ["info", artefact_path, "--json"]).output)
    b = json.loads(runner.invoke(main, ["info", str(imported), "--json"]).output)
    assert a["artefact_id"] == b["artefact_id"] and b["method"]["name"] == "import"


def test_import_error_is_clear(runner, tmp_path, image_tree):
    src = tmp_path / "labels.pth"
    torch.save({"labels": torch.zeros(1, 4, dtype=torch.long)}, src)
    result = runner.invoke(main, ["import", str(src), "--image-root", str(image_tree), "--out", str(tmp_path / "x.parquet")])
    assert result.exit_code == 1 and "has 4 labels per head but the key list has 6 samples" in result.output
    assert not (tmp_path / "x.parquet").exists()


def test_data_command(runner):
    result = runner.invoke(main, ["data", "builtin:digits", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["count"] == 1797
