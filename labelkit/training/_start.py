"""A run that starts from an earlier artefact's labels (``generate --start-from``).

Rerunning SeLa on grown or cleaned data from random or graph labels finds clusters anew, and ``align`` can only
rename them afterwards. Starting from the earlier labels instead keeps what was found (and reviewed): the
network first learns the old clusters, the samples the old artefact lacks start at random, and every label
step after that is the usual equal-size solve. A head takes the old head of the same index and K, else the
old artefact's primary head (its consensus) where that has the head's K; a head with neither starts at random.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..artefact import Artefact, read_artefact
from ..errors import ConfigError

__all__ = ["artefact_start", "started_from"]


def _old_head(old: Artefact, h: int, k: int) -> int | None:
    if h < old.num_heads and old.heads[h].k == k:
        return h
    primary = old.primary_head
    return primary if old.heads[primary].k == k else None


def artefact_start(job, labels_out: torch.Tensor, ks: list[int]) -> dict:
    """The first labels of every head, written into ``labels_out`` (T, N), from ``job.config.start_from``;
    returns the start's record (the artefact, how many samples it labelled, which old head each head took)."""
    path = job.config.start_from
    old = read_artefact(path)
    heads = [_old_head(old, h, k) for h, k in enumerate(ks)]
    if all(h is None for h in heads):
        raise ConfigError(f"--start-from {path}: its heads have K = {[head.k for head in old.heads]}, none of the "
                          f"run's K = {ks}; give --clusters to match, or start without it")
    rows = job.source.positions_in(old.table.column("sample_id"))
    known = rows >= 0
    if not known.any():
        raise ConfigError(f"--start-from {path}: none of its {old.num_samples:,} sample ids is in "
                          f"{job.config.data}; it labels other data")
    for h, o in enumerate(heads):
        if o is not None:
            labels_out[h, torch.from_numpy(np.flatnonzero(known))] = torch.from_numpy(
                old.labels(o)[rows[known]].astype(np.int64))
    return {"from": old.artefact_id, "path": str(path), "matched": int(known.sum()),
            "new": int((~known).sum()), "old_heads": heads}


def started_from(history: Path) -> str | None:
    """The artefact id a run started from, from its history (so that a resumed run knows it too)."""
    if not history.exists():
        return None
    for line in history.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("type") == "start" and record.get("from"):
                return record["from"]
    return None
