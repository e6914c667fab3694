"""Round trips with the tools people label in: Label Studio, FiftyOne, and plain class folders (CVAT, ImageFolder).

Each export holds one head: every sample under its cluster's class, the cluster's name where it has one, else
``cluster-<id>``, with the sample's confidence where the format has a place for it. Each import reads what a
person changed as decisions (``move`` where a sample now has another class, ``remove`` where a file left the
folder tree) and applies them to the exported artefact as a reviewed version (``materialise``); with nothing
changed it gives back the exported artefact itself, id and all.

* Label Studio: ``tasks.json`` (image-classification tasks whose prediction is the cluster, scored by the
  confidence; ``data.sample_id`` names the sample) and ``config.xml`` (the Choices to label with). Images are
  served by Label Studio's local-files storage: start it with ``LOCAL_FILES_SERVING_ENABLED=true`` and
  ``LOCAL_FILES_DOCUMENT_ROOT`` set to the data folder's parent (or ``--document-root``). The import reads
  Label Studio's JSON export: a task's newest annotation that is not cancelled overrides the prediction.
* FiftyOne: a ``FiftyOneImageClassificationDataset`` folder: ``data/<sample id>`` (links, or copies) and
  ``labels.json`` with ``classes`` and, per sample, ``{"label": class index, "confidence": c}``; FiftyOne's own
  export of that type reads back the same way.
* Folders: ``OUT/<class>/<sample id, /-quoted>`` links or copies: what CVAT and every ImageFolder reader take.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np

from ..artefact import Artefact, read_artefact
from ..errors import ConfigError, DataError
from ._decisions import DecisionLog, materialise

__all__ = ["TOOL_FORMATS", "export_for_tool", "import_from_tool"]

TOOL_FORMATS = ("label-studio", "fiftyone", "folders")
MANIFEST = "labelkit-export.json"


def _classes(art: Artefact, head: int) -> list[str]:
    names = art.heads[head].names or [None] * art.heads[head].k
    return [n if n is not None else f"cluster-{c}" for c, n in enumerate(names)]


def _local_files(art: Artefact, data: str | None):
    from ..data import resolve

    spec = data or art.metadata["data"]["spec"]
    source = resolve(spec)
    root = getattr(source, "root", None)
    if source.kind != "folder" or not isinstance(root, Path):
        raise DataError(f"{spec}: this export links the image files, and this data has none on local disk; "
                        "export a local image folder")
    known = set(source.ids)
    absent = next((s for s in art.sample_ids if s not in known), None)
    if absent is not None:
        raise DataError(f"{spec}: sample {absent!r} of the artefact is not in this folder")
    return root.resolve()


def _place(source: Path, target: Path, copy: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copy2(source, target)
    else:
        os.symlink(source, target)


def export_for_tool(art: Artefact, fmt: str, out: str | os.PathLike, *, head: int | None = None,
                    data: str | None = None, copy: bool = False, document_root: str | None = None) -> Path:
    """Write ``art``'s head (default: the primary head) for ``fmt`` (one of :data:`TOOL_FORMATS`) into the folder
    ``out``, which must not exist yet; returns it."""
    if fmt not in TOOL_FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; one of {', '.join(TOOL_FORMATS)}")
    head = art.primary_head if head is None else head
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {out} exists; give a new folder (an export never writes into an old one)")
    root = _local_files(art, data)
    classes, labels = _classes(art, head), art.labels(head)
    scores = art.scores(head)
    scores = np.ones(art.num_samples, np.float32) if scores is None else scores
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if fmt == "folders":
        for sid, c in zip(art.sample_ids, labels):
            _place(root / sid, partial / classes[c] / quote(sid, safe=""), copy)
    elif fmt == "fiftyone":
        entries = {}
        for sid, c, s in zip(art.sample_ids, labels, scores):
            _place(root / sid, partial / "data" / sid, copy)
            entries[os.path.splitext(sid)[0]] = {"label": int(c), "confidence": round(float(s), 6)}
        (partial / "labels.json").write_text(json.dumps({"classes": classes, "labels": entries}))
    else:
        _label_studio(art, head, classes, root, partial, document_root)
    manifest = {"artefact_id": art.artefact_id, "head": head, "format": fmt, "classes": classes,
                "samples": art.num_samples, "root": str(root)}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    partial.rename(out)
    return out


def _label_studio(art: Artefact, head: int, classes: list[str], root: Path, out: Path, document_root) -> None:
    from xml.sax.saxutils import quoteattr

    base = Path(document_root).resolve() if document_root else root.parent
    try:
        prefix = root.relative_to(base)
    except ValueError:
        raise ConfigError(f"--document-root {base} does not hold the data folder {root}") from None
    scores = art.scores(head)
    tasks = []
    for i, (sid, c) in enumerate(zip(art.sample_ids, art.labels(head))):
        score = 1.0 if scores is None else round(float(scores[i]), 6)
        tasks.append({"data": {"image": "/data/local-files/?d=" + quote(str(prefix / sid)), "sample_id": sid},
                      "predictions": [{"model_version": f"labelkit-{art.artefact_id[:12]}", "score": score,
                                       "result": [{"from_name": "cluster", "to_name": "image", "type": "choices",
                                                   "value": {"choices": [classes[c]]}}]}]})
    (out / "tasks.json").write_text(json.dumps(tasks))
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in classes)
    (out / "config.xml").write_text('<View>\n  <Image name="image" value="$image"/>\n'
                                    f'  <Choices name="cluster" toName="image" choice="single">\n{choices}\n'
                                    "  </Choices>\n</View>\n")


def _chosen(task: dict) -> str | None:
    """The class a Label Studio task's newest annotation that was not cancelled chose, None without one."""
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not done:
        return None
    newest = max(done, key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a.get("id") or 0))
    for result in newest.get("result") or []:
        if result.get("from_name") == "cluster" and result.get("value", {}).get("choices"):
            return result["value"]["choices"][0]
    return None


