"""The graph start: first labels from the neighbourhood graph of the images themselves.

SeLa starts from random labels on a random network, and on a small CPU budget it often never recovers:
a from-scratch network learns slowly, so the early label steps cluster what a random network sees. The
graph start gives the first label step something better: every image is shrunk to a thumbnail, the
thumbnails are PCA-reduced, linked to their nearest neighbours (a self-tuning Gaussian affinity, as in
Zelnik-Manor & Perona 2004), embedded by the graph Laplacian's leading eigenvectors (spectral embedding, the
same start UMAP uses) and clustered by k-means, one K per head. SeLa then trains the network on these labels
under augmentation and re-solves them every epoch; the network quickly learns what the pixels cannot show
(shifts, rotations, strokes), and its balanced labels overtake the start within a few epochs.

Ground truth is only measured here (each start's NMI in the history, where the data has classes), never used.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from ..data import Order, eval_transform
from ..quality import agreement, kmeans
from ._config import feature_scaling
from ._job import Job
from ._loop import extract_features

__all__ = ["Thumbnail", "spectral_labels", "image_graph_start", "vector_graph_start", "GRAPH_LIMIT", "GRAPH_MIN", "GRAPH_THUMBNAIL",
           "LOBPCG_ROWS"]

# Above this many samples the exact kNN graph and the eigensolver cost more than they give on a CPU budget;
# the auto recipe then starts from random labels, as the paper does.
GRAPH_LIMIT = 100_000
# Below this a neighbourhood graph says little; tiny data sets start from random labels.
GRAPH_MIN = 100
# From this many vectors a table's start gets its eigenvectors from LOBPCG, not scikit-learn's default ARPACK,
# whose shift-invert mode factorises the graph Laplacian: its fill-in grows far faster than the graph (the two
# graphs of --whiten both on 10,000 mixture vectors: 93 s against 1.9 s; bench/graph_start.py). Below, both
# take seconds (3,000 mixture vectors: 3.5 s against 0.8 s) and ARPACK keeps the starts that
# bench/suite.py's sets (at most 3,000 rows) were measured with: LOBPCG's gave the same start NMI on their 22
# tables (to 0.001), but its slightly different eigenvectors moved which head a run keeps on one of them
# (textures-grey16-pixels 0.422 -> 0.391).
LOBPCG_ROWS = 5_000
# Thumbnails at most this many pixels on a side: enough for shapes, and 32 x 32 x 3 floats per sample
GRAPH_THUMBNAIL = 32


class Thumbnail(torch.nn.Module):
    """Flattened pixels of a (resized) image, averaged over the channels for grey images."""

    def __init__(self, grey: bool):
        super().__init__()
        self.grey = grey

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.grey:
            images = images.mean(dim=1)
        return images.flatten(1)


def spectral_labels(x: np.ndarray, ks: list[int], seed: int, *, neighbours: int = 10, dims: int = 20,
                    components: int = 50, per_k: int = 2, smooth: bool = False,
                    whiten: str = "no", eigen_solver: str | None = None) -> tuple[np.ndarray, dict]:
    """k-means labels (one row per K in ``ks``) of the first ``per_k`` x K eigenvectors (at most ``dims``) of
    the spectral embedding of the kNN graph of ``x``'s first ``components`` principal components: as they are
    (``whiten`` "no"), each scaled to unit variance ("yes"), or both ("both": one graph of each, their
    eigenvectors side by side, each row of each normalised, so that k-means weighs the two graphs alike).
    With ``smooth``, each label then moves to the one its graph neighbours weigh most (with "both", in the
    sum of the two graphs), until none moves (at most 10 rounds). ``eigen_solver``: scikit-learn's; None
    takes ARPACK below :data:`LOBPCG_ROWS` samples and LOBPCG from there (``bench/graph_start.py``).

    Returns ((T, N) int64 labels, a record of what was done and how long it took)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import spectral_embedding

    start = time.perf_counter()
    n = len(x)
    neighbours = min(neighbours, n - 1)
    components = min(components, n, x.shape[1])
    pca = PCA(components, random_state=seed)
    reduced = pca.fit_transform(x.astype(np.float32, copy=False))
    # directions of (almost) no variance stay small when whitened: scaled up, they would be pure noise
    whitened = reduced / np.sqrt(np.maximum(pca.explained_variance_, 1e-6 * pca.explained_variance_[0]))
    spaces = {"no": [reduced], "yes": [whitened], "both": [reduced, whitened]}[whiten]
    graphs = [_knn_graph(points, neighbours) for points in spaces]
    # a head of K clusters reads the first 2K eigenvectors (at most ``dims``): K, as in Ng, Jordan & Weiss
    # (2001), leaves out modes that real classes need (a 10k-image digits folder: SeLa from a 10-eigenvector
    # start ended at NMI 0.77-0.82, from a 20-eigenvector start at 0.93); many more than K add within-cluster
    # modes that, once the rows are normalised, outweigh the clusters of clean, simple data
    dims = max(1, min(dims, per_k * max(ks), n - 2))
    solver = eigen_solver or ("arpack" if n < LOBPCG_ROWS else "lobpcg")
    with warnings.catch_warnings():
        # LOBPCG ends a few eigenvectors at residuals near 1e-5 and says so, for every run: far finer than the
        # k-means on the rows' directions that reads them
        warnings.filterwarnings("ignore", message="Exited (postprocessing|at iteration)", category=UserWarning)
        embeddings = [spectral_embedding(graph, n_components=dims, random_state=seed, drop_first=True,
                                         eigen_solver=solver) for graph in graphs]
    affinity = sum(graphs[1:], graphs[0])
    labels = []
    for h, k in enumerate(ks):
        # on the unit sphere, clusters that the eigenvectors separate by direction are split evenly by k-means
        part = np.hstack([_unit_rows(e[:, : min(per_k * k, dims)]) for e in embeddings])
        found = kmeans(part, k, seed + h, restarts=3)[0]
        labels.append(_smoothed(affinity, found, k) if smooth else found)
    labels = np.stack(labels).astype(np.int64)
    return labels, {"samples": n, "pixels": int(x.shape[1]), "pca": components, "neighbours": neighbours,
                    "components": int(_components(affinity)[0]), "dims": dims, "per_k": per_k, "smoothed": smooth,
                    "eigen_solver": solver,
                    "whiten": whiten,
                    "seconds": round(time.perf_counter() - start, 2)}


