"""The timing probe: this run's own pieces timed on this machine -- a few training batches through the real
loader and augmentation, a label pass batch, one solve on a sample -- so the plan's estimates are measured, not
assumed."""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import torch

from ..data import Order, augmentation_preset, decoding, eval_transform, make_loader
from ..solver import Algorithm, Storage, kernel_path, solve
from ._config import memory_bytes
from ._graph import GRAPH_THUMBNAIL
from ._loop import autocast, images_to, model_to, resolve_device, train_step
from ._models import SelaModel, create_backbone, feature_dim

__all__ = []

# Iterations of a label step's solve on a trained network's features. Random features converge in 40-50; the
# label steps of the suite's image runs took a median of 105-755 per run (digits 545, glyphs 105, textures 755,
# glyphs-tail 303, the 10.8k folder 263-267; mean over all their solves 395), so the probe's solve counts at
# least this many. Heads on a table stay at the probe's count: theirs took 26-71.
TRAINED_ITERATIONS = 400


def _probe(config, source, ks: list[int] | None = None) -> dict:
    """Throughputs and sizes of a run as ``config`` would make it: ``ks`` given (a transfer run's heads) means
    no label step is timed."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    state = torch.get_rng_state()
    torch.manual_seed(config.seed)
    try:
        solves = ks is None  # a SeLa run solves; a transfer run (ks given: its heads' K) does not
        ks = config.head_clusters() if solves else ks
        backbone = create_backbone(config.arch, config.image_size, config.init, pretrained=config.pretrained,
                                   init_partial=config.init_partial)
        model = model_to(SelaModel(backbone, ks, getattr(config, "head_temperature", None)), device)
        dim = feature_dim(model.backbone)
        startup = time.perf_counter() - started
        batch = min(config.batch_size, max(8, len(source) // 4))  # at least one timed batch after the first
        decoded = _decoded_side(config, source)
        if decoded is None:
            train_rate = _train_rate(model, config, source, batch, device)
            label_rate = _label_rate(model, config, source, batch, device)
            decode_s = 0.0
        else:  # the run decodes the images once and augments them by the batch: time that path
            train_rate, label_rate = _batched_rates(model, config, decoded, batch, device)
            decode_s = _decode_seconds(source, decoded)
        # the path the run will take at full size, timed on a sample of rows from features of the run's width
        path = kernel_path(len(source), max(ks), device, memory_bytes(getattr(config, "label_memory", None)),
                           scratch=config.out)
        solve_s = _solve_seconds(config, len(source), ks, dim, path, TRAINED_ITERATIONS) if solves else 0.0
        checkpoint = sum(p.numel() * p.element_size() * 2 for p in model.parameters())
    finally:
        torch.set_rng_state(state)
    side = min(config.image_size, GRAPH_THUMBNAIL)
    return {"train_images_per_s": round(train_rate, 1), "label_images_per_s": round(label_rate, 1),
            "solve_s_per_step": round(solve_s, 3), "startup_s": round(startup + 2.0 + decode_s, 2),
            "decoded_side": decoded, "decode_s": round(decode_s, 2),
            # the graph start: one thumbnail pass (decoding dominates, as in the label pass) and the spectral
            # embedding (measured: 4.8 s for 10,782 samples on 2 cores, close to linear in N)
            "graph_s": round(len(source) / label_rate + 4.5e-4 * len(source), 2),
            "feature_dim": int(dim), "kernel": path if solves else None, "thumbnail_pixels": 3 * side * side,
            "checkpoint_bytes": int(checkpoint), "probe_s": round(time.perf_counter() - started, 2)}


def _decoded_side(config, source) -> int | None:
    """The side the run will keep its images decoded at, or None where it reads them per sample."""
    from .._util.system import system_memory_available

    if getattr(config, "pretrained", False) or getattr(config, "freeze", False) or config.augment == "heavy":
        return None  # own transforms, cached features, or an augmentation without a batch form: per sample
    folder = getattr(config, "feature_cache", None) or os.path.join(config.out, "features")
    chosen = decoding(source, config.image_size, budget=system_memory_available() // 4, folder=folder)
    return None if chosen is None else chosen[0]


def _batched_rates(model, config, side: int, batch: int, device) -> tuple[float, float]:
    """Images a second of training steps and of the label pass on decoded images (random pixels: the cost
    does not depend on what they show), each after a first batch."""
    pixels = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8)
    seeds = np.arange(batch, dtype=np.uint64)
    augment = augmentation_preset(config.augment, config.image_size).batch
    plain = eval_transform(config.image_size).batch
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    target = torch.zeros((len(model.heads), batch), dtype=torch.long)
    for step in range(5):
        if step == 1:
            t0 = time.perf_counter()
        x = augment(pixels, seeds + np.uint64(step * batch)) if augment else plain(pixels, seeds)
        train_step(model, optimizer, x, target, device, config.precision)
    train = 4 * batch / (time.perf_counter() - t0)
    model.eval()
    with torch.no_grad(), autocast(device, config.precision):
        for step in range(3):
            if step == 1:
                t1 = time.perf_counter()
            model.features(images_to(plain(pixels, seeds), device))
    return train, 2 * batch / (time.perf_counter() - t1)


def _decode_seconds(source, side: int, count: int = 32) -> float:
    """Seconds to decode every image once, from the time of ``count`` of them."""
    from PIL import Image

    picked = np.linspace(0, len(source) - 1, min(len(source), count)).astype(np.int64)
    began = time.perf_counter()
    for i in picked:
        try:
            source.load(int(i)).resize((side, side), Image.BILINEAR)
        except Exception:  # an undecodable image costs its attempt, as in the run
            pass
    return (time.perf_counter() - began) * len(source) / len(picked)


def _train_rate(model, config, source, batch: int, device) -> float:
    """Images a second of training steps, after the first batch (which pays for start-up)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loader = make_loader(source, augmentation_preset(config.augment, config.image_size),
                         Order(batch, shuffle=True, seed=config.seed), workers=config.workers)
    timed, images, t0 = 0, 0, None
    for i, (_indices, x, _bad) in enumerate(loader):
        if x is None:
            continue
        if i == 1:  # the first batch pays for worker start-up and lazy initialisation
            t0 = time.perf_counter()
        train_step(model, optimizer, x, torch.zeros((len(model.heads), len(x)), dtype=torch.long), device,
                   config.precision)
        if i >= 1:
            images += len(x)
            timed += 1
        if timed >= 6 or images >= len(source):
            break
    return images / (time.perf_counter() - t0) if images else 1.0


