"""Measurements of issue 33 (README "From cluster ids to a data set"), each a subcommand:

  folders FOLDER OUT [--leave-out 9] [--held 0.2] [--share 0.9]
      OUT/train (the class folders without --leave-out, less a --held share of each), OUT/test (that held share
      and every file of --leave-out) and OUT/part (a --share of every class), as symbolic links chosen by a hash
      of each path (the same on every machine).
  confidence ARTEFACT --truth SPEC
      How the primary head's confidence ranks its wrong labels (Hungarian-mapped to the truth): accuracy per
      confidence decile, the share of the errors among the least confident 20 %, AUROC.
  examples SPEC OUT.csv [--per-class 3] [--names zero,one,...]
      A CSV of sample_id,name: --per-class samples of every true class of SPEC, chosen by a hash of the id, as a
      person who labelled a handful by eye would give `labelkit name --from-examples`.
  review ARTEFACT --truth SPEC --out REVIEWED.parquet
      A simulated reviewer who looks at every cluster of the primary head once: accepts it when its majority class
      holds >= 80 % of it, merges clusters of the same majority (into the largest), and moves the minority, up to
      5 samples a cluster, to the cluster of their class. Writes the decision log beside OUT and the reviewed
      version, and prints the accuracy (Hungarian-matched) before and after, and the samples corrected per
      decision (labelling images one by one corrects at most one per decision). Then
      `labelkit generate --data SPEC --start-from OUT` is the refine run.
  novelty PREDICTED --novel-prefix 9/
      AUROC of a `predict --novelty` artefact's novelty for the samples under the prefix, and the share of them and
      of the others flagged novel.

  Example (the folder of bench/digits_folder.py):
    python bench/curation.py folders /tmp/f10k /tmp/f10k-parts
    labelkit generate --data /tmp/f10k-parts/train --clusters 9 --out /tmp/nine
    labelkit predict /tmp/nine --data /tmp/f10k-parts/test --novelty
    python bench/curation.py novelty /tmp/nine/predicted-test.parquet --novel-prefix 9/
"""

from __future__ import annotations

import argparse
import os
import zlib
from pathlib import Path

import numpy as np


def folders(args) -> None:
    root, out = Path(args.folder), Path(args.out)
    counts = {"train": 0, "test": 0, "part": 0}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        cls = relative.split("/")[0]
        held = zlib.crc32(relative.encode()) % 1000 < args.held * 1000
        chosen = ["test" if cls == args.leave_out or held else "train"]
        if zlib.crc32(b"part:" + relative.encode()) % 1000 < args.share * 1000:
            chosen.append("part")
        for part in chosen:
            link = out / part / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.symlink(path.resolve(), link)
            counts[part] += 1
    print(" ".join(f"{part} {n:,}" for part, n in counts.items()))


def _truth_of(art, spec: str) -> np.ndarray:
    from labelkit.quality import load_truth

    ids, labels = load_truth(spec)
    where = {s: i for i, s in enumerate(ids.to_pylist())}
    return np.array([labels[where[s]] for s in art.sample_ids])


def _accuracy(labels: np.ndarray, truth: np.ndarray, k: int) -> float:
    from scipy.optimize import linear_sum_assignment

    table = np.zeros((k, truth.max() + 1))
    np.add.at(table, (labels, truth), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / len(labels))


def review(args) -> None:
    from labelkit.artefact import read_artefact
    from labelkit.review import DecisionLog, materialise

    art = read_artefact(args.artefact)
    head = art.primary_head
    labels, truth, k = art.labels(head), _truth_of(art, args.truth), art.heads[head].k
    log = DecisionLog(Path(args.out).with_suffix(".decisions.jsonl"))
    if log.path.exists():
        raise SystemExit(f"{log.path} exists; remove it to review again")
    majority = {c: np.bincount(truth[labels == c]).argmax() for c in range(k) if (labels == c).any()}
    share = {c: (truth[labels == c] == m).mean() for c, m in majority.items()}
    sizes = np.bincount(labels, minlength=k)
    into = {}  # class -> the cluster that keeps it
    decisions = 0
    for m in sorted(set(majority.values())):
        group = sorted((c for c in majority if majority[c] == m), key=lambda c: -sizes[c])
        into[m] = group[0]
        if len(group) > 1:
            log.append({"op": "merge", "clusters": group})
            decisions += 1
    for c in sorted(majority):
        if share[c] >= 0.8:
            log.append({"op": "status", "cluster": into[majority[c]], "status": "accepted"})
            decisions += 1
        wrong = art.sample_ids[(labels == c) & (truth != majority[c])][:5]
        for sid, t in zip(wrong, truth[np.searchsorted(art.sample_ids, wrong)]):
            if t in into:
                log.append({"op": "move", "samples": [sid], "to": into[t]})
                decisions += 1
    reviewed, state = materialise(art, head, log)
    reviewed.write(args.out)
    before = _accuracy(labels, truth, k)
    after = _accuracy(reviewed.labels(head), _truth_of(reviewed, args.truth), reviewed.heads[head].k)
    print(f"{args.artefact} head {head}: {decisions} decisions ({state.pinned.sum():,} samples pinned); accuracy "
          f"{before:.4f} -> {after:.4f} on {len(labels):,} samples: {(after - before) * len(labels) / decisions:.2f} "
          f"samples corrected per decision; wrote {args.out}")


