"""The model of heads on fixed features: the frozen backbone (none for an embedding table), its whitening and
the trunk the heads read, and the heads' start from k-means centroids."""

from __future__ import annotations

import numpy as np
import torch

from ..quality import unit_centroids
from ._frozen import FeatureTrunk, Whiten
from ._models import SelaModel

__all__ = ["FrozenBackbone", "frozen_model", "frozen_heads", "frozen_record", "seed_prototypes"]


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
