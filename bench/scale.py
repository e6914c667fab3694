"""Vectors end to end at scale: the wall time and peak memory of every command, at several table sizes.

Run: .venv/bin/python bench/scale.py --dir /tmp/scale --n 1000000,3000000 [--dim 768] [--clusters 1000]
         [--generate "--epochs 1 --label-steps 2"] [--laion] [--released] [--commands generate,info,...]

For each N it writes (once; reused by later runs) an N x DIM float16 table of a Gaussian mixture with 1,000
known components -- the rows of a smaller table are the first rows of a larger one, so the small table is a
sample of the large -- the components as a one-head artefact (``truth-N.parquet``), and, with ``--laion``,
the same vectors in the LAION ``img_emb/`` + ``metadata/`` layout, in parts of 1 M rows. Then every command
runs in a fresh process, as a user types it, and its peak resident memory is read from the kernel
(``os.wait4``): generate, info, validate --full, consensus, metrics --against the truth, export --format hub,
and predict on 1,000,000 further vectors of the same mixture. The last column is the ratio of each command's
peak memory at the largest N to that at the smallest ("flat in N" is <= 1.5). ``--released`` also runs the
artefact commands on an artefact of the released SeLa ImageNet layout (1,281,167 rows x 10 heads, K = 3,000).
"""

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

COMPONENTS = 1000
PREDICT_ROWS = 1_000_000
PART_ROWS = 1_000_000
BLOCK = 200_000
ARTEFACT_COMMANDS = ("info", "validate", "consensus", "metrics", "export")


def mixture_rows(lo: int, hi: int, dim: int, seed: int):
    """Rows lo:hi of the mixture (float16) and their components; any row is the same whatever the table size."""
    centres = np.random.default_rng(seed).standard_normal((COMPONENTS, dim)).astype(np.float32)
    for start in range(lo, hi, BLOCK):
        stop = min(hi, start + BLOCK)
        rng = np.random.default_rng([seed, start])
        component = rng.integers(0, COMPONENTS, stop - start)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        yield start, stop, (0.35 * centres[component] + noise).astype(np.float16), component


def write_table(path: Path, n: int, dim: int, seed: int, offset: int = 0) -> np.ndarray:
    """An (n, dim) float16 .npy of the mixture's rows offset:offset+n; returns the components."""
    components = np.empty(n, dtype=np.int64)
    if path.exists():
        return np.load(path.with_suffix(".components.npy"))
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
    for start, stop, rows, component in mixture_rows(offset, offset + n, dim, seed):
        out[start - offset:stop - offset] = rows
        components[start - offset:stop - offset] = component
        out.flush()
    del out
    np.save(path.with_suffix(".components.npy"), components)
    os.replace(tmp, path)
    return components


def write_laion(root: Path, table: Path, n: int) -> None:
    """The same rows in the LAION layout: img_emb/img_emb_<i>.npy beside metadata/metadata_<i>.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (root / "done").exists():
        return
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(exist_ok=True)
    source = np.load(table, mmap_mode="r")
    width = len(str(n - 1))
    for part, lo in enumerate(range(0, n, PART_ROWS)):
        hi = min(n, lo + PART_ROWS)
        np.save(root / "img_emb" / f"img_emb_{part}.npy", np.asarray(source[lo:hi]))
        keys = [str(i).zfill(max(6, width)) for i in range(lo, hi)]
        pq.write_table(pa.table({"key": keys}), root / "metadata" / f"metadata_{part}.parquet")
    (root / "done").write_text("")


def write_truth(path: Path, components: np.ndarray) -> None:
    from labelkit.artefact import Artefact

    if path.exists():
        return
    width = max(6, len(str(len(components) - 1)))
    ids = [str(i).zfill(width) for i in range(len(components))]
    Artefact.build(ids, components[None], [COMPONENTS], method={"name": "truth"}).write(path)


def write_released(path: Path, seed: int = 0) -> None:
    """An artefact of the released SeLa layout: 1,281,167 rows x 10 heads of K = 3,000, heads that mostly agree."""
    from labelkit.artefact import Artefact

    if path.exists():
        return
    n, heads, k = 1_281_167, 10, 3000
    rng = np.random.default_rng(seed)
    base = rng.integers(0, k, n)
    labels = np.stack([np.where(rng.random(n) < 0.8, rng.permutation(k)[base], rng.integers(0, k, n))
                       for _ in range(heads)])
    ids = [f"n{i // 1300:08d}_{i:07d}.JPEG" for i in range(n)]
    Artefact.build(ids, labels, [k] * heads, method={"name": "sela"}).write(path)


# Each command runs under this small wrapper, which forks it and reads its rusage. Run straight from the bench, a
# command's peak would include the bench's own: subprocess starts children with vfork, and the kernel carries the
# parent's high-water RSS into the child's at exec (writing a LAION copy made a 0.4 GB command read 1.8 GB).
_WRAPPER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def measure(command: list[str], log: Path) -> tuple[float, float, int]:
    """(seconds, peak RSS in GB, exit status) of one command in a fresh process."""
    report = log.with_suffix(".rusage")
    started = time.perf_counter()
    with open(log, "ab") as out:
        out.write(("\n$ " + shlex.join(command) + "\n").encode())
        out.flush()
        subprocess.run([sys.executable, "-c", _WRAPPER, str(report), *command], stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    maxrss_kb, status = (int(x) for x in report.read_text().split())
    return seconds, maxrss_kb * 1024 / 1e9, status


def estimate_line(run: Path, seconds: float, peak: float) -> str:
    """The plan's configuration and estimate of a generate run, beside what the run took."""
    import json

    plan = json.loads((run / "config.json").read_text()).get("plan") or {}
    estimate = plan.get("estimate") or {}
    config = json.loads((run / "config.json").read_text())["config"]
    line = (f"plan: {config['heads']} head(s), hidden {config['head_hidden']}, {config['epochs']} epochs, "
            f"{estimate.get('label_steps')} label steps")
    if estimate:
        line += (f"; estimate {estimate['seconds']:.0f} s (measured / estimate {seconds / estimate['seconds']:.2f}), "
                 f"{estimate['peak_memory'] / 1e9:.2f} GB (measured / estimate {peak / (estimate['peak_memory'] / 1e9):.2f})")
    return line


