"""``labelkit report``: an offline HTML page that shows the clusters of one head.

Cluster grids (sorted by purity when ground truth is known, by size otherwise, plus a random selection),
each image framed in the colour of its true class; the most and least homogeneous clusters; cluster-size and
per-cluster-entropy histograms; and, with a run directory, the training curves of ``history.jsonl``.
Only the shown images are decoded. The page references PNG files beside it and nothing on a network.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._util.files import atomic_path, write_text_atomic
from .._util import remote
from ..artefact import read_artefact
from ..data import resolve
from ..errors import ConfigError, DataError
from ._figures import headless_pyplot
from ..artefact import summarize

__all__ = ["build_report", "Report", "TILE"]

TILE = 64  # pixels per image in a grid
_BORDER = 4
_COLUMNS = 8


@dataclass
class Report:
    index: Path
    figures: list[Path]
    missing: list[str]
    warning: str | None = None  # e.g. the data is not what the labels were made on


def _class_colours(count: int) -> list[tuple[int, int, int]]:
    plt = headless_pyplot()
    cmap = plt.get_cmap("tab20" if count > 10 else "tab10")
    return [tuple(int(255 * c) for c in cmap(i % cmap.N)[:3]) for i in range(count)]


def _grid(images: list, frames: list, path: Path) -> Path:
    from PIL import Image, ImageOps

    rows = max(1, -(-len(images) // _COLUMNS))
    canvas = Image.new("RGB", (_COLUMNS * TILE, rows * TILE), (255, 255, 255))
    inner = TILE - 2 * _BORDER
    for n, (image, frame) in enumerate(zip(images, frames)):
        tile = ImageOps.expand(image.resize((inner, inner)), border=_BORDER, fill=frame)
        canvas.paste(tile, ((n % _COLUMNS) * TILE, (n // _COLUMNS) * TILE))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def _load_selected(source, wanted: set[int]) -> tuple[dict[int, object], list[int]]:
    """Decode just the wanted samples: by index, or in one streaming pass over shards."""
    images, failed = {}, []
    if source.map_style:
        for i in sorted(wanted):
            try:
                images[i] = source.load(i)
            except Exception:  # a bad file is reported and replaced, not fatal
                failed.append(i)
    else:
        for i, image, _ in source.iter_samples(only=wanted):
            if image is None:
                failed.append(i)
            else:
                images[i] = image
    return images, failed


def _histograms(sizes: np.ndarray, entropies: np.ndarray | None, k: int, path: Path) -> Path:
    plt = headless_pyplot()
    fig, axes = plt.subplots(1, 2 if entropies is not None else 1, figsize=(10 if entropies is not None else 5, 3.2),
                             squeeze=False)
    ax = axes[0, 0]
    ax.hist(sizes, bins=min(50, max(10, k // 4)), color="#3b6ea8")
    ax.axvline(sizes.mean(), color="k", linestyle="--", linewidth=1)
    ax.set(title=f"cluster sizes (K={k}, empty={(sizes == 0).sum()})", xlabel="samples per cluster", ylabel="clusters")
    if entropies is not None:
        ax = axes[0, 1]
        ax.hist(entropies, bins=20, color="#c0504d")
        ax.set(title=f"class entropy inside clusters (mean {entropies.mean():.2f} nats)", xlabel="entropy (nats)",
               ylabel="clusters")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def _curves(history: Path, path: Path) -> Path | None:
    records = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    epochs = [r for r in records if r.get("type") == "epoch"]
    steps = [r for r in records if r.get("type") == "label_step"]
    if not epochs:
        return None
    plt = headless_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].plot([r["epoch"] for r in epochs], [r["loss"] for r in epochs], color="#3b6ea8")
    axes[0].set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    if steps:
        x = [r["epoch"] for r in steps]
        axes[1].plot(x, [r["heads"][0]["nmi_previous"] for r in steps], marker="o", label="NMI to previous labels")
        if "nmi" in steps[0]["heads"][0]:
            axes[1].plot(x, [r["heads"][0]["nmi"] for r in steps], marker="s", label="NMI to ground truth")
        axes[1].set(title="head 0 over training (paper, fig. A.1)", xlabel="epoch", ylim=(0, 1.02))
        axes[1].legend(frameon=False)
    else:
        axes[1].axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


@dataclass
class _Head:
    """One head's labels over the data's samples, with what the truth (if any) says of each cluster."""

    labels: np.ndarray  # cluster of each sample of the data, -1 where the artefact has none
    present: np.ndarray  # samples of the data that carry a label
    targets: np.ndarray | None
    classes: list[str] | None
    sizes: np.ndarray
    members: list[np.ndarray]
    purity: np.ndarray
    entropy: np.ndarray
    has_truth: bool
    names: tuple | None = None  # each cluster's name (None where not named), when the head has names


def build_report(artefact: str | os.PathLike, data: str | None = None, out: str | os.PathLike | None = None, *,
                 truth: str | None = None, run: str | None = None, head: int = 0, per_cluster: int = 16,
                 clusters: int = 24, seed: int = 0) -> Report:
    """Write ``out/index.html`` and its PNG figures for one head of ``artefact`` over the images of ``data``.

    What the artefact knows need not be given: ``data`` defaults to the data it records, ``run`` (training
    curves) to the run directory it is in (or is), ``out`` to ``<artefact>-report`` beside it."""
    from ..artefact import output_beside

    art = read_artefact(artefact)
    if data is None:
        data = art.metadata["data"].get("spec")
        if not data:
            raise ConfigError(f"{artefact} records no data spec (it was imported without one); give --data")
    if run is None:
        folder = Path(artefact) if Path(artefact).is_dir() else Path(artefact).parent
        run = str(folder) if not remote.is_url(artefact) and (folder / "history.jsonl").is_file() else None
    out = output_beside(artefact, "-report") if out is None else out
    remote.refuse_url(out, "--out", "a report is a local folder of HTML and PNG files")
    if not 0 <= head < art.num_heads:
        raise ConfigError(f"--head {head}: this artefact has heads 0..{art.num_heads - 1}")
    if per_cluster < 1 or clusters < 1:
        raise ConfigError("--per-cluster and --show must be at least 1")
    source = resolve(data)
    from ..data import content_check

    warning = None
    if content_check(art, source)["content_match"] is False:
        warning = (f"{data} has the artefact's sample ids but other contents: these images are not the ones "
                   "the labels were made on")
    view = _head_view(art, head, source, data, truth)
    rng = np.random.default_rng(seed)
    sections = _sections(view, clusters, rng)
    shown = {c: rng.permutation(view.members[c]) for _, cs in sections for c in cs}
    wanted = {int(i) for c, m in shown.items() for i in m[: per_cluster * 2]}  # spares replace bad images
    images, failed = _load_selected(source, wanted)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures, blocks = _cluster_grids(view, sections, shown, images, per_cluster, out)
    nonempty = np.flatnonzero([len(m) > 0 for m in view.members])
    hist = _histograms(view.sizes, view.entropy[nonempty] if view.has_truth else None, len(view.sizes),
                       out / "histograms.png")
    figures.append(hist)
    extra = [f'<h2>Cluster sizes and homogeneity</h2><img src="{hist.name}" alt="histograms">']
    if run:
        history = Path(run) / "history.jsonl"
        if not history.is_file():
            raise ConfigError(f"--run {run}: no history.jsonl there")
        curves = _curves(history, out / "training.png")
        if curves:
            figures.append(curves)
            extra.append(f'<h2>Training</h2><img src="{curves.name}" alt="training curves">')
    lines = (f"<p>{len(view.present):,} of {len(source):,} images of {html.escape(data)} carry a label"
             + (f"; {len(failed)} selected image(s) could not be read and were replaced" if failed else "") + "</p>"
             + (f'<p style="color:#b00"><b>Warning:</b> {html.escape(warning)}</p>' if warning else ""))
    page = _page(art, head, artefact, _provenance(art, head) + lines + _metrics(view) + _legend(view),
                 "".join(blocks) + "\n" + "".join(extra))
    index = write_text_atomic(out / "index.html", page)
    return Report(index=index, figures=figures, missing=[source.ids[i] for i in failed], warning=warning)


def _head_view(art, head: int, source, data: str, truth: str | None) -> _Head:
    rows = source.positions_in(art.table.column("sample_id"))
    present = np.flatnonzero(rows >= 0)
    if len(present) == 0:
        raise DataError(f"none of the {art.num_samples:,} labelled ids is in {data} ({len(source):,} samples)")
    k = art.heads[head].k
    labels = np.full(len(source), -1, dtype=np.int64)
    labels[present] = art.labels(head)[rows[present]]
    classes, targets = source.classes, source.targets
    if truth:
        from ..quality import load_truth

        truth_ids, truth_labels = load_truth(truth)
        where = source.positions_in(truth_ids)
        targets = np.where(where >= 0, truth_labels[np.maximum(where, 0)], -1)
        classes = [str(c) for c in range(int(targets.max()) + 1)]
    has_truth = targets is not None and bool((targets[present] >= 0).any())
    members = [np.flatnonzero(labels == c) for c in range(k)]
    purity, entropy = np.zeros(k), np.zeros(k)
    for c in range(k if has_truth else 0):
        t = targets[members[c]]
        t = t[t >= 0]
        if len(t):
            counts = np.bincount(t)
            p = counts[counts > 0] / len(t)
            purity[c], entropy[c] = counts.max() / len(t), float(-(p * np.log(p)).sum())
    return _Head(labels, present, targets, classes, np.bincount(art.labels(head), minlength=k), members, purity,
                 entropy, has_truth, art.heads[head].names)


def _sections(view: _Head, clusters: int, rng) -> list[tuple[str, list[int]]]:
    """The clusters to show, by section: the purest (or largest), a random sample, and with truth the most and
    least homogeneous."""
    sizes, purity, entropy = view.sizes, view.purity, view.entropy
    nonempty = np.flatnonzero([len(m) > 0 for m in view.members])
    order = nonempty[np.lexsort((-sizes[nonempty], -purity[nonempty]))] if view.has_truth else \
        nonempty[np.argsort(-sizes[nonempty], kind="stable")]
    if len(order) <= clusters:  # every cluster fits on the page: each shown once
        return [(f"All {len(order)} clusters, " + ("purest first" if view.has_truth else "largest first"), list(order))]
    top = list(order[: (clusters + 1) // 2])
    rest = [c for c in order if c not in set(top)]
    random_pick = sorted(rng.choice(rest, size=min(len(rest), clusters // 2), replace=False).tolist()) if rest else []
    sections = [("Clusters by purity" if view.has_truth else "Largest clusters", top)]
    if random_pick:
        sections.append(("Random clusters", random_pick))
    if view.has_truth:  # the extremes not already shown above
        seen = set(top) | set(random_pick)
        by_entropy = [c for c in nonempty[np.argsort(entropy[nonempty], kind="stable")] if c not in seen]
        low, high = by_entropy[:4], [c for c in by_entropy[::-1][:4] if c not in by_entropy[:4]]
        sections += [(title, cs) for title, cs in (("Most homogeneous (lowest class entropy)", low),
                                                   ("Least homogeneous (highest class entropy)", high)) if cs]
    return sections


def _cluster_grids(view: _Head, sections, shown: dict, images: dict, per_cluster: int, out: Path):
    """One image grid per shown cluster (frames coloured by true class), and the page's sections."""
    colours = _class_colours(len(view.classes or [])) if view.has_truth else []
    grey = (200, 200, 200)
    figures, blocks = [], []
    for title, cluster_ids in sections:
        cards = []
        for c in cluster_ids:
            picked = [int(i) for i in shown[c] if int(i) in images][:per_cluster]
            frames = [colours[view.targets[i]] if view.has_truth and view.targets[i] >= 0 else grey for i in picked]
            name = f"cluster_{c:05d}.png"  # drawn anew: a grid left by another artefact, head or seed is stale
            figures.append(_grid([images[i] for i in picked], frames, out / name))
            named = view.names[c] if view.names is not None else None
            caption = (f"cluster {c}" + (f" “{named}”" if named is not None else "") + f" · {view.sizes[c]:,} samples"
                       + (f" · purity {view.purity[c]:.2f}" if view.has_truth else ""))
            cards.append(f'<figure><img src="{name}" alt="{html.escape(caption)}"><figcaption>'
                         f'{html.escape(caption)}</figcaption></figure>')
        blocks.append(f"<h2>{html.escape(title)}</h2><div class=grid>{''.join(cards)}</div>")
    return figures, blocks


