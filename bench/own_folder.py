"""labelkit's default command on a folder of images, beside what a user would try instead: UMAP + k-means on
the raw pixels (umap-learn: 10-d embedding, 15 neighbours, min_dist 0; ``pip install umap-learn``) and
k-means on the raw pixels. Prints NMI against the folder's class names (measured only) and wall times, and
the plan's estimates beside what the run measured.

Run:  .venv/bin/python bench/digits_folder.py /tmp/digits10k --copies 6
      .venv/bin/python bench/own_folder.py /tmp/digits10k --clusters 10 [--budget 15m] [--umap-seeds 3] [generate options]

The labelkit run is the command a user types (``labelkit generate --data DIR --clusters K``), in a child
process, so its wall time includes start-up, the plan's probe and writing the artefact.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _runs import plan_check  # bench/ is on the path of a script run from it


def _pixels(root: Path):
    from PIL import Image

    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    x = np.stack([np.asarray(Image.open(f).convert("L"), dtype=np.float32).ravel() / 255 for f in files])
    classes = sorted({f.relative_to(root).parts[0] for f in files})
    y = np.array([classes.index(f.relative_to(root).parts[0]) for f in files])
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--budget", default=None)
    parser.add_argument("--umap-seeds", type=int, default=3)
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args, extra = parser.parse_known_args()  # other options go to labelkit generate (e.g. --precision bfloat16)
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score as nmi

    root = Path(args.folder)
    x, y = _pixels(root)
    rows = []
    start = time.perf_counter()
    rows.append(("k-means on pixels", nmi(y, KMeans(args.clusters, n_init=3, random_state=0).fit_predict(x)),
                 time.perf_counter() - start))
    try:
        import umap
    except ImportError:
        umap = None
        print("umap-learn is not installed (pip install umap-learn): no UMAP baseline", file=sys.stderr)
    if umap is not None and args.umap_seeds:
        umap.UMAP(n_components=10, n_neighbors=15, min_dist=0.0, random_state=0).fit_transform(x[:500])  # JIT warm-up
        for seed in range(args.umap_seeds):
            start = time.perf_counter()
            embedded = umap.UMAP(n_components=10, n_neighbors=15, min_dist=0.0, random_state=seed).fit_transform(x)
            labels = KMeans(args.clusters, n_init=3, random_state=seed).fit_predict(embedded)
            rows.append((f"UMAP + k-means, seed {seed}", nmi(y, labels), time.perf_counter() - start))

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="labelkit-own-")) / "run"
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "labelkit", "generate", "--data", str(root), "--clusters", str(args.clusters),
               "--out", str(out), "--quiet"]
    if args.budget:
        command += ["--budget", args.budget]
    command += extra
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall, ended = time.perf_counter() - start, time.time()
    import pyarrow.parquet as pq

    table = pq.read_table(out / "labels.parquet")
    ids = table.column("sample_id").to_pylist()
    truth = np.array([ids_class for ids_class in (i.split("/", 1)[0] for i in ids)])
    heads = [c for c in table.column_names if c.startswith("head_")]
    for head in heads:
        rows.append((f"labelkit generate, {head}", nmi(truth, table.column(head).to_numpy()), wall))

    record = json.loads((out / "config.json").read_text())
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    estimate = record["plan"]["estimate"]
    held = max(r.get("memory_bytes", 0) for r in history if r["type"] in ("label_step", "start"))
    print(f"{'method':<34} {'NMI':>6} {'seconds':>8}")
    for name, score, seconds in rows:
        print(f"{name:<34} {score:6.3f} {seconds:8.1f}")
    check = plan_check(out, ended)
    print(f"plan: {check['planned_s']:.0f} s estimated for {check['planned_epochs']} epochs; for the {check['epochs']} "
          f"epochs and {check['label_steps']} label steps run {check['expected_s']:.0f} s estimated, "
          f"{check['wall_s']:.0f} s measured from the plan's start (ratio {check['ratio']:.2f}); "
          f"label-step memory {estimate['label_memory'] / 1e6:.1f} MB estimated, {held / 1e6:.1f} MB held "
          f"(ratio {held / estimate['label_memory']:.2f})")
    print(f"config: {record['config']['arch']} at {record['config']['image_size']} px, "
          f"{record['config']['epochs']} epochs, start {record['config']['start']}"
          + (f"; {check['stopped']}" if check["stopped"] else ""))


if __name__ == "__main__":
    main()
