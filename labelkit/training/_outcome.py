"""The end of a SeLa run: its artefact, written a row group at a time from the run's state (at 10 M rows, building
the whole table first held about 0.7 GB more than the run itself), its weights, the label-free quality of its
heads and, where the data have classes, their scores against them."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from ..artefact import Artefact, read_artefact, write_parts
from ..data import Ids
from ..quality import agreement, consensus_labels, head_quality, recommend_k
from ._job import Job
from ._select import labels_from
from ._start import SelaState, started_from

__all__ = ["SelaRun", "finish"]

_PART = 1 << 20  # rows a part of the artefact holds: one row group


@dataclass
class SelaRun:
    """What a finished run produced: the artefact at ``artefact`` (``labels`` reads it when first asked for), the
    heads' scores against the data's classes (``metrics``, where it has them) and the run's records. Under
    torchrun, rank 0 writes the artefact; on the other ranks ``written`` is False and ``labels``, ``metrics``
    and the records are None."""

    out: Path
    artefact: Path
    metrics: list[dict] | None
    seconds: float
    skipped: list[dict]
    history: Path
    quality: dict | None = None  # label-free quality per head and the recommended K (labelkit.quality)
    consensus: dict | None = None  # the consensus head, when one was appended
    solver: dict | None = None  # how the Sinkhorn solves ended: count, unconverged, worst error
    written: bool = True

    @cached_property
    def labels(self) -> Artefact | None:
        return read_artefact(self.artefact) if self.written else None


def method_record(job: Job) -> dict:
    method, plan = {"name": "sela", "config": job.config.to_dict(), "precision": job.precision}, job.plan
    if plan:  # how the configuration was chosen: recipe, reasons, budget and the estimate
        method["recipe"] = {k: plan[k] for k in ("recipe", "reasons", "budget_s", "estimate") if k in plan}
    if job.stopped_early:  # the config says what was planned; this says where training ended, and why
        method.setdefault("recipe", {}).update(stopped_after_epoch=job.stopped_early,
                                               stopped_because=job.stopped_because)
    return method


def _quality(job: Job, state: SelaState, ks: list[int]) -> dict | None:
    """Label-free quality of every head on this rank's rows of the last label step, and the K to keep."""
    if job.label_features is None or not job.dist.main:
        return None
    rows, features = job.label_features
    heads = head_quality(state.labels[:, rows].numpy(), ks, features=features.numpy(),
                         previous=job.previous_labels.numpy(), seed=job.config.seed)
    record = {}
    if job.selection is not None:  # which label step each head's labels come from, how well they agree, and k-means's
        epochs, keep = labels_from(job.run_dir.history, len(ks)), state.keep(~job.skips.mask())
        for row in heads:
            row.update(neighbour_agreement=job.selection.score(state.labels[row["head"]], keep),
                       labels_from_epoch=epochs[row["head"]])
        kmeans = job.selection.kmeans_agreement(keep, ks, job.config.seed)
        record["kmeans_neighbour_agreement"] = {str(k): round(v, 4) for k, v in kmeans.items()}
    record["heads"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()} for h in heads]
    which = recommend_k(heads)
    if which:
        record["recommended_k"] = which
    return record


def finish(job: Job, model, state: SelaState, ks) -> SelaRun:
    """Write the run's artefact (the last labels of every kept row, with a consensus head where asked) and
    weights, and say what the run produced."""
    config, source, run_dir = job.config, job.source, job.run_dir
    ended = {"out": run_dir.out, "artefact": run_dir.out / "labels.parquet", "skipped": job.skips.as_list(),
             "history": run_dir.history}
    if not run_dir.writer:  # under torchrun rank 0 alone writes the artefact of every row
        return SelaRun(**ended, metrics=None, seconds=time.perf_counter() - job.started, written=False)
    rows = np.flatnonzero(state.keep(~job.skips.mask()))
    method = {**method_record(job), "solver": _solver_record(run_dir.history, config.sinkhorn_tol)}
    quality = _quality(job, state, ks)
    if quality:
        method["quality"] = quality
        job.log({"type": "quality", **quality})
    heads_k, voted = list(ks), None
    if config.consensus and len(ks) > 1:  # appended as one more head, after the heads it was voted from
        agreed = consensus_labels(state.labels[:, rows].numpy(), ks, scores=state.scores[:, rows].numpy())
        voted = (agreed.labels, agreed.confidence)
        heads_k.append(agreed.k)
        method["consensus"] = {"head": len(ks), **agreed.record()}
        job.log({"type": "consensus", **method["consensus"]})
    start = started_from(run_dir.history)  # labels that grew out of an earlier artefact's name it as parent
    order = None if isinstance(source.ids, Ids) else pc.sort_indices(source.ids_at(rows)).to_numpy()
    write_parts(ended["artefact"], lambda: _parts(source, state, rows, order, voted), heads_k, method=method,
                data=job.provenance(), parents=[start] if start else [])
    run_dir.save_weights(model, config.arch, "sela")
    return SelaRun(**ended, metrics=_truth_metrics(source, state, rows, voted, heads_k),
                   seconds=time.perf_counter() - job.started, quality=quality, consensus=method.get("consensus"),
                   solver=method["solver"])


def _parts(source, state: SelaState, rows: np.ndarray, order: np.ndarray | None, voted):
    """The artefact's rows a part at a time, in sample-id order: the ids, every head's labels (the consensus
    head's after them) and scores. An embedding table's ids (:class:`~labelkit.data.Ids`) are in row order
    already; other sources' are put in order by ``order``."""
    for start in range(0, len(rows), _PART):
        at = slice(start, start + _PART) if order is None else order[start:start + _PART]
        part = rows[at]
        labels, scores = state.labels[:, part].numpy(), state.scores[:, part].numpy()
        if voted is not None:
            labels = np.concatenate([labels, voted[0][None, at]])
            scores = np.concatenate([scores, voted[1][None, at]])
        yield source.ids_at(part), labels, scores


def _truth_metrics(source, state: SelaState, rows: np.ndarray, voted, ks: list[int]) -> list[dict] | None:
    """Each head's agreement with the data's classes (never trained on), where it has them."""
    if not source.has_truth:
        return None
    truth = source.targets[rows]
    known = truth >= 0

    def head(h: int) -> np.ndarray:  # one head's labels at a time
        return voted[0] if h == len(state.labels) else state.labels[h, rows].numpy()

    return [dict(agreement(head(h)[known], truth[known], accuracy=True), head=h, k=k) for h, k in enumerate(ks)]


def _solver_record(history: Path, tolerance: float) -> dict:
    """How the run's Sinkhorn solves ended, from its history (so a resumed run counts the steps before it)."""
    solves = [head for line in history.read_text().splitlines() if line.strip()
              for record in [json.loads(line)] if record.get("type") == "label_step" for head in record["heads"]]
    stalled = [head["error"] for head in solves if not head["converged"]]
    return {"solves": len(solves), "unconverged": len(stalled), "worst_error": max(stalled, default=None),
            "tolerance": tolerance}
