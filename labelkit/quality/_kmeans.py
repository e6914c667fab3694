"""k-means in one place: scikit-learn's (k-means++ seeding) where that is cheap, and spherical Lloyd rounds on
cosine similarity (random seeding, cheap at any K). The graph start, the label-free check against k-means, the
heads' centroid start and the neighbour search all use these."""

from __future__ import annotations

import numpy as np

__all__ = ["kmeans", "spherical_kmeans", "unit_centroids"]


def kmeans(x: np.ndarray, k: int, seed: int, *, restarts: int = 1, max_iter: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """(labels, centres) of scikit-learn's k-means (k-means++ seeding, the best of ``restarts`` runs)."""
    from sklearn.cluster import KMeans

    fit = KMeans(k, n_init=restarts, max_iter=max_iter, random_state=seed).fit(x)
    return fit.labels_, fit.cluster_centers_


def spherical_kmeans(x, k: int, seed: int, *, sample: int | None = None, rounds: int = 20):
    """Unit-norm centroids of unit-norm rows ``x`` (a tensor): ``rounds`` Lloyd rounds on cosine similarity from
    k random rows of a seeded ``sample`` (empty clusters re-seeded from random rows). Cheap at any k, unlike
    k-means++."""
    import torch

    rng = np.random.default_rng(seed)
    if sample is not None and sample < len(x):
        x = x[torch.from_numpy(np.sort(rng.choice(len(x), sample, replace=False)))]
    centres = x[torch.from_numpy(rng.choice(len(x), k, replace=False))]
    for _ in range(rounds):
        assigned = torch.cat([(x[i:i + 65536] @ centres.T).argmax(1) for i in range(0, len(x), 65536)])
        sums = torch.zeros_like(centres).index_add_(0, assigned, x)
        empty = torch.from_numpy(np.flatnonzero(torch.bincount(assigned, minlength=k).numpy() == 0))
        sums[empty] = x[torch.from_numpy(rng.choice(len(x), len(empty), replace=False))]
        centres = torch.nn.functional.normalize(sums, dim=1)
    return centres


def unit_centroids(x, k: int, seed: int, rounds: int = 10):
    """Unit-norm centroids of the rows of ``x`` (a tensor): scikit-learn's k-means (best of 3) while that is
    cheap; for large problems, where k-means++ seeding alone takes minutes, spherical Lloyd rounds."""
    import torch

    if len(x) * k <= 2e7:
        centres = torch.from_numpy(kmeans(x.numpy(), k, seed, restarts=3, max_iter=100)[1])
        return torch.nn.functional.normalize(centres.float(), dim=1)
    return spherical_kmeans(x, k, seed, rounds=rounds)
