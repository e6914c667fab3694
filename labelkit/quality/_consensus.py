"""Consensus labels: one labelling that the heads of a run agree on.

SeLa trains T heads side by side; heads of the same K reach different local optima, and which one is best
varies with the seed. The consensus aligns every head to a reference head and lets them vote:

* heads of the reference's K are aligned by Hungarian matching of their contingency table with it (cluster
  names are arbitrary, the partition is not);
* heads of another K are mapped through their contingency table: each of their clusters goes to the reference
  cluster it overlaps most (an over-clustering head then votes for the union of its pieces);
* every sample takes the label most heads give it (ties go to the reference head), the heads are re-aligned to
  that vote, and the vote is repeated until it no longer changes;
* a sample's score is its confidence when the heads carry scores -- the mean over the voting heads of each
  head's probability of its label where it agrees with the consensus, 0 where it does not -- else the share of
  heads that agree with its consensus label.

The reference is the head of the chosen K that agrees most (mean NMI) with all the other heads: the medoid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ._metrics import agreement

__all__ = ["ConsensusResult", "consensus_labels", "consensus_artefact", "consensus_of_predictions"]

_ROUNDS = 10


@dataclass
class ConsensusResult:
    """The consensus of several heads.

    Attributes:
        labels: int64 (N,) consensus label of every sample, in ``[0, k)``.
        scores: float32 (N,) share of the heads that agree with it.
        k: clusters of the consensus (the reference head's K).
        reference: the head the others were aligned to.
        heads: the heads that voted.
        agreement: NMI of each voting head with the consensus.
        rounds: align-and-vote rounds run.
        confidence: float32 (N,) when the heads' scores were given: the mean over the voting heads of the score
            of each head's label where it agrees with the consensus, 0 where it does not (see
            :func:`consensus_labels`); None otherwise.
    """

    labels: np.ndarray
    scores: np.ndarray
    k: int
    reference: int
    heads: list[int]
    agreement: list[float]
    rounds: int
    confidence: np.ndarray | None = None

    def record(self) -> dict:
        extra = {} if self.confidence is None else {"score": "confidence",
                                                    "mean_confidence": round(float(self.confidence.mean()), 4)}
        return {"reference": self.reference, "k": self.k, "heads": self.heads,
                "agreement": [round(a, 4) for a in self.agreement], "mean_score": round(float(self.scores.mean()), 4),
                "rounds": self.rounds, **extra}


def _mapping(labels: np.ndarray, k: int, target: np.ndarray, k_target: int) -> np.ndarray:
    """For every cluster of ``labels``, the cluster of ``target`` it is aligned to."""
    table = np.zeros((k, k_target), dtype=np.int64)
    np.add.at(table, (labels, target), 1)
    if k == k_target:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(table, maximize=True)
        mapping = np.empty(k, dtype=np.int64)
        mapping[rows] = cols
        return mapping
    return table.argmax(axis=1)


def _medoid(labels: np.ndarray, group: list[int], heads: list[int]) -> int:
    """The head of ``group`` with the highest mean NMI with all other voting heads, whatever their K: with two
    heads of a K the pair is symmetric, and heads of other K break the tie (a head that merged two classes
    agrees less with the over-clustering heads that kept them apart)."""
    if len(group) == 1:
        return group[0]
    mean = [np.mean([agreement(labels[h], labels[o])["nmi"] for o in heads if o != h]) for h in group]
    return group[int(np.argmax(mean))]


def _votes(mapped: np.ndarray, tie: np.ndarray, values) -> np.ndarray:
    """Each sample's vote for ``values`` (one per sample, or one cluster for all): the heads whose aligned label
    it is, plus 0.5 where it is the tie-breaking label. Never an N x K table: T passes over (T, N) labels."""
    return (mapped == values).sum(axis=0) + 0.5 * (tie == values)


def _vote(mapped: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """The label with the most votes of each sample (see :func:`_votes`); equal votes go to the smaller label,
    as an argmax over the K clusters would."""
    best_label, best_votes = None, None
    for candidate in mapped:  # the winner is one of the labels the heads voted for
        votes = _votes(mapped, tie, candidate)
        if best_label is None:
            best_label, best_votes = candidate.copy(), votes
            continue
        better = (votes > best_votes) | ((votes == best_votes) & (candidate < best_label))
        best_label[better], best_votes[better] = candidate[better], votes[better]
    return best_label


def _keep_every_cluster(labels: np.ndarray, mapped: np.ndarray, tie: np.ndarray, k: int) -> np.ndarray:
    """A cluster that the vote left empty takes back the samples that voted for it most nearly (smallest vote
    margin first), as many as the heads gave it on average, from clusters that keep at least one sample: when
    every head holds all K clusters (as the solver's floor makes them), so does their consensus."""
    labels = labels.copy()
    sizes = np.bincount(labels, minlength=k)
    for c in np.flatnonzero(sizes == 0):
        for_c = _votes(mapped, tie, c)
        support = np.flatnonzero(for_c > 0)
        margin = _votes(mapped[:, support], tie[support], labels[support]) - for_c[support]
        want = max(1, int(round(for_c.sum() / len(mapped))))
        for i in support[np.argsort(margin, kind="stable")].tolist():
            if want == 0:
                break
            if sizes[labels[i]] > 1:
                sizes[labels[i]] -= 1
                labels[i] = c
                sizes[c] += 1
                want -= 1
    return labels


def consensus_labels(labels, ks: list[int], *, k: int | None = None, reference: int | None = None,
                     heads: list[int] | None = None, scores=None) -> ConsensusResult:
    """Consensus of the heads ``labels`` (T, N) with ``ks`` clusters.

    Args:
        k: the consensus's K (default: that of ``reference``, else of head 0).
        reference: the head to align to (default: the medoid of the heads of that K).
        heads: the heads that vote (default: all).
        scores: (T, N) each head's probability of its own label (the network's softmax, see
            :attr:`labelkit.solver.SinkhornResult.posterior`); gives each sample's confidence,
            ``mean over the voting heads h of [h agrees] * scores[h]``: high only where the heads agree and are sure.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 2 or labels.shape[0] != len(ks):
        raise ConfigError(f"consensus needs (heads, N) labels and one K per head; got {labels.shape} and {len(ks)} K")
    heads = list(range(len(ks))) if heads is None else list(heads)
    if len(heads) < 2:
        raise ConfigError(f"consensus needs at least two heads to vote; got {len(heads)}")
    if reference is not None and reference not in heads:
        raise ConfigError(f"the reference head {reference} is not among the voting heads {heads}")
    k = ks[reference if reference is not None else heads[0]] if k is None else int(k)
    group = [h for h in heads if ks[h] == k]
    if not group:
        raise ConfigError(f"no head has K={k}; the heads have K={sorted({ks[h] for h in heads})}")
    if reference is None:
        reference = _medoid(labels, group, heads)
    elif ks[reference] != k:
        raise ConfigError(f"the reference head {reference} has K={ks[reference]}, not K={k}")

    current = labels[reference]
    for rounds in range(1, _ROUNDS + 1):
        mapped = np.stack([_mapping(labels[h], ks[h], current, k)[labels[h]] for h in heads])
        tie = labels[reference] if rounds == 1 else current  # ties: the reference, then the last vote
        new = _vote(mapped, tie)
        if rounds > 1 and np.array_equal(new, current):
            break
        current = new
    current = _keep_every_cluster(current, mapped, tie, k)
    agrees = mapped == current
    confidence = None
    if scores is not None:
        confidence = (agrees * np.asarray(scores, dtype=np.float32)[heads]).mean(axis=0).astype(np.float32)
    return ConsensusResult(labels=current, scores=agrees.mean(axis=0).astype(np.float32), k=k,
                           reference=int(reference), heads=heads, rounds=rounds, confidence=confidence,
                           agreement=[agreement(m, current)["nmi"] for m in mapped])


def consensus_artefact(art, *, k: int | None = None, reference: int | None = None, heads: list[int] | None = None):
    """A one-head artefact of the consensus of ``art``'s heads, with ``art`` as its parent."""
    from ..artefact import Artefact

    if art.num_heads < 2:
        raise ConfigError(f"artefact {art.artefact_id[:12]} has one head; a consensus needs at least two")
    ks = [h.k for h in art.heads]
    voted = (art.metadata["method"].get("consensus") or {}).get("head")
    if heads is None:  # a consensus head already in the artefact does not vote again
        heads = [h for h in range(art.num_heads) if h != voted]
    head_scores = [art.scores(h) for h in range(art.num_heads)]
    head_scores = None if any(s is None for s in head_scores) else np.stack(head_scores)
    result = consensus_labels(art.label_matrix(), ks, k=k, reference=reference, heads=heads, scores=head_scores)
    score = result.confidence if result.confidence is not None else result.scores
    return Artefact.build(art.sample_ids, result.labels[None], [result.k], scores=score[None],
                          data=art.metadata["data"], method={"name": "consensus", "consensus": result.record()},
                          parents=[art.artefact_id]), result


def consensus_of_predictions(labels, scores, trained) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """The consensus head of new samples' predicted ``labels`` (T, N) and ``scores``, as the run whose labels
    ``trained`` (an artefact with a consensus head) holds voted: each head mapped to the consensus by its
    contingency table with it on the training samples (not re-estimated on the new ones, which may be few or
    unlike them), then the same vote and confidence. None when ``trained`` has no consensus head."""
    record = trained.metadata["method"].get("consensus")
    if not record:
        return None
    heads, k, agreed = record["heads"], record["k"], trained.labels(record["head"]).astype(np.int64)
    ks = [trained.heads[h].k for h in range(trained.num_heads)]
    labels = np.asarray(labels, dtype=np.int64)
    mapped = np.stack([_mapping(trained.labels(h).astype(np.int64), ks[h], agreed, k)[labels[h]] for h in heads])
    tie = mapped[heads.index(record["reference"])]
    vote = _vote(mapped, tie)
    agrees = mapped == vote
    confidence = (agrees * np.asarray(scores, dtype=np.float32)[heads]).mean(axis=0).astype(np.float32)
    return vote, confidence, record