def commands(name: str, data: str, run: Path, truth: Path, predict: Path, out: Path, extra: list[str],
             clusters: int, labels: Path | None = None) -> dict[str, list[str]]:
    labelkit = [sys.executable, "-m", "labelkit"]
    labels = str(labels or run / "labels.parquet")
    return {
        "generate": [*labelkit, "generate", "--data", data, "--clusters", str(clusters), "--out", str(run), "--quiet",
                     *extra],
        "info": [*labelkit, "info", labels, "--full"],
        "validate": [*labelkit, "validate", labels, "--full"],
        "consensus": [*labelkit, "consensus", labels, "--out", str(out / f"{name}-consensus.parquet")],
        "metrics": [*labelkit, "metrics", labels, "--against", str(truth), "--head", "all"],
        "export": [*labelkit, "export", labels, "--format", "hub", "--out", str(out / f"{name}-hub")],
        "predict": [*labelkit, "predict", str(run), "--data", str(predict), "--out", str(out / f"{name}-predicted.parquet"),
                    "--quiet"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--n", default="1000000,3000000", help="table sizes, comma separated")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--generate", default="", help="extra generate options, e.g. '--epochs 1 --label-steps 2'")
    parser.add_argument("--commands", default="generate,info,validate,consensus,metrics,export,predict")
    parser.add_argument("--laion", action="store_true", help="also the LAION layout of each table")
    parser.add_argument("--released", action="store_true", help="also the released SeLa ImageNet layout")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.n.split(","))
    wanted = args.commands.split(",")
    args.dir.mkdir(parents=True, exist_ok=True)
    log = args.dir / "commands.log"
    predict = args.dir / "predict.npy"
    write_table(predict, PREDICT_ROWS, args.dim, args.seed, offset=10 ** 9)  # rows no table holds
    results = {}  # (layout, command) -> {n: (seconds, GB, status)}
    for n in sizes:
        table = args.dir / f"table-{n}.npy"
        started = time.perf_counter()
        components = write_table(table, n, args.dim, args.seed)
        truth = args.dir / f"truth-{n}.parquet"
        write_truth(truth, components)
        layouts = {"npy": str(table)}
        if args.laion:
            write_laion(args.dir / f"laion-{n}", table, n)
            layouts["laion"] = str(args.dir / f"laion-{n}")
        print(f"N = {n:,}: data ready in {time.perf_counter() - started:.0f} s", flush=True)
        for layout, data in layouts.items():
            name = f"{layout}-{n}"
            run = args.dir / f"run-{name}"
            todo = commands(name, data, run, truth, predict, args.dir, args.generate.split(), args.clusters)
            if (run / "labels.parquet").exists():
                wanted_here = [c for c in wanted if c != "generate"]  # a finished run is measured once
            else:
                wanted_here = wanted
            for command in wanted_here:
                results.setdefault((layout, command), {})[n] = seconds, peak, status = measure(todo[command], log)
                print(f"  {layout:5} {command:9} {seconds:8.1f} s  {peak:6.2f} GB  exit {status}", flush=True)
                if command == "generate" and status == 0:
                    print("  " + estimate_line(run, seconds, peak), flush=True)
    if args.released:
        released = args.dir / "released.parquet"
        write_released(released)
        todo = commands("released", "", args.dir, released, predict, args.dir, [], args.clusters, labels=released)
        for command in [c for c in wanted if c in ARTEFACT_COMMANDS]:
            results.setdefault(("released", command), {})[1_281_167] = measure(todo[command], log)
    print(f"\nlog: {log}\n")
    print("| layout | command | " + " | ".join(f"N = {n:,}: s, GB" for n in sizes) + " | GB ratio |")
    print("|---|---|" + "---|" * len(sizes) + "---|")
    for (layout, command), by_n in results.items():
        cells = [f"{by_n[n][0]:.1f}, {by_n[n][1]:.2f}" + ("" if by_n[n][2] == 0 else f" (exit {by_n[n][2]})")
                 if n in by_n else "—" for n in sizes]
        if layout == "released":
            cells = [f"{v[0]:.1f}, {v[1]:.2f}" for v in by_n.values()] + [""] * (len(sizes) - 1)
        ratio = (f"{by_n[sizes[-1]][1] / by_n[sizes[0]][1]:.2f}" if sizes[0] in by_n and sizes[-1] in by_n
                 and len(sizes) > 1 else "")
        print(f"| {layout} | {command} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
