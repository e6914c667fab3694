"""One embedding table labelled by one process and by torchrun: wall time, peak memory per process, equal labels.

Run: .venv/bin/python bench/torchrun_table.py --dir /tmp/scale --n 1000000 --procs 2,4
         [--generate "--clusters 1000 --heads 1 --epochs 2 --label-steps 2 --neighbours 0"]

The table is bench/scale.py's Gaussian mixture (written once into --dir, reused). Each run is one
``labelkit generate`` with the same options (a fixed configuration: under torchrun there is no time budget to
fit), every process with OMP_NUM_THREADS=1 so that one process and P processes do the same float operations.
Peak RSS is the largest of the run's processes (``os.wait4`` on torchrun covers the workers it reaped). The
last column is the share of labels equal to the one-process run's.
"""

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

from scale import measure, write_table

DEFAULT = "--clusters 1000 --heads 1 --epochs 2 --label-steps 2 --neighbours 0 --device cpu --workers 0 --quiet"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--procs", default="2,4", help="torchrun process counts, comma separated")
    parser.add_argument("--generate", default=DEFAULT, help="the generate options of every run")
    args = parser.parse_args()

    from labelkit.artefact import read_artefact

    args.dir.mkdir(parents=True, exist_ok=True)
    table = args.dir / f"table-{args.n}.npy"
    if not table.exists():
        write_table(table, args.n, args.dim, seed=0)
    os.environ["OMP_NUM_THREADS"] = "1"
    log = args.dir / "torchrun.log"
    options = ["generate", "--data", str(table), *shlex.split(args.generate)]
    runs = []
    for procs in [1, *(int(p) for p in args.procs.split(","))]:
        out = args.dir / f"torchrun-{args.n}-{procs}"
        shutil.rmtree(out, ignore_errors=True)
        launcher = [sys.executable, "-m", "labelkit"] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "labelkit"]
        seconds, peak, status = measure([*launcher, *options, "--out", str(out)], log)
        if status != 0:
            sys.exit(f"{procs} process(es) failed (exit {status}); see {log}")
        runs.append((procs, seconds, peak, read_artefact(out / "labels.parquet").label_matrix()))
        print(f"{procs} process(es): {seconds:.1f} s, peak RSS {peak:.2f} GB", flush=True)
    reference = runs[0][3]
    print(f"\nN = {args.n:,} x {args.dim}; generate {args.generate}")
    print(f"{'processes':>10}{'seconds':>10}{'peak RSS GB':>13}{'RSS / one':>11}{'labels equal':>14}")
    for procs, seconds, peak, labels in runs:
        same = float(np.mean(labels == reference)) if labels.shape == reference.shape else float("nan")
        print(f"{procs:>10}{seconds:>10.1f}{peak:>13.2f}{peak / runs[0][2]:>11.2f}{same:>13.4%} ")


if __name__ == "__main__":
    main()
