"""SeLa heads on fixed features against scikit-learn's KMeans (same K) on the same features.

Run:
  .venv/bin/python bench/frozen.py gmm [--n 100000] [--dim 768] [--components 100] [--clusters 100] [--heads 5]
                                       [--neighbours K] [--no-kmeans]
  .venv/bin/python bench/frozen.py digits [--init runs/digits/model.safetensors] [--data SPEC]

``gmm`` draws an embedding table from an anisotropic Gaussian mixture with unequal spreads (fixed seed), runs
``labelkit generate`` on it with the fixed-feature defaults, and KMeans on the same vectors; it prints the NMI
to the mixture components and the wall time of each, and their ratio. ``digits`` runs ``generate --freeze``
on an image data set (random-init labelkit_cnn, or ``--init`` weights) and KMeans on the cached backbone
features, raw and PCA-whitened as labelkit's heads read them.
"""

import argparse
import glob
import tempfile
import time
from pathlib import Path

import numpy as np


def mixture(n: int, dim: int, components: int, seed: int = 0, separation: float = 0.5):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((components, dim)).astype(np.float32) * separation
    spread = rng.uniform(0.5, 2.0, components).astype(np.float32)  # unequal spreads
    axes = rng.lognormal(0, 0.75, (components, dim)).astype(np.float32)  # anisotropic, each its own way
    labels = rng.integers(0, components, n)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= axes[labels] * spread[labels, None]
    x += means[labels]
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (x @ rotation.astype(np.float32)).astype(np.float32), labels


def nmi(a, b) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(a, b))


def kmeans(x, k: int, seed: int = 0):
    from sklearn.cluster import KMeans

    start = time.perf_counter()
    labels = KMeans(k, random_state=seed).fit_predict(x)
    return labels, time.perf_counter() - start


def generate(**options):
    from labelkit.training import resolve_config
    from labelkit.training import run_sela

    start = time.perf_counter()
    run = run_sela(resolve_config(options))
    return run, time.perf_counter() - start


def gmm(args) -> None:
    x, truth = mixture(args.n, args.dim, args.components)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "table.npz"
        np.savez(table, embeddings=x, labels=truth)
        run, seconds = generate(data=str(table), clusters=(args.clusters,), heads=args.heads, out=str(Path(tmp) / "run"),
                                neighbours=args.neighbours or None)
        ours = [m["nmi"] for m in run.metrics]
    print(f"N={args.n:,} D={args.dim} components={args.components}, heads [{args.clusters} x {args.heads}]")
    print(f"labelkit generate{f' --neighbours {args.neighbours}' if args.neighbours else ''}: {seconds:.0f} s, NMI per head {', '.join(f'{v:.3f}' for v in ours)}")
    if args.kmeans:
        labels, km_seconds = kmeans(x, args.clusters)
        print(f"KMeans(K={args.clusters}) on the same vectors: {km_seconds:.0f} s, NMI {nmi(labels, truth):.3f}")
        print(f"time ratio labelkit / KMeans: {seconds / km_seconds:.2f}")


def digits(args) -> None:
    import torch

    from labelkit.data import resolve
    from labelkit.training import Whiten

    with tempfile.TemporaryDirectory() as tmp:
        options = dict(data=args.data, freeze=True, out=str(Path(tmp) / "run"), clusters=(args.clusters,), heads=args.heads)
        if args.init:
            options.update(init=args.init)
        if args.data != "builtin:digits":
            options.update(arch="labelkit_cnn", image_size=args.image_size, augment="digits")
        run, seconds = generate(**options)
        features = np.load(glob.glob(str(Path(tmp) / "run" / "features" / "*.npy"))[0])[0].astype(np.float32)
    source = resolve(args.data)
    truth = source.targets
    whitened = Whiten.fit(torch.from_numpy(features), None)(torch.from_numpy(features)).numpy()
    ours = [m["nmi"] for m in run.metrics]
    print(f"{args.data}: labelkit_cnn {'from ' + args.init if args.init else 'random init'}, frozen; "
          f"heads [{args.clusters} x {args.heads}], {seconds:.0f} s")
    print(f"labelkit: NMI per head {', '.join(f'{v:.3f}' for v in ours)} (mean {np.mean(ours):.3f})")
    for name, x in (("raw features", features), ("whitened as labelkit reads them", whitened)):
        scores = [nmi(kmeans(x, args.clusters, seed)[0], truth) for seed in range(args.heads)]
        print(f"KMeans on the {name}: NMI {', '.join(f'{v:.3f}' for v in scores)} (mean {np.mean(scores):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    g = commands.add_parser("gmm")
    g.add_argument("--n", type=int, default=100_000)
    g.add_argument("--dim", type=int, default=768)
    g.add_argument("--components", type=int, default=100)
    g.add_argument("--clusters", type=int, default=100)
    g.add_argument("--heads", type=int, default=5)
    g.add_argument("--neighbours", type=int, default=0)
    g.add_argument("--no-kmeans", dest="kmeans", action="store_false")
    d = commands.add_parser("digits")
    d.add_argument("--data", default="builtin:digits")
    d.add_argument("--init", default=None)
    d.add_argument("--image-size", type=int, default=16)
    d.add_argument("--clusters", type=int, default=10)
    d.add_argument("--heads", type=int, default=5)
    args = parser.parse_args()
    {"gmm": gmm, "digits": digits}[args.command](args)


if __name__ == "__main__":
    main()
