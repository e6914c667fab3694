"""Label transfer (paper, section 4.3): train any architecture from scratch on an artefact's labels.

Ordinary supervised training -- cross-entropy averaged over the chosen heads -- on the samples whose ids the
artefact labels. The trained model's own predictions become a new artefact whose parent is the source one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artefact import Artefact, producer_versions, read_artefact
from ._config import TRANSFER_RECIPE_NAMES, TRANSFER_RECIPES, TransferConfig, resolve_config
from ..errors import ConfigError, DataError
from ..data import batches_per_rank, is_embedding_spec, resolve, run_transforms
from ._models import SelaModel, create_backbone, feature_dim, init_record
from ._job import Job
from ..quality import agreement, parse_heads
from ._loop import Reporter, autocast, images_to, make_optimizer, model_to, seed_everything
from ._plan import (BUDGET_SHARE, DEFAULT_CPU_BUDGET, BudgetError, Plan, _clock, check_memory,
                    check_recipe_and_budget, chosen_options, refuse_used_out, resumed_plan)
from ._recipe import machine_info
from ._timing import _probe

__all__ = ["TransferConfig", "TransferRun", "TRANSFER_RECIPES", "TRANSFER_RECIPE_NAMES", "TRANSFER_MAX_EPOCHS",
           "run_transfer", "join_labels", "plan_transfer"]


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
    # per head learnt: how the trained model's labels keep the source's (``same``: share of samples with the same
    # id; NMI, ARI) and, where the data has classes, how they score against them (NMI, ARI, purity, accuracy)
    against_source: list[dict] | None = None
    metrics: list[dict] | None = None


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


def _trusted(parent: Artefact, rows: np.ndarray, min_confidence: float | None, report: dict) -> np.ndarray:
    """The samples to train on: those with a label, and with ``min_confidence`` only the labels at least that
    confident (SCAN's self-labelling keeps confident samples the same way); counted in ``report``."""
    labelled = rows >= 0
    if min_confidence is None:
        return labelled
    confident = parent.confidence() >= min_confidence
    labelled[labelled] = confident[rows[labelled]]
    report["confident"] = int(labelled.sum())
    if not labelled.any():
        raise ConfigError(f"--min-confidence {min_confidence:g}: no label is that confident (the highest is "
                          f"{float(parent.confidence().max()):.3f})")
    return labelled


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
            with autocast(job.device, job.config.precision):
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


def run_transfer(config: TransferConfig, *, resume: bool = False, reporter: Reporter | None = None,
                 plan: dict | None = None) -> TransferRun:
    """Train ``config.arch`` from scratch on the chosen heads of ``config.labels``; see the module docstring.
    ``plan`` (:meth:`labelkit.training.Plan.record` of :func:`~labelkit.training.plan_transfer`) is kept with the
    run, and its budget's deadline stops training between epochs."""
    parent = read_artefact(config.labels)
    heads = parse_heads(config.heads, parent.num_heads, option="--heads")
    with Job(config, kind="transfer", resume=resume, reporter=reporter) as job:
        job.plan = plan
        source = job.source
        rows, report = join_labels(parent, source, config.min_coverage)
        ks = [parent.heads[h].k for h in heads]
        targets = _targets(parent, heads, rows, len(source))
        labelled = _trusted(parent, rows, config.min_confidence, report)
        seed_everything(config.seed)
        backbone = create_backbone(config.arch, config.image_size, config.init, pretrained=config.pretrained,
                                   init_partial=config.init_partial)
        model = model_to(SelaModel(backbone, ks), job.device)
        optimizer = make_optimizer(model, config.lr, config.momentum, config.weight_decay)
        record = {"kind": "transfer", "config": config.to_dict(), "arch": config.arch,
                  "image_size": config.image_size, "clusters": ks, "heads": heads, "head_temperature": None,
                  "feature_dim": feature_dim(model.backbone), "parents": [parent.artefact_id], "join": report,
                  "class_names": [parent.heads[h].names and list(parent.heads[h].names) for h in heads],
                  "producer": producer_versions(), **({"plan": plan} if plan else {})}
        if not job.start(record, model=model, optimizer=optimizer):
            job.log({"type": "join", **report})
            if init_record(backbone):
                job.log(init_record(backbone))
        job.announce(model, heads=ks, parent=parent.artefact_id, matched=report["matched"])
        if not config.pretrained:  # a pretrained backbone's own transforms work per sample
            job.decode_images(config.image_size)
        plain, transform = run_transforms(backbone, config.image_size, config.augment, config.pretrained)
        train_model = job.parallel(model)
        job.run_epochs(lambda: job.train_epoch(train_model, transform, targets, optimizer,
                                               keep=labelled & ~job.skips.mask()))
        # every sample with a label gets the model's, also those too doubtful to train on
        predicted, scores, done = _predict(job, model, plain, (rows >= 0) & ~job.skips.mask())
        done = done[~job.merge_skips()[done]]  # a sample unreadable now gets no label, whatever it had before
        quality = _quality(predicted[:, done], targets[:, done].numpy(), heads, ks,
                           source.targets[done] if source.has_truth else None)
        job.log({"type": "quality", **quality})
        method = {"name": "transfer", "config": config.to_dict(), "quality": quality}
        if job.plan:
            method["recipe"] = job.plan
        if job.stopped_early:
            method["stopped_early"] = job.stopped_early
        artefact = Artefact.build(source.ids_at(done), predicted[:, done], ks, scores=scores[:, done],
                                  method=method, parents=[parent.artefact_id], data=job.provenance(),
                                  names=record["class_names"])  # the model's classes are the source's clusters
        path = job.run_dir.out / "labels.parquet"
        if job.run_dir.writer:
            artefact.write(path)
            job.run_dir.save_weights(model, config.arch, "transfer")
        job.finish()
        return TransferRun(out=job.run_dir.out, artefact=path, labels=artefact, matched=report["matched"],
                           missing_labels=report["samples_without_label"],
                           missing_samples=report["labels_without_sample"],
                           fingerprint_match=report["fingerprint_match"], seconds=time.perf_counter() - job.started,
                           join=report, against_source=quality["against_source"], metrics=quality.get("truth"))


def _targets(parent: Artefact, heads: list[int], rows: np.ndarray, n: int) -> torch.Tensor:
    """(heads, n) labels of the data's samples from the artefact's rows (0 where a sample has none)."""
    targets = torch.zeros((len(heads), n), dtype=torch.long)
    for i, h in enumerate(heads):
        targets[i, rows >= 0] = torch.from_numpy(parent.labels(h)[rows[rows >= 0]].astype(np.int64))
    return targets


def _quality(predicted: np.ndarray, learnt: np.ndarray, heads: list[int], ks: list[int],
             truth: np.ndarray | None) -> dict:
    """The trained model's labels against the labels it learnt (per head: the share that kept their id, NMI,
    ARI) and against the data's classes where it has them."""
    against = [{"head": i, "source_head": h, "k": k, "same": float((pred == want).mean()), **agreement(pred, want)}
               for i, (h, k, pred, want) in enumerate(zip(heads, ks, predicted, learnt))]
    quality = {"against_source": against}
    if truth is not None:
        known = truth >= 0
        quality["truth"] = [dict(agreement(pred[known], truth[known], accuracy=True), head=i, k=k)
                            for i, (k, pred) in enumerate(zip(ks, predicted))]
    return quality


# -- the plan: what a transfer takes from the run that made its labels ----------------------------------------

TRANSFER_MAX_EPOCHS = 30  # fixed labels do not drift as self-labels do; the digits transfer recipe's 30 epochs
# the options a transfer takes from the run that made its labels: what suits the images and the machine
_FROM_SOURCE = ("image_size", "augment", "batch_size", "lr", "lr_schedule", "warmup", "momentum", "weight_decay",
                "workers")


def plan_transfer(options: dict, config_file: str | None = None, *, recipe: str | None = None,
                  budget: str | None = None, resume: bool = False, probe: bool = True) -> Plan:
    """Resolve a ``transfer`` run and estimate it: defaults < recipe < config file < options given.

    The recipe is ``source`` for labels made by ``generate`` on images (the default there): the data, input size,
    augmentation and optimiser of the run that made them, and as many epochs as fit the budget (15 minutes on a
    CPU unless ``budget`` says otherwise; at most 30). ``paper`` is the paper's ImageNet setting (224 px, 90
    epochs) and ``digits`` the built-in digits' recipe. The probe times a few batches of the real data on this
    machine (also with ``probe=False`` when the budget sets the epochs); without it the estimates are left out."""
    seconds, distributed = check_recipe_and_budget(recipe, TRANSFER_RECIPE_NAMES, budget)
    if resume:
        return resumed_plan(resolve_config(options, config_file, cls=TransferConfig, recipes=TRANSFER_RECIPES,
                                           resume=True))
    chosen = chosen_options(options, config_file)
    if not chosen.get("labels"):
        raise ConfigError("transfer needs the label artefact (or the run directory) to learn from")
    parent = read_artefact(chosen["labels"])
    data = chosen.get("data") or parent.metadata["data"].get("spec")
    name, base, reasons = _transfer_recipe(recipe, parent, chosen, data)
    config = resolve_config({**options, "data": data}, config_file, cls=TransferConfig, recipes={data: base})
    source = resolve(config.data)
    ks = [parent.heads[h].k for h in parse_heads(config.heads, parent.num_heads, option="--heads")]
    plan = Plan(config, recipe=name, reasons=reasons, machine=machine_info(config.device),
                profile={"samples": len(source)})
    if seconds is None and plan.machine["device"] == "cpu" and name == "source" and not distributed:
        seconds = DEFAULT_CPU_BUDGET
        plan.reasons["budget"] = f"{_clock(seconds)} (the default on a CPU; --budget changes it)"
    plan.budget = seconds
    refuse_used_out(config.out)
    if not distributed and (probe or (seconds is not None and "epochs" not in chosen)):  # the budget needs it
        _estimate(plan, source, ks, fit_epochs=seconds is not None and "epochs" not in chosen)
    return plan


def _transfer_recipe(recipe: str | None, parent: Artefact, chosen: dict, data: str) -> tuple[str, dict, dict]:
    """(name, options, reasons) of the recipe a transfer builds on (see :func:`plan_transfer`)."""
    made_by = parent.metadata.get("method") or {}
    made = made_by.get("config") or {}
    images = made_by.get("name") == "sela" and not made.get("freeze") and "image_size" in made \
        and not is_embedding_spec(str(made.get("data")))
    name = recipe or ("digits" if data in TRANSFER_RECIPES else "source" if images else "paper")
    reasons = {} if "data" in chosen else {"data": f"{data}, the data the labels were made on (the artefact records it)"}
    if name == "digits":
        return name, dict(TRANSFER_RECIPES["builtin:digits"]), reasons
    if name == "paper":
        return name, {}, reasons
    if not images:
        raise ConfigError(f"--recipe source: {chosen['labels']} was not made by generate on images, so there is no "
                          "run to follow; give --recipe paper and the options")
    base = {k: made[k] for k in _FROM_SOURCE if k in made}
    base.update(epochs=TRANSFER_MAX_EPOCHS, out=_transfer_out(chosen["labels"]))
    taken = [k for k in _FROM_SOURCE if k in base and k not in chosen]
    if taken:
        reasons["source"] = (f"{', '.join(taken)} as the run that made the labels ({made.get('arch')} at "
                             f"{made.get('image_size')} px)")
    return name, base, reasons


def _estimate(plan: Plan, source, ks: list[int], fit_epochs: bool) -> None:
    """Probe this machine, fit the epochs to the budget if asked, and estimate time, memory and disk."""
    config, n = plan.config, len(source)
    plan.probe = _probe(config, source, ks=ks)
    per_epoch = n / plan.probe["train_images_per_s"]
    predict = n / plan.probe["label_images_per_s"]
    fixed = plan.probe["startup_s"] + predict
    if fit_epochs:
        epochs = math.floor((BUDGET_SHARE * plan.budget - fixed) / per_epoch)
        if epochs < 1:
            raise BudgetError(f"--budget {_clock(plan.budget)} is too short for one epoch and the prediction pass of "
                              f"{n:,} samples here (about {_clock(fixed + per_epoch)}); give a longer --budget, or a "
                              "smaller --image-size or --arch")
        cap = TRANSFER_MAX_EPOCHS if plan.recipe == "source" else config.epochs
        plan.config = config = dataclasses.replace(config, epochs=min(epochs, cap))
        plan.reasons["epochs"] = (f"{config.epochs} epoch{'s' if config.epochs > 1 else ''} fit the "
                                  f"{_clock(plan.budget)} budget at the probed speed"
                                  + (" (the recipe's most)" if config.epochs == cap else ""))
    memory = n * (plan.probe["feature_dim"] * 4 + sum(ks) * 4)  # features, or each head's scores, of every sample
    disk = 2 * plan.probe["checkpoint_bytes"] + n * (len(ks) * 8 + 24) + 4096 * config.epochs
    plan.estimate = {"seconds": round(fixed + config.epochs * per_epoch, 1), "label_memory": int(memory),
                     "disk": int(disk), "label_steps": 0, "per_epoch_s": round(per_epoch, 2),
                     "per_label_step_s": round(predict, 2)}
    check_memory(plan, memory)


def _transfer_out(labels: str) -> str:
    """Beside the run that made the labels: ``runs/photos`` (or its ``labels.parquet``) -> ``runs/photos-transfer``."""
    path = os.path.normpath(str(labels))
    if path.endswith(".parquet"):
        path = os.path.dirname(path) if os.path.basename(path) == "labels.parquet" else path[: -len(".parquet")]
    return (path or "runs/labels") + "-transfer"
