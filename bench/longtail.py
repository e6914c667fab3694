"""Long-tailed digits: uniform vs relaxed vs power-law cluster priors with the digits recipe.

The data: scikit-learn's digits with class sizes following a Zipf law (the class of rank r keeps 174 // r
images: 174, 87, 58, …, 17, so the largest class is 10.2x the smallest; the classes are ranked in a seeded random order and the images kept
are a seeded sample). Each variant is the command a user types (``labelkit generate --data FILE.npz --recipe
digits …``) in a child process; the script prints the NMI and accuracy of the labels the run reports first
(the consensus head of the digits recipe) against the true digits, and the sizes they came out with.

Run:  .venv/bin/python bench/longtail.py [--seeds 0,1,2] [--out /tmp/longtail]
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "uniform": [],
    "relaxed (--balance 1)": ["--balance", "1"],
    "relaxed (--balance 0.5)": ["--balance", "0.5"],
    "relaxed (--balance 0.2)": ["--balance", "0.2"],
    "power law (--prior powerlaw:1)": ["--prior", "powerlaw:1"],
}


def long_tailed_digits(path: Path, seed: int = 0) -> np.ndarray:
    """Write the long-tailed digits to ``path`` (images, labels) and return the class sizes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    rank = rng.permutation(10)  # class c is the rank[c]-th largest
    base = np.bincount(digits.target).min()  # 174: every class can give that many
    keep = []
    for c in range(10):
        rows = np.flatnonzero(digits.target == c)
        keep.append(rng.choice(rows, base // (rank[c] + 1), replace=False))
    keep = np.sort(np.concatenate(keep))
    images = np.round(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)
    np.savez(path, images=images, labels=digits.target[keep].astype(np.int64))
    return np.bincount(digits.target[keep], minlength=10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2")
    parser.add_argument("--out", default="/tmp/longtail")
    parser.add_argument("--variants", default=None, help="comma-separated subset of: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "longtail-digits.npz"
    sizes = long_tailed_digits(data)
    print(f"long-tailed digits: {sizes.sum()} images, class sizes {sorted(sizes.tolist(), reverse=True)} "
          f"(largest/smallest {sizes.max() / sizes.min():.1f})")
    chosen = VARIANTS if not args.variants else {k: v for k, v in VARIANTS.items()
                                                 if any(k.startswith(w.strip()) for w in args.variants.split(","))}
    exe = str(Path(sys.executable).with_name("labelkit"))
    results = {}
    for name, options in chosen.items():
        for seed in [int(s) for s in args.seeds.split(",")]:
            run = out / f"{name.split()[0]}{''.join(options).replace('-', '').replace(':', '')}-s{seed}"
            shutil.rmtree(run, ignore_errors=True)  # the bench's own earlier result
            command = [exe, "generate", "--data", str(data), "--recipe", "digits", "--seed", str(seed),
                       "--out", str(run), "--quiet", *options]
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            info = json.loads(subprocess.run([exe, "info", str(run / "labels.parquet"), "--json"], check=True,
                                             capture_output=True, text=True).stdout)
            primary = (info["method"].get("consensus") or {}).get("head", 0)  # the labels the run reports first
            scored = subprocess.run([exe, "metrics", str(run / "labels.parquet"), "--truth", str(data), "--head",
                                     str(primary), "--json"], check=True, capture_output=True, text=True)
            head = json.loads(scored.stdout)["heads"][0]
            results.setdefault(name, []).append(head)
            accuracy = "-" if head["accuracy"] is None else f"{head['accuracy']:.3f}"  # None: an empty cluster
            print(f"{name:<32} seed {seed}: NMI {head['nmi']:.3f}  accuracy {accuracy}  "
                  f"sizes {head['size_min']}..{head['size_max']}  ({seconds:.0f} s)", flush=True)
    print("\nmean over seeds (the primary labels, K=10):")
    base = np.mean([h["nmi"] for h in results.get("uniform", [])]) if "uniform" in results else None
    for name, heads in results.items():
        mean = np.mean([h["nmi"] for h in heads])
        gain = f"  ({mean - base:+.3f} vs uniform)" if base is not None and name != "uniform" else ""
        accuracy = [h["accuracy"] for h in heads if h["accuracy"] is not None]
        shown = f"{np.mean(accuracy):.3f}" if accuracy else "-"
        print(f"  {name:<32} NMI {mean:.3f}  accuracy {shown}{gain}")


if __name__ == "__main__":
    main()
