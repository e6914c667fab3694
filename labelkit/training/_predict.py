"""Label new samples with a trained run: every head's argmax and its softmax score.

``predict`` rebuilds the model of a ``generate`` or ``transfer`` run directory from its ``config.json`` and
``model.safetensors`` (a frozen run carries its backbone, whitening and heads), passes the data through it
once -- images with the eval transform, or embedding vectors -- and writes an artefact whose parent is the
run's own artefact. Under ``torchrun`` each rank passes its share and rank 0 writes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artefact import Artefact, read_artefact
from ..data import Order, SkipLog, Source, keep_decoded, resolve, run_transforms
from ..errors import ConfigError, DataError
from ._frozen import TableRows
from ._models import SelaModel, create_backbone, feature_dim
from ._novelty import Novelty, describe
from ._loop import Reporter, autocast, extract_features, model_to, resolve_device

__all__ = ["load_run_model", "run_predict", "PredictRun", "sample_features"]


@dataclass
class PredictRun:
    artefact: Artefact
    path: Path | None
    seconds: float
    skipped: list[dict]


def load_run_model(run: str | Path) -> tuple[SelaModel, dict]:
    """The model of a finished run directory, weights loaded, in eval mode; and its ``config.json`` record."""
    from safetensors.torch import load_file

    from ._heads import frozen_model

    run_dir = Path(run)
    config_path, weights = run_dir / "config.json", run_dir / "model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise ConfigError(f"--model {run}: not a finished labelkit run (needs config.json and model.safetensors)")
    record = json.loads(config_path.read_text())
    if "frozen" in record:
        net = create_backbone(record["arch"], record["image_size"]) if record["frozen"]["pixels"] else None
        model = frozen_model(record, net)
    else:
        model = SelaModel(create_backbone(record["arch"], record["image_size"]), record["clusters"],
                          record.get("head_temperature"))
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise ConfigError(f"--model {run}: model.safetensors does not fit its config.json "
                          f"({str(exc).splitlines()[0]})") from None
    return model.eval(), record


def sample_features(model: SelaModel, record: dict, source: Source, indices, batch_size: int = 256) -> torch.Tensor:
    """The features the heads read, of the samples at ``indices`` of ``source`` only, each decoded on its own (for
    a few thousand samples: a cluster to split, say; whole data sets go through :func:`run_predict`)."""
    indices = np.asarray(indices, dtype=np.int64)
    with torch.no_grad():
        if not _needs_pixels(record):
            return model.features(TableRows(source)[indices].float())
        backbone = model.backbone.net if "frozen" in record else model.backbone
        transform = run_transforms(backbone, record["image_size"], "none",
                                   bool(record.get("config", {}).get("pretrained")))[0]
        return torch.cat([model.features(torch.stack([transform(source.load(int(i)).convert("RGB"))
                                                      for i in indices[start:start + batch_size]]))
                          for start in range(0, len(indices), batch_size)])


def _needs_pixels(record: dict) -> bool:
    return record.get("frozen", {}).get("pixels", True)


def run_predict(model_dir: str | Path, data: str, out: str | Path | None = None, *, batch_size: int = 256,
                workers: int = 0, device: str = "auto", reporter: Reporter | None = None,
                names: str | Path | None = None, novelty: str | None = None, novelty_fpr: float = 0.05) -> PredictRun:
    """Label every sample of ``data`` with the run in ``model_dir``; write the artefact to ``out`` (rank 0).

    ``names`` is a named or aligned version of the run's labels (``labelkit name`` / ``align``): the predictions
    then take its cluster ids and names, and the artefact has a ``name_H`` column per named head. By default
    that is the newest ``RUN/labels-*named.parquet`` or ``RUN/labels-aligned.parquet`` (what ``labelkit name RUN``
    and ``generate --align-to`` write), else the run's own labels.

    ``novelty`` (``knn`` or ``prototype``, see :mod:`labelkit.training._novelty`) adds each sample's novelty and
    whether it is past the threshold that flags ``novelty_fpr`` of samples like the run's training data."""
    from ._distributed import from_environment

    started = time.perf_counter()
    model, record = load_run_model(model_dir)
    source = resolve(data)
    if _needs_pixels(record) and not source.has_pixels:
        raise DataError(f"{data} holds vectors, but the run in {model_dir} reads images; give an image spec")
    if not _needs_pixels(record):
        if source.has_pixels:
            raise DataError(f"the run in {model_dir} was trained on embedding vectors; give vectors from the same "
                            f"embedding model, not images ({data})")
        if source.dim != model.backbone.whiten.mean.numel():
            raise DataError(f"{data}: vectors of width {source.dim}, but the run in {model_dir} was trained on "
                            f"width {model.backbone.whiten.mean.numel()}")
    dist, dev = from_environment(resolve_device(device))
    reporter = reporter if (reporter is not None and dist.main) else Reporter()
    model = model_to(model, dev)
    ks = [head.out_features for head in model.heads]
    skips = SkipLog(source)
    try:
        loading = {"batch_size": batch_size, "workers": workers, "device": dev, "dist": dist}
        fitted = None if novelty is None else _novelty_of(model_dir, model, record, novelty, **loading)
        if _needs_pixels(record):
            labels, scores, novel, seen = _predict_images(model, record, source, skips, fitted, reporter, model_dir,
                                                          loading)
        else:  # vectors: block by block, never N x D features at once
            labels, scores, novel, seen = _predict_vectors(model, source, skips, dev, fitted, reporter)
        rows = np.flatnonzero(seen)
        method = {"name": "predict", "model": str(model_dir), "arch": record.get("arch"), "run": record.get("kind")}
        labels, scores, ks = _with_consensus(_run_labels(model_dir), labels, scores, ks, method)
        labels, ks, head_names = _in_version_ids(labels, ks, _named_version(model_dir, names, ks), method)
        parent = _parent(model_dir)
        artefact = Artefact.build(
            source.ids_at(rows), labels, ks, scores=scores,
            data={**source.manifest(skips.as_list()).record(), "spec": data},
            method=method, parents=[parent] if parent else [],
            names=head_names).with_name_columns()
        if fitted is not None:
            by_id = np.searchsorted(artefact.sample_ids, np.array(source.ids_at(rows).to_pylist(), dtype=object))
            scores_sorted = np.empty(len(rows), dtype=np.float32)
            scores_sorted[by_id] = novel
            artefact = artefact.with_novelty(scores_sorted, describe(fitted, novelty_fpr))
        path = None
        if out is not None and dist.main:
            path = artefact.write(out)
        return PredictRun(artefact, path, time.perf_counter() - started, skips.as_list())
    finally:
        dist.close()


