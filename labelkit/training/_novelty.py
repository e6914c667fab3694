""""None of these": how far a new sample lies from everything a run was trained on, and the threshold past which
it is called novel.

Two scores, both on the unit-normalised features the heads read (higher = more novel):

* ``knn`` (the default) -- one minus the mean cosine similarity to the 10 nearest of a bank of up to 20,000
  training samples;
* ``prototype`` -- one minus the cosine similarity to the nearest cluster prototype (the normalised mean
  feature of each cluster of the run's primary head): K vectors instead of a bank, for very large runs.

The threshold is the ``1 - fpr`` quantile of the scores of training samples that are not in the bank (so that
no sample is compared with itself): at ``fpr = 0.05`` about 5 % of samples like the training data are flagged.
The bank and those calibration scores are kept in ``RUN/novelty-<method>.safetensors``, computed on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["Novelty", "NOVELTY_METHODS", "fit_novelty", "load_novelty", "describe"]

NOVELTY_METHODS = ("knn", "prototype")
_NEIGHBOURS = 10
_BANK = 20_000
_CALIBRATION = 20_000


@dataclass
class Novelty:
    """A fitted novelty score: ``reference`` (bank or prototypes, unit rows) and the training samples' scores."""

    method: str
    reference: torch.Tensor
    calibration: np.ndarray
    fingerprint: str

    def score(self, features: torch.Tensor, block: int = 4096) -> np.ndarray:
        """Novelty of each row of ``features`` (N x D): 1 - mean cosine similarity to the nearest references."""
        reference = self.reference.float()
        k = min(_NEIGHBOURS, len(reference)) if self.method == "knn" else 1
        out = []
        for start in range(0, len(features), block):
            x = torch.nn.functional.normalize(features[start : start + block].float(), dim=1)
            out.append(1.0 - (x @ reference.T).topk(k, dim=1).values.mean(dim=1))
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)

    def threshold(self, fpr: float) -> float:
        """The score past which a sample is novel, so that a share ``fpr`` of training samples would be."""
        if not 0.0 < fpr < 1.0:
            raise ConfigError(f"--novelty-fpr must lie strictly between 0 and 1, got {fpr}")
        return float(np.quantile(self.calibration, 1.0 - fpr))

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        from .._util.files import atomic_path

        meta = {"method": self.method, "fingerprint": self.fingerprint, "neighbours": str(_NEIGHBOURS)}
        with atomic_path(path) as tmp:
            save_file({"reference": self.reference.contiguous(),
                       "calibration": torch.from_numpy(self.calibration)}, str(tmp), metadata=meta)


def fit_novelty(features: torch.Tensor, labels: np.ndarray, method: str, fingerprint: str, seed: int = 0) -> Novelty:
    """The novelty score of a run from its training samples' ``features`` (N x D) and primary-head ``labels``."""
    if method not in NOVELTY_METHODS:
        raise ConfigError(f"unknown novelty method {method!r}; choose {', '.join(NOVELTY_METHODS)}")
    n = len(features)
    if n < 20:
        raise ConfigError(f"{n} training samples are too few to calibrate a novelty threshold (at least 20)")
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    order = np.random.default_rng(seed).permutation(n)
    if method == "knn":
        in_bank = min(_BANK, int(0.8 * n))
        bank, held = order[:in_bank], order[in_bank : in_bank + _CALIBRATION]
        reference = unit[torch.from_numpy(np.sort(bank))].half()
    else:
        held = order[:_CALIBRATION]
        labels = torch.as_tensor(labels, dtype=torch.long)
        k = int(labels.max()) + 1
        sums = torch.zeros(k, unit.shape[1]).index_add_(0, labels, unit)
        reference = torch.nn.functional.normalize(sums[sums.norm(dim=1) > 0], dim=1).half()
    fitted = Novelty(method, reference, np.zeros(0, dtype=np.float32), fingerprint)
    fitted.calibration = fitted.score(features[torch.from_numpy(np.sort(held))]).astype(np.float32)
    return fitted


def load_novelty(path: Path) -> Novelty | None:
    """A saved novelty score, or None where there is none."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if meta.get("neighbours") != str(_NEIGHBOURS):
        return None  # made with other settings: fit again
    return Novelty(meta["method"], tensors["reference"], tensors["calibration"].numpy(), meta.get("fingerprint", ""))


def describe(novelty: Novelty, fpr: float) -> dict:
    """What the predict artefact records of the novelty score."""
    return {"method": novelty.method, "fpr": fpr, "threshold": round(novelty.threshold(fpr), 6),
            "references": len(novelty.reference), "calibration_samples": len(novelty.calibration),
            "neighbours": _NEIGHBOURS if novelty.method == "knn" else 1, "train_fingerprint": novelty.fingerprint,
            "formula": "1 - mean cosine similarity of the unit feature to its nearest references"}
