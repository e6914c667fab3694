"""Feature quality of a trained backbone: weighted kNN and a linear probe on frozen features.

* ``knn`` -- weighted k-nearest neighbours on L2-normalised features (Wu et al. 2018, as in the SeLa paper's
  appendix): each of the k most similar training samples votes for its class with weight exp(s / T).
* ``linear`` -- multinomial logistic regression (scikit-learn, L-BFGS, C = 1, up to 1000 iterations) on
  standardised frozen features.

Features come from the backbone's pre-logit output with the eval transform, extracted once and cached in
the run directory under the data fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass

import json
from pathlib import Path

import numpy as np
import torch

from ..data import Order, SkipLog, Source, keep_decoded, resolve, run_transforms
from ..errors import ConfigError, DataError
from ._models import create_backbone, feature_dim
from ._loop import Reporter, autocast, extract_features, model_to, resolve_device

__all__ = ["load_backbone", "features_of", "knn_accuracy", "linear_accuracy", "evaluate", "EvalConfig", "PROTOCOLS"]

PROTOCOLS = ("knn", "linear")


def load_backbone(run: str | None = None, arch: str | None = None, init: str | None = None,
                  image_size: int | None = None, pretrained: bool = False) -> tuple[torch.nn.Module, int, Path | None, object]:
    """The frozen backbone of a ``generate``/``transfer`` run directory (for a ``--freeze`` run: its fixed
    backbone), or a bare timm arch (+ timm's ``pretrained`` weights and/or ``init``); its input size, run
    folder, and the plain transform its run used (a pretrained backbone's own input configuration)."""
    if run:
        from ._predict import load_run_model

        model, record = load_run_model(run)
        if "frozen" in record:
            if not record["frozen"]["pixels"]:
                raise ConfigError(f"--model {run} was trained on embedding vectors and has no image backbone")
            backbone = model.backbone.net
        else:
            backbone = model.backbone
        size = image_size or record["image_size"]
        pretrained = bool(record.get("config", {}).get("pretrained"))
        return backbone, size, Path(run), run_transforms(backbone, size, "none", pretrained)[0]
    if not arch:
        raise ConfigError("give --model RUN_DIR, or --arch NAME (with --pretrained or --init FILE for its weights)")
    size = image_size or 224
    backbone = create_backbone(arch, size, init, pretrained=pretrained).eval()
    return backbone, size, None, run_transforms(backbone, size, "none", pretrained)[0]


def features_of(backbone, source: Source, transform, *, cache: Path | None, batch_size: int = 256,
                workers: int = 0, device: str = "auto", reporter: Reporter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features through ``transform`` and a mask of the samples that decoded; cached as
    ``features-<data fingerprint>-<transform digest>.npz``."""
    import hashlib

    key = hashlib.sha256(repr(transform).encode()).hexdigest()[:12]
    path = cache / f"features-{source.fingerprint[:16]}-{key}.npz" if cache else None
    if path is not None and path.is_file():
        with np.load(path) as stored:
            return stored["features"], stored["seen"]
    from ._distributed import from_environment

    dist, dev = from_environment(resolve_device(device))
    backbone = model_to(backbone, dev)
    if cache is not None and getattr(transform, "batch", None) is not None:  # images the run left decoded
        keep_decoded(source, transform.batch.size, budget=0, folder=cache / "features", existing_only=True)
    with autocast(dev):
        features, seen = extract_features(backbone, feature_dim(backbone), source, transform,
                                          Order(batch_size, rank=dist.rank, world=dist.world), workers=workers,
                                          device=dev, skips=SkipLog(source),
                                          reporter=reporter if dist.main and reporter else Reporter())
    features = features.numpy()
    rows, values = dist.gather_rows(np.flatnonzero(seen), features[seen].T)  # under torchrun: every rank's share
    features[rows], seen[rows] = values.T, True
    if path is not None and dist.main:
        from .._util.files import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, features=features, seen=seen)
    return features, seen


def _topk(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    order = np.argsort(-scores, axis=1)
    top1 = float((order[:, 0] == truth).mean())
    top5 = float((order[:, : min(5, scores.shape[1])] == truth[:, None]).any(axis=1).mean())
    return top1, top5


def knn_accuracy(train_x, train_y, test_x, test_y, *, k: int = 50, temperature: float = 0.1,
                 classes: int | None = None, chunk: int = 1024) -> tuple[float, float]:
    """Top-1 and top-5 of weighted kNN on L2-normalised features: each of the ``k`` nearest votes for its class
    with weight exp(similarity / temperature), taken relative to the nearest one so that no weight overflows
    at any temperature (the ranking of the classes is the same)."""
    if not temperature > 0:
        raise ConfigError(f"--temperature must be a positive number, got {temperature}")
    classes = classes or int(max(train_y.max(), test_y.max())) + 1
    train = torch.nn.functional.normalize(torch.as_tensor(train_x, dtype=torch.float32), dim=1)
    test = torch.nn.functional.normalize(torch.as_tensor(test_x, dtype=torch.float32), dim=1)
    labels = torch.as_tensor(train_y, dtype=torch.long)
    k = min(k, len(train))
    scores = torch.zeros((len(test), classes))
    for start in range(0, len(test), chunk):
        sims, idx = (test[start : start + chunk] @ train.T).topk(k, dim=1)
        weights = ((sims - sims[:, :1]) / temperature).exp()  # the nearest weighs 1: never inf
        scores[start : start + chunk].scatter_add_(1, labels[idx], weights)
    return _topk(scores.numpy(), np.asarray(test_y))


def linear_accuracy(train_x, train_y, test_x, test_y, *, seed: int = 0) -> tuple[float, float]:
    """Top-1 and top-5 of a multinomial logistic-regression probe on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    probe = LogisticRegression(max_iter=1000, C=1.0, random_state=seed).fit(scaler.transform(train_x), train_y)
    probs = probe.predict_proba(scaler.transform(test_x))
    scores = np.full((len(test_x), int(max(train_y.max(), test_y.max())) + 1), -1.0)
    scores[:, probe.classes_] = probs
    return _topk(scores, np.asarray(test_y))


@dataclass(frozen=True)
class EvalConfig:
    """What ``labelkit eval`` measures: a ``protocol`` (``knn`` or ``linear``) on the features of a backbone --
    a run's (``model``), or ``arch`` with ``init`` weights or timm's ``pretrained`` ones -- trained on ``data``
    and tested on ``test`` or on a seeded, stratified ``split`` of ``data``; ``k`` and ``temperature`` for kNN."""

    protocol: str
    data: str
    model: str | None = None
    arch: str | None = None
    init: str | None = None
    pretrained: bool = False
    test: str | None = None
    split: float = 0.2
    k: int = 50
    temperature: float = 0.1
    image_size: int | None = None
    seed: int = 0
    device: str = "auto"
    workers: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.model and (self.arch or self.init or self.pretrained):
            raise ConfigError(f"--model {self.model} brings its own architecture and weights; drop "
                              "--arch/--init/--pretrained, or drop --model")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be a positive number, got {self.temperature}")
        if self.test is None and not 0.0 < self.split < 1.0:
            raise ConfigError(f"--split must lie in (0, 1), got {self.split}")


def evaluate(config: EvalConfig, reporter: Reporter | None = None) -> dict:
    """Evaluate a backbone as ``config`` says; returns top-1 and top-5 accuracy and the sizes of both sides."""
    c = config
    data, test, device, workers = c.data, c.test, c.device, c.workers
    backbone, size, run_dir, transform = load_backbone(c.model, c.arch, c.init, c.image_size, c.pretrained)
    train_source = resolve(data)
    if not train_source.has_truth:
        raise DataError(f"{data}: evaluation needs ground-truth classes (class folders, shard cls, npz labels)")
    if reporter is not None:
        name = json.loads((run_dir / "config.json").read_text())["arch"] if run_dir else c.arch
        reporter.begin({"command": "eval", "protocol": c.protocol, "arch": name, "model": c.model, "image_size": size,
                        "data": data, "samples": len(train_source), "test": test})
    from ._distributed import from_environment

    dist, _ = from_environment(resolve_device(device))  # under torchrun: joined here once, left at the end
    try:
        train_x, train_seen = features_of(backbone, train_source, transform, cache=run_dir, device=device, workers=workers,
                                          reporter=reporter)
        train_y = train_source.targets
        usable = train_seen & (train_y >= 0)
        if test:
            test_source = resolve(test)
            shared = set(train_source.ids) & set(test_source.ids)
            if shared:
                raise DataError(f"--test {test} shares {len(shared):,} sample ids with --data {data}; "
                                "they must be disjoint")
            test_x, test_seen = features_of(backbone, test_source, transform, cache=run_dir, device=device, workers=workers,
                                            reporter=reporter)
            test_y = test_source.targets
            keep = test_seen & (test_y >= 0)
            tr = np.flatnonzero(usable)
            x_train, y_train, x_test, y_test = train_x[tr], train_y[tr], test_x[keep], test_y[keep]
        else:
            from sklearn.model_selection import train_test_split

            indices = np.flatnonzero(usable)
            tr, te = train_test_split(indices, test_size=c.split, stratify=train_y[indices], random_state=c.seed)
            x_train, y_train, x_test, y_test = train_x[tr], train_y[tr], train_x[te], train_y[te]
        if c.protocol == "knn":
            top1, top5 = knn_accuracy(x_train, y_train, x_test, y_test, k=c.k, temperature=c.temperature)
        else:
            top1, top5 = linear_accuracy(x_train, y_train, x_test, y_test, seed=c.seed)
        return {"protocol": c.protocol, "top1": top1, "top5": top5, "n_train": int(len(y_train)), "n_test": int(len(y_test))}
    finally:
        dist.close()
