"""A reviewer's decisions on one head of an artefact: an append-only log, and the new version they make.

Each line of ``decisions.jsonl`` is one JSON object with a sequence number ``seq`` and an ``op``:

* ``name``    ``cluster``, ``name`` (a string, or null to remove it)
* ``status``  ``cluster``, ``status`` (unreviewed, accepted or rejected)
* ``merge``   ``clusters`` (two or more): all their samples go to the first, whose id, name and status stay;
  the others stay empty and lose their names
* ``split``   ``cluster``, ``parts`` (lists of sample ids, as the reviewer's sub-clustering gave them): the
  first part keeps the id, the others take fresh ids from K up
* ``remove``  ``samples``: noise; they leave the new version (and the next label step)
* ``move``    ``samples``, ``to``: they go to that cluster and keep that label in the next solve
* ``example`` ``sample``, ``name``: the sample is an example of that name; it goes to the cluster of that name
* ``undo``    ``undo``: the ``seq`` of an earlier decision, which no longer applies

A line is written and fsync'd before the decision is acknowledged, so a crash or a closed tab loses nothing.
Decisions replay in order on the reviewed artefact; ``materialise`` writes the result as a new version whose
parent is the reviewed artefact and whose method records the log's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artefact import Artefact
from ..artefact.format import CLUSTER_STATUS
from ..errors import ConfigError

__all__ = ["DecisionLog", "Decisions", "replay", "materialise", "OPS"]

OPS = ("name", "status", "merge", "split", "remove", "move", "example", "undo")
_REQUIRED = {"name": ("cluster", "name"), "status": ("cluster", "status"), "merge": ("clusters",),
             "split": ("cluster", "parts"), "remove": ("samples",), "move": ("samples", "to"),
             "example": ("sample", "name"), "undo": ("undo",)}


class DecisionLog:
    """The append-only decision log of one review (``folder/decisions.jsonl``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        lines = self.path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):  # a line cut short by a crash: not acknowledged
                    break
                raise ConfigError(f"{self.path}: line {number} is not JSON; the log was edited by hand") from None
        return out

    def append(self, decision: dict) -> dict:
        """Write ``decision`` with the next sequence number and the time; durable when this returns."""
        entries = self.entries()
        entry = {"seq": (entries[-1]["seq"] + 1) if entries else 1, "time": round(time.time(), 3), **decision}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return entry

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes() if self.path.exists() else b"").hexdigest()


@dataclass
class Decisions:
    """The state one head reaches after the decisions: labels (-1: removed), K, names, statuses, pinned rows."""

    labels: np.ndarray
    k: int
    names: list
    status: list
    pinned: np.ndarray  # samples whose label a person chose: moved, examples, members of accepted clusters
    moved: np.ndarray  # of those, the ones moved or marked as examples one by one
    applied: list = field(default_factory=list)

    @property
    def removed(self) -> np.ndarray:
        return self.labels < 0


def _check(decision: dict, k: int) -> None:
    op = decision.get("op")
    if op not in OPS:
        raise ConfigError(f"decision {decision.get('seq', '?')}: unknown op {op!r}; one of {', '.join(OPS)}")
    missing = [key for key in _REQUIRED[op] if key not in decision]
    if missing:
        raise ConfigError(f"decision {decision.get('seq', '?')} ({op}) lacks {', '.join(missing)}")


