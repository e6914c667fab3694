"""Label transfer (paper, section 4.3): train any architecture from scratch on an artefact's labels.

Ordinary supervised training -- cross-entropy averaged over the chosen heads -- on the samples whose ids the
artefact labels. The trained model's own predictions become a new artefact whose parent is the source one.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .artefact import Artefact, producer_versions, read_artefact
from .data import resolve
from .distributed import from_environment
from .errors import DataError
from .loading import SkipLog, augmentation_preset, eval_transform
from .models import SelaModel, create_backbone, feature_dim
from .scoring import parse_heads
from .train import Reporter, RunDir, autocast, make_optimizer, resolve_device, seed_everything, train_epoch

__all__ = ["TransferConfig", "TransferRun", "TRANSFER_RECIPES", "run_transfer", "join_labels"]


@dataclass(frozen=True)
class TransferConfig:
    """Everything that determines a ``labelkit transfer`` run."""

    labels: str = ""
    data: str = ""
    arch: str = "alexnet"
    heads: str = "all"
    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.05
    lr_schedule: str = "step"
    warmup: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    image_size: int = 224
    augment: str = "paper"  # paper | heavy (+ equalize/autocontrast/sharpness) | digits | none
    min_coverage: float = 0.99
    workers: int = 4
    device: str = "auto"
    seed: int = 0
    init: str | None = None
    strict: bool = False
    out: str = "runs/transfer"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Defaults for a known data set, under config files and options (see labelkit.config.resolve_config).
TRANSFER_RECIPES = {
    "builtin:digits": {"image_size": 16, "augment": "digits", "epochs": 30, "batch_size": 64, "lr": 0.05,
                       "lr_schedule": "cosine", "warmup": 0.05, "weight_decay": 5e-4, "workers": 0,
                       "out": "runs/digits-transfer"},
}


@dataclass
class TransferRun:
    out: Path
    artefact: Path
    labels: Artefact
    matched: int
    missing_labels: int
    missing_samples: int
    fingerprint_match: bool
    seconds: float


def join_labels(artefact: Artefact, source, min_coverage: float) -> tuple[np.ndarray, dict]:
    """Row of the artefact for every sample of ``source`` (-1: no label), joined by sample id."""
    rows = source.positions_in(artefact.table.column("sample_id"))
    matched = int((rows >= 0).sum())
    report = {"matched": matched, "samples_without_label": len(source) - matched,
              "labels_without_sample": artefact.num_samples - matched,
              "fingerprint_match": artefact.metadata["data"]["fingerprint"] == source.fingerprint}
    coverage = matched / max(len(source), artefact.num_samples)
    if matched == 0 or coverage < min_coverage:
        raise DataError(
            f"only {matched:,} samples join the artefact by id: {report['samples_without_label']:,} samples of "
            f"{source.spec} have no label and {report['labels_without_sample']:,} labels have no sample "
            f"(coverage {coverage:.1%} < --min-coverage {min_coverage:g})")
    return rows, report


@torch.no_grad()
def _predict(model, source, keep, config, device, skips, reporter, dist) -> tuple[np.ndarray, np.ndarray]:
    """The trained heads' argmax and softmax confidence for every kept sample (each rank predicts its share,
    then every rank has all of them)."""
    from .loading import make_loader

    model.eval()
    loader = make_loader(source, eval_transform(config.image_size), batch_size=config.batch_size * 2,
                         workers=config.workers, keep=keep, rank=dist.rank, world=dist.world)
    labels = np.zeros((len(model.heads), len(source)), dtype=np.int64)
    scores = np.zeros((len(model.heads), len(source)), dtype=np.float32)
    reporter.phase("predict", len(loader) if source.map_style else 1)
    for indices, images, bad in loader:
        skips.add(bad)
        if images is not None:
            with autocast(device):
                outputs = model(images.to(device))
            for h, out in enumerate(outputs):
                prob, idx = torch.softmax(out.float(), 1).max(1)
                labels[h, indices.numpy()] = idx.cpu().numpy()
                scores[h, indices.numpy()] = prob.cpu().numpy()
        reporter.advance()
    reporter.end_phase()
    mine = np.flatnonzero(keep)[dist.rank :: dist.world] if source.map_style else np.flatnonzero(scores[0] > 0)
    rows, values = dist.gather_rows(mine, np.concatenate([labels[:, mine], scores[:, mine]]).astype(np.float64))
    heads = len(model.heads)
    labels[:, rows] = values[:heads].astype(np.int64)
    scores[:, rows] = values[heads:].astype(np.float32)
    return labels, scores


def run_transfer(config: TransferConfig, *, resume: bool = False, reporter: Reporter | None = None) -> TransferRun:
    """Train ``config.arch`` from scratch on the chosen heads of ``config.labels``; see the module docstring."""
    reporter = reporter or Reporter()
    started = time.perf_counter()
    dist, device = from_environment(resolve_device(config.device))
    if not dist.main:
        reporter = Reporter()  # under torchrun, rank 0 alone shows progress and writes files
    run_dir = RunDir(config, resume, reporter, writer=dist.main)
    parent = read_artefact(config.labels)
    heads = parse_heads(config.heads, parent.num_heads)
    source = resolve(config.data)
    rows, report = join_labels(parent, source, config.min_coverage)
    ks = [parent.heads[h].k for h in heads]
    targets = torch.zeros((len(heads), len(source)), dtype=torch.long)
    for i, h in enumerate(heads):
        targets[i, rows >= 0] = torch.from_numpy(parent.labels(h)[rows[rows >= 0]].astype(np.int64))
    keep = rows >= 0
    seed_everything(config.seed)
    model = SelaModel(create_backbone(config.arch, config.image_size, config.init), ks).to(device)
    optimizer = make_optimizer(model, config.lr, config.momentum, config.weight_decay)
    record = {"kind": "transfer", "config": config.to_dict(), "arch": config.arch, "image_size": config.image_size,
              "clusters": ks, "heads": heads, "head_temperature": None, "feature_dim": feature_dim(model.backbone),
              "parents": [parent.artefact_id], "join": report, "producer": producer_versions()}
    skips = SkipLog(source, strict=config.strict)
    start_epoch = 0
    saved = run_dir.restore(record)
    if saved:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start_epoch = saved["epoch"]
        skips.skipped.update(saved["skipped"])
    if not saved:
        run_dir.log({"type": "join", **report})
    transform = augmentation_preset(config.augment, config.image_size)
    train_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    for epoch in range(start_epoch, config.epochs):
        seed_everything(config.seed * 1000 + epoch)
        bad = skips.mask()
        stats = train_epoch(train_model, source, transform, targets, optimizer, epoch=epoch, epochs=config.epochs,
                            lr=config.lr, schedule=config.lr_schedule, warmup=config.warmup,
                            batch_size=max(1, config.batch_size // dist.world), workers=config.workers,
                            seed=config.seed, device=device, keep=keep & ~bad, skips=skips, reporter=reporter,
                            rank=dist.rank, world=dist.world)
        skips.skipped.update(dist.gather_dict(skips.skipped))
        run_dir.log_epoch(epoch, config.epochs, stats, started)
        run_dir.save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "skipped": dict(skips.skipped), "config": config.to_dict()})
    bad = skips.mask()
    predicted, scores = _predict(model, source, keep & ~bad, config, device, skips, reporter, dist)
    skips.skipped.update(dist.gather_dict(skips.skipped))
    done = np.flatnonzero(keep & ~bad)
    manifest = source.manifest(skips.as_list())
    artefact = Artefact.build([source.ids[i] for i in done], predicted[:, done], ks, scores=scores[:, done],
                              data_spec=config.data, data_fingerprint=manifest.fingerprint, data_count=manifest.count,
                              method={"name": "transfer", "config": config.to_dict()}, parents=[parent.artefact_id])
    path = run_dir.out / "labels.parquet"
    if run_dir.writer:
        artefact.write(path)
        run_dir.save_weights(model, config.arch, "transfer")
    dist.barrier()
    dist.close()
    return TransferRun(out=run_dir.out, artefact=path, labels=artefact, matched=report["matched"],
                       missing_labels=report["samples_without_label"], missing_samples=report["labels_without_sample"],
                       fingerprint_match=report["fingerprint_match"], seconds=time.perf_counter() - started)
