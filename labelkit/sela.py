"""SeLa: self-labelling via simultaneous clustering and representation learning (Asano et al., ICLR 2020).

The loop, as in the paper: for each epoch, train the backbone and T heads with cross-entropy on the current
labels (step 1); at the scheduled epochs, pass over the data once, and for each head find the labels that
minimise the same cross-entropy under equal cluster sizes with Sinkhorn-Knopp (step 2). The last label step
comes after the last epoch, and its labels are the artefact.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._io import write_text_atomic
from .artefact import Artefact, producer_versions
from .config import SelaConfig
from .data import Source, resolve
from .errors import ConfigError
from .loading import SkipLog, eval_transform, train_transform
from .metrics import compare
from .models import SelaModel, create_backbone, feature_dim
from .sinkhorn import kernel_buffer, solve
from .train import (Reporter, extract_features, load_checkpoint, make_optimizer, resolve_device,
                    save_checkpoint, seed_everything, train_epoch)

__all__ = ["run_sela", "label_schedule", "SelaRun", "augmentation"]

_RUN_FIELDS_FREE = {"out", "workers", "device", "strict"}  # may change when a run is resumed


def label_schedule(epochs: int, steps: int) -> list[int]:
    """Epochs after which the labels are re-solved: the i-th of M at t_i = ((i - 1) / (M - 1))^2 of training
    (paper, appendix A.1). Epoch 0 means before any training (on the randomly initialised network); the last
    comes after the final epoch. Dense early, sparse late, at most one per epoch.
    """
    if steps == 1:
        return [epochs]
    return sorted({round(epochs * ((i - 1) / (steps - 1)) ** 2) for i in range(1, steps + 1)})


def augmentation(config: SelaConfig):
    size = config.image_size
    if config.augment == "paper":
        return train_transform(size)
    if config.augment == "digits":  # no flips (they change digits); small crops and rotations
        # brightness and contrast jitter keep clusters from forming by ink intensity
        return train_transform(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), flip=False, jitter=0.4,
                               colour_jitter=False, grayscale_p=0.0, rotate=12.0)
    return eval_transform(size)


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


def _prepare_out(config: SelaConfig, resume: bool) -> Path:
    out = Path(config.out)
    stored = out / "config.json"
    if stored.exists():
        previous = json.loads(stored.read_text()).get("config", {})
        if not resume:
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        ours = config.to_dict()
        changed = sorted(k for k in ours if k not in _RUN_FIELDS_FREE and previous.get(k) != ours[k])
        if changed:
            detail = ", ".join(f"{k}: {previous.get(k)!r} -> {ours[k]!r}" for k in changed)
            raise ConfigError(f"--resume: {out} holds a run with other settings ({detail})")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _run_record(config: SelaConfig, ks: list[int], dim: int) -> dict:
    return {"kind": "sela", "config": config.to_dict(), "arch": config.arch, "image_size": config.image_size,
            "clusters": ks, "head_temperature": config.head_temperature, "feature_dim": dim,
            "producer": producer_versions()}


def _label_step(model, dim, source, config, state, device, skips, reporter, ks) -> dict:
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
                                           keep=keep)
        features = view if features is None else features.add_(view)
        seen = view_seen if seen is None else seen & view_seen
    features /= len(views)
    state["bad"] |= ~seen
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
                           exact_balance=config.exact_balance, buffer=buffer, device=device)
        state["potentials"][h] = torch.from_numpy(result.potentials)
        state["labels"][h, rows] = torch.from_numpy(result.labels).long()
        state["scores"][h, rows] = torch.from_numpy(result.scores)
        info = {"head": h, "k": ks[h], "iterations": result.iterations, "seconds": round(result.seconds, 3),
                "error": result.error, "converged": result.converged, "size_min": int(result.sizes.min()),
                "size_max": int(result.sizes.max()), "empty": int((result.sizes == 0).sum())}
        labels = result.labels
        info["nmi_previous"] = compare(labels, previous[h, rows].numpy())["nmi"]
        if source.has_truth:  # ground truth is only ever measured, never trained on
            truth = source.targets[rows.numpy()]
            known = truth >= 0
            scores = compare(labels[known], truth[known])
            info.update(nmi=scores["nmi"], ari=scores["ari"], accuracy=scores["accuracy"])
        heads.append(info)
        reporter.advance(head=h)
    reporter.end_phase()
    del buffer
    return {"labelled": int(len(rows)), "seconds": round(time.perf_counter() - start, 3), "heads": heads}


def run_sela(config: SelaConfig, *, resume: bool = False, reporter: Reporter | None = None) -> SelaRun:
    """Run SeLa as configured and write ``labels.parquet``, ``model.safetensors``, ``config.json`` and
    ``history.jsonl`` into ``config.out``. Checkpoints every epoch; ``resume`` continues a killed run."""
    reporter = reporter or Reporter()
    started = time.perf_counter()
    out = _prepare_out(config, resume)
    source = resolve(config.data)
    ks = config.head_clusters()
    if max(ks) > len(source):
        raise ConfigError(f"--clusters {max(ks)} is more than the {len(source)} samples of {config.data}")
    device = resolve_device(config.device)
    seed_everything(config.seed)
    model = SelaModel(create_backbone(config.arch, config.image_size, config.init), ks, config.head_temperature)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    dim = feature_dim(model.backbone)
    optimizer = make_optimizer(model, config.lr, config.momentum, config.weight_decay)
    n = len(source)
    state = {"epoch": 0, "labels": _random_equipartition(n, ks, config.seed), "potentials": [None] * len(ks),
             "scores": torch.zeros((len(ks), n), dtype=torch.float32), "bad": np.zeros(n, dtype=bool),
             "history_lines": 0}
    skips = SkipLog(source, strict=config.strict)
    checkpoint_path = out / "checkpoint.pt"
    history_path = out / "history.jsonl"
    if resume and checkpoint_path.exists():
        saved = load_checkpoint(checkpoint_path)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update(epoch=saved["epoch"], labels=saved["labels"].long(), scores=saved["scores"],
                     potentials=list(saved["potentials"]), bad=saved["bad"].numpy().astype(bool),
                     history_lines=saved["history_lines"])
        skips.skipped.update(saved["skipped"])
        lines = history_path.read_text().splitlines()[: state["history_lines"]] if history_path.exists() else []
        write_text_atomic(history_path, "".join(line + "\n" for line in lines))
    else:
        write_text_atomic(history_path, "")
    write_text_atomic(out / "config.json", json.dumps(_run_record(config, ks, dim), indent=2))

    def log(record: dict) -> None:
        with open(history_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        state["history_lines"] += 1
        reporter.record(record)

    def checkpoint() -> None:
        save_checkpoint(checkpoint_path, {
            "epoch": state["epoch"], "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "labels": state["labels"].to(torch.int32), "scores": state["scores"], "potentials": state["potentials"],
            "bad": torch.from_numpy(state["bad"]), "history_lines": state["history_lines"],
            "skipped": dict(skips.skipped), "config": config.to_dict()})

    schedule = set(label_schedule(config.epochs, config.label_steps))
    transform = augmentation(config)
    epoch_times = []
    if state["epoch"] == 0 and 0 in schedule and not state["history_lines"]:
        step = _label_step(model, dim, source, config, state, device, skips, reporter, ks)
        log({"type": "label_step", "epoch": 0, **step})
        checkpoint()
    for epoch in range(state["epoch"], config.epochs):
        seed_everything(config.seed * 1000 + epoch)  # each epoch's randomness depends on (seed, epoch) only
        stats = train_epoch(model, source, transform, state["labels"], optimizer, epoch=epoch, epochs=config.epochs,
                            lr=config.lr, schedule=config.lr_schedule, warmup=config.warmup,
                            batch_size=config.batch_size, workers=config.workers, seed=config.seed,
                            device=device, keep=~state["bad"], skips=skips, reporter=reporter)
        state["bad"][[source.index[i] for i in skips.skipped]] = True
        epoch_times.append(stats["seconds"])
        left = (config.epochs - epoch - 1) * float(np.mean(epoch_times[-5:]))
        log({"type": "epoch", "epoch": epoch + 1, "epochs": config.epochs, "loss": round(stats["loss"], 5),
             "lr": stats["lr"], "images_per_s": round(stats["images_per_s"], 1),
             "elapsed_s": round(time.perf_counter() - started, 1), "eta_s": round(left, 1)})
        if epoch + 1 in schedule:
            step = _label_step(model, dim, source, config, state, device, skips, reporter, ks)
            log({"type": "label_step", "epoch": epoch + 1, **step})
        state["epoch"] = epoch + 1
        checkpoint()
    return _finish(config, source, model, state, skips, out, history_path, ks, started)


def _finish(config, source: Source, model, state, skips, out: Path, history_path: Path, ks, started) -> SelaRun:
    from safetensors.torch import save_file

    from ._io import atomic_path

    rows = np.flatnonzero(~state["bad"])
    ids = [source.ids[i] for i in rows]
    manifest = source.manifest(skips.as_list())
    artefact = Artefact.build(
        ids, state["labels"][:, rows].numpy(), ks, scores=state["scores"][:, rows].numpy(), data_spec=config.data,
        data_fingerprint=manifest.fingerprint, data_count=manifest.count,
        method={"name": "sela", "config": config.to_dict()})
    path = artefact.write(out / "labels.parquet")
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"arch": config.arch, "labelkit": "sela"})
    metrics = None
    if source.has_truth:
        truth = source.targets[rows]
        known = truth >= 0
        metrics = [dict(compare(artefact_labels[known], truth[known]), head=h, k=ks[h])
                   for h, artefact_labels in enumerate(state["labels"][:, rows].numpy())]
    return SelaRun(out=out, artefact=path, labels=artefact, metrics=metrics, seconds=time.perf_counter() - started,
                   skipped=skips.as_list(), history=history_path)
