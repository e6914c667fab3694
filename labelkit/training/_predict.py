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

from ..artefact import Artefact, producer_versions, read_artefact
from ..data import Order, SkipLog, Source, keep_decoded, resolve, run_transforms
from ..errors import ConfigError, DataError
from ._models import SelaModel, create_backbone, feature_dim
from ._loop import Reporter, extract_features, model_to, resolve_device

__all__ = ["load_run_model", "run_predict", "PredictRun"]


@dataclass
class PredictRun:
    artefact: Artefact
    path: Path | None
    seconds: float
    skipped: list[dict]


def load_run_model(run: str | Path) -> tuple[SelaModel, dict]:
    """The model of a finished run directory, weights loaded, in eval mode; and its ``config.json`` record."""
    from safetensors.torch import load_file

    from ._sela import frozen_model

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


def _needs_pixels(record: dict) -> bool:
    return record.get("frozen", {}).get("pixels", True)


def run_predict(model_dir: str | Path, data: str, out: str | Path | None = None, *, batch_size: int = 256,
                workers: int = 0, device: str = "auto", reporter: Reporter | None = None) -> PredictRun:
    """Label every sample of ``data`` with the run in ``model_dir``; write the artefact to ``out`` (rank 0)."""
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
        features, seen = _features(model, record, source, skips, batch_size=batch_size, workers=workers,
                                   device=dev, dist=dist, reporter=reporter, run_dir=model_dir)
        rows = np.flatnonzero(seen)
        with torch.no_grad():
            logits = [torch.cat([torch.nn.functional.linear(features[i:i + 65536].to(dev), *_weights(model, h))
                                 for i in range(0, len(features), 65536)]) for h in range(len(ks))]
        probabilities = [torch.softmax(out.float(), dim=1) for out in logits]
        scores, labels = zip(*(p.max(dim=1) for p in probabilities))
        labels = np.stack([lab.cpu().numpy() for lab in labels])
        scores = np.stack([s.cpu().numpy() for s in scores])
        parent = _parent(model_dir)
        artefact = Artefact.build(
            [source.ids[i] for i in rows], labels, ks, scores=scores,
            data={**source.manifest(skips.as_list()).record(), "spec": data},
            method={"name": "predict", "model": str(model_dir), "arch": record.get("arch"),
                    "run": record.get("kind")},
            parents=[parent] if parent else [], producer=producer_versions())
        path = None
        if out is not None and dist.main:
            path = artefact.write(out)
        return PredictRun(artefact, path, time.perf_counter() - started, skips.as_list())
    finally:
        dist.close()


def _weights(model: SelaModel, h: int):
    weight, bias = model.head_weights(h)
    return weight.detach(), None if bias is None else bias.detach()


def _features(model: SelaModel, record: dict, source: Source, skips: SkipLog, *, batch_size, workers, device,
              dist, reporter, run_dir=None) -> tuple[torch.Tensor, np.ndarray]:
    """The features the heads read, for the samples that could be read (every rank gets all of them)."""
    if not source.has_pixels:
        skips.skipped.update(source.check_finite(skip=True))
        keep = np.flatnonzero(~skips.mask())
        with torch.no_grad():
            features = torch.cat([model.features(torch.from_numpy(source.vectors(keep[i:i + 65536])).to(device)).cpu()
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
    features, seen = extract_features(model.features, dim, source, transform,
                                      Order(batch_size, rank=dist.rank, world=dist.world), workers=workers,
                                      device=device, skips=skips, reporter=reporter)
    rows, values = dist.gather_rows(np.flatnonzero(seen), features[torch.from_numpy(seen)].numpy().T)
    features[torch.from_numpy(rows)] = torch.from_numpy(values.T.astype(np.float32))
    seen[rows] = True
    skips.skipped.update(dist.gather_dict(skips.skipped))
    return features[torch.from_numpy(seen)], seen


def _parent(model_dir) -> str | None:
    path = Path(model_dir) / "labels.parquet"
    if not path.is_file():
        return None
    try:
        return read_artefact(path).artefact_id
    except Exception:  # a run's artefact that cannot be read is no lineage to record
        return None