def _read_edits(fmt: str, src: Path, art: Artefact, classes: list[str]) -> dict:
    """sample id -> class it now has (None: removed) for every sample the tool's files say otherwise about."""
    if fmt == "label-studio":
        path = src if src.is_file() else src / "tasks.json"
        tasks = json.loads(path.read_text())
        if not isinstance(tasks, list):
            raise DataError(f"{path}: not Label Studio's JSON export (a list of tasks)")
        return {t["data"]["sample_id"]: c for t in tasks if (c := _chosen(t)) is not None}
    if fmt == "fiftyone":
        labels = json.loads((src / "labels.json").read_text())
        names = labels.get("classes")
        stems = {os.path.splitext(s)[0]: s for s in art.sample_ids}
        out = {}
        for uuid, target in labels["labels"].items():
            target = target.get("label") if isinstance(target, dict) else target
            if uuid not in stems:
                raise DataError(f"{src / 'labels.json'}: {uuid!r} is no sample of artefact {art.artefact_id[:12]}")
            out[stems[uuid]] = names[target] if isinstance(target, int) and names else target
        return {**{s: None for s in art.sample_ids if os.path.splitext(s)[0] not in labels["labels"]}, **out}
    found = {}
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        for file in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
            found[unquote(file.name)] = folder.name
    return {**{s: None for s in art.sample_ids if s not in found}, **found}


def import_from_tool(fmt: str, src: str | os.PathLike, onto: str | os.PathLike, log_path: str | os.PathLike,
                     *, head: int | None = None) -> tuple[Artefact, dict]:
    """``onto`` (the exported artefact) with the edits of ``src`` (a tool's files) applied as decisions, logged in
    ``log_path``; and counts of what changed. Nothing changed: ``onto`` itself."""
    if fmt not in TOOL_FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; one of {', '.join(TOOL_FORMATS)}")
    art, src = read_artefact(onto), Path(src)
    manifest_path = (src if src.is_dir() else src.parent) / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest["artefact_id"] != art.artefact_id:
            raise ConfigError(f"{src} was exported from artefact {manifest['artefact_id'][:16]}…, not {onto} "
                              f"({art.artefact_id[:16]}…)")
        head = manifest["head"] if head is None else head
    head = art.primary_head if head is None else head
    classes = _classes(art, head)
    lookup = {name: c for c, name in enumerate(classes)}
    current = dict(zip(art.sample_ids, art.labels(head).tolist()))
    moves, removed, kept = {}, [], 0
    for sid, cls in _read_edits(fmt, src, art, classes).items():
        if sid not in current:
            raise DataError(f"{src}: {sid!r} is no sample of artefact {art.artefact_id[:12]}")
        if cls is None:
            removed.append(sid)
        elif cls not in lookup:
            raise DataError(f"{src}: class {cls!r} (sample {sid!r}) is none of the clusters' names; name the "
                            "cluster in labelkit first, or use one of its names")
        elif lookup[cls] != current[sid]:
            moves.setdefault(lookup[cls], []).append(sid)
        else:
            kept += 1
    counts = {"moved": sum(map(len, moves.values())), "removed": len(removed), "unchanged": kept}
    if not moves and not removed:
        return art, counts
    log = DecisionLog(log_path)
    if log.path.exists():
        raise ConfigError(f"{log.path} exists; an import starts a new decision log")
    for to, samples in sorted(moves.items()):
        log.append({"op": "move", "samples": samples, "to": to, "by": fmt})
    if removed:
        log.append({"op": "remove", "samples": removed, "by": fmt})
    version, _ = materialise(art, head, log)
    return version, counts
