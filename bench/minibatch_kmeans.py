"""The baseline the scale goal names: scikit-learn's MiniBatchKMeans with the same K on a bench/scale.py table,
scored against the mixture's components, beside the labels of a labelkit run on the same table.

Run: .venv/bin/python bench/minibatch_kmeans.py --dir /tmp/scale --n 1000000 [--clusters 1000] [--run DIR]

The table is read in blocks (never whole as float32) and fed to ``partial_fit``, a few passes over it, then
labelled block by block; ``--run`` (default DIR/run-npy-N) is scored with the same truth and the same code.
"""

import argparse
import time
from pathlib import Path

import numpy as np

BLOCK = 100_000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from sklearn.cluster import MiniBatchKMeans

    from labelkit.artefact import read_artefact
    from labelkit.quality import _metrics as lk

    table = np.load(args.dir / f"table-{args.n}.npy", mmap_mode="r")
    truth = read_artefact(args.dir / f"truth-{args.n}.parquet").labels(0)
    model = MiniBatchKMeans(n_clusters=args.clusters, batch_size=args.batch, n_init=1, random_state=args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    for p in range(args.passes):
        for start in rng.permutation(np.arange(0, args.n, BLOCK)):
            block = np.asarray(table[start:start + BLOCK], dtype=np.float32)
            for i in range(0, len(block), args.batch):
                model.partial_fit(block[i:i + args.batch])
        print(f"pass {p + 1}/{args.passes}: {time.perf_counter() - started:.0f} s", flush=True)
    labels = np.concatenate([model.predict(np.asarray(table[s:s + BLOCK], dtype=np.float32))
                             for s in range(0, args.n, BLOCK)])
    seconds = time.perf_counter() - started
    kmeans = lk.compare(labels, truth)
    print(f"\nN = {args.n:,}, K = {args.clusters}; NMI / AMI / ARI against the {len(np.unique(truth))} components")
    print(f"MiniBatchKMeans ({args.passes} passes, batch {args.batch}): {kmeans['nmi']:.4f} / {kmeans['ami']:.4f} / "
          f"{kmeans['ari']:.4f} in {seconds:.0f} s")
    run = args.run or args.dir / f"run-npy-{args.n}"
    if (run / "labels.parquet").exists():
        art = read_artefact(run / "labels.parquet")
        for h in range(art.num_heads):
            ours = lk.compare(art.labels(h), truth)
            print(f"labelkit {run.name} head {h} (K = {art.heads[h].k}): {ours['nmi']:.4f} / {ours['ami']:.4f} / "
                  f"{ours['ari']:.4f}")


if __name__ == "__main__":
    main()
