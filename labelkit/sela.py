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
from .errors import ConfigError
from .loading import augmentation_preset, eval_transform
from .metrics import agreement
from .models import SelaModel, create_backbone, feature_dim
from .run import Job
from .sinkhorn import kernel_buffer, solve
from .train import Reporter, extract_features, make_optimizer, seed_everything

__all__ = ["run_sela", "label_schedule", "SelaRun", "SelaState", "augmentation"]


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


@dataclass
class SelaState:
    """What SeLa carries between label steps besides the network, per head: the current label of every
    sample, its score q(label | sample), and the Sinkhorn potentials that warm-start the next solve."""

    labels: torch.Tensor  # (T, N) int64
    scores: torch.Tensor  # (T, N) float32
    potentials: list  # T tensors of shape (K_h,), None before a head's first solve

    @classmethod
    def initial(cls, n: int, ks: list[int], seed: int) -> "SelaState":
        """A random equipartition for every head: the labels before the first label step."""
        rng = np.random.default_rng(seed)
        labels = torch.from_numpy(np.stack([rng.permutation(n) % k for k in ks]).astype(np.int64))
        return cls(labels, torch.zeros(labels.shape, dtype=torch.float32), [None] * len(ks))

    def state_dict(self) -> dict:
        return {"labels": self.labels.to(torch.int32), "scores": self.scores, "potentials": list(self.potentials)}

    def load_state_dict(self, saved: dict) -> None:
        self.labels, self.scores = saved["labels"].long(), saved["scores"]
        self.potentials = list(saved["potentials"])


def _run_record(config: SelaConfig, ks: list[int], dim: int) -> dict:
    return {"kind": "sela", "config": config.to_dict(), "arch": config.arch, "image_size": config.image_size,
            "clusters": ks, "head_temperature": config.head_temperature, "feature_dim": dim,
            "producer": producer_versions()}


def _label_step(job: Job, model: SelaModel, dim: int, state: SelaState, ks: list[int]) -> dict:
    """Step 2: one pass for the features, then one Sinkhorn solve per head, warm-started."""
    config, dist, source = job.config, job.dist, job.source
    model.eval()
    # the plain view, plus label_views - 1 augmented ones whose features are averaged in: labels then follow
    # what the augmentation leaves unchanged (``label_augment`` replaces the plain view by an augmented one)
    views = [augmentation(config) if config.label_augment else eval_transform(config.image_size)]
    views += [augmentation(config)] * (config.label_views - 1)
    keep = ~job.skips.mask()
    features, seen = None, None
    for transform in views:
        view, view_seen = extract_features(model.features, dim, source, transform, batch_size=config.batch_size * 2,
                                           workers=config.workers, device=job.device, skips=job.skips,
                                           reporter=job.reporter, keep=keep, rank=dist.rank, world=dist.world)
        features = view if features is None else features.add_(view)
        seen = view_seen if seen is None else seen & view_seen
    features /= len(views)
    labelled = ~job.merge_skips()  # every rank learns which samples any rank could not read
    rows = torch.from_numpy(np.flatnonzero(seen & labelled))  # this rank's share
    features = features[rows].to(job.device)
    everyone = np.flatnonzero(labelled)
    previous = state.labels[:, everyone].numpy()
    buffer = kernel_buffer(len(rows), max(ks), device=job.device)
    job.reporter.phase("solve", len(ks))
    heads = []
    start = time.perf_counter()
    for h in range(len(model.heads)):
        weight, bias = model.head_weights(h)
        bias = None if bias is None else bias.detach().float()
        with warnings.catch_warnings():  # an unconverged solve is recorded in the history instead
            warnings.simplefilter("ignore", RuntimeWarning)
            result = solve(features=features, weight=weight.detach().float(), bias=bias,
                           lam=config.lam, tol=config.sinkhorn_tol, warm_start=state.potentials[h],
                           exact_balance=config.exact_balance, buffer=buffer, device=job.device, group=dist.group)
        state.potentials[h] = torch.from_numpy(result.potentials)
        gathered_rows, values = dist.gather_rows(rows.numpy(), np.stack([result.labels.astype(np.float64),
                                                                          result.scores.astype(np.float64)]))
        state.labels[h, gathered_rows] = torch.from_numpy(values[0].astype(np.int64))
        state.scores[h, gathered_rows] = torch.from_numpy(values[1].astype(np.float32))
        info = {"head": h, "k": ks[h], "iterations": result.iterations, "seconds": round(result.seconds, 3),
                "error": result.error, "converged": result.converged, "size_min": int(result.sizes.min()),
                "size_max": int(result.sizes.max()), "empty": int((result.sizes == 0).sum())}
        if dist.main:  # the figures go to the history, which rank 0 writes
            labels = state.labels[h, everyone].numpy()
            info["nmi_previous"] = agreement(labels, previous[h])["nmi"]
            if source.has_truth:  # ground truth is only ever measured, never trained on
                truth = source.targets[everyone]
                known = truth >= 0
                scores = agreement(labels[known], truth[known], accuracy=True)
                info.update(nmi=scores["nmi"], ari=scores["ari"], accuracy=scores["accuracy"])
        heads.append(info)
        job.reporter.advance(head=h)
    job.reporter.end_phase()
    del buffer
    return {"labelled": len(everyone), "seconds": round(time.perf_counter() - start, 3), "heads": heads}