class _Replay:
    """Applies decisions one at a time to a head's labels; sample ids map to rows through ``index``."""

    def __init__(self, art: Artefact, head: int):
        spec = art.heads[head]
        self.ids = art.sample_ids
        self.state = Decisions(labels=art.labels(head).astype(np.int64), k=spec.k,
                               names=list(spec.names or [None] * spec.k),
                               status=list(spec.status or ["unreviewed"] * spec.k),
                               pinned=np.zeros(art.num_samples, dtype=bool),
                               moved=np.zeros(art.num_samples, dtype=bool))

    def rows(self, samples, seq) -> np.ndarray:
        samples = np.asarray(list(samples), dtype=object)
        where = np.searchsorted(self.ids, samples)
        where = np.minimum(where, len(self.ids) - 1)
        bad = self.ids[where] != samples
        if bad.any():
            raise ConfigError(f"decision {seq}: sample {samples[bad][0]!r} is not in the reviewed artefact")
        return where

    def cluster(self, c, seq) -> int:
        if not isinstance(c, int) or not 0 <= c < self.state.k:
            raise ConfigError(f"decision {seq}: cluster {c!r} is not one of 0..{self.state.k - 1}")
        return c

    def apply(self, d: dict) -> None:
        s, seq = self.state, d.get("seq", "?")
        op = d["op"]
        if op == "name":
            c = self.cluster(d["cluster"], seq)
            name = d["name"] or None
            if name is not None and name in s.names and s.names.index(name) != c:
                raise ConfigError(f"decision {seq}: cluster {s.names.index(name)} is already named {name!r}")
            s.names[c] = name
        elif op == "status":
            if d["status"] not in CLUSTER_STATUS:
                raise ConfigError(f"decision {seq}: status {d['status']!r} is not one of {', '.join(CLUSTER_STATUS)}")
            s.status[self.cluster(d["cluster"], seq)] = d["status"]
        elif op == "merge":
            clusters = [self.cluster(c, seq) for c in d["clusters"]]
            if len(set(clusters)) < 2:
                raise ConfigError(f"decision {seq}: a merge needs two or more different clusters")
            for c in clusters[1:]:
                s.labels[s.labels == c] = clusters[0]
                s.names[c] = None
        elif op == "split":
            self._split(d, seq)
        elif op == "remove":
            s.labels[self.rows(d["samples"], seq)] = -1
        elif op in ("move", "example"):
            self._move(d, seq)

    def _split(self, d: dict, seq) -> None:
        s = self.state
        c = self.cluster(d["cluster"], seq)
        parts = [self.rows(part, seq) for part in d["parts"] if len(part)]
        if len(parts) < 2:
            raise ConfigError(f"decision {seq}: a split needs two or more non-empty parts")
        for part in parts:
            if (s.labels[part] != c).any():
                raise ConfigError(f"decision {seq}: a part holds samples outside cluster {c}")
        for part in parts[1:]:
            s.labels[part] = s.k
            s.k += 1
            s.names.append(None)
            s.status.append("unreviewed")

    def _move(self, d: dict, seq) -> None:
        s = self.state
        if d["op"] == "example":
            if d["name"] not in s.names:
                raise ConfigError(f"decision {seq}: no cluster is named {d['name']!r}; name one first")
            to, rows = s.names.index(d["name"]), self.rows([d["sample"]], seq)
        else:
            to, rows = self.cluster(d["to"], seq), self.rows(d["samples"], seq)
        s.labels[rows] = to
        s.pinned[rows] = True
        s.moved[rows] = True


def replay(art: Artefact, head: int, entries: list[dict]) -> Decisions:
    """The head's state after ``entries`` (a log's lines, undos honoured), each checked as it applies."""
    if not 0 <= head < art.num_heads:
        raise ConfigError(f"--head {head}: the artefact has heads 0 to {art.num_heads - 1}")
    seqs = set()
    for entry in entries:
        _check(entry, art.heads[head].k)
        if entry["op"] == "undo" and entry["undo"] not in seqs:
            raise ConfigError(f"decision {entry.get('seq', '?')}: there is no earlier decision {entry['undo']} to undo")
        seqs.add(entry.get("seq"))
    undone = {entry["undo"] for entry in entries if entry["op"] == "undo"}
    run = _Replay(art, head)
    for entry in entries:
        if entry["op"] != "undo" and entry.get("seq") not in undone:
            run.apply(entry)
            run.state.applied.append(entry["seq"] if "seq" in entry else None)
    state = run.state
    accepted = np.array([st == "accepted" for st in state.status])
    state.pinned |= (state.labels >= 0) & accepted[np.maximum(state.labels, 0)]
    return state


def materialise(art: Artefact, head: int, log: DecisionLog) -> tuple[Artefact, Decisions]:
    """The reviewed version: ``art`` with the head's labels, K, names and statuses after the log's decisions,
    less the removed samples; its parent is ``art`` and its method names the log and its sha256."""
    state = replay(art, head, log.entries())
    labels = art.label_matrix().astype(np.int64)
    labels[head] = np.maximum(state.labels, 0)
    ks = [h.k for h in art.heads]
    ks[head] = state.k
    names = [list(h.names) if h.names else None for h in art.heads]
    status = [list(h.status) if h.status else None for h in art.heads]
    names[head] = state.names if any(n is not None for n in state.names) else None
    status[head] = state.status
    method = {"name": "review", "head": head, "log": str(log.path), "log_sha256": log.sha256(),
              "decisions": len(state.applied), "removed": int(state.removed.sum()),
              "pinned": int(state.pinned.sum()),
              # what the next solve needs beyond the labels and statuses (generate --start-from): the samples a
              # person placed one by one keep their label, the removed ones leave the label step
              "moved_ids": art.sample_ids[state.moved & ~state.removed].tolist(),
              "removed_ids": art.sample_ids[state.removed].tolist()}
    voted = art.metadata["method"].get("consensus")
    if voted:  # which head is the consensus (the primary head) outlives the review
        method["consensus"] = voted
    rows = np.flatnonzero(~state.removed)
    scores = None
    if all(art.scores(h) is not None for h in range(art.num_heads)):
        scores = np.stack([art.scores(h)[rows] for h in range(art.num_heads)])
    version = Artefact.build(art.sample_ids[rows].tolist(), labels[:, rows], ks, scores=scores,
                             data=art.metadata["data"], method=method, parents=[art.artefact_id],
                             names=names, status=status)
    return version, state