def _label_rate(model, config, source, batch: int, device) -> float:
    """Images a second of the label pass (plain view, features only)."""
    model.eval()
    loader = make_loader(source, eval_transform(config.image_size), Order(2 * batch, shuffle=True, seed=config.seed),
                         workers=config.workers)
    t1, seen = time.perf_counter(), 0
    with torch.no_grad(), autocast(device, config.precision):
        for i, (_indices, x, _bad) in enumerate(loader):
            if x is not None:
                model.features(images_to(x, device))
                seen += len(x)
            if i >= 2:
                break
    return seen / (time.perf_counter() - t1) if seen else 1.0


def _solve_seconds(config, n: int, ks: list[int], dim: int, path: str, iterations: int | None = None) -> float:
    """Seconds of one label step's solves at N = ``n``, scaled from solves on up to 20,000 rows of random
    features (the median of two to five, until they take 0.3 s: one solve's time wandered by 1.6x between
    plans); with ``iterations``, scaled to that many where the random features converged in fewer."""
    from ._sela import head_balance

    rows = min(n, 20_000)
    seconds = 0.0
    for k in sorted(set(ks)):
        features, weight = torch.randn(rows, dim), torch.randn(k, dim) * (2 / dim**0.5)
        times = []
        while len(times) < 5 and (len(times) < 2 or sum(times) < 0.3):
            t2 = time.perf_counter()
            result = solve(features=features, weight=weight, balance=head_balance(config, k, rows),
                           algorithm=Algorithm(lam=config.lam, tol=config.sinkhorn_tol), storage=Storage(kernel=path))
            times.append(time.perf_counter() - t2)
        scale = max(1.0, iterations / max(result.iterations, 1)) if iterations else 1.0
        seconds += float(np.median(times)) * scale * ks.count(k) * n / rows
    return seconds


def _table_probe(config, source) -> dict:
    """The costs of heads on an embedding table as ``config`` makes them, measured here: reading and projecting
    a block of the table (the whitening pass), and :func:`_head_rates` of the configured heads."""
    from ._frozen import TableRows

    started = time.perf_counter()
    state = torch.get_rng_state()
    torch.manual_seed(config.seed)
    try:
        n, dim = len(source), int(source.dim)
        width = _table_width(config, dim)
        rows = min(n, 65536)
        t0 = time.perf_counter()
        block = TableRows(source)[slice(0, rows)]
        read_s = time.perf_counter() - t0
        (block - block.mean(0)) @ torch.randn(dim, width)
        whiten_s = time.perf_counter() - t0
        # a batch of random rows read from a file, as the training batches of a table beyond memory are
        picked = np.sort(np.random.default_rng(config.seed).choice(n, min(n, 4 * config.batch_size), replace=False))
        t1 = time.perf_counter()
        source.vectors(picked)
        random_s = (time.perf_counter() - t1) / len(picked)
        rates = _head_rates(config, n, width)
        rates.update(_once_costs(config, n, block, whiten_s - read_s, width, rates["feature_dim"]))
        if config.neighbours:  # the neighbour search, timed exact on a sample (the plan scales it)
            from ._frozen import neighbours

            sample = min(n, 4096)
            t2 = time.perf_counter()
            neighbours(torch.randn(sample, width), config.neighbours)
            rates.update(neighbours_s=round(time.perf_counter() - t2, 3), neighbours_rows=sample)
    finally:
        torch.set_rng_state(state)
    return {"rows_read_per_s": round(rows / max(read_s, 1e-6), 1),
            "rows_whitened_per_s": round(rows / max(whiten_s, 1e-6), 1), "random_read_s_per_row": random_s,
            "width": width, **rates,
            "probe_s": round(time.perf_counter() - started, 2)}


