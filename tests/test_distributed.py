"""torchrun with two CPU processes (gloo): data-parallel generate, exactly-once labels, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from labelkit.artefact import read_artefact
from labelkit.data import resolve

from test_sela import _blobs

pytestmark = pytest.mark.distributed


def _torchrun(data, out, *extra):
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "labelkit",
            "generate", "--data", data, "--arch", "labelkit_cnn", "--clusters", "3,6", "--heads", "2",
            "--epochs", "5", "--label-steps", "3", "--batch-size", "32", "--image-size", "16", "--workers", "0",
            "--device", "cpu", "--augment", "digits", "--out", str(out), "--quiet", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, as a scheduler's cgroup kill does. torchrun starts each
    worker in a session of its own, so killing torchrun's process group would leave the workers running."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    for member in reversed(tree):  # workers first, so torchrun cannot restart them
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_two_process_generate_labels_every_sample_once_and_resumes(tmp_path):
    data = _blobs(tmp_path / "blobs.npz", n=300, size=16)
    reference = _torchrun(data, tmp_path / "reference", "--vote", "3")  # rank 0 votes, every rank receives
    output = reference.communicate(timeout=300)[0]
    assert reference.returncode == 0, output
    assert output.count("wrote ") == 1  # rank 0 alone reports
    art = read_artefact(tmp_path / "reference" / "labels.parquet")
    assert list(art.sample_ids) == resolve(data).ids  # every sample exactly once

    killed = tmp_path / "killed"
    proc = _torchrun(data, killed, "--vote", "3")
    history = killed / "history.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and '"epoch": 3,' not in (history.read_text() if history.exists() else ""):
        time.sleep(0.02)
    kill_tree(proc.pid)
    proc.wait(timeout=300)
    import torch

    saved = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert 0 < saved["epoch"] < 5 and not (killed / "labels.parquet").exists()
    resumed = _torchrun(data, killed, "--vote", "3", "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    again = read_artefact(killed / "labels.parquet")
    assert again.artefact_id == art.artefact_id
    votes = [json.loads(line) for line in history.read_text().splitlines() if '"type": "vote"' in line]
    assert len(votes) == 1 and votes[0]["rows"] == 300
    epochs = [json.loads(line)["epoch"] for line in history.read_text().splitlines() if '"type": "epoch"' in line]
    assert epochs == [1, 2, 3, 4, 5]


def test_two_process_label_step_with_features_on_disk(tmp_path):
    data = _blobs(tmp_path / "blobs.npz", n=300, size=16)
    runs = {}
    for name, extra in (("memory", ()), ("disk", ("--label-memory", "20000"))):  # 150 x 64 float32 per rank do not fit
        proc = _torchrun(data, tmp_path / name, *extra)
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output
        runs[name] = read_artefact(tmp_path / name / "labels.parquet")
    history = [json.loads(line) for line in (tmp_path / "disk" / "history.jsonl").read_text().splitlines()]
    assert {r.get("features") for r in history if r.get("type") == "label_step"} == {"disk"}
    assert list(runs["disk"].sample_ids) == list(runs["memory"].sample_ids)
    # the file holds float16. The K=3 head (three blobs) has no near-ties: identical. The K=6 head splits each blob
    # in two along no real boundary, so rounding moves near-tied samples and five epochs amplify it (95-98 % equal
    # seen); what must hold is that both runs split the same blobs: every K=6 cluster inside one K=3 cluster.
    assert (runs["disk"].labels(0) == runs["memory"].labels(0)).all()
    for run in runs.values():
        pairs = np.stack([run.labels(1), run.labels(0)], 1)
        inside = sum(np.bincount(pairs[pairs[:, 0] == c, 1]).max() for c in np.unique(pairs[:, 0]))
        assert inside == run.num_samples
    assert not list((tmp_path / "disk").glob("*label_features*"))


def test_two_process_transfer_and_eval(tmp_path):
    from labelkit.artefact import Artefact

    data = _blobs(tmp_path / "blobs.npz", n=120, size=8)
    source = resolve(data)
    parent = Artefact.build(source.ids, source.targets, 3).write(tmp_path / "labels.parquet")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "labelkit"]
    done = subprocess.run([*launcher, "transfer", str(parent), "--data", data, "--arch", "labelkit_cnn",
                           "--epochs", "2", "--batch-size", "32", "--image-size", "8", "--workers", "0",
                           "--device", "cpu", "--augment", "none", "--out", str(tmp_path / "t"), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    child = read_artefact(tmp_path / "t" / "labels.parquet")
    assert list(child.sample_ids) == source.ids and child.metadata["parents"]
    evaluated = subprocess.run([*launcher, "eval", str(tmp_path / "t"), "--data", data, "--k", "5",
                                "--device", "cpu", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    lines = [line for line in evaluated.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["n_test"] == 24


def test_one_process_under_torchrun_joins_a_group_and_matches_a_plain_run(tmp_path):
    """torchrun --nproc_per_node=1 goes through the process group (gloo here, NCCL on a GPU), DDP and the
    collectives, and that changes nothing: the labels equal those of a plain process."""
    data = _blobs(tmp_path / "blobs.npz", n=120, size=8)
    options = ["generate", "--data", data, "--arch", "labelkit_cnn", "--clusters", "3", "--heads", "1",
               "--epochs", "2", "--label-steps", "2", "--batch-size", "32", "--image-size", "8", "--workers", "0",
               "--device", "cpu", "--augment", "none", "--vote", "3", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                               "-m", "labelkit", *options, "--out", str(tmp_path / "torchrun")],
                              env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    plain = subprocess.run([sys.executable, "-m", "labelkit", *options, "--out", str(tmp_path / "plain")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stdout + plain.stderr

    def steps(run):
        lines = (tmp_path / run / "history.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r.get("type") == "label_step"]

    assert len(steps("torchrun")) == len(steps("plain")) >= 1
    assert all(s["group"] == {"backend": "gloo", "ranks": 1} for s in steps("torchrun"))
    assert all("group" not in s for s in steps("plain"))
    joined = read_artefact(tmp_path / "torchrun" / "labels.parquet")
    alone = read_artefact(tmp_path / "plain" / "labels.parquet")
    assert list(joined.sample_ids) == list(alone.sample_ids)
    assert (joined.label_matrix() == alone.label_matrix()).all()


def test_labelkit_leaves_only_a_group_it_made(monkeypatch):
    import socket

    import torch
    import torch.distributed as dist

    from labelkit.training import from_environment

    plain, _ = from_environment(torch.device("cpu"))
    assert not plain.enabled and plain.backend is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"TORCHELASTIC_RUN_ID": "test", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    made, _ = from_environment(torch.device("cpu"))
    try:
        assert made.enabled and made.owned and made.backend == "gloo" and made.world == 1
        found, _ = from_environment(torch.device("cpu"))  # a group that exists already (the caller's, say)
        assert found.enabled and not found.owned
        found.close()
        assert dist.is_initialized()
    finally:
        made.close()
    assert not dist.is_initialized()


def test_table_under_torchrun_gives_the_labels_of_one_process(tmp_path):
    """Two processes, each holding the whitened rows of its half of the table, train on the batches that one
    process takes (each batch gathered from the ranks that hold it) and solve with the solver's collectives: the
    labels, scores and artefact id equal a plain run's, with a hidden BatchNorm layer, the graph start (rank 0),
    bad rows found by each rank in its half, and label features on disk."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 24)) * 1.5
    vectors = (centres[rng.integers(0, 6, 1200)] + rng.normal(size=(1200, 24))).astype(np.float32)
    vectors[[100, 1000]] = np.nan  # one in each rank's half
    np.save(tmp_path / "t.npy", vectors)
    options = ["generate", "--data", str(tmp_path / "t.npy"), "--clusters", "6", "--heads", "2", "--head-hidden", "32",
               "--epochs", "3", "--label-steps", "3", "--neighbours", "0", "--skip-bad", "--label-memory", "20000",
               "--device", "cpu", "--workers", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "labelkit"]
    two = subprocess.run([*launcher, *options, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    one = subprocess.run([sys.executable, "-m", "labelkit", *options, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    history = [json.loads(line) for line in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    whiten = [r for r in history if r.get("type") == "whiten"]
    assert whiten[0]["rows"] == 599 and whiten[0]["ranks"] == 2  # rank 0 holds its half of the 1,198 good rows
    steps = [r for r in history if r.get("type") == "label_step"]
    assert steps and all(s["group"] == {"backend": "gloo", "ranks": 2} and s["features"] == "disk" for s in steps)
    assert any(r.get("type") == "start" and "components" in r for r in history)  # the graph start, by rank 0
    shared, alone = (read_artefact(tmp_path / run / "labels.parquet") for run in ("two", "one"))
    assert shared.num_samples == 1198 and "100" not in set(shared.sample_ids)
    assert (shared.label_matrix() == alone.label_matrix()).all()
    assert shared.artefact_id == alone.artefact_id  # the scores too
    assert not list((tmp_path / "two").glob("*rank*"))  # per-rank scratch files removed

    near = [option if option != "0" else "5" for option in options]  # --neighbours 5
    refused = subprocess.run([*launcher, *near, "--out", str(tmp_path / "near")],
                             env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--neighbours 0 under torchrun" in refused.stdout + refused.stderr


def test_frozen_backbone_under_torchrun_extracts_by_rank_and_gives_the_labels_of_one_process(tmp_path):
    """--freeze under torchrun: each rank extracts the features of its share of the images into the one cache file
    (the augmented view's randomness is drawn per sample, so which rank draws it does not matter), then trains as a
    table does: the cache and the labels equal a plain run's."""
    data = _blobs(tmp_path / "blobs.npz", n=300, size=16)
    options = ["generate", "--data", data, "--freeze", "--arch", "labelkit_cnn", "--image-size", "16", "--views", "2",
               "--clusters", "3,6", "--heads", "2", "--epochs", "3", "--label-steps", "2", "--neighbours", "0",
               "--device", "cpu", "--workers", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "labelkit", *options, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    one = subprocess.run([sys.executable, "-m", "labelkit", *options, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    caches = [np.load(next((tmp_path / run / "features").glob("*.npy"))) for run in ("two", "one")]
    assert caches[0].shape == (2, 300, 128) and np.abs(caches[0][:, -1]).sum() > 0  # the last image's rows written
    assert np.array_equal(caches[0], caches[1])
    assert not list((tmp_path / "two" / "features").glob("*.partial"))
    shared, alone = (read_artefact(tmp_path / run / "labels.parquet") for run in ("two", "one"))
    assert (shared.label_matrix() == alone.label_matrix()).all()


def _chunks_worker(rank, world, init, out):
    import torch
    import torch.distributed as dist

    from labelkit._util import collectives

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        rows = np.arange(100 * rank, 100 * rank + [10, 0, 23][rank])  # unequal shares, one of them empty
        values = np.stack([rows * 2, rows * 3], axis=1).astype(np.float32)
        chunks = [tuple(torch.from_numpy(a.copy()) for a in chunk)
                  for chunk in collectives.gather_chunks(dist.group.WORLD, rows, values, rows=4)]
        torch.save(chunks, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gathered_chunks_give_every_rank_every_row_once_a_chunk_at_a_time(tmp_path):
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_chunks_worker, args=(3, f"file://{tmp_path}/rdzv", str(tmp_path / "out")), nprocs=3, join=True)
    expected = np.concatenate([np.arange(0, 10), np.arange(200, 223)])
    for rank in range(3):
        chunks = torch.load(tmp_path / f"out.{rank}")
        assert len(chunks) == 6  # the longest share, 23 rows, in chunks of 4
        assert max(len(rows) for rows, _ in chunks) <= 3 * 4  # a chunk holds at most 4 rows of each rank
        rows = np.concatenate([rows.numpy() for rows, _ in chunks])
        values = np.concatenate([values.numpy() for _, values in chunks])
        assert sorted(rows.tolist()) == expected.tolist()
        np.testing.assert_array_equal(values, np.stack([rows * 2, rows * 3], axis=1))
