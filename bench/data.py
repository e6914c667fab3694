"""Decoding throughput of the data layer: images/s for a 32x32 and a 224x224 JPEG folder.

Run: .venv/bin/python bench/data.py [--images 2000] [--workers 0 1 2]

The baseline in the same process is a plain single-threaded loop (PIL open + decode + the same transform);
the ratio shows what DataLoader workers add on this machine.
"""

import argparse
import os
import tempfile
import time

import numpy as np


def make_folder(root: str, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = os.path.join(root, f"class{i % 10}")
        os.makedirs(folder, exist_ok=True)
        array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(array).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    from labelkit.data import resolve
    from labelkit.data import Order, eval_transform, make_loader

    print(f"{os.cpu_count()} CPU cores, {args.images} JPEG images per folder")
    for size in (32, 224):
        with tempfile.TemporaryDirectory() as root:
            make_folder(root, args.images, size)
            source = resolve(root)
            transform = eval_transform(size)
            t0 = time.perf_counter()
            for i in range(len(source)):
                transform(source.load(i))
            baseline = len(source) / (time.perf_counter() - t0)
            print(f"{size}x{size}: plain loop {baseline:8.0f} images/s")
            for workers in args.workers:
                loader = make_loader(source, transform, Order(64), workers=workers)
                t0 = time.perf_counter()
                count = sum(len(indices) for indices, _, _ in loader)
                rate = count / (time.perf_counter() - t0)
                print(f"{size}x{size}: loader, {workers} workers {rate:8.0f} images/s  ({rate / baseline:.2f}x)")


if __name__ == "__main__":
    main()
