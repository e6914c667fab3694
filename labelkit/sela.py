"""SeLa: self-labelling via simultaneous clustering and representation learning (Asano et al., ICLR 2020).

The loop, as in the paper: for each epoch, train the backbone and T heads with cross-entropy on the current
labels (step 1); at the scheduled epochs, pass over the data once, and for each head find the labels that
minimise the same cross-entropy under equal cluster sizes with Sinkhorn-Knopp (step 2). The last label step
comes after the last epoch, and its labels are the artefact.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .artefact import Artefact, producer_versions
from .config import SelaConfig
from .data import Source, resolve
from .errors import ConfigError
from .loading import SkipLog, augmentation_preset, eval_transform
from .metrics import compare
from .models import SelaModel, create_backbone, feature_dim
from .sinkhorn import kernel_buffer, solve
from .distributed import Distributed, from_environment
from .train import Reporter, RunDir, extract_features, make_optimizer, resolve_device, seed_everything, train_epoch

__all__ = ["run_sela", "label_schedule", "SelaRun", "augmentation"]



def label_schedule(epochs: int, steps: int) -> list[int]:
    """Epochs after which the labels are re-solved: the i-th of M at t_i = ((i - 1) / (M - 1))^2 of training
    (paper, appendix A.1). Epoch 0 means before any training (on the randomly initialised network); the last
    comes after the final epoch. Dense early, sparse late, at most one per epoch.
    """
    if steps == 1:
        return [epochs]
    return sorted({round(epochs * ((i - 1) / (steps - 1)) ** 2) for i in range(1, steps + 1)})


def augmentation(config: SelaConfig):
    return augmentation_preset(config.augment, config.image_size)


@dataclass
class SelaRun:
    """What a finished run produced."""

    out: Path
    artefact: Path
    labels: Artefact
    metrics: list[dict] | None
    seconds: float
    skipped: list[dict]
    history: Path


def _random_equipartition(n: int, ks: list[int], seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([rng.permutation(n) % k for k in ks]).astype(np.int64))


def _run_record(config: SelaConfig, ks: list[int], dim: int) -> dict:
    return {"kind": "sela", "config": config.to_dict(), "arch": config.arch, "image_size": config.image_size,
            "clusters": ks, "head_temperature": config.head_temperature, "feature_dim": dim,
            "producer": producer_versions()}


def _label_step(model, dim, source, config, state, device, skips, reporter, ks, dist: Distributed) -> dict:
    """Step 2: one pass for the features, then one Sinkhorn solve per head, warm-started."""
    model.eval()
    keep = ~state["bad"]
    # the plain view, plus label_views - 1 augmented ones whose features are averaged in: labels then follow
    # what the augmentation leaves unchanged (``label_augment`` replaces the plain view by an augmented one)
    views = [augmentation(config) if config.label_augment else eval_transform(config.image_size)]
    views += [augmentation(config)] * (config.label_views - 1)
    features, seen = None, None
    for transform in views:
        view, view_seen = extract_features(model.features, dim, source, transform, batch_size=config.batch_size * 2,
                                           workers=config.workers, device=device, skips=skips, reporter=reporter,
                                           keep=keep, rank=dist.rank, world=dist.world)
        features = view if features is None else features.add_(view)
        seen = view_seen if seen is None else seen & view_seen
    features /= len(views)
    # each rank saw its own share of the samples: every rank learns which samples were seen by any
    all_rows, _ = dist.gather_rows(np.flatnonzero(seen), np.zeros((1, int(seen.sum()))))
    seen_anywhere = np.zeros(len(source), dtype=bool)
    seen_anywhere[all_rows] = True
    state["bad"] |= ~seen_anywhere
    rows = torch.from_numpy(np.flatnonzero(seen))
    features = features[rows].to(device)
    previous = state["labels"].clone()
    buffer = kernel_buffer(len(rows), max(ks), device=device)
    reporter.phase("solve", len(ks))
    heads = []
    start = time.perf_counter()
    for h in range(len(model.heads)):
        weight, bias = model.head_weights(h)
        bias = None if bias is None else bias.detach().float()
        with warnings.catch_warnings():  # an unconverged solve is recorded in the history instead
            warnings.simplefilter("ignore", RuntimeWarning)
            result = solve(features=features, weight=weight.detach().float(), bias=bias,
                           lam=config.lam, tol=config.sinkhorn_tol, warm_start=state["potentials"][h],
                           exact_balance=config.exact_balance and not dist.enabled, buffer=buffer, device=device,
                           group=dist.group)
        state["potentials"][h] = torch.from_numpy(result.potentials)
        gathered_rows, values = dist.gather_rows(rows.numpy(), np.stack([result.labels.astype(np.float64),
                                                                          result.scores.astype(np.float64)]))
        state["labels"][h, gathered_rows] = torch.from_numpy(values[0].astype(np.int64))
        state["scores"][h, gathered_rows] = torch.from_numpy(values[1].astype(np.float32))
        info = {"head": h, "k": ks[h], "iterations": result.iterations, "seconds": round(result.seconds, 3),
                "error": result.error, "converged": result.converged, "size_min": int(result.sizes.min()),
                "size_max": int(result.sizes.max()), "empty": int((result.sizes == 0).sum())}
        everyone = np.sort(gathered_rows)
        labels = state["labels"][h, everyone].numpy()
        info["nmi_previous"] = compare(labels, previous[h, everyone].numpy())["nmi"]
        if source.has_truth:  # ground truth is only ever measured, never trained on
            truth = source.targets[everyone]
            known = truth >= 0
            scores = compare(labels[known], truth[known])
            info.update(nmi=scores["nmi"], ari=scores["ari"], accuracy=scores["accuracy"])
        heads.append(info)
        reporter.advance(head=h)
    reporter.end_phase()
    del buffer
    return {"labelled": int(seen_anywhere.sum()), "seconds": round(time.perf_counter() - start, 3), "heads": heads}


def run_sela(config: SelaConfig, *, resume: bool = False, reporter: Reporter | None = None) -> SelaRun:
    """Run SeLa as configured and write ``labels.parquet``, ``model.safetensors``, ``config.json`` and
    ``history.jsonl`` into ``config.out``. Checkpoints every epoch; ``resume`` continues a killed run."""
    reporter = reporter or Reporter()
    started = time.perf_counter()
    device = resolve_device(config.device)
    dist, device = from_environment(device)
    if not dist.main:
        reporter = Reporter()  # under torchrun, rank 0 alone shows progress and writes files
    run_dir = RunDir(config, resume, reporter, writer=dist.main)
    source = resolve(config.data)
    ks = config.head_clusters()
    if max(ks) > len(source):
        raise ConfigError(f"--clusters {max(ks)} is more than the {len(source)} samples of {config.data}")
    seed_everything(config.seed)
    model = SelaModel(create_backbone(config.arch, config.image_size, config.init), ks, config.head_temperature)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    dim = feature_dim(model.backbone)
    optimizer = make_optimizer(model, config.lr, config.momentum, config.weight_decay)
    n = len(source)
    state = {"epoch": 0, "labels": _random_equipartition(n, ks, config.seed), "potentials": [None] * len(ks),
             "scores": torch.zeros((len(ks), n), dtype=torch.float32), "bad": np.zeros(n, dtype=bool)}
    skips = SkipLog(source, strict=config.strict)
    saved = run_dir.restore(_run_record(config, ks, dim))
    if saved:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update(epoch=saved["epoch"], labels=saved["labels"].long(), scores=saved["scores"],
                     potentials=list(saved["potentials"]), bad=saved["bad"].numpy().astype(bool))
        skips.skipped.update(saved["skipped"])
    log = run_dir.log
    train_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        if config.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def checkpoint() -> None:
        run_dir.save({
            "epoch": state["epoch"], "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "labels": state["labels"].to(torch.int32), "scores": state["scores"], "potentials": state["potentials"],
            "bad": torch.from_numpy(state["bad"]), "skipped": dict(skips.skipped), "config": config.to_dict()})

    schedule = set(label_schedule(config.epochs, config.label_steps))
    transform = augmentation(config)
    if state["epoch"] == 0 and 0 in schedule and not run_dir.lines:
        step = _label_step(model, dim, source, config, state, device, skips, reporter, ks, dist)
        log({"type": "label_step", "epoch": 0, **step})
        checkpoint()
    for epoch in range(state["epoch"], config.epochs):
        seed_everything(config.seed * 1000 + epoch)  # each epoch's randomness depends on (seed, epoch) only
        stats = train_epoch(train_model, source, transform, state["labels"], optimizer, epoch=epoch, epochs=config.epochs,
                            lr=config.lr, schedule=config.lr_schedule, warmup=config.warmup,
                            batch_size=max(1, config.batch_size // dist.world), workers=config.workers,
                            seed=config.seed, device=device, keep=~state["bad"], skips=skips, reporter=reporter,
                            rank=dist.rank,
                            world=dist.world)
        skips.skipped.update(dist.gather_dict(skips.skipped))
        state["bad"] |= skips.mask()
        run_dir.log_epoch(epoch, config.epochs, stats, started)
        if epoch + 1 in schedule:
            step = _label_step(model, dim, source, config, state, device, skips, reporter, ks, dist)
            log({"type": "label_step", "epoch": epoch + 1, **step})
        state["epoch"] = epoch + 1
        checkpoint()
    skips.skipped.update(dist.gather_dict(skips.skipped))
    try:
        return _finish(config, source, model, state, skips, run_dir, ks, started)
    finally:
        dist.barrier()
        dist.close()


def _finish(config, source: Source, model, state, skips, run_dir: RunDir, ks, started) -> SelaRun:
    rows = np.flatnonzero(~state["bad"])
    ids = [source.ids[i] for i in rows]
    manifest = source.manifest(skips.as_list())
    artefact = Artefact.build(
        ids, state["labels"][:, rows].numpy(), ks, scores=state["scores"][:, rows].numpy(), data_spec=config.data,
        data_fingerprint=manifest.fingerprint, data_count=manifest.count,
        method={"name": "sela", "config": config.to_dict()})
    path = run_dir.out / "labels.parquet"
    if run_dir.writer:
        artefact.write(path)
        run_dir.save_weights(model, config.arch, "sela")
    metrics = None
    if source.has_truth:
        truth = source.targets[rows]
        known = truth >= 0
        metrics = [dict(compare(artefact_labels[known], truth[known]), head=h, k=ks[h])
                   for h, artefact_labels in enumerate(state["labels"][:, rows].numpy())]
    return SelaRun(out=run_dir.out, artefact=path, labels=artefact, metrics=metrics,
                   seconds=time.perf_counter() - started, skipped=skips.as_list(), history=run_dir.history)