def _heads_argmax(model: SelaModel, features: torch.Tensor, device, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Each head's most probable cluster and its softmax probability, (heads, n) each. Rows go ``chunk`` at a
    time, so that no more than chunk x K logits exist at once (N x K would be 15 GB a head at 1.28 M x 3,000)."""
    n = len(features)
    labels = np.empty((len(model.heads), n), dtype=np.int64)
    scores = np.empty((len(model.heads), n), dtype=np.float32)
    with torch.no_grad():
        for h in range(len(model.heads)):
            weight, bias = _weights(model, h)
            for i in range(0, n, chunk):
                logits = torch.nn.functional.linear(features[i:i + chunk].to(device), weight, bias).float()
                score, label = torch.softmax(logits, dim=1).max(dim=1)
                labels[h, i:i + chunk] = label.cpu().numpy()
                scores[h, i:i + chunk] = score.cpu().numpy()
    return labels, scores


def _predict_images(model: SelaModel, record: dict, source: Source, skips: SkipLog, fitted: Novelty | None,
                    reporter: Reporter, model_dir, loading: dict):
    """As :func:`_predict_vectors`, for images: the features of every image, then the heads in chunks."""
    features, seen = _features(model, record, source, skips, reporter=reporter, run_dir=model_dir, **loading)
    labels, scores = _heads_argmax(model, features, loading["device"])
    return labels, scores, None if fitted is None else fitted.score(features), seen


def _predict_vectors(model: SelaModel, source: Source, skips: SkipLog, device, fitted: Novelty | None,
                     reporter: Reporter, block: int = 65536):
    """Labels and scores (heads, n), novelty (n,) or None, and which samples were read, of a table's vectors,
    ``block`` rows at a time: the heads' input features exist for one block only."""
    skips.skipped.update(source.check_finite(skip=True))
    keep = np.flatnonzero(~skips.mask())
    labels = np.empty((len(model.heads), len(keep)), dtype=np.int64)
    scores = np.empty((len(model.heads), len(keep)), dtype=np.float32)
    novel = None if fitted is None else np.empty(len(keep), dtype=np.float32)
    starts, table = range(0, len(keep), block), TableRows(source)
    reporter.phase("predict", len(starts))
    with torch.no_grad():
        for i in starts:
            features = model.features(table[keep[i:i + block]].to(device))
            labels[:, i:i + block], scores[:, i:i + block] = _heads_argmax(model, features, device)
            if fitted is not None:
                novel[i:i + block] = fitted.score(features.cpu())
            reporter.advance()
    reporter.end_phase()
    seen = np.zeros(len(source), dtype=bool)
    seen[keep] = True
    return labels, scores, novel, seen


def _weights(model: SelaModel, h: int):
    weight, bias = model.head_weights(h)
    return weight.detach(), None if bias is None else bias.detach()


def _features(model: SelaModel, record: dict, source: Source, skips: SkipLog, *, batch_size, workers, device,
              dist, reporter, run_dir=None) -> tuple[torch.Tensor, np.ndarray]:
    """The features the heads read, for the samples that could be read (every rank gets all of them)."""
    if not source.has_pixels:
        skips.skipped.update(source.check_finite(skip=True))
        keep, table = np.flatnonzero(~skips.mask()), TableRows(source)
        with torch.no_grad():
            features = torch.cat([model.features(table[keep[i:i + 65536]].to(device)).cpu()
                                  for i in range(0, len(keep), 65536)]) if len(keep) else torch.zeros(0, 1)
        seen = np.zeros(len(source), dtype=bool)
        seen[keep] = True
        return features, seen
    config = record.get("config", {})
    backbone = model.backbone.net if "frozen" in record else model.backbone
    transform = run_transforms(backbone, record["image_size"], "none", bool(config.get("pretrained")))[0]
    if run_dir is not None:  # the images a run on the same data left decoded in its folder (see keep_decoded)
        folder = config.get("feature_cache") or Path(run_dir) / "features"
        keep_decoded(source, record["image_size"], budget=0, folder=folder, existing_only=True)
    dim = feature_dim(model.backbone)
    with autocast(device, config.get("precision", "auto")):  # the run's --precision, resolved on this machine
        features, seen = extract_features(model.features, dim, source, transform,
                                          Order(batch_size, rank=dist.rank, world=dist.world), workers=workers,
                                          device=device, skips=skips, reporter=reporter)
    rows, values = dist.gather_rows(np.flatnonzero(seen), features[torch.from_numpy(seen)].numpy().T)
    features[torch.from_numpy(rows)] = torch.from_numpy(values.T.astype(np.float32))
    seen[rows] = True
    skips.skipped.update(dist.gather_dict(skips.skipped))
    return features[torch.from_numpy(seen)], seen


def _novelty_of(model_dir, model, record: dict, method: str, **loading) -> Novelty:
    """The run's novelty score: saved in the run folder, or fitted once on the run's own training data."""
    from ._novelty import fit_novelty, load_novelty

    path = Path(model_dir) / f"novelty-{method}.safetensors"
    own = Path(model_dir) / "labels.parquet"
    fingerprint = read_artefact(own).metadata["data"]["fingerprint"] if own.is_file() else ""
    saved = load_novelty(path)
    if saved is not None and saved.fingerprint == fingerprint:
        return saved
    spec = record.get("config", {}).get("data")
    try:
        source = resolve(spec)
    except (DataError, ConfigError) as exc:
        raise ConfigError(f"--novelty needs the run's training data ({spec}) once, to calibrate: {exc}") from None
    features, _ = _features(model, record, source, SkipLog(source), reporter=Reporter(), run_dir=model_dir,
                            **loading)
    with torch.no_grad():
        weight, bias = _weights(model, 0)
        labels = torch.nn.functional.linear(features.to(weight.device), weight, bias).argmax(1).cpu().numpy()
    fitted = fit_novelty(features, labels, method, fingerprint)
    if loading["dist"].main:
        fitted.save(path)
    return fitted


def _in_version_ids(labels: np.ndarray, ks: list[int], version, method: dict):
    """The model's classes as the ids of a named or aligned version of the run's labels (when there is one):
    labels, K and names per head; the version's id goes into ``method``."""
    if version is None:
        return labels, ks, None
    named, maps = version
    labels = np.stack([maps[h][labels[h]] for h in range(len(ks))])
    ks = [max(len(maps[h]), named.heads[h].k) for h in range(len(ks))]
    method["names"] = named.artefact_id
    return labels, ks, [None if head.names is None else list(head.names) + [None] * (ks[h] - head.k)
                        for h, head in enumerate(named.heads)]


def _named_version(model_dir, names, ks: list[int]) -> tuple[Artefact, list[np.ndarray]] | None:
    """The version of the run's labels whose ids and names predictions take, and the map from the model's
    classes to its ids; None when the labels have no names and were not aligned."""
    from ..artefact import relabelling

    own = Path(model_dir) / "labels.parquet"
    if names is None:
        versions = [p for p in Path(model_dir).glob("labels-*.parquet")
                    if p.name.endswith(("-named.parquet", "-aligned.parquet"))]
        if versions:  # the newest named or aligned version that `name RUN` / `generate --align-to` wrote
            names = max(versions, key=lambda p: p.stat().st_mtime_ns)
        elif own.is_file():
            run_labels = read_artefact(own)
            if any(head.names is not None for head in run_labels.heads) and \
                    [head.k for head in run_labels.heads] == ks:
                return run_labels, [np.arange(k) for k in ks]
            return None
        else:
            return None
    if not own.is_file():
        raise ConfigError(f"--names {names}: the run in {model_dir} has no labels.parquet to match it against")
    named = read_artefact(names)
    try:
        maps = relabelling(read_artefact(own), named)
    except ConfigError as exc:
        raise ConfigError(f"--names {names}: {exc}") from None
    if [len(m) for m in maps] != ks:
        raise ConfigError(f"--names {names}: its heads have K={[h.k for h in named.heads]} but the model's {ks}")
    return named, maps


def _run_labels(model_dir) -> Artefact | None:
    path = Path(model_dir) / "labels.parquet"
    if not path.is_file():
        return None
    try:
        return read_artefact(path)
    except Exception:  # a run's artefact that cannot be read is no lineage to record, and no consensus to vote
        return None


def _parent(model_dir) -> str | None:
    labels = _run_labels(model_dir)
    return None if labels is None else labels.artefact_id


def _with_consensus(trained: Artefact | None, labels, scores, ks: list[int], method: dict):
    """The predictions with the run's consensus head appended where its labels have one (voted with the
    training samples' head-to-consensus maps, :func:`labelkit.quality.consensus_of_predictions`), so that the
    head the run reports first, and any names given to it, exist for new samples too."""
    from ..quality import consensus_of_predictions

    if trained is None or trained.num_heads != len(ks) + 1:
        return labels, scores, ks
    voted = consensus_of_predictions(labels, scores, trained)
    if voted is None:
        return labels, scores, ks
    agreed, confidence, record = voted
    method["consensus"] = {"head": len(ks), "k": record["k"], "reference": record["reference"],
                           "heads": record["heads"], "score": "confidence", "maps": "the run's training labels"}
    return (np.concatenate([labels, agreed[None]]), np.concatenate([scores, confidence[None]]),
            [*ks, record["k"]])
