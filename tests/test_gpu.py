"""Every CUDA path, on a real GPU: `bench/gpu.sh` runs these (``pytest -m gpu tests/test_gpu.py``); without
CUDA they are skipped (their heavier imports sit inside them, so that bench/gpu.sh's collection stays quick).
The last test runs on any machine: bench/gpu.sh itself at toy sizes, so that the script
which spends scarce GPU minutes is known to work before it gets them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from labelkit.artefact import read_artefact
from labelkit.cli import main
from labelkit.data import resolve
from labelkit.solver import Balance, Storage, solve

from test_sinkhorn import realistic

ROOT = Path(__file__).resolve().parents[1]


def _invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["stored", "stream"])
@pytest.mark.parametrize("exact", [False, True], ids=["plain", "exact-balance"])
def test_solver_on_cuda_equals_the_cpu_solver(kernel, exact):
    features, weight = realistic(20_000, 300)
    cpu = solve(features=features, weight=weight, balance=Balance(exact=exact), storage=Storage(kernel=kernel))
    gpu = solve(features=features.cuda(), weight=weight.cuda(), balance=Balance(exact=exact), storage=Storage(kernel=kernel))
    assert gpu.kernel == kernel and gpu.products == "widen"  # sparse rows and compiled tiles are CPU-only
    assert gpu.converged and abs(gpu.iterations - cpu.iterations) <= 2
    assert (cpu.labels == gpu.labels).mean() >= 0.999
    if exact:  # every cluster floor(N/K) or ceil(N/K) on both
        assert sorted(gpu.sizes.tolist()) == sorted(cpu.sizes.tolist())
    from_logits = solve((features @ weight.T).cuda(), balance=Balance(exact=exact))
    assert (from_logits.labels == gpu.labels).mean() >= 0.999


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 2-epoch generate on the built-in digits on the GPU (bf16 autocast, channels_last, the label step's
    features and kernel in GPU memory). Its users are marked to skip without CUDA before it is set up."""
    out = tmp_path_factory.mktemp("gpu") / "digits"
    _invoke("generate", "--data", "builtin:digits", "--epochs", "2", "--device", "cuda", "--out", out, "--quiet")
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_on_cuda_writes_a_valid_artefact(digits_run):
    from sklearn.metrics import normalized_mutual_info_score

    artefact = read_artefact(digits_run / "labels.parquet")  # validated against schemas/
    source = resolve("builtin:digits")
    assert list(artefact.sample_ids) == source.ids
    config = json.loads((digits_run / "config.json").read_text())
    assert "cuda" in json.dumps(config)
    history = [json.loads(line) for line in (digits_run / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history if r.get("type") == "epoch"] == [1, 2]
    nmi = max(normalized_mutual_info_score(source.targets, artefact.labels(h)) for h in range(artefact.num_heads))
    assert nmi > 0.5, nmi  # the CPU run of the same recipe is near 0.9 after its full length


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eval_knn_and_predict_on_cuda_agree_with_the_cpu(digits_run, tmp_path):
    from labelkit.training import EvalConfig, evaluate

    on_gpu = evaluate(EvalConfig("knn", data="builtin:digits", model=str(digits_run), device="cuda"))
    on_cpu = evaluate(EvalConfig("knn", data="builtin:digits", model=str(digits_run), device="cpu"))
    assert on_gpu["n_test"] == on_cpu["n_test"] > 0
    assert on_gpu["top1"] > 0.5 and abs(on_gpu["top1"] - on_cpu["top1"]) <= 0.03  # bf16 autocast vs float32
    for device in ("cuda", "cpu"):
        _invoke("predict", digits_run, "--data", "builtin:digits", "--out", tmp_path / f"{device}.parquet",
                "--device", device, "--workers", "0", "--quiet")
    gpu, cpu = (read_artefact(tmp_path / f"{d}.parquet").label_matrix() for d in ("cuda", "cpu"))
    assert (gpu == cpu).mean() >= 0.98


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transfer_on_cuda(digits_run, tmp_path):
    _invoke("transfer", digits_run / "labels.parquet", "--data", "builtin:digits", "--arch", "alexnet",
            "--epochs", "1", "--image-size", "32", "--device", "cuda", "--out", tmp_path / "t", "--quiet")
    child = read_artefact(tmp_path / "t" / "labels.parquet")
    assert child.metadata["parents"] and child.num_samples == 1797


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torchrun_one_process_goes_through_nccl(tmp_path):
    from test_distributed import kill_tree

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "labelkit",
            "generate", "--data", "builtin:digits", "--epochs", "2", "--device", "cuda", "--out", str(tmp_path / "r"),
            "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:  # a hung collective: take the workers down too, not only torchrun
        kill_tree(proc.pid)
        raise
    assert proc.returncode == 0, output
    history = [json.loads(line) for line in (tmp_path / "r" / "history.jsonl").read_text().splitlines()]
    steps = [r for r in history if r.get("type") == "label_step"]
    assert steps and all(s["group"] == {"backend": "nccl", "ranks": 1} for s in steps)
    assert read_artefact(tmp_path / "r" / "labels.parquet").num_samples == 1797


def test_the_gpu_script_runs_end_to_end_at_toy_sizes(tmp_path):
    """bench/gpu.sh --smoke on whatever this machine has: setup finds labelkit importable, the CUDA tests are
    collected (and skipped without CUDA), both benchmarks run and every figure lands in gpu.json."""
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "2"}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(tmp_path / "out"), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert set(result["steps"]) == {"setup", "tests", "label-step", "throughput"}
    assert all(step["exit"] == 0 for step in result["steps"].values())
    assert result["env"]["torch"] == torch.__version__
    tests = result["tests"]
    assert tests["failed"] == [] and tests["total"] >= 8
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["total"]
    step = result["label-step"]
    assert step["agreement"]["paper_vs_labelkit"] >= 0.999 and step["agreement"]["stream_vs_stored"] == 1.0
    assert step["paper_loop"]["converged"] and step["speedup_cold"] > 0
    assert {"logits_cold", "logits_again", "logits_warm", "features_cold", "features_warm",
            "features_stream"} <= set(step["solves"])
    assert all(s["converged"] for s in step["solves"].values())
    assert all(p["images"] == result["throughput"]["jpegs"]["count"] for p in result["throughput"]["loader"].values())
    for arch in ("resnet50", "alexnet"):
        part = result["throughput"][arch]
        assert part["loader_and_training"]["images"] == result["throughput"]["jpegs"]["count"]
        assert part["synthetic"]["images_per_s"] > 0 and part["bottleneck"] in ("loader", "model")
    assert (tmp_path / "out" / "gpu.log").read_text().count("== ") >= 5
    tables = (tmp_path / "out" / "gpu.md").read_text()
    assert "Ratio to the paper's loop" in tables and "| loader + training" in tables


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_embedding_table_and_frozen_backbone_on_cuda(tmp_path):
    from labelkit.quality import agreement

    from test_frozen import blobs

    x, y = blobs(n=800, d=32, k=8, spread=1.6, seed=1)
    np.savez(tmp_path / "t.npz", embeddings=x, labels=y)
    _invoke("generate", "--data", tmp_path / "t.npz", "--clusters", "8", "--heads", "2", "--epochs", "20",
            "--device", "cuda", "--out", tmp_path / "table", "--quiet")
    artefact = read_artefact(tmp_path / "table" / "labels.parquet")
    order = np.argsort([f"{i:06d}" for i in range(800)])
    assert min(agreement(artefact.labels(h), y[order])["nmi"] for h in range(2)) >= 0.9  # as on the CPU
    _invoke("generate", "--data", "builtin:digits", "--freeze", "--views", "2", "--epochs", "2", "--device", "cuda",
            "--out", tmp_path / "frozen", "--quiet")
    assert read_artefact(tmp_path / "frozen" / "labels.parquet").num_samples == 1797