def _metrics(view: _Head) -> str:
    if not view.has_truth:
        return ""
    from ..quality import compare

    known = view.present[view.targets[view.present] >= 0]
    m = compare(view.labels[known], view.targets[known])
    acc = "-" if m["accuracy"] is None else f"{m['accuracy']:.3f}"
    return (f"<table><tr><th>NMI</th><th>AMI</th><th>ARI</th><th>accuracy</th><th>purity</th>"
            f"<th>mean class entropy</th></tr><tr><td>{m['nmi']:.3f}</td><td>{m['ami']:.3f}</td>"
            f"<td>{m['ari']:.3f}</td><td>{acc}</td><td>{m['purity']:.3f}</td>"
            f"<td>{m['entropy_mean']:.3f}</td></tr></table>")


def _legend(view: _Head) -> str:
    if not (view.has_truth and view.classes):
        return ""
    colours = _class_colours(len(view.classes))
    return "<p class=legend>" + " ".join(f'<span style="border-color: rgb{colours[i]}">{html.escape(str(name))}</span>'
                                         for i, name in enumerate(view.classes)) + "</p>"


def _provenance(art, head: int) -> str:
    summary = summarize(art)
    head_info, method = summary["heads"][head], summary["method"]
    return (f"<p>artefact <code>{summary['artefact_id'][:16]}…</code> · {summary['num_samples']:,} samples · "
            f"{summary['num_heads']} heads · head {head}: K={head_info['k']}, sizes {head_info['size_min']}–"
            f"{head_info['size_max']}, {head_info['empty']} empty · method {html.escape(method['name'])} · "
            f"data {html.escape(str(summary['data']['spec']))} · created {summary['created_at']}</p>")


def _page(art, head: int, artefact, top: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>labelkit report: head {head}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 18px; }}
figure {{ margin: 0; }} figcaption {{ font-size: 13px; color: #555; }}
img {{ image-rendering: pixelated; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; }}
.legend span {{ border: 4px solid; padding: 0 6px; margin-right: 4px; display: inline-block; }}
</style></head><body>
<h1>Self-labels of head {head} ({html.escape(Path(remote.redact(str(artefact))).name)})</h1>
{top}
{body}
</body></html>
"""
