"""The GPU figures of labelkit, one part at a time; `bench/gpu.sh OUTDIR` runs them all under timeouts.

Run: python bench/gpu.py env          [--json PATH]
     python bench/gpu.py label-step   [--json PATH] [--smoke]
     python bench/gpu.py throughput   [--json PATH] [--smoke] [--images 8192] [--workers N]

label-step: ImageNet's size (N = 1,281,167, K = 3000) from logits and from D = 2048 features on the GPU: the
first solve in the process (cold), the same solve again, and a warm-started re-solve after a 1 % change of the
head (what every label step after the first costs); beside the paper's float64 loop run on the same card in
the same process (until it converges, or for at most --paper-seconds, then scaled to its iteration count).

throughput: images/s of labelkit's training step ([3000 x 10] heads, bf16 autocast, channels_last, SGD) for
ResNet-50 and AlexNet at 224 px: on synthetic tensors already on the GPU (the model's ceiling), through
labelkit's own loader and augmentation on JPEG files written to local disk (the pipeline's ceiling), and the
two together (what a run gets).

--smoke runs everything at toy sizes, on the CPU when there is no GPU: it proves the script, not the figures.
Every part prints one JSON object and writes it to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

LAM = 25.0


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -- env ---------------------------------------------------------------------------------------------------


def env(args) -> dict:
    import labelkit

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "labelkit": labelkit.__version__, "cpus": os.cpu_count(), "cuda_available": torch.cuda.is_available()}
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        info["commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1),
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    nccl=".".join(map(str, torch.cuda.nccl.version())))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["nvidia_smi"] = None
    return info


# -- label step ----------------------------------------------------------------------------------------------


def realistic(n: int, k: int, d: int, device: torch.device, seed: int = 0, target: float = 0.3):
    """float16 features and a linear head scaled so that the softmax maxima average about ``target`` (as in
    bench/sinkhorn.py, made on ``device`` directly: 1.28 M x 2048 would take minutes on the host)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    features = torch.empty((n, d), dtype=torch.float16, device=device)
    for start in range(0, n, 1 << 16):
        stop = min(n, start + (1 << 16))
        features[start:stop] = torch.randn((stop - start, d), generator=gen, device=device)
    weight = torch.randn((k, d), generator=gen, device=device) / d**0.5
    probe = features[:2000].float() @ weight.T
    lo, hi = 0.1, 50.0
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        if torch.softmax(probe * mid, 1).amax(1).mean() < target:
            lo = mid
        else:
            hi = mid
    return features, weight * mid, torch.zeros(k, device=device)


