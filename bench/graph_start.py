"""The graph start's eigensolver: LOBPCG (the default from 5,000 samples) against ARPACK, on the same kNN graphs.

Run:
  .venv/bin/python bench/graph_start.py [--n 3000,10000] [--dim 128] [--clusters 10] [--spread 0.6]

Draws a Gaussian mixture (fixed seed; ``--spread`` scales the distance between the component centres against
unit noise), runs the table start (:func:`labelkit.training._graph.spectral_labels` as a table run calls it:
K eigenvectors, smoothed, ``--whiten both``'s two graphs) with each solver, and prints the seconds, their
ratio and each solver's NMI to the components. ARPACK's shift-invert mode factorises the graph Laplacian,
whose fill-in grows much faster than the graph (2-core Intel Xeon: 3.5 s at 3,000 vectors, 93 s at 10,000;
beyond, many minutes).
"""

import argparse
import time

import numpy as np
from sklearn.metrics import normalized_mutual_info_score as nmi

from labelkit.training._graph import spectral_labels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="3000,10000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--spread", type=float, default=0.6)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.clusters, args.dim)) * args.spread
    print("| N | LOBPCG s | ARPACK s | ARPACK / LOBPCG | NMI LOBPCG | NMI ARPACK |\n|---|---|---|---|---|---|")
    for n in (int(v) for v in args.n.split(",")):
        truth = rng.integers(0, args.clusters, n)
        x = (centres[truth] + rng.normal(size=(n, args.dim))).astype(np.float32)
        seconds, scores = {}, {}
        for solver in ("lobpcg", "arpack"):
            start = time.perf_counter()
            labels, _ = spectral_labels(x, [args.clusters], 0, per_k=1, smooth=True, whiten="both",
                                        eigen_solver=solver)
            seconds[solver], scores[solver] = time.perf_counter() - start, nmi(truth, labels[0])
        print(f"| {n:,} | {seconds['lobpcg']:.1f} | {seconds['arpack']:.1f} | "
              f"{seconds['arpack'] / seconds['lobpcg']:.1f} | {scores['lobpcg']:.3f} | {scores['arpack']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
