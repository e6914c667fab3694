"""Hardening of the run skeleton: uneven ranks never hang, preemption checkpoints mid-epoch and resumes to the
same labels, scores describe the labels they sit beside, and provenance says what was really done."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from labelkit.artefact import read_artefact
from labelkit.cli import main
from labelkit.training import SelaConfig, resolve_config
from labelkit.data import resolve
from labelkit.training import run_sela
from labelkit.solver import Algorithm, Balance, solve
from labelkit.training import Reporter

from test_sela import _blobs, _tiny

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run: float sums in the same order
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "labelkit"]


def _shards(tmp_path, sizes, size=8):
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    n = 0
    for shard, count in enumerate(sizes):
        with wds.TarWriter(str(tmp_path / f"part-{shard:06d}.tar")) as sink:
            for i in range(n, n + count):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
                sink.write({"__key__": f"img{i:04d}", "png": buffer.getvalue(), "cls": i % 3})
        n += count
    return str(tmp_path / f"part-{{000000..{len(sizes) - 1:06d}}}.tar")


def _generate_args(data, out, *extra):
    return ["generate", "--data", data, "--arch", "labelkit_cnn", "--image-size", "16", "--workers", "0",
            "--device", "cpu", "--augment", "digits", "--out", str(out), "--quiet", *extra]


def _balanced(labels, k):
    sizes = np.bincount(labels, minlength=k)
    return sizes.min() >= len(labels) // k and sizes.max() <= -(-len(labels) // k)


@pytest.mark.distributed
def test_two_processes_on_35_samples_finish_and_label_every_sample_once(tmp_path):
    # a global batch of 32 over two ranks leaves one rank a 1-sample batch: it used to skip a collective alone
    data = _blobs(tmp_path / "n35.npz", n=35, size=16)
    args = _generate_args(data, tmp_path / "run", "--clusters", "3", "--heads", "1", "--epochs", "2",
                          "--label-steps", "2", "--batch-size", "32")
    done = subprocess.run([*TORCHRUN, *args], env=ENV, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    art = read_artefact(tmp_path / "run" / "labels.parquet")
    assert list(art.sample_ids) == resolve(data).ids
    # exact balance now works across ranks, and the provenance says so
    assert art.metadata["method"]["config"]["exact_balance"] is True
    assert _balanced(art.labels(0), 3)


@pytest.mark.distributed
def test_whole_shards_of_unequal_size_neither_hang_nor_shorten_the_schedule(tmp_path):
    # shards handed out whole give the ranks 16 and 20 samples: 8 and 10 batches of 2. Both ranks take 8 steps,
    # and the one-epoch cosine schedule must be counted in those: its last step (7/8) is near zero
    data = _shards(tmp_path, [20, 10, 6])
    args = _generate_args(data, tmp_path / "run", "--clusters", "3", "--heads", "1", "--epochs", "1",
                          "--label-steps", "1", "--batch-size", "4", "--lr-schedule", "cosine", "--lr", "0.1",
                          "--image-size", "8")
    done = subprocess.run([*TORCHRUN, *args], env=ENV, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    epoch = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()
             if '"type": "epoch"' in line][-1]
    assert epoch["lr"] < 0.1 * 0.1


def test_scores_describe_the_exactly_balanced_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(600, 6)).astype(np.float32)
    logits[:, 0] += 2.0  # one popular cluster: exact balance must move many rows away from their argmax
    result = solve(logits, algorithm=Algorithm(tol=1e-4), balance=Balance(exact=True))
    assert _balanced(result.labels, 6)
    q = torch.softmax(torch.from_numpy(logits) * 25.0 + torch.from_numpy(result.potentials).float(), dim=1)
    expected = q[torch.arange(600), torch.from_numpy(result.labels).long()].numpy()
    np.testing.assert_allclose(result.scores, expected, rtol=2e-2, atol=1e-4)


def _balanced_worker(rank, world, init, logits, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        part = np.array_split(np.arange(len(logits)), world)[rank]
        result = solve(logits[part], group=dist.group.WORLD, algorithm=Algorithm(tol=1e-4), balance=Balance(exact=True))
        torch.save({"labels": torch.from_numpy(result.labels), "scores": torch.from_numpy(result.scores),
                    "rows": torch.from_numpy(part)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_exact_balance_across_ranks_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1003, 10)).astype(np.float32)
    logits[:, :3] += 1.0
    single = solve(logits, algorithm=Algorithm(tol=1e-4), balance=Balance(exact=True))
    mp.spawn(_balanced_worker, args=(2, f"file://{tmp_path}/rdzv", logits, str(tmp_path / "out")), nprocs=2, join=True)
    labels, scores = np.empty(1003, dtype=np.int32), np.empty(1003, dtype=np.float32)
    for rank in range(2):
        part = torch.load(tmp_path / f"out.{rank}")
        labels[part["rows"].numpy()] = part["labels"].numpy()
        scores[part["rows"].numpy()] = part["scores"].numpy()
    assert (labels == single.labels).all() and _balanced(labels, 10)
    np.testing.assert_allclose(scores, single.scores, rtol=1e-5)


def test_transfer_never_labels_a_sample_it_could_not_read(tmp_path, monkeypatch):
    import labelkit.training._job as job
    from labelkit.artefact import Artefact
    from labelkit.training import TRANSFER_RECIPES, TransferConfig, run_transfer
    from conftest import write_image

    root = tmp_path / "imgs"
    for i in range(24):
        write_image(root / f"c{i % 2}" / f"{i:03d}.png", size=(8, 8), seed=i)
    source = resolve(str(root))
    labels = Artefact.build(source.ids, np.array([[i % 2 for i in range(24)]]), [2]).write(tmp_path / "l.parquet")
    victim = root / "c1" / "005.png"

    class BreakBeforePredict(Reporter):
        def phase(self, name, total):
            if name == "predict":  # the file is fine during training and unreadable when predicted
                victim.write_bytes(b"not an image any more")

    config = resolve_config(dict(labels=str(labels), data=str(root), arch="labelkit_cnn", epochs=1, batch_size=8,
                                 image_size=8, workers=0, device="cpu", augment="none", out=str(tmp_path / "t")),
                            cls=TransferConfig, recipes=TRANSFER_RECIPES)
    # the per-sample path, which reads every file in every pass (shards, data above the memory budget); images
    # decoded once are labelled as they were read, once
    monkeypatch.setattr(job, "keep_decoded", lambda *args, **kwargs: None)
    run = run_transfer(config, reporter=BreakBeforePredict())
    child = read_artefact(run.artefact)
    assert "c1/005.png" not in set(child.sample_ids) and child.num_samples == 23


def test_workers_default_to_what_the_machine_has():
    cpus = len(os.sched_getaffinity(0))
    assert 0 <= resolve_config({"data": "folder/"}).workers <= cpus
    from labelkit.training import TRANSFER_RECIPES, TransferConfig

    transfer = resolve_config({"data": "folder/", "labels": "l.parquet"}, cls=TransferConfig, recipes=TRANSFER_RECIPES)
    assert 0 <= transfer.workers <= cpus


def test_label_steps_log_cheap_metrics_computed_once(tmp_path, monkeypatch):
    import scipy.optimize

    import labelkit.quality._metrics as metrics

    def no_ami(*args, **kwargs):
        raise AssertionError("the label step must not compute the exact AMI")

    calls = []
    hungarian = scipy.optimize.linear_sum_assignment
    monkeypatch.setattr(metrics, "ami", no_ami)
    monkeypatch.setattr(scipy.optimize, "linear_sum_assignment", lambda *a, **k: calls.append(1) or hungarian(*a, **k))
    run_sela(_tiny(tmp_path, clusters=(3,), heads=2, epochs=4, label_steps=3))
    records = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "label_step"]
    assert len(steps) == 3 and {"nmi_previous", "nmi", "ari", "accuracy"} <= set(steps[0]["heads"][0])
    # one assignment per head against the truth in each label step, plus the final summary; none against the
    # previous labels
    assert len(calls) <= 2 * 3 + 2


def test_command_line_choices_and_defaults_come_from_the_library():
    from labelkit.data import AUGMENTATIONS
    from labelkit.training import LR_SCHEDULES
    from labelkit.training import TransferConfig

    for name, cls in (("generate", SelaConfig), ("transfer", TransferConfig)):
        command = main.commands[name]
        params = {p.name: p for p in command.params}
        assert list(params["augment"].type.choices) == list(AUGMENTATIONS)
        assert list(params["lr_schedule"].type.choices) == list(LR_SCHEDULES)
        assert f"paper: {cls.epochs}]" in params["epochs"].help and f"paper: {cls.lr}]" in params["lr"].help
    assert "heavy" in AUGMENTATIONS


def test_generate_accepts_heavy_augmentation(tmp_path):
    data = _blobs(tmp_path / "b.npz")
    result = CliRunner().invoke(main, ["generate", "--data", data, "--arch", "labelkit_cnn", "--clusters", "3",
                                       "--heads", "1", "--epochs", "1", "--label-steps", "1", "--image-size", "8",
                                       "--batch-size", "32", "--workers", "0", "--augment", "heavy",
                                       "--out", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM / SIGUSR1 -> finish the batch, checkpoint mid-epoch, exit 75; --resume gives the same labels


class SignalAt(Reporter):
    """Sends a signal to this process at a given training step of a given epoch (counted from 1)."""

    def __init__(self, epoch, step, signum=signal.SIGTERM):
        self.epoch, self.step, self.signum = epoch, step, signum
        self.epochs_started, self.steps, self.training = 0, 0, False

    def phase(self, name, total):
        self.training = name == "train"
        if self.training:
            self.epochs_started += 1
            self.steps = 0

    def advance(self, batches=1, **info):
        if self.training:
            self.steps += 1
            if (self.epochs_started, self.steps) == (self.epoch, self.step):
                os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_mid_epoch_and_resumes_to_the_same_labels(tmp_path, signum):
    from labelkit.errors import Preempted

    data = _blobs(tmp_path / "blobs.npz", n=200, size=8)
    options = dict(data=data, epochs=4, label_steps=3, batch_size=16, augment="digits", seed=5)
    full = run_sela(_tiny(tmp_path, **options, out=str(tmp_path / "full")))
    config = _tiny(tmp_path, **options, out=str(tmp_path / "cut"))
    with pytest.raises(Preempted) as stopped:
        run_sela(config, reporter=SignalAt(epoch=2, step=5, signum=signum))
    assert stopped.value.exit_code == 75 and "--resume" in str(stopped.value)
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 5)  # the fifth batch of the second epoch was finished
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)  # handlers restored
    resumed = run_sela(config, resume=True)
    assert resumed.labels.artefact_id == full.labels.artefact_id
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "cut" / "history.jsonl").read_text().splitlines()
              if '"type": "epoch"' in line]
    assert epochs == [1, 2, 3, 4]


def test_transfer_preempted_mid_epoch_resumes_to_the_same_model(tmp_path):
    from labelkit.errors import Preempted
    from labelkit.training import TRANSFER_RECIPES, TransferConfig, run_transfer
    from test_transfer import _artefact

    data = _blobs(tmp_path / "blobs.npz", n=160)
    _, labels = _artefact(tmp_path, data)

    def config(out):
        return resolve_config(dict(labels=labels, data=data, arch="labelkit_cnn", epochs=3, batch_size=16,
                                   image_size=8, workers=0, device="cpu", augment="digits", out=str(tmp_path / out)),
                              cls=TransferConfig, recipes=TRANSFER_RECIPES)

    full = run_transfer(config("full"))
    with pytest.raises(Preempted):
        run_transfer(config("cut"), reporter=SignalAt(epoch=2, step=3))
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3
    assert run_transfer(config("cut"), resume=True).labels.artefact_id == full.labels.artefact_id


def test_sigterm_exits_with_the_documented_code_and_says_how_to_resume(tmp_path):
    data = _blobs(tmp_path / "blobs.npz", n=600, size=16)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "labelkit", *_generate_args(data, out, "--clusters", "3", "--heads", "1",
                                                               "--epochs", "30", "--label-steps", "2",
                                                               "--batch-size", "8")]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history, deadline = out / "history.jsonl", time.time() + 120
    while time.time() < deadline and '"type": "epoch"' not in (history.read_text() if history.exists() else ""):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert f"labelkit generate --out {out} --resume" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] < 30


@pytest.mark.distributed
def test_two_processes_preempted_by_sigterm_resume_to_the_same_labels(tmp_path):
    data = _blobs(tmp_path / "blobs.npz", n=400, size=16)
    common = ("--clusters", "3,6", "--heads", "2", "--epochs", "4", "--label-steps", "2", "--batch-size", "16")

    def launch(out, *extra):
        return subprocess.Popen([*TORCHRUN, *_generate_args(data, out, *common, *extra)], env=ENV, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    reference = launch(tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stdout.read()
    cut = tmp_path / "cut"
    proc = launch(cut)
    history, deadline = cut / "history.jsonl", time.time() + 240
    while time.time() < deadline and '"epoch": 2,' not in (history.read_text() if history.exists() else ""):
        time.sleep(0.01)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM does: every process of the job
    proc.wait(timeout=120)
    saved = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] < 4 and not (cut / "labels.parquet").exists()
    resumed = launch(cut, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    same = read_artefact(cut / "labels.parquet").artefact_id == read_artefact(tmp_path / "reference" / "labels.parquet").artefact_id
    assert same


def test_eta_counts_the_label_steps_still_to_come():
    from labelkit.training import Job

    job = Job.__new__(Job)  # only the ETA's fields
    job.label_schedule, job._label_seconds, job.label_weight = {0, 5, 10}, [9.0, 2.0, 4.0, 3.0], {}
    assert job.label_eta(4) == 2 * 3.0  # steps after epochs 5 and 10, at the last three steps' mean
    assert job.label_eta(9) == 3.0 and job.label_eta(10) == 0.0
    job.label_weight = {10: 4.0}  # --train-rows: the last step labels four times the sample's rows
    assert job.label_eta(4) == (1 + 4) * 3.0 and job.label_eta(9) == 4 * 3.0
    job._label_seconds = []
    assert job.label_eta(0) == 0.0  # no pace yet


def test_two_runs_into_one_folder_at_once_the_second_is_refused(tmp_path):
    """The run folder is locked for the run's lifetime: no check-then-create race between two runs."""
    import os

    from labelkit.training import resolve_config
    from labelkit.errors import ConfigError
    from labelkit.training._loop import Reporter, RunDir

    config = resolve_config({"data": "builtin:digits", "out": str(tmp_path / "run")})
    first = RunDir(config, resume=False, reporter=Reporter())  # started, config.json not yet written
    with pytest.raises(ConfigError, match=rf"in use by another labelkit run \(pid {os.getpid()}\)"):
        RunDir(config, resume=False, reporter=Reporter())
    first.close()
    second = RunDir(config, resume=False, reporter=Reporter())  # the folder is free again
    second.close()