def _knn_graph(points: np.ndarray, neighbours: int):
    """The symmetric kNN graph of ``points``, each edge weighted by a Gaussian of the two points' local scales
    (Zelnik-Manor & Perona), its pieces bridged (see :func:`_bridged`)."""
    import scipy.sparse as sp
    from sklearn.neighbors import NearestNeighbors

    n = len(points)
    distance, index = NearestNeighbors(n_neighbors=neighbours + 1).fit(points).kneighbors(points)
    distance, index = distance[:, 1:], index[:, 1:]  # drop each point itself
    scale = np.maximum(distance[:, -1], 1e-12)  # local scale: the distance to the k-th neighbour
    weight = np.exp(-distance**2 / (scale[:, None] * scale[index]))
    affinity = sp.csr_matrix((weight.ravel(), (np.repeat(np.arange(n), neighbours), index.ravel())), shape=(n, n))
    return _bridged(affinity.maximum(affinity.T), points, float(weight.min()))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _smoothed(affinity, labels: np.ndarray, k: int, rounds: int = 10) -> np.ndarray:
    """Each sample's label moved to the one its neighbours weigh most in ``affinity``, round after round
    until none moves: k-means cuts the embedding by straight boundaries, the graph knows where they bend."""
    for _ in range(rounds):
        votes = affinity @ np.eye(k, dtype=np.float32)[labels]
        moved = np.asarray(votes.argmax(1)).ravel()
        if np.array_equal(moved, labels):
            break
        labels = moved
    return labels


def _components(affinity):
    from scipy.sparse.csgraph import connected_components

    return connected_components(affinity, directed=False)


def _bridged(affinity, points: np.ndarray, weight: float, most: int = 200):
    """The graph with every connected component tied to its nearest other point by one weak edge.

    Clean, well-separated data gives a kNN graph in pieces, and the Laplacian of a graph in pieces has one zero
    eigenvalue per piece: the eigenvectors are then arbitrary mixes of the pieces' indicators, and k-means on
    them fails exactly where the data is easiest. Weak bridges keep the pieces apart but make the eigenproblem
    well-posed. Beyond ``most`` pieces the graph is left as it is."""
    import scipy.sparse as sp
    from sklearn.neighbors import NearestNeighbors

    count, component = _components(affinity)
    if count == 1 or count > most:
        return affinity
    rows, cols = [], []
    for c in range(count):
        inside = np.flatnonzero(component == c)
        outside = np.flatnonzero(component != c)
        distance, nearest = NearestNeighbors(n_neighbors=1).fit(points[outside]).kneighbors(points[inside])
        best = int(np.argmin(distance[:, 0]))
        rows.append(inside[best])
        cols.append(outside[nearest[best, 0]])
    bridges = sp.csr_matrix((np.full(len(rows), 0.01 * weight), (rows, cols)), shape=affinity.shape)
    return affinity.maximum(bridges).maximum(bridges.T)


