"""A newcomer's first hour: the frictions found by walking every journey on a small folder (issue 16)."""

import json
import os
import stat

import numpy as np
import pytest

from labelkit.artefact import Artefact, read_artefact
from labelkit.data import resolve

from conftest import cli as _cli
from conftest import write_image
from test_sela import _blobs

GENERATE = ["generate", "--arch", "labelkit_cnn", "--clusters", "3", "--heads", "2", "--epochs", "2",
            "--label-steps", "2", "--image-size", "8", "--batch-size", "16", "--augment", "digits", "--quiet"]


def test_same_seed_same_labels_with_any_worker_count(tmp_path):
    data = _blobs(tmp_path / "b.npz", n=96)
    ids = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        result = _cli(*GENERATE, "--data", data, "--workers", workers, "--out", out)
        assert result.exit_code == 0, result.output
        ids.append(read_artefact(out).artefact_id)
    assert ids[0] == ids[1]


def test_every_file_of_a_run_gets_the_users_normal_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        result = _cli(*GENERATE, "--data", _blobs(tmp_path / "b.npz"), "--workers", 0, "--out", tmp_path / "run")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    for path in (tmp_path / "run").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_resume_takes_the_saved_options_and_only_given_differences_are_errors(tmp_path):
    from labelkit.training import Reporter

    data = _blobs(tmp_path / "b.npz")
    out = tmp_path / "run"
    from labelkit.training import resolve_config
    from labelkit.training import run_sela

    class CtrlC(Reporter):
        def record(self, record):
            if record.get("type") == "epoch":
                raise KeyboardInterrupt

    options = dict(data=data, arch="labelkit_cnn", clusters=(3,), heads=1, epochs=3, label_steps=2, batch_size=16,
                   image_size=8, workers=0, out=str(out))
    with pytest.raises(KeyboardInterrupt):
        run_sela(resolve_config(options), reporter=CtrlC())
    clash = _cli("generate", "--out", out, "--resume", "--epochs", "5", "--quiet")
    assert clash.exit_code == 2 and "epochs: 3 -> 5" in clash.output
    result = _cli("generate", "--out", out, "--resume", "--quiet")  # nothing else: the rest comes from the run
    assert result.exit_code == 0, result.output
    assert "resuming at epoch 1 of 3" in result.output
    assert read_artefact(out).metadata["method"]["config"]["data"] == data
    finished = _cli("generate", "--out", out, "--resume", "--quiet")
    assert finished.exit_code == 2 and "nothing to resume" in finished.output


def test_resuming_a_checkpoint_of_heads_another_version_shaped_is_one_clear_error(tmp_path):
    import torch

    from labelkit.training import Reporter, resolve_config, run_sela

    class CtrlC(Reporter):
        def record(self, record):
            if record.get("type") == "epoch":
                raise KeyboardInterrupt

    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    x[:100] += 4
    np.save(tmp_path / "v.npy", x)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_sela(resolve_config(dict(data=str(tmp_path / "v.npy"), clusters=(3,), epochs=3, out=str(out))),
                 reporter=CtrlC())
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    first = saved["model"]["backbone.layer.0.weight"]  # the hidden layer reads the whitened vectors
    saved["model"]["backbone.layer.0.weight"] = torch.cat([first, first], 1)  # heads of twice the width
    torch.save(saved, out / "checkpoint.pt")
    result = _cli("generate", "--out", out, "--resume", "--quiet")
    assert result.exit_code == 2, result.output
    assert "written by another labelkit version (its model does not fit" in result.output
    assert "start afresh without --resume" in result.output and "Traceback" not in result.output


def test_ctrl_c_says_how_to_continue(tmp_path, monkeypatch):
    import labelkit.training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(labelkit.training, "run_sela", interrupted)  # where the command looks it up
    result = _cli("generate", "--data", "builtin:digits", "--out", tmp_path / "r")  # the plan reads the data first
    assert result.exit_code == 130
    assert f"labelkit generate --out {tmp_path / 'r'} --resume" in result.output