def run_sela(config: SelaConfig, *, resume: bool = False, reporter: Reporter | None = None) -> SelaRun:
    """Run SeLa as configured and write ``labels.parquet``, ``model.safetensors``, ``config.json`` and
    ``history.jsonl`` into ``config.out``. Checkpoints every epoch and on SIGTERM/SIGUSR1 (then raises
    :class:`~labelkit.errors.Preempted`); ``resume`` continues a stopped or killed run."""
    with Job(config, kind="generate", resume=resume, reporter=reporter) as job:
        ks = config.head_clusters()
        if max(ks) > len(job.source):
            raise ConfigError(f"--clusters {max(ks)} is more than the {len(job.source)} samples of {config.data}; "
                              "give a K below the number of samples, e.g. --clusters 10")
        seed_everything(config.seed)
        model = SelaModel(create_backbone(config.arch, config.image_size, config.init), ks, config.head_temperature)
        model = model.to(job.device)
        if job.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        dim = feature_dim(model.backbone)
        optimizer = make_optimizer(model, config.lr, config.momentum, config.weight_decay)
        state = SelaState.initial(len(job.source), ks, config.seed)
        resumed = job.start(_run_record(config, ks, dim), model=model, optimizer=optimizer, sela=state)
        job.announce(model, heads=ks, label_steps=len(label_schedule(config.epochs, config.label_steps)))
        train_model = job.parallel(model)
        schedule = set(label_schedule(config.epochs, config.label_steps))
        transform = augmentation(config)
        if not resumed and 0 in schedule:  # the first labels come from the untrained network
            job.log({"type": "label_step", "epoch": 0, **_label_step(job, model, dim, state, ks)})
            job.checkpoint_or_stop()
        for epoch in job.epochs():
            job.train_epoch(train_model, transform, state.labels, optimizer, keep=~job.skips.mask())  # step 1
            if epoch + 1 in schedule:
                job.log({"type": "label_step", "epoch": epoch + 1, **_label_step(job, model, dim, state, ks)})
            job.end_epoch()
        job.merge_skips()
        run = _finish(job, model, state, ks)
        job.finish()
        return run


def _finish(job: Job, model, state: SelaState, ks) -> SelaRun:
    config, source = job.config, job.source
    rows = np.flatnonzero(~job.skips.mask())
    labels = state.labels[:, rows].numpy()
    artefact = Artefact.build([source.ids[i] for i in rows], labels, ks, scores=state.scores[:, rows].numpy(),
                              method={"name": "sela", "config": config.to_dict()}, **job.provenance())
    path = job.run_dir.out / "labels.parquet"
    if job.run_dir.writer:
        artefact.write(path)
        job.run_dir.save_weights(model, config.arch, "sela")
    metrics = None
    if source.has_truth:
        truth = source.targets[rows]
        known = truth >= 0
        metrics = [dict(agreement(head[known], truth[known], accuracy=True), head=h, k=ks[h])
                   for h, head in enumerate(labels)]
    return SelaRun(out=job.run_dir.out, artefact=path, labels=artefact, metrics=metrics,
                   seconds=time.perf_counter() - job.started, skipped=job.skips.as_list(), history=job.run_dir.history)
