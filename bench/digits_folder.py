"""Write scikit-learn's digits as a folder of PNG files: a stand-in for "my own small images".

Run: .venv/bin/python bench/digits_folder.py OUT [--size 28] [--copies 1] [--seed 0]

Each 8x8 digit is upscaled (bicubic) to ``--size`` pixels, moved by a random affine transform (rotation
within 10 degrees, shift within 8 % of the size, scale 0.9-1.1) and given Gaussian pixel noise (sigma 8 of
255), ``--copies`` times with other draws; files go to ``OUT/<digit>/<index>-<copy>.png``, so the folder's
classes are the digits (measured only: labelkit never trains on them).
"""

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    digits = load_digits()
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        base = Image.fromarray(np.round(image * 255 / 16).astype(np.uint8)).resize((args.size, args.size), Image.BICUBIC)
        for copy in range(args.copies):
            shift = rng.uniform(-0.08, 0.08, 2) * args.size
            moved = base.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR, translate=tuple(shift))
            scale = rng.uniform(0.9, 1.1)
            side = max(1, round(args.size * scale))
            moved = moved.resize((side, side), Image.BILINEAR)
            canvas = Image.new("L", (args.size, args.size))
            canvas.paste(moved, ((args.size - side) // 2, (args.size - side) // 2))
            pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 8, (args.size, args.size))
            path = out / str(label) / f"{index:05d}-{copy}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    print(f"wrote {len(digits.images) * args.copies} images to {out}")


if __name__ == "__main__":
    main()
