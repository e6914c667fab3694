"""Label transfer (paper, section 4.3): train any architecture from scratch on an artefact's labels.

Ordinary supervised training -- cross-entropy averaged over the chosen heads -- on the samples whose ids the
artefact labels. The trained model's own predictions become a new artefact whose parent is the source one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artefact import Artefact, producer_versions, read_artefact
from ._config import TRANSFER_RECIPES, TransferConfig
from ..errors import DataError
from ..data import batches_per_rank, run_transforms
from ._models import SelaModel, create_backbone, feature_dim, init_record
from ._job import Job
from ..quality import parse_heads
from ._loop import Reporter, autocast, images_to, make_optimizer, model_to, seed_everything

__all__ = ["TransferConfig", "TransferRun", "TRANSFER_RECIPES", "run_transfer", "join_labels"]


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
    join: dict


def join_labels(artefact: Artefact, source, min_coverage: float) -> tuple[np.ndarray, dict]:
    """Row of the artefact for every sample of ``source`` (-1: no label), joined by sample id."""
    rows = source.positions_in(artefact.table.column("sample_id"))
    matched = int((rows >= 0).sum())
    # samples the labelling run could not decode have no label by design: not missing, but counted apart
    undecodable = {item["sample_id"] for item in artefact.metadata["data"].get("skipped", [])}
    unlabelled = [source.ids[i] for i in np.flatnonzero(rows < 0)]
    skipped = sorted(i for i in unlabelled if i in undecodable)
    report = {"matched": matched, "samples_without_label": len(unlabelled) - len(skipped),
              "labels_without_sample": artefact.num_samples - matched,
              "undecodable": len(skipped), "undecodable_examples": skipped[:5],
              "fingerprint_match": artefact.metadata["data"]["fingerprint"] == source.fingerprint}
    coverage = matched / max(len(source) - len(skipped), artefact.num_samples)
    if matched == 0 or coverage < min_coverage:
        raise DataError(
            f"only {matched:,} samples join the artefact by id: {report['samples_without_label']:,} samples of "
            f"{source.spec} have no label and {report['labels_without_sample']:,} labels have no sample "
            f"(coverage {coverage:.1%} < --min-coverage {min_coverage:g})")
    return rows, report


@torch.no_grad()
def _predict(job: Job, model, transform, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The trained heads' argmax and softmax confidence for every kept sample that can be read (each rank
    predicts its share, then every rank has all of them); returns labels, scores and the rows predicted."""
    from ..data import Order, make_loader

    config, source, dist = job.config, job.source, job.dist
    model.eval()
    order = Order(config.batch_size * 2, rank=dist.rank, world=dist.world, keep=keep)
    loader = make_loader(source, transform, order, workers=config.workers)
    heads = len(model.heads)
    labels = np.zeros((heads, len(source)), dtype=np.int64)
    scores = np.zeros((heads, len(source)), dtype=np.float32)
    mine = []
    job.reporter.phase("predict", batches_per_rank(source, keep, config.batch_size * 2, world=dist.world,
                                                   workers=config.workers))
    for indices, images, bad in loader:
        job.skips.add(bad)
        if images is not None:
            with autocast(job.device):
                outputs = model(images_to(images, job.device))
            for h, out in enumerate(outputs):
                prob, idx = torch.softmax(out.float(), 1).max(1)
                labels[h, indices.numpy()] = idx.cpu().numpy()
                scores[h, indices.numpy()] = prob.cpu().numpy()
            mine.append(indices.numpy())
        job.reporter.advance()
    job.reporter.end_phase()
    mine = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
    rows, values = dist.gather_rows(mine, np.concatenate([labels[:, mine], scores[:, mine]]).astype(np.float64))
    labels[:, rows] = values[:heads].astype(np.int64)
    scores[:, rows] = values[heads:].astype(np.float32)
    return labels, scores, np.sort(rows)


def run_transfer(config: TransferConfig, *, resume: bool = False, reporter: Reporter | None = None) -> TransferRun:
    """Train ``config.arch`` from scratch on the chosen heads of ``config.labels``; see the module docstring."""
    parent = read_artefact(config.labels)
    heads = parse_heads(config.heads, parent.num_heads, option="--heads")
    with Job(config, kind="transfer", resume=resume, reporter=reporter) as job:
        source = job.source
        rows, report = join_labels(parent, source, config.min_coverage)
        ks = [parent.heads[h].k for h in heads]
        targets = torch.zeros((len(heads), len(source)), dtype=torch.long)
        for i, h in enumerate(heads):
            targets[i, rows >= 0] = torch.from_numpy(parent.labels(h)[rows[rows >= 0]].astype(np.int64))
        labelled = rows >= 0
        seed_everything(config.seed)
        backbone = create_backbone(config.arch, config.image_size, config.init, pretrained=config.pretrained,
                                   init_partial=config.init_partial)
        model = model_to(SelaModel(backbone, ks), job.device)
        optimizer = make_optimizer(model, config.lr, config.momentum, config.weight_decay)
        record = {"kind": "transfer", "config": config.to_dict(), "arch": config.arch,
                  "image_size": config.image_size, "clusters": ks, "heads": heads, "head_temperature": None,
                  "feature_dim": feature_dim(model.backbone), "parents": [parent.artefact_id], "join": report,
                  "producer": producer_versions()}
        if not job.start(record, model=model, optimizer=optimizer):
            job.log({"type": "join", **report})
            if init_record(backbone):
                job.log(init_record(backbone))
        job.announce(model, heads=ks, parent=parent.artefact_id, matched=report["matched"])
        plain, transform = run_transforms(backbone, config.image_size, config.augment, config.pretrained)
        train_model = job.parallel(model)
        job.run_epochs(lambda: job.train_epoch(train_model, transform, targets, optimizer,
                                               keep=labelled & ~job.skips.mask()))
        predicted, scores, done = _predict(job, model, plain, labelled & ~job.skips.mask())
        done = done[~job.merge_skips()[done]]  # a sample unreadable now gets no label, whatever it had before
        artefact = Artefact.build([source.ids[i] for i in done], predicted[:, done], ks, scores=scores[:, done],
                                  method={"name": "transfer", "config": config.to_dict()},
                                  parents=[parent.artefact_id], data=job.provenance())
        path = job.run_dir.out / "labels.parquet"
        if job.run_dir.writer:
            artefact.write(path)
            job.run_dir.save_weights(model, config.arch, "transfer")
        job.finish()
        return TransferRun(out=job.run_dir.out, artefact=path, labels=artefact, matched=report["matched"],
                           missing_labels=report["samples_without_label"],
                           missing_samples=report["labels_without_sample"],
                           fingerprint_match=report["fingerprint_match"], seconds=time.perf_counter() - job.started,
                           join=report)
