"""Cluster names and review status: set by hand, from a names file, or from a handful of labelled examples. Each
change is a new artefact version whose parent is the old one (same sample ids, same labels)."""

from __future__ import annotations

import collections
import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import format as fmt
from ..errors import ConfigError
from ._artefact import Artefact

__all__ = ["name_clusters", "read_names", "read_examples", "names_from_examples", "ExampleNaming"]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def name_clusters(artefact: Artefact, head: int, names: dict[int, str | None] | None = None,
                  status: dict[int, str] | None = None, how: str = "by hand") -> Artefact:
    """A new version of ``artefact`` where ``head``'s clusters carry the given names (None removes one) and review
    status; clusters not mentioned keep theirs. Raises :class:`ConfigError` naming an unknown cluster, an empty or
    repeated name, or an unknown status."""
    artefact._check_head(head)
    current = artefact.heads[head]
    k = current.k
    names, status = dict(names or {}), dict(status or {})
    for cluster in [*names, *status]:
        if not 0 <= int(cluster) < k:
            raise ConfigError(f"head {head} has clusters 0..{k - 1}; there is no cluster {cluster}")
    new_names = list(current.names) if current.names is not None else [None] * k
    for cluster, name in names.items():
        if name is not None and not str(name).strip():
            raise ConfigError(f"cluster {cluster}: a name must not be empty")
        new_names[int(cluster)] = None if name is None else str(name).strip()
    holders = collections.defaultdict(list)
    for cluster, name in enumerate(new_names):
        if name is not None:
            holders[name].append(cluster)
    repeated = {name: clusters for name, clusters in holders.items() if len(clusters) > 1}
    if repeated:
        name, clusters = next(iter(repeated.items()))
        raise ConfigError(f"names must be unique within a head: {name!r} would name clusters {clusters}")
    new_status = list(current.status) if current.status is not None else ["unreviewed"] * k
    for cluster, state in status.items():
        if state not in fmt.CLUSTER_STATUS:
            raise ConfigError(f"cluster {cluster}: unknown status {state!r}; choose {', '.join(fmt.CLUSTER_STATUS)}")
        new_status[int(cluster)] = state
    per_head = [None] * artefact.num_heads
    per_status = [None] * artefact.num_heads
    per_head[head] = new_names if any(n is not None for n in new_names) or current.names is not None else None
    per_status[head] = new_status if status or current.status is not None else None
    method = {"name": "naming", "config": {"head": head, "how": how, "named": len(names), "status": len(status)}}
    return artefact.revise(method, names=per_head, status=per_status)


def read_names(path: str | os.PathLike) -> tuple[dict[int, str | None], dict[int, str]]:
    """Cluster names (and status, when the file has that column) from a CSV with a header naming the columns
    ``cluster`` and ``name`` (and optionally ``status``); an empty name removes one."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
            columns = [c.strip().lower() for c in (rows[0].keys() if rows else [])]
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the names file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the names file is not UTF-8 text") from None
    if "cluster" not in columns or "name" not in columns:
        raise ConfigError(f"{path}: a names file needs a header with the columns cluster,name[,status]; "
                          f"found {columns or 'no rows'}")
    names, status = {}, {}
    for row_number, row in enumerate(rows, start=2):
        row = {str(key).strip().lower(): (value or "").strip() for key, value in row.items() if key is not None}
        try:
            cluster = int(row["cluster"])
        except ValueError:
            raise ConfigError(f"{path}, line {row_number}: cluster {row['cluster']!r} is not an integer") from None
        if cluster in names:
            raise ConfigError(f"{path}, line {row_number}: cluster {cluster} is named twice")
        names[cluster] = row["name"] or None
        if row.get("status"):
            status[cluster] = row["status"]
    return names, status


def read_examples(spec: str | os.PathLike, sample_ids: np.ndarray) -> dict[str, str]:
    """A few labelled samples, as ``{sample_id: name}``: a CSV with the columns ``sample_id,name``, or a folder
    of class folders whose files are samples of the data (matched by their path below the folder's class level,
    or else by file name when that is unique among the sample ids)."""
    path = Path(spec)
    if path.is_dir():
        return _folder_examples(path, sample_ids)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the examples ({exc.strerror or exc})") from None
    if not rows or not {"sample_id", "name"} <= {str(c).strip() for c in rows[0]}:
        raise ConfigError(f"{path}: an examples file is a CSV with the columns sample_id,name (a header first)")
    examples = {}
    for row_number, row in enumerate(rows, start=2):
        sample, name = (row.get("sample_id") or "").strip(), (row.get("name") or "").strip()
        if not sample or not name:
            raise ConfigError(f"{path}, line {row_number}: both sample_id and name are needed")
        if examples.get(sample, name) != name:
            raise ConfigError(f"{path}, line {row_number}: sample {sample!r} is labelled both "
                              f"{examples[sample]!r} and {name!r}")
        examples[sample] = name
    return examples


def _folder_examples(root: Path, sample_ids: np.ndarray) -> dict[str, str]:
    known = set(sample_ids.tolist())
    by_file_name = collections.defaultdict(list)
    for sample in known:
        by_file_name[sample.rsplit("/", 1)[-1]].append(sample)
    examples = {}
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"{root}: a folder of examples holds one folder per name (e.g. {root}/cat/1.jpg)")
    for folder in classes:
        for file in sorted(folder.rglob("*")):
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            relative = file.relative_to(root).as_posix()
            below = file.relative_to(folder).as_posix()
            candidates = [c for c in (relative, below) if c in known] or by_file_name.get(file.name, [])
            if len(candidates) > 1:
                raise ConfigError(f"{file}: its name matches {len(candidates)} samples ({candidates[:3]}); put it "
                                  "at the path its sample has below the data folder")
            examples[candidates[0] if candidates else relative] = folder.name  # unmatched: reported as unknown
    return examples


@dataclass
class ExampleNaming:
    """How clusters were named from examples: each cluster's majority name and its votes, and what did not fit."""

    names: dict[int, str] = field(default_factory=dict)
    votes: dict[int, dict[str, int]] = field(default_factory=dict)
    without_example: list[int] = field(default_factory=list)
    disagreeing: list[int] = field(default_factory=list)
    shared: dict[str, list[int]] = field(default_factory=dict)
    unknown_samples: list[str] = field(default_factory=list)
    used: int = 0


