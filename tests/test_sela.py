import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from labelkit.artefact import read_artefact
from labelkit.cli import main
from labelkit.training import resolve_config
from labelkit.errors import ConfigError
from labelkit.training import label_schedule, run_sela


def _blobs(path, n=120, classes=3, size=8, seed=0):
    """Images of three visually distinct kinds (bright square in different corners) plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, (n, size, size), dtype=np.uint8)
    half = size // 2
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 2)
        images[i, r * half:(r + 1) * half, col * half:(col + 1) * half] += 180
    np.savez(path, images=images, labels=labels)
    return str(path)


def _tiny(tmp_path, **over):
    options = dict(data=_blobs(tmp_path / "blobs.npz"), arch="labelkit_cnn", clusters=(3, 6), heads=2, epochs=3,
                   label_steps=2, batch_size=32, image_size=8, lr=0.05, workers=0, device="cpu",
                   out=str(tmp_path / "run"), augment="none")
    options.update(over)
    return resolve_config(options)


def test_label_schedule_is_dense_early_and_ends_at_the_end():
    steps = label_schedule(100, 10)  # t_i = ((i - 1) / (M - 1))^2 of training, as in the paper
    assert steps == [0, 1, 5, 11, 20, 31, 44, 60, 79, 100]
    assert label_schedule(5, 30) == [0, 1, 2, 3, 4, 5]  # at most one per epoch
    assert label_schedule(7, 1) == [7]
    assert label_schedule(400, 80)[-1] == 400 and len(label_schedule(400, 80)) <= 80


def test_config_layers_defaults_recipe_file_and_options(tmp_path):
    default = resolve_config({})
    assert default.data == "builtin:digits" and default.arch == "labelkit_cnn"  # the digits recipe
    assert resolve_config({"data": "x.npz"}).arch == "alexnet"  # paper defaults elsewhere
    assert resolve_config({"data": "x.npz"}).head_clusters() == [3000] * 10
    config_file = tmp_path / "c.toml"
    config_file.write_text('epochs = 7\narch = "resnet18"\nclusters = [5, 6]\nheads = 2\n')
    merged = resolve_config({"arch": "alexnet"}, str(config_file))
    assert (merged.epochs, merged.arch, merged.head_clusters()) == (7, "alexnet", [5, 6])
    bad = tmp_path / "bad.json"
    bad.write_text('{"epoch": 3}')
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['epoch'\]"):
        resolve_config({}, str(bad))
    with pytest.raises(ConfigError, match="--heads must be at least 1"):
        resolve_config({"heads": 0})
    with pytest.raises(ConfigError, match="lists 2 values but --heads is 3"):
        resolve_config({"clusters": (3, 4), "heads": 3})


def test_impossible_settings_are_refused_up_front(tmp_path):
    with pytest.raises(ConfigError, match="--clusters 500 is more than the 120 samples"):
        run_sela(_tiny(tmp_path, clusters=(500,), heads=1))
    with pytest.raises(ConfigError, match="not a timm model name; did you mean"):
        run_sela(_tiny(tmp_path, arch="resnet19", out=str(tmp_path / "r2")))


def test_tiny_run_writes_artefact_model_and_history(tmp_path):
    config = _tiny(tmp_path)
    run = run_sela(config)
    art = read_artefact(run.artefact)
    assert art.num_samples == 120 and [h.k for h in art.heads] == [3, 6]
    assert art.metadata["method"]["name"] == "sela"
    assert art.metadata["method"]["config"]["arch"] == "labelkit_cnn"
    assert art.metadata["data"]["count"] == 120
    for h in range(2):
        sizes = np.bincount(art.labels(h), minlength=art.heads[h].k)
        assert sizes.min() > 0  # equipartition keeps every cluster alive
    records = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records].count("epoch") == 3
    steps = [r for r in records if r["type"] == "label_step"]
    assert [s["epoch"] for s in steps] == label_schedule(3, 2)
    assert {"iterations", "seconds", "error", "nmi_previous", "nmi", "ari", "size_min"} <= set(steps[0]["heads"][0])
    assert run.metrics is not None and len(run.metrics) == 2
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert any(k.startswith("heads.1.") for k in weights)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["config"]["clusters"] == [3, 6] and stored["arch"] == "labelkit_cnn"


def test_out_dir_with_another_run_needs_resume(tmp_path):
    config = _tiny(tmp_path, epochs=1, label_steps=1)
    run_sela(config)
    with pytest.raises(ConfigError, match="holds a finished run .*: choose another --out"):
        run_sela(config)
    with pytest.raises(ConfigError, match="finished run .* nothing to resume"):
        run_sela(config, resume=True)
    (tmp_path / "run" / "labels.parquet").unlink()  # as if it had stopped before its end
    changed = _tiny(tmp_path, epochs=1, label_steps=1, lr=0.1)
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0.05 -> 0.1\)"):
        run_sela(changed, resume=True)


def test_killed_run_resumes_to_the_same_labels(tmp_path):
    data = _blobs(tmp_path / "blobs.npz", n=600, size=16)
    args = ["--data", data, "--arch", "labelkit_cnn", "--clusters", "3,6", "--heads", "2", "--epochs", "6",
            "--label-steps", "4", "--batch-size", "16", "--image-size", "16", "--workers", "0", "--device", "cpu",
            "--seed", "3", "--augment", "digits", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run: float sums in the same order

    def generate(out, *extra):
        return subprocess.Popen([sys.executable, "-m", "labelkit", "generate", *args, "--out", str(out), *extra],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    reference = tmp_path / "reference"
    assert generate(reference).wait(timeout=300) == 0
    killed = tmp_path / "killed"
    proc = generate(killed)
    history = killed / "history.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        text = history.read_text() if history.exists() else ""
        if '"epoch": 3,' in text:  # the third epoch is done: kill during the fourth
            time.sleep(0.05)
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=300)
    import torch

    saved = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert 0 < saved["epoch"] < 6, "the process must be killed before it finishes"
    assert not (killed / "labels.parquet").exists()
    resumed = generate(killed, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a, b = read_artefact(reference / "labels.parquet"), read_artefact(killed / "labels.parquet")
    assert a.artefact_id == b.artefact_id
    lines = (killed / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines if '"type": "epoch"' in line] == [1, 2, 3, 4, 5, 6]


def test_generate_command_prints_artefact_and_metrics(tmp_path):
    data = _blobs(tmp_path / "b.npz")
    result = CliRunner().invoke(main, ["generate", "--data", data, "--arch", "labelkit_cnn", "--clusters", "3",
                                       "--heads", "1", "--epochs", "2", "--label-steps", "1", "--image-size", "8",
                                       "--batch-size", "32", "--workers", "0", "--out", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "labels.parquet" in result.output and "NMI" in result.output
    again = CliRunner().invoke(main, ["generate", "--data", data, "--out", str(tmp_path / "r"), "--quiet"])
    assert again.exit_code == 2 and "holds a finished run" in again.output


def test_generate_on_webdataset_shards(tmp_path):
    import io

    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    for shard in range(3):
        with wds.TarWriter(str(tmp_path / f"train-{shard:06d}.tar")) as sink:
            for i in range(shard * 20, shard * 20 + 20):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
                sink.write({"__key__": f"img{i:04d}", "png": buffer.getvalue(), "cls": i % 3})
    config = _tiny(tmp_path, data=str(tmp_path / "train-{000000..000002}.tar"), workers=2)
    run = run_sela(config)
    art = read_artefact(run.artefact)
    assert art.num_samples == 60 and art.sample_ids[0] == "img0000"
    assert run.metrics is not None  # cls is ground truth


def test_a_label_memory_budget_moves_the_kernel_out_of_memory_and_changes_no_label(tmp_path):
    stored = run_sela(_tiny(tmp_path, out=str(tmp_path / "stored")))
    streamed = run_sela(_tiny(tmp_path, out=str(tmp_path / "streamed"), label_memory="1500"))  # 120 x 6 bf16 would be 1,440 bytes
    a, b = read_artefact(tmp_path / "stored"), read_artefact(tmp_path / "streamed")
    assert (a.label_matrix() == b.label_matrix()).all()
    history = [json.loads(line) for line in (tmp_path / "streamed" / "history.jsonl").read_text().splitlines()]
    kernels = {h["kernel"] for r in history if r.get("type") == "label_step" for h in r["heads"]}
    assert kernels == {"disk"} and stored is not None and streamed is not None  # a CPU with scratch room
    assert not list((tmp_path / "streamed").glob(".labelkit-kernel-*"))
    # the features went to a float16 file for each step (float16 moved no label here) and did not outlive it
    assert {r.get("features") for r in history if r.get("type") == "label_step"} == {"disk"}
    assert not list((tmp_path / "streamed").glob("*label_features*"))
    assert b.metadata["method"]["config"]["label_memory"] == "1500"
    with pytest.raises(ConfigError, match="--label-memory '4 parsecs'"):
        _tiny(tmp_path, label_memory="4 parsecs")


def test_features_on_disk_with_label_views_and_a_broken_image(tmp_path):
    from conftest import write_image

    folder = tmp_path / "images"
    for i in range(40):
        write_image(folder / f"c{i % 2}" / f"{i:03d}.png", size=(10, 10), color=(200 * (i % 2), 40, 90), seed=i)
    (folder / "c0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    options = dict(data=str(folder), clusters=(2,), heads=1, epochs=2, label_steps=2, label_views=2,
                   augment="none", start="random")
    in_memory = run_sela(_tiny(tmp_path, out=str(tmp_path / "memory"), **options))
    # the kernel (40 x 2) fits in 2,000 bytes, the 40 x 64 float32 features do not
    on_disk = run_sela(_tiny(tmp_path, out=str(tmp_path / "disk"), label_memory="2000", **options))
    history = [json.loads(line) for line in (tmp_path / "disk" / "history.jsonl").read_text().splitlines()]
    assert {r.get("features") for r in history if r.get("type") == "label_step"} == {"disk"}
    a, b = read_artefact(in_memory.artefact), read_artefact(on_disk.artefact)
    assert list(a.sample_ids) == list(b.sample_ids) and "c0/broken.png" not in list(b.sample_ids)
    assert b.num_samples == 40
    assert (a.label_matrix() == b.label_matrix()).all()  # two colours: float16 features cannot move a label
    assert sorted(p.name for p in (tmp_path / "disk").iterdir() if "features" in p.name) == []


def test_augmented_label_views_are_different_draws_at_every_label_step(tmp_path, monkeypatch):
    """Each augmented view of each label step draws its own augmentation (not sample seed (0, 0, i) for all)."""
    import torch

    import labelkit.training._sela as sela

    drawn, original = [], sela.extract_features

    def recording(model_features, dim, source, transform, order, **kwargs):
        features, seen = original(model_features, dim, source, transform, order, **kwargs)
        drawn.append(((order.seed, order.epoch), features.clone()))
        return features, seen

    monkeypatch.setattr(sela, "extract_features", recording)
    options = dict(data=_blobs(tmp_path / "b.npz", size=12), clusters=(3,), heads=1, epochs=2, label_steps=3,
                   label_views=3, augment="paper", start="random", seed=4, label_spacing="even")
    run_sela(_tiny(tmp_path, out=str(tmp_path / "run"), **options))
    streams = [stream for stream, _ in drawn]
    assert len(streams) == 3 * 3 and len(set(streams)) == len(streams)  # 3 label steps x 3 views
    assert all(seed == 4 for seed, _ in streams)
    for step in range(3):  # within a step the two augmented views differ, as they differ from the plain one
        plain, first, second = (features for _, features in drawn[3 * step:3 * step + 3])
        assert not torch.equal(first, second) and not torch.equal(plain, first)


@pytest.mark.parametrize("option, value, message", [
    ("lam", 0.0, "--lam: lam must be a positive number"),
    ("sinkhorn_tol", 0.0, "--sinkhorn-tol: tol must be a positive number"),
    ("head_temperature", 0.0, "--head-temperature must be a positive number"),  # 0 meant linear heads
    ("warmup", 1.5, r"--warmup is the share of training"),
    ("momentum", 1.0, r"--momentum must lie in \[0, 1\)"),
    ("weight_decay", -1e-4, "--weight-decay must be 0 or more"),
])
def test_options_are_checked_before_anything_runs(tmp_path, option, value, message):
    with pytest.raises(ConfigError, match=message):
        _tiny(tmp_path, **{option: value})
    assert not (tmp_path / "run").exists()


def test_a_killed_run_from_a_reviewed_version_resumes_with_its_pins(tmp_path):
    from labelkit.review import DecisionLog, materialise

    data = _blobs(tmp_path / "blobs.npz", n=600, size=16)
    args = ["--data", data, "--arch", "labelkit_cnn", "--clusters", "3", "--heads", "1", "--epochs", "6",
            "--label-steps", "4", "--batch-size", "16", "--image-size", "16", "--workers", "0", "--device", "cpu",
            "--seed", "3", "--augment", "digits", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def generate(out, *extra):
        return subprocess.Popen([sys.executable, "-m", "labelkit", "generate", *args, "--out", str(out), *extra],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    assert generate(tmp_path / "first").wait(timeout=300) == 0
    first = read_artefact(tmp_path / "first" / "labels.parquet")
    log = DecisionLog(tmp_path / "decisions.jsonl")
    log.append({"op": "move", "samples": first.sample_ids[first.labels(0) == 0][:10].tolist(), "to": 1})
    log.append({"op": "remove", "samples": first.sample_ids[:4].tolist()})
    materialise(first, 0, log)[0].write(tmp_path / "reviewed.parquet")
    start = ["--start-from", str(tmp_path / "reviewed.parquet")]
    assert generate(tmp_path / "reference", *start).wait(timeout=300) == 0
    killed = tmp_path / "killed"
    proc = generate(killed, *start)
    history = killed / "history.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if history.exists() and '"epoch": 3,' in history.read_text():
            time.sleep(0.05)
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=300)
    assert not (killed / "labels.parquet").exists(), "the process must be killed before it finishes"
    resumed = generate(killed, *start, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a, b = read_artefact(tmp_path / "reference" / "labels.parquet"), read_artefact(killed / "labels.parquet")
    assert a.artefact_id == b.artefact_id and b.num_samples == 596