def logits_of(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    out = torch.empty((features.shape[0], weight.shape[0]), dtype=torch.float32, device=features.device)
    for start in range(0, features.shape[0], 1 << 16):
        out[start:start + (1 << 16)] = features[start:start + (1 << 16)].float() @ weight.T + bias
    return out


def paper_loop(logits: torch.Tensor, lam: float = LAM, max_seconds: float = 60.0) -> dict:
    """The SeLa paper's Sinkhorn written out plainly, as bench/sinkhorn.py's baseline: float64 P^lam, alternating
    full matrix-vector products, stop when sum |beta_old / beta_new - 1| < 0.1. Kept N x K and normalised in
    place, so that ImageNet's size needs one float64 copy (31 GB) on the card. After ``max_seconds`` it stops
    and scales its time per iteration to the iterations it would need, estimated from the error's decay."""
    device = logits.device
    _sync(device)
    t0 = time.perf_counter()
    p = logits.double()
    p -= p.amax(1, keepdim=True)
    p.exp_()
    p /= p.sum(1, keepdim=True)
    p.pow_(lam)
    n, k = p.shape
    r = torch.full((k,), 1.0 / k, dtype=torch.float64, device=device)
    c = torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
    errors, err = [], float("inf")
    _sync(device)
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    while err > 0.1 and time.perf_counter() - t1 < max_seconds:
        r = (1.0 / k) / (c @ p)
        c_new = (1.0 / n) / (p @ r)
        err = float(torch.nansum((c / c_new - 1).abs()))  # one sync per iteration, as the paper's loop
        errors.append(err)
        c = c_new
    looped = time.perf_counter() - t1
    labels = p.mul_(r).argmax(1)  # Q's row argmax: the row scaling c does not change it
    del p
    converged = err <= 0.1
    iterations = len(errors)
    needed = iterations
    if not converged:  # geometric decay of the error over the last half of what ran
        import math

        half = errors[len(errors) // 2:]
        rate = (half[-1] / half[0]) ** (1 / max(1, len(half) - 1)) if len(half) > 1 and half[0] > 0 else 1.0
        needed = iterations + (math.ceil(math.log(0.1 / err) / math.log(rate)) if 0 < rate < 1 else 10 * iterations)
    seconds = setup + looped / iterations * needed
    return {"seconds": round(seconds, 3), "measured_seconds": round(setup + looped, 3), "iterations": iterations,
            "iterations_needed": needed, "converged": converged, "error": err, "setup_seconds": round(setup, 3),
            "labels": labels.cpu().numpy()}


def _timed_solve(device, kernel: str = "auto", **kwargs) -> tuple[object, float]:
    from labelkit.solver import Algorithm, Storage, solve

    _sync(device)
    t0 = time.perf_counter()
    result = solve(**kwargs, algorithm=Algorithm(lam=LAM), storage=Storage(kernel=kernel))
    _sync(device)
    return result, time.perf_counter() - t0


def _describe(result, wall: float, device) -> dict:
    return {"seconds": round(wall, 3), "solver_seconds": round(result.seconds, 3), "iterations": result.iterations,
            "converged": bool(result.converged), "error": float(result.error), "kernel": result.kernel,
            "products": result.products, "sizes": [int(result.sizes.min()), int(result.sizes.max())],
            "peak_gb": _peak_gb(device)}


def label_step(args) -> dict:
    device = _device()
    n, k, d = (8_000, 100, 32) if args.smoke else (args.n, args.k, args.d)
    out: dict = {"device": str(device), "n": n, "k": k, "d": d, "lam": LAM}
    features, weight, bias = realistic(n, k, d, device)
    moved = weight + 0.01 * weight.std() * torch.randn(weight.shape, device=device,
                                                       generator=torch.Generator(device=device).manual_seed(1))
    logits = logits_of(features, weight, bias)
    out["mean_max_softmax"] = round(float(torch.softmax(logits[:20000], 1).amax(1).mean()), 3)
    runs = {}
    _reset_peak(device)
    first, wall = _timed_solve(device, logits=logits)
    runs["logits_cold"] = _describe(first, wall, device)
    _reset_peak(device)
    again, wall = _timed_solve(device, logits=logits)
    runs["logits_again"] = _describe(again, wall, device)
    moved_logits = logits_of(features, moved, bias)
    _reset_peak(device)
    warm, wall = _timed_solve(device, logits=moved_logits, warm_start=first)
    runs["logits_warm"] = _describe(warm, wall, device)
    del moved_logits
    _reset_peak(device)
    from_features, wall = _timed_solve(device, features=features, weight=weight, bias=bias)
    runs["features_cold"] = _describe(from_features, wall, device)
    _reset_peak(device)
    warm_features, wall = _timed_solve(device, features=features, weight=moved, bias=bias,
                                       warm_start=from_features)
    runs["features_warm"] = _describe(warm_features, wall, device)
    _reset_peak(device)
    stream, wall = _timed_solve(device, features=features, weight=weight, bias=bias, kernel="stream")
    runs["features_stream"] = _describe(stream, wall, device)
    out["solves"] = runs
    out["agreement"] = {"again_vs_cold": float((again.labels == first.labels).mean()),
                        "features_vs_logits": float((from_features.labels == first.labels).mean()),
                        "stream_vs_stored": float((stream.labels == from_features.labels).mean())}
    del features
    _reset_peak(device)
    paper = paper_loop(logits, LAM, max_seconds=args.paper_seconds)
    paper_labels = paper.pop("labels")
    paper["peak_gb"] = _peak_gb(device)
    out["paper_loop"] = paper
    out["agreement"]["paper_vs_labelkit"] = float((paper_labels == first.labels).mean())
    out["speedup_cold"] = round(paper["seconds"] / runs["logits_cold"]["seconds"], 1)
    out["speedup_warm"] = round(paper["seconds"] / runs["logits_warm"]["seconds"], 1)
    out["goal_cold_logits_2s"] = runs["logits_cold"]["seconds"] <= 2.0
    return out


# -- training throughput -------------------------------------------------------------------------------------


def _write_jpeg(task) -> int:
    """A smooth random photo-like image (low-frequency colour field plus grain), so its JPEG is photo-sized."""
    import numpy as np
    from PIL import Image

    path, seed, size = task
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    big = np.asarray(small.resize(size, Image.BICUBIC), dtype=np.int16)
    big = np.clip(big + rng.normal(0, 8, big.shape), 0, 255).astype(np.uint8)
    Image.fromarray(big).save(path, quality=90)
    return os.path.getsize(path)


def write_jpegs(folder: Path, count: int, size=(500, 375), workers: int = 1) -> dict:
    """``count`` JPEGs in 10 class folders (ImageNet's layout); returns their count and mean size."""
    from concurrent.futures import ProcessPoolExecutor

    tasks = []
    for i in range(count):
        sub = folder / f"c{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        tasks.append((sub / f"{i:06d}.jpg", i, size))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max(1, workers)) as pool:
        sizes = list(pool.map(_write_jpeg, tasks, chunksize=64))
    return {"count": count, "width": size[0], "height": size[1], "mean_kb": round(sum(sizes) / count / 1e3, 1),
            "seconds_to_write": round(time.perf_counter() - t0, 2)}


@dataclass(frozen=True)
class Shape:
    """What one throughput measurement trains: inputs, batch, timed steps, heads and untimed warm-up steps."""

    device: torch.device
    image_size: int = 224
    batch: int = 256
    steps: int = 30
    heads: tuple = (3000,) * 10  # the paper's [3000 x 10]
    warmup: int = 3  # cuDNN's algorithm search and the allocator's first growth

    def model(self, arch: str):
        from labelkit.training import SelaModel, create_backbone
        from labelkit.training import make_optimizer, model_to

        model = model_to(SelaModel(create_backbone(arch, self.image_size), list(self.heads)), self.device)
        model.train()  # placed as `generate` places it
        return model, make_optimizer(model, 0.05, 0.9, 5e-4)

    def labels(self, batch: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.randint(0, min(self.heads), (len(self.heads), batch), device=device)


def _synthetic(arch: str, shape: Shape) -> dict:
    from labelkit.training._loop import train_step  # the step of labelkit's training loop

    device, batch = shape.device, shape.batch
    model, optimizer = shape.model(arch)
    images = torch.randn((batch, 3, shape.image_size, shape.image_size), device=device)
    labels = shape.labels(batch, device)
    for _ in range(shape.warmup):
        train_step(model, optimizer, images, labels, device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(shape.steps):
        train_step(model, optimizer, images, labels, device)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"images_per_s": round(batch * shape.steps / seconds, 1), "batch": batch, "steps": shape.steps,
            "seconds": round(seconds, 2), "peak_gb": _peak_gb(device)}


def _through_loader(source, arch: str | None, shape: Shape, workers: int) -> dict:
    """One pass of labelkit's shuffled training loader (its augmentation, its workers); with an ``arch``, each
    batch also takes a training step. Rates are counted from the second batch on (worker start-up apart)."""
    from labelkit.data import Order, augmentation_preset, make_loader
    from labelkit.training import train_step

    device, batch = shape.device, shape.batch
    model = optimizer = None
    if arch is not None:
        model, optimizer = shape.model(arch)
        warm = torch.randn((batch, 3, shape.image_size, shape.image_size))
        for _ in range(shape.warmup):
            train_step(model, optimizer, warm, shape.labels(batch), device)
    loader = make_loader(source, augmentation_preset("paper", shape.image_size), Order(batch, shuffle=True),
                         workers=workers)
    _sync(device)
    t0 = time.perf_counter()
    first, images_seen, steady_images = None, 0, 0
    for _indices, images, _bad in loader:
        if model is not None:
            train_step(model, optimizer, images, shape.labels(len(images)), device)
            _sync(device)
        images_seen += len(images)
        if first is None:
            first = time.perf_counter()
        else:
            steady_images += len(images)
    _sync(device)
    end = time.perf_counter()
    steady = steady_images / max(end - first, 1e-9) if steady_images else None
    return {"images_per_s": round(steady, 1) if steady else None,
            "images_per_s_with_startup": round(images_seen / (end - t0), 1), "images": images_seen,
            "first_batch_s": round(first - t0, 2), "seconds": round(end - t0, 2), "workers": workers}


def throughput(args) -> dict:
    from labelkit.training import default_workers
    from labelkit.data import resolve

    device = _device()
    smoke = args.smoke
    shape = Shape(device, image_size=32, batch=8, steps=2, heads=(100,) * 2, warmup=1) if smoke else Shape(device)
    count = 16 if smoke else args.images
    workers = args.workers if args.workers is not None else (2 if smoke else default_workers())
    out: dict = {"device": str(device), "image_size": shape.image_size,
                 "heads": f"{shape.heads[0]} x {len(shape.heads)}", "workers": workers}
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="labelkit-jpegs-", dir=args.scratch) as tmp:
        out["jpegs"] = write_jpegs(Path(tmp) / "train", count, workers=cpus)
        source = resolve(str(Path(tmp) / "train"))
        # the loader alone does not depend on the model: at labelkit's default workers, and at every core
        out["loader"] = {str(w): _through_loader(source, None, shape, w) for w in sorted({workers, cpus})}
        loader_rate = out["loader"][str(workers)]["images_per_s"]
        for arch in ("resnet50", "alexnet"):
            part = {"batch": shape.batch}
            part["synthetic"] = _synthetic(arch, shape)
            if device.type == "cuda":  # labelkit leaves cuDNN's autotuner off (PyTorch's default): what would it give?
                torch.backends.cudnn.benchmark = True
                part["synthetic_cudnn_benchmark"] = _synthetic(arch, shape)
                torch.backends.cudnn.benchmark = False
            part["loader_and_training"] = _through_loader(source, arch, shape, workers)
            model_rate = part["synthetic"]["images_per_s"]
            if model_rate and loader_rate:
                part["bottleneck"] = "loader" if loader_rate < model_rate else "model"
                part["loader_short_by"] = round(model_rate / loader_rate, 2) if loader_rate < model_rate else None
            out[arch] = part
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    for name in ("env", "label-step", "throughput"):
        p = sub.add_parser(name)
        p.add_argument("--json", default=None, help="also write the result here")
        p.add_argument("--smoke", action="store_true", help="toy sizes; runs on the CPU too")
    ls = sub.choices["label-step"]
    ls.add_argument("--n", type=int, default=1_281_167)
    ls.add_argument("--k", type=int, default=3000)
    ls.add_argument("--d", type=int, default=2048)
    ls.add_argument("--paper-seconds", type=float, default=60.0, help="cap on the paper loop's iterations' time")
    tp = sub.choices["throughput"]
    tp.add_argument("--images", type=int, default=8192)
    tp.add_argument("--workers", type=int, default=None, help="loader workers [labelkit's default]")
    tp.add_argument("--scratch", default=None, help="where the JPEGs go [the system's temporary folder]")
    args = parser.parse_args()
    result = {"env": env, "label-step": label_step, "throughput": throughput}[args.part](args)
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    sys.exit(main())
