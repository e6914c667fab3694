"""Keeping the better labels of heads on fixed features, judged without ground truth.

SeLa's label step replaces every head's labels by the solve of its current predictions. On fixed features the
heads can only draw the partitions that their layers make, and those can be worse than the labels they were
trained on: on the pixel tables of bench/suite.py the spectral start agreed best with the classes (digits
0.905, textures 0.71, glyphs 0.25), and the first label step of every head lost 0.01-0.09 of that, which the
later steps never won back. Where the run has the features' nearest neighbours (the neighbour term's graph),
each head's new labels are judged by their chance-corrected agreement with that graph
(:func:`labelkit.quality.neighbour_agreement`), and a head whose new labels agree less than the labels
they replace keeps its old ones: the heads then go on training towards the labels that were kept, and the
history says which label step each head's final labels come from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..quality import kmeans, neighbour_agreement

__all__ = []


_KMEANS_ROWS = 20_000  # the k-means baseline is fitted on at most this many rows; every row then takes its nearest centre
_BLOCK = 65536


class KeepBetter:
    """Keeps a head's old labels where its new ones agree less with the neighbour graph ``near`` (N, k) of the
    heads' input ``vectors`` (N, D)."""

    def __init__(self, near: torch.Tensor, vectors):
        self.near = near.numpy()
        self.vectors = vectors

    def score(self, labels: torch.Tensor, keep: np.ndarray) -> float:
        """The agreement of one head's ``labels`` (N,) on the ``keep`` rows."""
        return neighbour_agreement(labels.numpy(), self.near, np.flatnonzero(keep))

    def judge(self, state, h: int, rows: torch.Tensor, keep: np.ndarray, solved: tuple, free, info: dict,
              probability: Callable[[torch.Tensor], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Head ``h``'s labels and scores of ``rows`` after a solve: the ``solved`` (labels, posterior) where they
        agree with the neighbours at least as well as the head's labels in ``state`` (on the ``keep`` rows),
        else those old labels with the network's ``probability`` of them (1 on rows a person pinned, as for a
        solve). ``info``, the head's record, gets ``neighbour_agreement`` and, where the old labels stay,
        ``kept`` (their agreement)."""
        old = state.labels[h, rows]
        new = state.labels[h].clone()
        new[rows] = torch.from_numpy(np.asarray(solved[0], dtype=np.int64))
        before, after = self.score(state.labels[h], keep), self.score(new, keep)
        info["neighbour_agreement"] = round(after, 4)
        if after >= before:
            return solved
        info["kept"] = {"neighbour_agreement": round(before, 4)}
        scores = probability(old).astype(np.float64)
        if free is not None:
            pinned = np.ones(len(rows), bool)
            pinned[free.numpy()] = False
            scores[pinned] = 1.0
        return old.numpy(), scores

    def kmeans_agreement(self, keep: np.ndarray, ks: list[int], seed: int) -> dict[int, float]:
        """The agreement of k-means with each K in ``ks`` on the same vectors: the cheap labels that a run on
        fixed features should not end below. Fitted on a seeded sample of the ``keep`` rows, then every kept
        row takes its nearest centre."""
        rows = np.flatnonzero(keep)
        sample = np.sort(np.random.default_rng(seed).choice(rows, min(len(rows), _KMEANS_ROWS), replace=False))
        x = self.vectors[torch.from_numpy(sample)].float()
        out = {}
        for k in sorted(set(ks)):
            centres = torch.from_numpy(kmeans(x.numpy(), k, seed)[1]).float()
            labels = torch.full((len(self.near),), -1, dtype=torch.int64)
            for i in range(0, len(rows), _BLOCK):
                part = torch.from_numpy(rows[i:i + _BLOCK])
                labels[part] = torch.cdist(self.vectors[part].float(), centres).argmin(1)
            out[k] = self.score(labels, keep)
        return out


def labels_from(history: Path, heads: int) -> list[int]:
    """Per head, the epoch after which the label step that made its final labels ran (0: the start), read
    from the run's history so that a resumed run says the same."""
    epochs = [0] * heads
    for line in history.read_text().splitlines():
        record = json.loads(line)
        if record.get("type") != "label_step":
            continue
        for info in record["heads"]:
            if "kept" not in info:
                epochs[info["head"]] = record["epoch"]
    return epochs
