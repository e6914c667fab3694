"""The development suite: several data sets of *distinct* samples with known classes, none a copy of another,
made reproducibly from what any machine has, and labelkit's defaults beside what users would pick instead.

Sets (``make`` writes them; the classes are the first folder level, or a table's ``label`` column):

* ``digits``     -- the 1,797 built-in scikit-learn digits at their own 8 px (grey).
* ``glyphs``     -- 3,000 letters rendered at 28 px from the system's and matplotlib's fonts, one font per
                    sample, with random pose (rotation, scale, shift), stroke width, blur and noise (grey).
* ``textures``   -- 3,000 colour crops (32 px) of ten scikit-image sample pictures, at random places, scales and
                    orientations; the class is the picture.
* ``glyphs-tail``-- 1,171 further glyphs with Zipf class sizes (400, 200, ..., 40); run without K.
* ``*-pixels``   -- the pixels of digits, glyphs and textures as embedding tables (Parquet, with ``label``).
* ``*-features`` -- a network's features as embedding tables, the way most tables reach labelkit: ``make`` trains
                    ``labelkit generate --data glyphs --clusters 10 --seed 0`` (the defaults) and writes that
                    network's features of 3,000 glyphs of ten *other* letters (``glyphs-features``) and of
                    the built-in digits (``digits-features``): classes the network never saw.
* more kinds of table (``--sets tables`` runs every table): the glyph network's features of 2,000 further
  texture crops (``textures-features``) and of 879 further glyphs of the other letters with Zipf class sizes
  (``glyphs-tail-features``); a second network's, trained the same way on the textures, of the digits and of
  2,500 glyphs of the other letters (``*-texnet-features``); a network of random weights' (the glyph
  network's layers re-initialised) of digits, glyphs and textures (``*-random-features``); HOG descriptors
  (scikit-image) of the same three (``*-hog-features``); the textures' colour histograms
  (``textures-hist-features``); more pixels: the tail glyphs, the textures at 16 px in grey and at 8 px in
  colour; and three small tables of measurements that scikit-learn ships (``wine-table``, ``iris-table``,
  ``cancer-table``: 178, 150 and 569 rows, 3, 3 and 2 classes, columns in different units).

Methods: k-means on the same pixels (scikit-learn, 3 starts), UMAP + k-means (umap-learn: 10-d, 15
neighbours, min_dist 0; ``pip install -e '.[bench]'``) and ``labelkit generate --data SET`` with its defaults
(the command a user types, in a child process; ``--clusters`` only where the set's K is known to the user).
Both baselines are told the true K; on the three tables of measurements they run on the columns as they are and
standardized (as a user of such a table would), and labelkit's margin is to the best of all of them. Prints
one table, worst labelkit margin first, with the CPU.

Run:  .venv/bin/python bench/suite.py make /tmp/suite
      .venv/bin/python bench/suite.py run /tmp/suite [--sets glyphs,textures | --sets tables] [--skip-labelkit]
                                                     [--json out.json] [generate's options, e.g. --whiten no]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _runs import plan_check  # bench/ is on the path of a script run from it

TABLES = ("digits-pixels", "glyphs-pixels", "textures-pixels", "glyphs-features", "digits-features",
          "glyphs-tail-pixels", "textures-grey16-pixels", "textures-small8-pixels", "textures-features",
          "glyphs-tail-features", "digits-texnet-features", "glyphs-texnet-features", "digits-random-features",
          "glyphs-random-features", "textures-random-features", "digits-hog-features", "glyphs-hog-features",
          "textures-hog-features", "textures-hist-features", "wine-table", "iris-table", "cancer-table")
SETS = ("digits", "glyphs", "textures", "glyphs-tail", *TABLES)
LETTERS = "ABCDEFGHKM"
OTHER_LETTERS = "NPRSTUVWXY"  # the feature table's glyphs: none of them is in LETTERS
PICTURES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "brick",
            "grass", "gravel", "retina")


# ---------------------------------------------------------------------------------------------------- making sets

def _write_folder(root: Path, images: list, labels: np.ndarray, names: list[str]) -> None:
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")


def _write_table(path: Path, images: list, labels: np.ndarray) -> None:
    _write_vectors(path, np.stack([np.asarray(im, dtype=np.float32).ravel() / 255 for im in images]), labels)


def _write_vectors(path: Path, x: np.ndarray, labels: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    table = pa.table({"sample_id": [f"{i:05d}" for i in range(len(x))], "embedding": vectors,
                      "label": pa.array(labels, pa.int64())})
    pq.write_table(table, path)


def _digits() -> tuple[list, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [np.clip(im * 16, 0, 255).astype(np.uint8) for im in d.images]
    return images, d.target, [str(c) for c in range(10)]


def _fonts(letters: str = LETTERS) -> list[str]:
    """Every TrueType font here that draws all the ``letters`` (symbol fonts are left out)."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    paths = sorted(Path("/usr/share/fonts").rglob("*.ttf")) + sorted(
        (Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf").glob("*.ttf"))
    fonts, seen = [], set()
    for path in paths:
        try:
            font = ImageFont.truetype(str(path), 40)
        except OSError:
            continue
        drawn = []
        for ch in letters + "\uffff":
            canvas = Image.new("L", (64, 64))
            ImageDraw.Draw(canvas).text((8, 4), ch, font=font, fill=255)
            drawn.append(np.asarray(canvas).tobytes())
        missing = drawn[-1]
        if len(set(drawn[:-1])) == len(letters) and missing not in drawn[:-1] and path.name not in seen:
            fonts.append(str(path))
            seen.add(path.name)
    return fonts


def _glyph(font_path: str, ch: str, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    font = ImageFont.truetype(font_path, int(rng.integers(30, 44)))
    canvas = Image.new("L", (64, 64))
    draw = ImageDraw.Draw(canvas)
    box = draw.textbbox((0, 0), ch, font=font)
    x, y = (64 - (box[2] + box[0])) / 2, (64 - (box[3] + box[1])) / 2
    draw.text((x, y), ch, font=font, fill=255)
    stroke = int(rng.integers(-1, 3))  # thinner, as drawn, or bolder
    if stroke > 0:
        canvas = canvas.filter(ImageFilter.MaxFilter(2 * stroke + 1))
    elif stroke < 0:
        thinner = canvas.filter(ImageFilter.MinFilter(3))
        ink = np.asarray(canvas, dtype=np.float32).sum()
        canvas = thinner if np.asarray(thinner, dtype=np.float32).sum() > 0.4 * ink else canvas  # never erased
    canvas = canvas.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR,
                           translate=tuple(rng.uniform(-5, 5, 2)))
    canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.2))))
    image = np.asarray(canvas.resize((28, 28), Image.BILINEAR), dtype=np.float32)
    image = image * rng.uniform(0.6, 1.0) + rng.normal(0, rng.uniform(0, 20), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _glyphs(counts: list[int], seed: int, letters: str = LETTERS) -> tuple[list, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    fonts = _fonts(letters)
    labels = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    rng.shuffle(labels)
    images = [_glyph(fonts[int(rng.integers(len(fonts)))], letters[k], rng) for k in labels]
    return images, labels, list(letters)


def _textures(per_class: int, seed: int) -> tuple[list, np.ndarray, list[str]]:
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k, name in enumerate(PICTURES):
        picture = getattr(skimage.data, name)()
        if picture.ndim == 2:
            picture = np.stack([picture] * 3, axis=-1)
        picture = Image.fromarray(np.ascontiguousarray(picture[..., :3]).astype(np.uint8))
        width, height = picture.size
        for _ in range(per_class):
            side = int(rng.integers(min(48, width, height) // 1, min(width, height) // 3 + 49))
            left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            crop = picture.crop((left, top, left + side, top + side)).resize((32, 32), Image.BILINEAR)
            crop = crop.rotate(90 * int(rng.integers(4)))
            images.append(np.asarray(crop))
            labels.append(k)
    order = rng.permutation(len(labels))
    return [images[i] for i in order], np.asarray(labels)[order], list(PICTURES)


def make(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tail_counts = [round(400 / (r + 1) ** 1.0) for r in range(10)]  # 400, 200, ..., 40
    sets = {"digits": _digits(), "glyphs": _glyphs([300] * 10, seed=1), "textures": _textures(300, seed=2),
            "glyphs-tail": _glyphs(tail_counts, seed=3)}
    for name, (images, labels, names) in sets.items():
        _write_folder(root / name, images, labels, names)
        if name != "glyphs-tail":
            _write_table(root / f"{name}-pixels.parquet", images, labels)
        print(f"{name}: {len(images)} images, class sizes {np.bincount(labels).tolist()}", flush=True)
    _feature_tables(root, {"glyphs-features": _glyphs([300] * 10, seed=4, letters=OTHER_LETTERS),
                           "digits-features": sets["digits"]})
    _more_tables(root, sets)


def _more_tables(root: Path, sets: dict) -> None:
    """The further kinds of table of the module's docstring."""
    from sklearn import datasets

    tail = [round(300 / (r + 1)) for r in range(10)]
    _feature_tables(root, {"textures-features": _textures(200, seed=12),
                           "glyphs-tail-features": _glyphs(tail, seed=13, letters=OTHER_LETTERS)})
    _feature_tables(root, {"digits-texnet-features": sets["digits"],
                           "glyphs-texnet-features": _glyphs([250] * 10, seed=14, letters=OTHER_LETTERS)},
                    network="textures")
    _feature_tables(root, {f"{name}-random-features": sets[name] for name in ("digits", "glyphs", "textures")},
                    random_weights=True)
    textures = sets["textures"]
    _write_table(root / "glyphs-tail-pixels.parquet", *sets["glyphs-tail"][:2])
    _write_table(root / "textures-grey16-pixels.parquet", [_resized(im, 16, grey=True) for im in textures[0]],
                 textures[1])
    _write_table(root / "textures-small8-pixels.parquet", [_resized(im, 8) for im in textures[0]], textures[1])
    for name, side, cell in (("digits", 16, 4), ("glyphs", 28, 7), ("textures", 32, 8)):
        _write_vectors(root / f"{name}-hog-features.parquet", _hog(sets[name][0], side, cell), sets[name][1])
    histograms = [np.concatenate([np.histogram(im[..., c], bins=16, range=(0, 256))[0] for c in range(3)])
                  / im[..., 0].size for im in textures[0]]
    _write_vectors(root / "textures-hist-features.parquet", np.stack(histograms).astype(np.float32), textures[1])
    for name, load in (("wine", datasets.load_wine), ("iris", datasets.load_iris),
                       ("cancer", datasets.load_breast_cancer)):
        data = load()
        _write_vectors(root / f"{name}-table.parquet", data.data.astype(np.float32), data.target)


def _resized(image: np.ndarray, side: int, grey: bool = False) -> np.ndarray:
    from PIL import Image

    picture = Image.fromarray(image)
    return np.asarray((picture.convert("L") if grey else picture).resize((side, side), Image.BILINEAR))


def _hog(images: list, side: int, cell: int) -> np.ndarray:
    from skimage.feature import hog

    return np.stack([hog(_resized(im, side, grey=True) / 255.0, pixels_per_cell=(cell, cell), cells_per_block=(2, 2))
                     for im in images]).astype(np.float32)


def _feature_tables(root: Path, sets: dict, network: str = "glyphs", random_weights: bool = False) -> None:
    """The features of a network that labelkit trains on the ``network`` set (its defaults, seed 0), of each
    of ``sets``; with ``random_weights``, of the same network with every layer re-initialised (seed 0). A
    network already in ``root/NETWORK-model`` is used as it is: delete the folder to train it again."""
    import torch

    from labelkit.data import resolve
    from labelkit.training import load_run_model, sample_features

    model_dir = root / f"{network}-model"
    if not (model_dir / "model.safetensors").is_file():
        command = ["generate", "--data", str(root / network), "--clusters", "10", "--seed", "0", "--quiet",
                   "--out", str(model_dir)]
        subprocess.run([sys.executable, "-m", "labelkit", *command], check=True)
    model, record = load_run_model(model_dir)
    if random_weights:
        torch.manual_seed(0)
        for layer in model.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    for name, (images, labels, _) in sets.items():
        with tempfile.TemporaryDirectory() as tmp:  # the images as files, so that they decode as any folder does
            folder = Path(tmp) / "images"
            _write_folder(folder, images, np.zeros(len(images), np.int64), ["all"])
            source = resolve(str(folder))
            order = [int(Path(sample).stem) for sample in source.ids]  # the folder's order: by path
            features = sample_features(model, record, source, np.arange(len(source))).numpy()
            x = np.empty_like(features)
            x[order] = features
        _write_vectors(root / f"{name}.parquet", x, labels)
        print(f"{name}: {x.shape[0]} x {x.shape[1]} features, class sizes {np.bincount(labels).tolist()}", flush=True)


# ---------------------------------------------------------------------------------------------------- running

def _load(root: Path, name: str) -> tuple[np.ndarray, np.ndarray, Path]:
    from PIL import Image

    if name.endswith(("-pixels", "-features", "-table")):
        import pyarrow.parquet as pq

        path = root / f"{name}.parquet"
        table = pq.read_table(path)
        x = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        return x, table.column("label").to_numpy(), path
    path = root / name
    files = sorted(path.rglob("*.png"))
    x = np.stack([np.asarray(Image.open(f), dtype=np.float32).ravel() / 255 for f in files])
    classes = sorted({f.parent.name for f in files})
    return x, np.array([classes.index(f.parent.name) for f in files]), path


def _baselines(x: np.ndarray, y: np.ndarray, k: int, umap_seeds: int) -> list[dict]:
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score as nmi

    rows = []
    start = time.perf_counter()
    rows.append({"method": "k-means", "nmi": nmi(y, KMeans(k, n_init=3, random_state=0).fit_predict(x)),
                 "seconds": time.perf_counter() - start})
    try:
        import umap
    except ImportError:
        return rows
    scores, start = [], time.perf_counter()
    for seed in range(umap_seeds):
        z = umap.UMAP(n_components=10, n_neighbors=15, min_dist=0.0, random_state=seed).fit_transform(x)
        scores.append(nmi(y, KMeans(k, n_init=3, random_state=0).fit_predict(z)))
    rows.append({"method": "UMAP + k-means", "nmi": float(np.mean(scores)), "spread": float(np.std(scores)),
                 "seconds": (time.perf_counter() - start) / umap_seeds})
    return rows


def _labelkit(path: Path, k: int | None, extra: list[str]) -> dict:
    from labelkit.artefact import read_artefact
    from sklearn.metrics import normalized_mutual_info_score as nmi

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = ["labelkit", "generate", "--data", str(path), "--out", str(out)]
        command += ["--clusters", str(k)] if k else []
        command += extra
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "labelkit", *command[1:]], capture_output=True, text=True)
        seconds, ended = time.perf_counter() - start, time.time()
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        artefact = read_artefact(out / "labels.parquet")
        history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
        solves = [h for r in history if r["type"] == "label_step" for h in r["heads"]]
        truth = _truth(path, artefact.sample_ids)
        heads = [nmi(truth, artefact.labels(h)) for h in range(artefact.num_heads)]
        chosen = _chosen_head(artefact.metadata.get("method", {}), [h.k for h in artefact.heads])
        return {"method": "labelkit", "nmi": heads[chosen], "heads": heads, "chosen": chosen, "seconds": seconds,
                "command": " ".join(command), "stdout_tail": done.stdout[-1500:], "plan": plan_check(out, ended),
                "solves": len(solves), "unconverged": sum(not h["converged"] for h in solves)}


def _chosen_head(method: dict, ks: list[int]) -> int:
    """The head a user would keep without ground truth: the consensus head when there is one, else the head of
    the recommended K (or any K) that agrees most with the others."""
    if "consensus" in method:
        return method["consensus"]["head"]
    quality = method.get("quality", {})
    rows = quality.get("heads", [])
    k = (quality.get("recommended_k") or {}).get("k")
    rows = [r for r in rows if k is None or r["k"] == k]
    if not rows or any(r.get("agreement") is None for r in rows):
        return 0
    return max(rows, key=lambda r: r["agreement"])["head"]


def _truth(path: Path, sample_ids) -> np.ndarray:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["sample_id", "label"])
        by_id = dict(zip(table.column("sample_id").to_pylist(), table.column("label").to_pylist()))
        return np.array([by_id[s] for s in sample_ids])
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    return np.array([classes.index(s.split("/")[0]) for s in sample_ids])


def run(root: Path, sets: list[str], skip_labelkit: bool, umap_seeds: int, extra: list[str]) -> list[dict]:
    results = []
    for name in sets:
        x, y, path = _load(root, name)
        k = len(np.unique(y))
        rows = _baselines(x, y, k, umap_seeds)
        if name.endswith("-table"):  # measurements in different units: a user would standardize them first
            scaled = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)
            rows += [{**r, "method": f"{r['method']} (standardized)"} for r in _baselines(scaled, y, k, umap_seeds)]
        if not skip_labelkit:
            rows.append(_labelkit(path, None if name == "glyphs-tail" else k, extra))
        best = max(r["nmi"] for r in rows if r["method"] != "labelkit")
        margin = next((r["nmi"] - best for r in rows if r["method"] == "labelkit"), float("nan"))
        results.append({"set": name, "samples": len(y), "k": k, "rows": rows, "margin": margin})
        print(f"{name}: " + ", ".join(f"{r['method']} {r['nmi']:.3f} ({r['seconds']:.0f} s)" for r in rows),
              flush=True)
    return results


def _cpu() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cell(rows: dict, method: str) -> str:
    """A baseline's NMI, then its NMI on the standardized columns where it ran on them too."""
    cell = f"{rows[method]['nmi']:.3f}" if method in rows else "-"
    scaled = rows.get(f"{method} (standardized)")
    return cell + (f" / {scaled['nmi']:.3f} standardized" if scaled else "")


def _print_table(results: list[dict]) -> None:
    print(f"\nCPU: {_cpu()}, {len(os.sched_getaffinity(0))} cores; worst labelkit margin first")
    print("| set | N | K | labelkit | UMAP + k-means | k-means | labelkit s | epochs run | s / plan | unconverged solves "
          "| margin |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: (r["margin"] if r["margin"] == r["margin"] else -1)):
        by = {row["method"]: row for row in r["rows"]}
        mine = by.get("labelkit", {})
        seconds = f"{mine['seconds']:.0f}" if mine else "-"
        stalls = f"{mine['unconverged']} of {mine['solves']}" if mine else "-"
        plan = mine.get("plan")  # the measured time over the plan's estimate for the epochs run (images only)
        ran = f"{plan['epochs']} of {plan['planned_epochs']}" if plan else "-"
        ratio = f"{plan['ratio']:.2f}" if plan else "-"
        print(f"| {r['set']} | {r['samples']} | {r['k']} | {_cell(by, 'labelkit')} | {_cell(by, 'UMAP + k-means')} | "
              f"{_cell(by, 'k-means')} | {seconds} | {ran} | {ratio} | {stalls} | {r['margin']:+.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("make", "run"))
    parser.add_argument("root")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--skip-labelkit", action="store_true")
    parser.add_argument("--umap-seeds", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args, extra = parser.parse_known_args()
    root = Path(args.root)
    if args.action == "make":
        make(root)
        return
    sets = TABLES if args.sets == "tables" else args.sets.split(",")
    results = run(root, sets, args.skip_labelkit, args.umap_seeds, extra)
    _print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
