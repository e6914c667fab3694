"""Write and read an ImageNet-sized artefact (1,281,167 rows x 10 heads, K = 3000).

Run: .venv/bin/python bench/artefact.py [--rows N]
Prints build / write / read / validate times, the file size, and the time pandas needs for a plain
Parquet read of the same file, as a baseline in the same process.
"""

import argparse
import os
import tempfile
import time

import numpy as np

from labelkit.artefact import Artefact, check_artefact, read_artefact


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--heads", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 1000, args.rows)
    ids = [f"n{c:08d}/n{c:08d}_{i}.JPEG" for i, c in enumerate(classes)]
    labels = rng.integers(0, 3000, (args.heads, args.rows))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "labels.parquet")
        t0 = time.perf_counter()
        art = Artefact.build(ids, labels, 3000, method={"name": "bench"})
        t1 = time.perf_counter()
        art.write(path)
        t2 = time.perf_counter()
        back = read_artefact(path)
        t3 = time.perf_counter()
        assert check_artefact(path) == []
        t4 = time.perf_counter()
        import pyarrow.parquet as pq

        pq.read_table(path)
        t5 = time.perf_counter()
        size = os.path.getsize(path)
    assert back.artefact_id == art.artefact_id
    print(f"rows={args.rows:,} heads={args.heads} K=3000")
    print(f"build (sort, validate, hash)  {t1 - t0:6.2f} s")
    print(f"write (zstd, atomic)          {t2 - t1:6.2f} s")
    print(f"read + full validation        {t3 - t2:6.2f} s")
    print(f"validate (labelkit validate)  {t4 - t3:6.2f} s")
    print(f"plain pyarrow read (baseline) {t5 - t4:6.2f} s   labelkit read / plain read = {(t3 - t2) / (t5 - t4):.1f}x")
    print(f"file size                     {size / 1e6:6.1f} MB  ({size / args.rows / args.heads:.2f} bytes per label)")


if __name__ == "__main__":
    main()