def _once_costs(config, n: int, block: torch.Tensor, project_s: float, width: int, feature_dim: int) -> dict:
    """Seconds of what a table run does once, outside its epochs and label steps, timed on the probe's block:
    the whitening's fit (the covariance of up to 100,000 rows, then its eigenvectors), one head's centroid start
    (:func:`~labelkit.training._heads.seed_prototypes`) and one head's closing label-free checks
    (:func:`~labelkit.quality.head_quality`). On the small tables of bench/suite.py these took more than the
    epochs, and a plan that left them out under-estimated its runs by 1.4-2.2x."""
    from ..quality import QUALITY_ROWS, head_quality, kmeans, unit_centroids

    rows, dim = block.shape
    k = max(config.head_clusters())
    # the covariance costs dim / width times the probe's projection of the same rows; the eigensolver is timed
    # at up to 1,024 directions and scaled as its cube (on 2 cores that over-estimates 3,072 directions by 1.4x)
    covariance_s = project_s * dim / width * min(n, 100_000) / rows
    side = min(dim, 1024)
    spd = torch.randn(side, side, dtype=torch.float64)
    t0 = time.perf_counter()
    np.linalg.eigh((spd @ spd.T).numpy())
    eigh_s = (time.perf_counter() - t0) * (dim / side) ** 3
    features = torch.nn.functional.normalize(block @ torch.randn(dim, feature_dim), dim=1)
    seeded, checked = min(n, max(20_000, 40 * k)), min(n, QUALITY_ROWS)
    labels = np.random.default_rng(config.seed).integers(0, k, size=(1, min(checked, rows)))
    with warnings.catch_warnings():  # timings only: what k-means says of these rows, the run says of its own
        warnings.simplefilter("ignore")
        kmeans(features[:64].numpy(), 2, 0)  # scikit-learn's first fit in a process starts its threads
        t1 = time.perf_counter()
        unit_centroids(features[:seeded], k, config.seed)
        seed_s = (time.perf_counter() - t1) * seeded / min(seeded, rows)
        t2 = time.perf_counter()
        head_quality(labels, [k], features=features[:checked].numpy(), seed=config.seed)
        check_s = (time.perf_counter() - t2) * checked / min(checked, rows)
    return {"whiten_fit_s": round(covariance_s + eigh_s, 3), "head_seed_s": round(seed_s, 3),
            "head_check_s": round(check_s, 3)}


def _table_width(config, dim: int) -> int:
    """The whitening's width as the run will choose it, at most: --pca, else up to 128 directions (in each
    scaling, "both" included)."""
    return min(dim, config.pca) if config.pca else min(dim, 128)


def _head_rates(config, n: int, width: int) -> dict:
    """Samples a second of training steps and of the label pass of the trunk and heads of ``config`` on
    ``width``-wide vectors, and the seconds of one label step's solves at ``n`` rows."""
    from ..solver import kernel_path
    from ._frozen import FeatureTrunk, head_step

    ks = config.head_clusters()
    trunk = FeatureTrunk(width, config.head_hidden)
    heads = SelaModel(trunk, ks, config.head_temperature)
    optimizer = torch.optim.SGD(heads.parameters(), lr=1e-3, momentum=0.9)
    batch = min(config.batch_size, max(2, n))
    x = torch.randn(batch, width)
    targets = torch.stack([torch.randint(0, k, (batch,)) for k in ks])
    rows = torch.arange(batch)
    other = rows.roll(1) if config.neighbours else None
    heads.train()
    head_step(heads, optimizer, rows, (x, other), targets)  # the first step pays for lazy initialisation
    # half a second of steps at least: 20 steps (a tenth of a second at 10 M rows) read 108,000-220,000 rows/s
    # in four plans of one table minutes apart
    steps, t0 = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - t0 < 0.5:
        head_step(heads, optimizer, rows, (x, other), targets)
        steps += 1
    train_rate = steps * batch / (time.perf_counter() - t0)
    heads.eval()
    block = torch.randn(min(n, 16384), width)
    passes, t1 = 0, time.perf_counter()
    with torch.no_grad():
        while passes < 1 or time.perf_counter() - t1 < 0.1:  # one block alone is a millisecond or two
            heads.features(block)
            passes += 1
    label_rate = passes * len(block) / max(time.perf_counter() - t1, 1e-6)
    dim = feature_dim(trunk)
    path = kernel_path(n, max(ks), "cpu", memory_bytes(getattr(config, "label_memory", None)), scratch=config.out)
    return {"train_rows_per_s": round(train_rate, 1), "label_rows_per_s": round(label_rate, 1),
            "solve_s_per_step": round(_solve_seconds(config, n, ks, dim, path), 3), "feature_dim": int(dim),
            "kernel": path}