def names_from_examples(artefact: Artefact, head: int, examples: dict[str, str]) -> ExampleNaming:
    """Name each cluster of ``head`` by the majority name of its labelled members. A cluster without a labelled
    member stays unnamed; when one name wins several clusters (K above the number of classes) the cluster with the
    most votes for it gets the name and the others ``name (2)``, ``name (3)``, … (listed in ``shared``)."""
    artefact._check_head(head)
    ids = artefact.sample_ids
    result = ExampleNaming()
    wanted = np.array(list(examples), dtype=object)
    rows = np.searchsorted(ids, wanted) if len(ids) else np.zeros(len(wanted), int)
    found = (rows < len(ids)) & (ids[np.minimum(rows, len(ids) - 1)] == wanted)
    result.unknown_samples = wanted[~found].tolist()
    if not found.any():
        raise ConfigError(f"none of the {len(examples)} examples is a sample of this artefact "
                          f"(e.g. {result.unknown_samples[:3]}); give sample ids as the artefact has them")
    labels = artefact.labels(head)[rows[found]]
    names = [examples[s] for s in wanted[found].tolist()]
    result.used = len(names)
    for cluster, name in zip(labels.tolist(), names):
        result.votes.setdefault(cluster, collections.Counter())[name] += 1
    winners = collections.defaultdict(list)
    for cluster, counter in sorted(result.votes.items()):
        (name, votes), = counter.most_common(1)
        winners[name].append((votes, votes / sum(counter.values()), cluster))
        if len(counter) > 1:
            result.disagreeing.append(cluster)
    for name, holders in winners.items():
        holders.sort(key=lambda h: (-h[0], -h[1], h[2]))
        for rank, (_, _, cluster) in enumerate(holders, start=1):
            result.names[cluster] = name if rank == 1 else f"{name} ({rank})"
        if len(holders) > 1:
            result.shared[name] = sorted(cluster for _, _, cluster in holders)
    result.without_example = [c for c in range(artefact.heads[head].k) if c not in result.votes]
    result.votes = {c: dict(v) for c, v in result.votes.items()}
    return result


def relabelling(base: Artefact, version: Artefact) -> list[np.ndarray]:
    """Per head, the map from ``base``'s cluster ids to ``version``'s, when ``version`` is ``base`` renamed or
    aligned (each cluster of ``base`` is one cluster of ``version`` on their common samples). ``predict`` uses it
    to write a run's predictions in the ids (and names) of a later version of the run's labels."""
    if version.num_heads != base.num_heads:
        raise ConfigError(f"{version.num_heads} heads in the named labels but {base.num_heads} in the run's")
    common, base_rows, version_rows = np.intersect1d(base.sample_ids.astype(str), version.sample_ids.astype(str),
                                                     assume_unique=True, return_indices=True)
    if not len(common):
        raise ConfigError("the named labels share no sample with the run's labels; they are not a version of them")
    maps = []
    for h, head in enumerate(base.heads):
        mapping = np.full(head.k, -1, dtype=np.int64)
        old, new = base.labels(h)[base_rows], version.labels(h)[version_rows]
        mapping[old] = new  # any cluster that goes two ways shows below
        if np.any(mapping[old] != new):
            cluster = int(old[mapping[old] != new][0])
            raise ConfigError(f"head {h}: cluster {cluster} of the run's labels is split between several clusters of "
                              "the named labels; they are another labelling, not a renamed or aligned version")
        unseen = np.flatnonzero(mapping < 0)
        free = np.setdiff1d(np.arange(max(version.heads[h].k, head.k)), mapping[mapping >= 0])
        mapping[unseen] = free[: len(unseen)]  # clusters empty on the common samples keep distinct ids
        maps.append(mapping)
    return maps
