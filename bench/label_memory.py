"""The label step beyond memory: the stored, disk and streamed kernels on the same problem, and several ranks.

Run: .venv/bin/python bench/label_memory.py --n 200000 --k 3000 --d 128 [--paths stored,disk,stream]
     (a path named PATH-dense, e.g. stored-dense, keeps the kernel dense: solve(..., sparse=False))
     .venv/bin/python bench/label_memory.py --n 1281167 --k 3000 --d 2048 --paths disk,stream --max-iter 2
     .venv/bin/python bench/label_memory.py --n 10000000 --k 1000 --d 128 --paths disk [--ranks 4]

Synthetic float16 features (Gaussian, a random head scaled so that the mean softmax peak is about 0.3, as in
bench/sinkhorn.py) are written once to a .npy file under --dir; every path then runs in a fresh process that
reads them by blocks (labelkit.solver._featurefile), so each process's peak RSS is its own. Prints per path: wall
time, iterations, seconds per iteration, peak RSS, and label agreement with the first path; with --ranks R,
R gloo processes solve together (each its own rows of the same file) and their labels are compared with
the one-process solve of the first path.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from labelkit.solver import Algorithm, Balance, FeatureFile, Storage, write_features


def make_problem(folder: Path, n: int, k: int, d: int, seed: int = 0, target: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(k, d, generator=gen) / d**0.5
    probe = torch.randn(2000, d, generator=gen) @ weight.T
    lo, hi = 0.1, 50.0
    for _ in range(40):  # scale the head so that the mean max softmax is about `target`
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if torch.softmax(probe * mid, 1).amax(1).mean() < target else (lo, mid)
    torch.save({"weight": weight * mid}, folder / "head.pt")

    def blocks(rows=65536):
        for start in range(0, n, rows):
            g = torch.Generator().manual_seed(seed + 1 + start)
            yield torch.randn(min(rows, n - start), d, generator=g)

    write_features(folder / "features.npy", blocks(), n, d)


def child(args) -> None:
    """One solve of one path in this process; prints one JSON line."""
    from labelkit.solver import solve

    weight = torch.load(Path(args.dir) / "head.pt")["weight"]
    features = FeatureFile(Path(args.dir) / "features.npy")
    group, rows = None, (0, len(features))
    if args.rank is not None:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{args.dir}/rendezvous", rank=args.rank,
                                world_size=args.ranks)
        group = dist.group.WORLD
        edges = np.linspace(0, len(features), args.ranks + 1).round().astype(int)
        rows = (int(edges[args.rank]), int(edges[args.rank + 1]))
        features = features.rows(*rows)
    t0 = time.perf_counter()
    kernel, _, dense = args.child.partition("-")
    result = solve(features=features, weight=weight, group=group, algorithm=Algorithm(max_iter=args.max_iter), balance=Balance(exact=False), storage=Storage(kernel=kernel, scratch=args.dir, sparse=dense != "dense"))
    seconds = time.perf_counter() - t0
    suffix = f"{args.child}" + (f".rank{args.rank}" if args.rank is not None else "")
    np.save(Path(args.dir) / f"labels.{suffix}.npy", result.labels)
    print(json.dumps({"path": result.kernel, "products": result.products, "density": result.density,
                      "seconds": seconds, "iterations": result.iterations,
                      "rebuilds": result.rebuilds, "error": result.error, "converged": result.converged,
                      "rows": rows, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
    if group is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


def run_child(args, path: str, rank: int | None = None, ranks: int | None = None) -> subprocess.Popen:
    command = [sys.executable, __file__, "--child", path, "--dir", args.dir, "--max-iter", str(args.max_iter)]
    if rank is not None:
        command += ["--rank", str(rank), "--ranks", str(ranks)]
    env = dict(os.environ)
    if ranks:  # share the cores between the ranks
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--k", type=int, default=3000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--paths", default="stored,disk,stream")
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--ranks", type=int, default=0)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--child", default=None)
    parser.add_argument("--rank", type=int, default=None)
    args = parser.parse_args()
    if args.child:
        return child(args)

    keep = args.dir is not None
    args.dir = args.dir or tempfile.mkdtemp(prefix="labelkit-bench-", dir=os.getcwd())
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"N={args.n:,} K={args.k} D={args.d}; {cpu}, {os.cpu_count()} threads; kernel {args.n * args.k * 2 / 1e9:.1f} GB "
          f"as bf16, features {args.n * args.d * 2 / 1e9:.2f} GB as float16 on disk")
    if not (folder / "features.npy").exists():
        t0 = time.perf_counter()
        make_problem(folder, args.n, args.k, args.d)
        print(f"wrote the features in {time.perf_counter() - t0:.1f} s")
    first = None
    for path in args.paths.split(","):
        out, _ = run_child(args, path).communicate()
        record = json.loads(out.strip().splitlines()[-1])
        labels = np.load(folder / f"labels.{path}.npy")
        first = first if first is not None else (path, labels)
        agree = f", labels equal to {first[0]}'s: {(labels == first[1]).mean():.4%}" if first[0] != path else ""
        sparse = f", {record['density']:.2%} non-zero" if record.get("density") is not None else ""
        print(f"{path:>12} ({record['products']}{sparse}): {record['seconds']:.1f} s, {record['iterations']} iterations "
              f"({record['seconds'] / max(1, record['iterations']):.2f} s each incl. build), error "
              f"{record['error']:.1e}{'' if record['converged'] else ' (not converged)'}, peak RSS "
              f"{record['peak_rss_gb']:.2f} GB{agree}")
    if args.ranks:
        path = args.paths.split(",")[0]
        t0 = time.perf_counter()
        procs = [run_child(args, path, rank, args.ranks) for rank in range(args.ranks)]
        records = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        together = np.concatenate([np.load(folder / f"labels.{path}.rank{r}.npy") for r in range(args.ranks)])
        print(f"{args.ranks} gloo processes ({path}): {time.perf_counter() - t0:.1f} s, {records[0]['iterations']} "
              f"iterations, peak RSS per rank {max(r['peak_rss_gb'] for r in records):.2f} GB, labels equal to one "
              f"process: {(together == first[1]).mean():.4%}")
    if not keep:
        import shutil

        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
