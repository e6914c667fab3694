"""Nearest neighbours for ``--neighbours``: the inverted-file search against the exact one.

Run:
  .venv/bin/python bench/neighbours.py [--n 100000] [--dim 128] [--k 10] [--large 1000000]

Draws whitened-width vectors from the anisotropic Gaussian mixture of ``bench/frozen.py`` (fixed seed), finds
each row's k nearest neighbours exactly and by the inverted-file search, and prints the recall (the share of
exact neighbours the search finds), the share of neighbours in the same mixture component, and the times and
their ratio. ``--large`` then times the inverted-file search alone at that many rows, where the exact search
(N^2) is extrapolated from the measured one.
"""

import argparse
import time

import numpy as np
import torch

from frozen import mixture
from labelkit.training import neighbours


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--large", type=int, default=1_000_000)
    args = parser.parse_args()
    x, truth = mixture(args.n, args.dim, 100)
    x = torch.from_numpy(x)
    exact, exact_s = timed(lambda: neighbours(x, args.k, exact_below=args.n))
    found, ivf_s = timed(lambda: neighbours(x, args.k, exact_below=0))
    recall = np.mean([len(np.intersect1d(a, b)) for a, b in zip(exact.numpy(), found.numpy())]) / args.k
    same = {name: float((truth[idx.numpy()] == truth[:, None]).mean()) for name, idx in (("exact", exact), ("ivf", found))}
    print(f"N={args.n:,} D={args.dim} k={args.k}, {torch.get_num_threads()} threads")
    print(f"exact {exact_s:.1f} s, inverted file {ivf_s:.1f} s (ratio {exact_s / ivf_s:.1f}x), recall {recall:.3f}")
    print(f"neighbours in the same component: exact {same['exact']:.3f}, inverted file {same['ivf']:.3f}")
    if args.large:
        big, _ = mixture(args.large, args.dim, 100, seed=1)
        _, large_s = timed(lambda: neighbours(torch.from_numpy(big), args.k, exact_below=0))
        guess = exact_s * (args.large / args.n) ** 2
        print(f"N={args.large:,}: inverted file {large_s:.1f} s; exact extrapolated {guess:.0f} s ({guess / large_s:.0f}x)")


if __name__ == "__main__":
    main()