def image_graph_start(job: Job, labels_out: torch.Tensor, ks: list[int]) -> dict:
    """The first labels of every head, written into ``labels_out`` (T, N), from the spectral embedding of the
    thumbnails' kNN graph; rank 0 computes them, every rank receives them. Returns the start's record."""
    config, dist, source = job.config, job.dist, job.source
    computed = None
    if dist.main:
        side = min(config.image_size, GRAPH_THUMBNAIL)
        transform = eval_transform(side, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        pixels, seen = extract_features(Thumbnail(grey=False), 3 * side * side, source, transform,
                                        Order(config.batch_size * 2, keep=~job.skips.mask()), workers=config.workers,
                                        device=torch.device("cpu"), skips=job.skips, reporter=job.reporter)
        rows = np.flatnonzero(seen & ~job.skips.mask())
        held = pixels.numel() * pixels.element_size()
        x = pixels[torch.from_numpy(rows)].view(len(rows), 3, -1)
        grey = bool(torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2]))
        del pixels
        job.reporter.phase("graph", 1)
        # ARPACK at every size: on the 10,782-image digits folder LOBPCG's start ended at 0.936 / 0.913 / 0.934
        # in 105 s against 0.952 / 0.913 / 0.953 in 84 s (bench/own_folder.py, one seed), and the thumbnails'
        # graphs did not show the tables' slow factorisation
        labels, info = spectral_labels((x[:, 0] if grey else x.flatten(1)).numpy(), ks, config.seed,
                                       eigen_solver="arpack")
        job.reporter.advance()
        job.reporter.end_phase()
        info.update(grey=grey, thumbnail=side, memory_bytes=2 * held)  # the pixels and their selected rows
        computed = rows, labels, info, dict(job.skips.skipped)
    rows, labels, info, skipped = dist.broadcast(computed)
    job.skips.skipped.update(skipped)
    labels_out[:, torch.from_numpy(rows)] = torch.from_numpy(labels)
    return {**info, **_start_truth(source, rows, labels, ks)}


def vector_graph_start(job: Job, features, keep: np.ndarray, labels_out: torch.Tensor, ks: list[int],
                       columns: np.ndarray | None = None) -> dict:
    """The graph start of images on fixed features: the first labels of every head, written into
    ``labels_out`` (T, N), from the spectral embedding of the kNN graph of ``features`` (the vectors as given,
    each column divided by ``columns`` where given, then scaled as :func:`feature_scaling` says: with "both",
    of two graphs) on the ``keep`` rows. Returns the start's record."""
    rows = np.flatnonzero(keep)
    x = torch.cat([features[torch.from_numpy(rows[i:i + 65536])].float() for i in range(0, len(rows), 65536)])
    if columns is not None:
        x /= torch.from_numpy(columns).float()
    job.reporter.phase("graph", 1)
    # the first K eigenvectors, not 2K as for images, and smoothed on the graph: on the pixel tables of
    # bench/suite.py (digits, textures, glyphs) the start's NMI was 0.82-0.88 / 0.66-0.68 / 0.14-0.18 from 2K,
    # 0.89 / 0.71 / 0.24-0.25 from K and 0.905 / 0.71-0.73 / 0.25 smoothed. (On an image folder the network
    # trained from a K-eigenvector start ended lower: see spectral_labels.)
    labels, info = spectral_labels(x.numpy(), ks, job.config.seed, per_k=1, smooth=True,
                                   whiten=feature_scaling(job.config, table=not job.source.has_pixels))
    job.reporter.advance()
    job.reporter.end_phase()
    labels_out[:, torch.from_numpy(rows)] = torch.from_numpy(labels)
    return {**info, **_start_truth(job.source, rows, labels, ks)}


def _start_truth(source, rows: np.ndarray, labels: np.ndarray, ks: list[int]) -> dict:
    """Each head's NMI to the data's classes, where it has them (measured only, never used)."""
    if not source.has_truth:
        return {}
    truth = source.targets[rows]
    known = truth >= 0
    return {"heads": [{"head": h, "k": ks[h], "nmi": agreement(labels[h][known], truth[known])["nmi"]}
                      for h in range(len(ks))]}
