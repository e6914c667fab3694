"""What the review app shows and changes: one head of an artefact, its data, and the decision log.

Everything a page needs is computed from the current state in O(N) numpy once per decision (sizes, mean
confidence, members ordered by confidence), so pages stay fast at N = 1.28 M and K = 3,000; thumbnails are
decoded on demand, one sample at a time, and cached in the review folder.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artefact import Artefact, read_artefact
from ..errors import ConfigError, DataError
from ._decisions import DecisionLog, Decisions, materialise, replay

__all__ = ["ReviewSession", "ClusterRow", "THUMBNAIL", "run_folder_of"]

THUMBNAIL = 96  # px, the longer side of a cached thumbnail
_SPLIT_SIDE = 16  # px: a split sub-clusters the members' pixels at this side (vectors: the vectors)


@dataclass
class ClusterRow:
    cluster: int
    size: int
    confidence: float
    name: str | None
    status: str
    examples: list  # sample ids of the most confident members


class ReviewSession:
    """A review of ``head`` of ``artefact`` on ``data``, with its log and cache in ``folder``."""

    def __init__(self, artefact: str, folder: str | Path, *, data: str | None = None, head: int | None = None,
                 run: str | Path | None = None):
        from ..data import resolve

        self.artefact_path = str(artefact)
        self.art: Artefact = read_artefact(artefact)
        self.head = self.art.primary_head if head is None else head
        if not 0 <= self.head < self.art.num_heads:
            raise ConfigError(f"--head {self.head}: the artefact has heads 0 to {self.art.num_heads - 1}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "thumbs").mkdir(exist_ok=True)
        self.log = DecisionLog(self.folder / "decisions.jsonl")
        self.data = data or self.art.metadata["data"]["spec"]
        self.source = resolve(self.data)
        if self.source.has_pixels and not self.source.map_style:
            raise DataError(f"{self.data}: review loads samples one at a time; streamed shards cannot be; "
                            "review an image folder or an array of the same samples")
        positions = self.source.positions_in(self.art.table.column("sample_id"))
        self.source_row = np.full(self.art.num_samples, -1, dtype=np.int64)
        self.source_row[positions[positions >= 0]] = np.flatnonzero(positions >= 0)
        scores = self.art.scores(self.head)
        self.scores = np.ones(self.art.num_samples, np.float32) if scores is None else scores.astype(np.float32)
        self.state: Decisions = replay(self.art, self.head, self.log.entries())
        self.model = self.record = None
        if run is not None:  # splits on the network's features, nearest clusters by its head's prototypes
            from ..training import load_run_model

            self.model, self.record = load_run_model(run)
            if self.record.get("kind") != "sela":
                raise ConfigError(f"--run {run}: a labelkit generate run, not a {self.record.get('kind')} run")
        self._refresh()

    # -- state ---------------------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Recompute what pages read from the current labels: sizes, mean confidence, members by confidence."""
        labels = self.state.labels
        kept = labels >= 0
        self.sizes = np.bincount(labels[kept], minlength=self.state.k)
        total = np.bincount(labels[kept], weights=self.scores[kept], minlength=self.state.k)
        self.confidence = np.divide(total, self.sizes, out=np.zeros(self.state.k), where=self.sizes > 0)
        order = np.lexsort((-self.scores, labels))  # by cluster, then most confident first
        order = order[labels[order] >= 0]
        self._members = order
        self._starts = np.concatenate([[0], np.cumsum(self.sizes)])

    def decide(self, decision: dict) -> dict:
        """Check ``decision`` against the current state, log it (durably), apply it; returns the logged entry."""
        decision = dict(decision)
        decision.pop("seq", None)
        decision.pop("time", None)
        if decision.get("op") == "split" and "parts" not in decision:
            decision["parts"] = self.split_parts(decision.get("cluster"), decision.get("k", 2))
        entries = self.log.entries()
        seq = entries[-1]["seq"] + 1 if entries else 1  # the number append gives it
        trial = replay(self.art, self.head, [*entries, {**decision, "seq": seq}])  # raises if it cannot apply
        entry = self.log.append(decision)
        self.state = trial
        self._refresh()
        return entry

    def members(self, cluster: int) -> np.ndarray:
        """Rows of the cluster's samples, most confident (most typical) first."""
        return self._members[self._starts[cluster]:self._starts[cluster + 1]]

    def rows_overview(self, sort: str = "cluster", descending: bool = False) -> list[int]:
        keys = {"cluster": np.arange(self.state.k), "size": self.sizes, "confidence": self.confidence,
                "status": np.array(self.state.status, dtype=object),
                "name": np.array([n or "" for n in self.state.names], dtype=object)}
        if sort not in keys:
            raise ConfigError(f"sort by one of {', '.join(keys)}, not {sort!r}")
        order = np.argsort(keys[sort], kind="stable")
        order = order[::-1] if descending else order
        return order[self.sizes[order] > 0].tolist()  # a merged-away cluster keeps its id, but has nothing to show

    def cluster_row(self, c: int, examples: int = 4) -> ClusterRow:
        ids = self.art.sample_ids[self.members(c)[:examples]].tolist()
        return ClusterRow(c, int(self.sizes[c]), float(self.confidence[c]), self.state.names[c],
                          self.state.status[c], ids)

    def nearest(self, cluster: int, count: int = 5) -> list[tuple[int, float]]:
        """With the run's network: the clusters whose head prototypes (weight rows) are most alike in cosine.
        Otherwise the clusters whose samples the artefact's other heads most often put with this cluster's: the
        mean over the other heads of P(other cluster | its label there) for this cluster's members (none with
        one head)."""
        prototypes = self._prototypes()
        if prototypes is not None and cluster < len(prototypes):
            similarity = prototypes @ prototypes[cluster]
            similarity[cluster] = -np.inf
            best = np.argsort(-similarity)[:count]
            return [(int(c), float(similarity[c])) for c in best if np.isfinite(similarity[c])]
        labels = self.state.labels
        kept = labels >= 0
        mine = kept & (labels == cluster)
        if self.art.num_heads < 2 or not mine.any():
            return []
        score = np.zeros(self.state.k)
        for g in range(self.art.num_heads):
            if g == self.head:
                continue
            other = self.art.labels(g).astype(np.int64)
            table = np.zeros((self.art.heads[g].k, self.state.k))
            np.add.at(table, (other[kept], labels[kept]), 1)
            table /= np.maximum(table.sum(axis=1, keepdims=True), 1)
            score += np.bincount(other[mine], minlength=table.shape[0]) @ table / mine.sum()
        score /= self.art.num_heads - 1
        score[cluster] = -1
        best = np.argsort(-score)[:count]
        return [(int(c), float(score[c])) for c in best if score[c] > 0]

    def _prototypes(self) -> np.ndarray | None:
        """Unit rows of the reviewed head's weights, when the run has that head (a consensus head has none)."""
        if self.model is None or self.head >= len(self.model.heads):
            return None
        weight, _ = self.model.head_weights(self.head)
        weight = weight.detach().float().numpy()
        return weight / np.maximum(np.linalg.norm(weight, axis=1, keepdims=True), 1e-12)

    # -- samples -------------------------------------------------------------------------------------------------
    def row_of(self, sample_id: str) -> int | None:
        """The artefact row of ``sample_id``, None when the artefact has no such sample (nothing else is served)."""
        ids = self.art.sample_ids
        where = int(np.searchsorted(ids, sample_id))
        return where if where < len(ids) and ids[where] == sample_id else None

    def thumbnail(self, sample_id: str) -> bytes | None:
        """PNG bytes of the sample's thumbnail (cached in the review folder), None for an unknown id or vectors."""
        row = self.row_of(sample_id)
        if row is None or self.source_row[row] < 0 or not self.source.has_pixels:
            return None
        cached = self.folder / "thumbs" / (hashlib.sha1(sample_id.encode()).hexdigest() + ".png")
        if cached.exists():
            return cached.read_bytes()
        image = self.source.load(int(self.source_row[row])).convert("RGB")
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        if max(image.size) < THUMBNAIL:  # tiny images (8-px digits) are scaled up, pixels kept sharp
            from PIL import Image

            scale = THUMBNAIL // max(image.size)
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        tmp = cached.with_suffix(".tmp")
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(cached)
        return buffer.getvalue()

    def split_parts(self, cluster, k) -> list[list[str]]:
        """Sub-clusters of a cluster's members, as id lists: k-means of the run's network features of them where a
        run was given, else of their pixels at 16 px (or their vectors)."""
        from ..quality import kmeans

        if not isinstance(cluster, int) or not 0 <= cluster < self.state.k:
            raise ConfigError(f"split: cluster {cluster!r} is not one of 0..{self.state.k - 1}")
        c, k = cluster, int(k)
        rows = self.members(c)
        if not 2 <= k <= len(rows):
            raise ConfigError(f"split cluster {c} into 2 to {len(rows)} parts, not {k}")
        if self.model is not None:
            from ..training import sample_features

            if (self.source_row[rows] < 0).any():
                raise DataError(f"cluster {c} holds samples that are not in {self.data}")
            x = sample_features(self.model, self.record, self.source, self.source_row[rows]).numpy()
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        else:
            x = np.stack([self._representation(int(r)) for r in rows])
        parts, _ = kmeans(x, k, seed=0, restarts=3)
        ids = self.art.sample_ids[rows]
        return [ids[parts == p].tolist() for p in range(k)]

    def _representation(self, row: int) -> np.ndarray:
        i = int(self.source_row[row])
        if i < 0:
            raise DataError(f"sample {self.art.sample_ids[row]} is not in {self.data}")
        if not self.source.has_pixels:
            return self.source.vectors(np.array([i]))[0].astype(np.float32)
        image = self.source.load(i).convert("L").resize((_SPLIT_SIDE, _SPLIT_SIDE))
        return np.asarray(image, dtype=np.float32).ravel() / 255.0

    def save(self) -> tuple[Path, Artefact]:
        """Materialise the decisions as ``folder/reviewed.parquet`` (written atomically)."""
        version, _ = materialise(self.art, self.head, self.log)
        path = self.folder / "reviewed.parquet"
        version.write(path)
        return path, version


def run_folder_of(artefact: str | Path) -> Path | None:
    """The ``generate`` run folder an artefact is in (its labels.parquet, or a named or reviewed version beside
    it), None when it is in none."""
    import json

    path = Path(artefact)
    folder = path if path.is_dir() else path.resolve().parent
    config = folder / "config.json"
    if not (folder / "model.safetensors").is_file() or not config.is_file():
        return None
    try:
        return folder if json.loads(config.read_text()).get("kind") == "sela" else None
    except (OSError, ValueError):
        return None
