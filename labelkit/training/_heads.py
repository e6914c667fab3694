"""The model of heads on fixed features: the frozen backbone (none for an embedding table), its whitening and
the trunk the heads read, the heads' start from k-means centroids, and their training epoch (on every row, or
on the random sample of ``--train-rows``)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..quality import unit_centroids
from ._frozen import FeatureTrunk, head_batches, head_draws, head_step
from ._whiten import Whiten
from ._models import SelaModel
from ._sharded import gathered_inputs, sharded_batches

__all__ = ["FrozenBackbone", "frozen_model", "frozen_heads", "frozen_record", "seed_prototypes", "training_sample", "head_training"]


class FrozenBackbone(torch.nn.Module):
    """What the heads of a frozen run read, as one module for ``predict``: the fixed backbone (none for an
    embedding table), the PCA whitening and the trainable trunk."""

    def __init__(self, net: torch.nn.Module | None, whiten: Whiten, trunk: FeatureTrunk):
        super().__init__()
        self.net, self.whiten, self.trunk = net, whiten, trunk
        self.num_features = self.head_hidden_size = trunk.head_hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.whiten(self.net(x) if self.net is not None else x))


def frozen_heads(net: torch.nn.Module | None, whiten: Whiten, ks: list[int], config) -> tuple[SelaModel, SelaModel]:
    """The heads a frozen run trains (on the whitened features, in eval mode until trained), and the model that
    is saved and predicts (backbone, whitening and the same heads)."""
    heads = SelaModel(FeatureTrunk(whiten.num_features, config.head_hidden), ks, config.head_temperature)
    model = SelaModel(FrozenBackbone(net, whiten, heads.backbone), ks, config.head_temperature)
    model.heads = heads.heads  # one set of heads: trained through ``heads``, saved and predicted through ``model``
    return heads.eval(), model


def frozen_record(whiten: Whiten, config, net: torch.nn.Module | None) -> dict:
    """What ``config.json`` keeps of a frozen run's model, for :func:`frozen_model`."""
    return {"in_dim": int(whiten.mean.numel()), "width": whiten.num_features, "hidden": config.head_hidden,
            "pixels": net is not None}


def frozen_model(record: dict, net: torch.nn.Module | None) -> SelaModel:
    """The model of a frozen run from its ``config.json`` record (weights not loaded)."""
    frozen = record["frozen"]
    trunk = FeatureTrunk(frozen["width"], frozen.get("hidden"))
    backbone = FrozenBackbone(net, Whiten(frozen["in_dim"], frozen["width"]), trunk)
    return SelaModel(backbone, record["clusters"], record.get("head_temperature"))


def seed_prototypes(heads: SelaModel, features: torch.Tensor, keep: np.ndarray, seed: int) -> None:
    """Start every head from k-means centroids of the (L2-normalised) features it reads, each head its own
    seed, on a sample of max(20,000, 40 K) rows. Heads started at random fit whatever partition their random
    hyperplanes make, and on fixed features SeLa settles near that start; centroids are a start that follows
    the data, which SeLa then refines under the equal-size constraint."""
    rng = np.random.default_rng([seed, 1])
    kept = np.flatnonzero(keep)
    with torch.no_grad():
        for h, head in enumerate(heads.heads):
            k = head.out_features
            rows = np.sort(rng.choice(kept, min(len(kept), max(20_000, 40 * k)), replace=False))
            x = torch.nn.functional.normalize(heads.features(features[torch.from_numpy(rows)].float()), dim=1)
            centres = unit_centroids(x, k, seed * 1000 + h)
            head.weight.copy_(centres * head.weight.norm(dim=1, keepdim=True))
            if head.bias is not None:
                head.bias.zero_()


def training_sample(rows: int | None, keep: np.ndarray, seed: int) -> np.ndarray | None:
    """The mask of the rows that the heads train on with ``--train-rows``: a seeded random sample of the kept
    rows (None where every row trains). The last label step labels every row all the same."""
    kept = np.flatnonzero(keep)
    if rows is None or rows >= len(kept):
        return None
    sample = np.zeros(len(keep), dtype=bool)
    sample[np.random.default_rng([seed, 2]).choice(kept, rows, replace=False)] = True
    return sample


def head_training(job, heads: SelaModel, optimizer, views, near, shard, state, trained):
    """Step 1 of heads on fixed features, one epoch a call, on the rows of the mask that ``trained()`` gives
    (every kept row, or the sample of ``--train-rows``)."""
    config = job.config
    smallest = 2 if any(isinstance(m, torch.nn.BatchNorm1d) for m in heads.modules()) else 1

    def train() -> dict:
        heads.train()
        keep = trained()
        steps = max(1, math.ceil(int(keep.sum()) / config.batch_size))
        if shard is None:
            return job.train_pass(lambda start: head_batches(views, keep, near, config, job.epoch, start, smallest),
                                  lambda rows, inputs: head_step(heads, optimizer, rows, inputs, state.labels),
                                  optimizer, steps, min_batch=smallest)
        draws = head_draws(views.shape[0], keep, None, config, job.epoch, smallest)
        return job.train_pass(lambda start: sharded_batches(views, draws, start),
                              lambda rows, inputs: head_step(heads, optimizer, rows,
                                                             gathered_inputs(views, rows, inputs), state.labels),
                              optimizer, steps, min_batch=smallest)

    return train