def confidence(args) -> None:
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import roc_auc_score

    from labelkit.artefact import read_artefact

    art = read_artefact(args.artefact)
    head = art.primary_head
    labels, score, truth = art.labels(head), art.confidence(), _truth_of(art, args.truth)
    table = np.zeros((art.heads[head].k, truth.max() + 1))
    np.add.at(table, (labels, truth), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    mapped = np.full(art.heads[head].k, -1)
    mapped[rows] = cols
    wrong = mapped[labels] != truth
    order = np.argsort(score, kind="stable")
    deciles = [1 - wrong[part].mean() for part in np.array_split(order, 10)]
    low = wrong[order[: len(order) // 5]].sum() / max(wrong.sum(), 1)
    print(f"{args.artefact} head {head}: {len(labels):,} samples, {wrong.sum():,} wrong ({wrong.mean():.1%})")
    print("accuracy by confidence decile, least confident first: " + " ".join(f"{a:.3f}" for a in deciles))
    print(f"least confident 20% hold {low:.1%} of the errors; AUROC of 1 - confidence for an error "
          f"{roc_auc_score(wrong, -score):.3f}")


def examples(args) -> None:
    import csv

    from labelkit.data import resolve

    source = resolve(args.spec)
    classes = args.names.split(",") if args.names else list(source.classes)
    order = sorted(range(len(source)), key=lambda i: zlib.crc32(source.ids[i].encode()))
    chosen = {c: [] for c in range(len(classes))}
    for i in order:
        c = int(source.targets[i])
        if c >= 0 and len(chosen[c]) < args.per_class:
            chosen[c].append(source.ids[i])
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample_id", "name"])
        writer.writerows([i, classes[c]] for c in sorted(chosen) for i in chosen[c])
    print(f"wrote {args.out}: {sum(map(len, chosen.values()))} examples of {len(classes)} classes")


def novelty(args) -> None:
    from sklearn.metrics import roc_auc_score

    from labelkit.artefact import read_artefact

    art = read_artefact(args.predicted)
    novel = np.array([s.startswith(args.novel_prefix) for s in art.sample_ids])
    score = art.table.column("novelty").to_numpy()
    flagged = art.table.column("novel").to_numpy(zero_copy_only=False)
    record = art.metadata["method"]["novelty"]
    print(f"{args.predicted}: {novel.sum():,} samples under {args.novel_prefix}, {(~novel).sum():,} others; "
          f"{record['method']}, threshold {record['threshold']:.4f} at fpr {record['fpr']}")
    print(f"AUROC {roc_auc_score(novel, score):.3f}; flagged novel: {flagged[novel].mean():.1%} of "
          f"{args.novel_prefix}, {flagged[~novel].mean():.1%} of the others")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("folders")
    p.add_argument("folder")
    p.add_argument("out")
    p.add_argument("--leave-out", default="9")
    p.add_argument("--held", type=float, default=0.2)
    p.add_argument("--share", type=float, default=0.9)
    p.set_defaults(run=folders)
    p = sub.add_parser("confidence")
    p.add_argument("artefact")
    p.add_argument("--truth", required=True)
    p.set_defaults(run=confidence)
    p = sub.add_parser("examples")
    p.add_argument("spec")
    p.add_argument("out")
    p.add_argument("--per-class", type=int, default=3)
    p.add_argument("--names", default=None)
    p.set_defaults(run=examples)
    p = sub.add_parser("review")
    p.add_argument("artefact")
    p.add_argument("--truth", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(run=review)
    p = sub.add_parser("novelty")
    p.add_argument("predicted")
    p.add_argument("--novel-prefix", required=True)
    p.set_defaults(run=novelty)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