def test_truth_with_class_names_and_ids_shown_when_nothing_matches(tmp_path, shapes):
    source = resolve(str(shapes))
    art = Artefact.build(source.ids, np.array([source.targets]), [3]).write(tmp_path / "a.parquet")
    truth = tmp_path / "truth.csv"
    truth.write_text("sample_id,label\n" + "".join(f"{i},{i.split('/')[0]}\n" for i in source.ids))
    result = _cli("metrics", art, "--truth", truth, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["heads"][0]["nmi"] == pytest.approx(1.0)
    other = _blobs(tmp_path / "other.npz")
    result = _cli("metrics", art, "--truth", other)
    assert result.exit_code == 1 and "class0/img_000.png" in result.output and "000000" in result.output
    result = _cli("validate", art, "--data", other)
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith("Error: no sample id")


def test_eval_rejects_contradictions_and_says_the_image_size(tmp_path):
    data = _blobs(tmp_path / "b.npz")
    run = tmp_path / "run"
    assert _cli(*GENERATE, "--data", data, "--workers", 0, "--out", run).exit_code == 0
    clash = _cli("eval", run, "--arch", "resnet18", "--data", data)
    assert clash.exit_code == 2 and "drop --arch" in clash.output
    result = _cli("eval", "--arch", "labelkit_cnn", "--image-size", "8", "--data", data, "--k", "5")
    assert result.exit_code == 0, result.output
    assert "at 8 px" in result.output


@pytest.mark.parametrize("fmt", ["csv", "json", "npy"])
def test_every_export_imports_back_to_the_same_artefact(tmp_path, fmt):
    rng = np.random.default_rng(0)
    ids = [f"img{i:03d}" for i in range(30)]
    art = Artefact.build(ids, rng.integers(0, 4, (2, 30)), [4, 4]).write(tmp_path / "a.parquet")
    out = tmp_path / f"labels.{fmt}"
    assert _cli("export", art, "--format", fmt, "--out", out).exit_code == 0
    extra = []
    if fmt == "npy":
        (tmp_path / "keys.txt").write_text("\n".join(ids) + "\n")
        extra = ["--keys", tmp_path / "keys.txt"]
    result = _cli("import", out, "--out", tmp_path / "back.parquet", *extra)
    assert result.exit_code == 0, result.output
    assert read_artefact(tmp_path / "back.parquet").artefact_id == read_artefact(art).artefact_id


def test_data_check_fails_on_undecodable_samples(shapes):
    (shapes / "class0" / "broken.png").write_bytes(b"not a png")
    result = _cli("data", shapes, "--check", "--workers", 0)
    assert result.exit_code == 1 and "broken.png" in result.output


def test_a_wrong_data_path_is_one_line(tmp_path):
    result = _cli(*GENERATE, "--data", tmp_path / "missing", "--out", tmp_path / "r")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {tmp_path / 'missing'}: no such file or directory"]


def test_start_line_names_the_job_and_a_finished_run_keeps_no_checkpoint(tmp_path):
    data = _blobs(tmp_path / "b.npz")
    art = Artefact.build(resolve(data).ids, np.array([resolve(data).targets]), [3]).write(tmp_path / "l.parquet")
    result = _cli("transfer", art, "--data", data, "--arch", "labelkit_cnn", "--epochs", 1,
                  "--image-size", 8, "--batch-size", 32, "--workers", 0, "--out", tmp_path / "t", "--quiet")
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.startswith(f"labelkit transfer: {data} (120 samples) with labelkit_cnn (") and "1 epoch " in first
    assert "checkpoint about" in first
    assert not (tmp_path / "t" / "checkpoint.pt").exists() and (tmp_path / "t" / "model.safetensors").exists()


def test_wording_heads_option_and_iterations_per_head(tmp_path, capsys):
    data = _blobs(tmp_path / "b.npz")
    art = Artefact.build(resolve(data).ids, np.array([resolve(data).targets]), [3]).write(tmp_path / "l.parquet")
    result = _cli("transfer", art, "--data", data, "--heads", "0,5", "--out", tmp_path / "t")
    assert result.exit_code == 2 and "--heads 0,5" in result.output
    help_text = _cli("--help").output
    assert "--clusters 10" in help_text
    assert "--show" in _cli("report", "--help").output
    from labelkit.cli._progress import BarReporter

    capsys.readouterr()
    BarReporter().record({"type": "label_step", "epoch": 3, "seconds": 1.0,
                          "heads": [{"iterations": 12, "nmi_previous": 0.5}, {"iterations": 30, "nmi_previous": 0.4}]})
    assert "2 heads, 12-30 Sinkhorn iterations per head" in capsys.readouterr().err


def test_no_carriage_returns_when_output_is_not_a_terminal(tmp_path):
    import subprocess
    import sys

    data = _blobs(tmp_path / "b.npz")
    done = subprocess.run([sys.executable, "-m", "labelkit", *GENERATE, "--data", data, "--workers", "0",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # bytes, not text: universal newlines would turn every carriage return into a newline
    without_quiet = subprocess.run([sys.executable, "-m", "labelkit", *[a for a in GENERATE if a != "--quiet"],
                                    "--data", data, "--workers", "0", "--out", str(tmp_path / "r2")],
                                   capture_output=True, timeout=300)
    assert without_quiet.returncode == 0 and b"\r" not in without_quiet.stderr
    assert b"epoch    1/2" in without_quiet.stderr


def test_info_and_metrics_accept_a_run_directory(tmp_path):
    data = _blobs(tmp_path / "b.npz")
    run = tmp_path / "run"
    assert _cli(*GENERATE, "--data", data, "--workers", 0, "--out", run).exit_code == 0
    result = _cli("info", run)
    assert result.exit_code == 0 and "artefact" in result.output
    assert _cli("metrics", run, "--truth", data).exit_code == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _cli("info", empty)
    assert result.exit_code == 1 and "without labels.parquet" in result.output


def test_transfer_accepts_generates_labels_when_some_files_are_corrupt(tmp_path, shapes):
    (shapes / "class0" / "truncated.png").write_bytes((shapes / "class0" / "img_000.png").read_bytes()[:40])
    (shapes / "class1" / "text.jpg").write_text("not an image")
    (shapes / "class2" / "empty.png").write_bytes(b"")
    run = tmp_path / "gen"
    result = _cli(*GENERATE, "--data", shapes, "--workers", 0, "--out", run)
    assert result.exit_code == 0, result.output
    skipped = read_artefact(run).metadata["data"]["skipped"]
    assert sorted(s["sample_id"] for s in skipped) == ["class0/truncated.png", "class1/text.jpg", "class2/empty.png"]
    result = _cli("transfer", run, "--data", shapes, "--arch", "labelkit_cnn", "--epochs", 1,
                  "--image-size", 8, "--batch-size", 16, "--workers", 0, "--out", tmp_path / "t")
    assert result.exit_code == 0, result.output  # 48 of 51 samples: coverage counts only decodable ones
    assert "3 sample(s) could not be decoded" in result.output


def test_same_names_other_pictures_are_told_apart(tmp_path):
    import shutil

    original = tmp_path / "a"
    for i in range(12):
        write_image(original / f"class{i % 2}" / f"img_{i:03d}.png", size=(8, 8) if i % 2 else (12, 12), seed=i)
    art = Artefact.build(resolve(str(original)).ids, np.array([[i % 2 for i in range(12)]]), [2],
                         data={"content": resolve(str(original)).content}).write(tmp_path / "l.parquet")
    result = _cli("validate", art, "--data", original)
    assert result.exit_code == 0 and "ids match; file sizes match" in result.output
    swapped = tmp_path / "b"
    shutil.copytree(original, swapped)
    for i in range(0, 12, 2):  # the pictures of the two classes trade places under the same names
        a, b = swapped / "class0" / f"img_{i:03d}.png", swapped / "class1" / f"img_{i + 1:03d}.png"
        data_a, data_b = a.read_bytes(), b.read_bytes()
        a.write_bytes(data_b)
        b.write_bytes(data_a)
    result = _cli("validate", art, "--data", swapped)
    assert result.exit_code == 1 and "ids match but file sizes differ" in result.output
    report = _cli("report", art, "--data", swapped, "--out", tmp_path / "report")
    assert report.exit_code == 0 and "warning: " in report.output
    assert _cli("data", original, "--hash").output != _cli("data", swapped, "--hash").output
