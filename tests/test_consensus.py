"""Consensus labels, label-free quality and the choice of K; cluster priors through generate."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_sela import _blobs, _tiny

from labelkit.artefact import Artefact, read_artefact
from labelkit.cli import main
from labelkit.training import resolve_config
from labelkit.quality import consensus_labels
from labelkit.errors import ConfigError
from labelkit.quality import agreement
from labelkit.quality import head_quality, recommend_k
from labelkit.training import run_sela


def noisy_heads(truth, k, heads, noise, seed=0):
    """Copies of ``truth`` with a share ``noise`` of labels replaced at random and cluster names permuted."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(heads):
        labels = truth.copy()
        flip = rng.random(len(truth)) < noise
        labels[flip] = rng.integers(0, k, flip.sum())
        out.append(rng.permutation(k)[labels])
    return np.stack(out)


def test_vote_of_aligned_heads_beats_every_head():
    truth = np.arange(3000) % 8
    heads = noisy_heads(truth, 8, 5, noise=0.3)
    result = consensus_labels(heads, [8] * 5)
    single = [agreement(h, truth)["nmi"] for h in heads]
    assert agreement(result.labels, truth)["nmi"] > max(single) + 0.1
    assert agreement(result.labels, truth, accuracy=True)["accuracy"] > 0.95
    # the score is the share of heads that agree with the consensus label
    mapped_agree = result.scores * 5
    assert np.allclose(mapped_agree, np.round(mapped_agree)) and result.scores.min() >= 0.2
    from scipy.optimize import linear_sum_assignment

    agreeing = np.zeros(len(truth))
    for head in heads:  # each head's clusters matched to the consensus ones, then counted per sample
        counts = np.zeros((8, 8))
        np.add.at(counts, (head, result.labels), 1)
        rows, cols = linear_sum_assignment(-counts)
        agreeing += cols[np.argsort(rows)][head] == result.labels
    np.testing.assert_allclose(result.scores, agreeing / 5)


def test_heads_of_other_k_vote_through_their_contingency():
    truth = np.arange(2000) % 5
    rng = np.random.default_rng(1)
    fine = truth * 3 + rng.integers(0, 3, len(truth))  # an over-clustering: every class split in three
    heads = np.stack([noisy_heads(truth, 5, 1, 0.35, seed=2)[0], noisy_heads(truth, 5, 1, 0.35, seed=3)[0],
                      rng.permutation(15)[fine]])
    result = consensus_labels(heads, [5, 5, 15])
    assert result.k == 5 and result.heads == [0, 1, 2]
    assert agreement(result.labels, truth)["nmi"] > max(agreement(h, truth)["nmi"] for h in heads[:2]) + 0.1


def test_reference_is_the_head_that_agrees_most():
    truth = np.arange(2000) % 6
    good = noisy_heads(truth, 6, 3, noise=0.1, seed=4)
    bad = np.random.default_rng(5).integers(0, 6, len(truth))
    result = consensus_labels(np.vstack([bad[None], good]), [6] * 4)
    assert result.reference != 0
    with pytest.raises(ConfigError, match="at least two heads"):
        consensus_labels(good[:1], [6])
    with pytest.raises(ConfigError, match="no head has K=7"):
        consensus_labels(good, [6] * 3, k=7)
    with pytest.raises(ConfigError, match="has K=6, not K=3"):
        consensus_labels(np.vstack([good, good[:1] % 3]), [6, 6, 6, 3], k=3, reference=0)


def test_consensus_command_writes_an_artefact_with_its_parent(tmp_path):
    truth = np.arange(600) % 4
    heads = noisy_heads(truth, 4, 3, noise=0.2)
    ids = [f"s{i:04d}" for i in range(600)]
    source = tmp_path / "heads.parquet"
    Artefact.build(ids, heads, 4, data={"spec": "x"}, method={"name": "sela"}).write(source)
    runner = CliRunner()
    result = runner.invoke(main, ["consensus", str(source), "--out", str(tmp_path / "c.parquet")])
    assert result.exit_code == 0, result.output
    assert "consensus of heads [0, 1, 2]" in result.output
    out = read_artefact(tmp_path / "c.parquet")
    parent = read_artefact(source)
    assert out.num_heads == 1 and out.metadata["parents"] == [parent.artefact_id]
    assert out.metadata["method"]["name"] == "consensus" and out.scores(0) is not None
    one = tmp_path / "one.parquet"
    Artefact.build(ids, heads[:1], 4).write(one)
    refused = runner.invoke(main, ["consensus", str(one), "--out", str(tmp_path / "x.parquet")])
    assert refused.exit_code == 2 and "has one head" in refused.output
    assert not (tmp_path / "x.parquet").exists()


def blobs(n=1500, k=5, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6.0, size=(k, d))
    truth = np.arange(n) % k
    return centres[truth] + rng.normal(size=(n, d)), truth


def test_label_free_quality_recommends_the_true_k():
    from sklearn.cluster import KMeans

    from labelkit.solver import Balance, solve

    x, truth = blobs()
    ks = [3, 5, 8, 12]
    # heads as SeLa makes them: equal-sized clusters around prototypes (here k-means centres)
    centres = [KMeans(k, n_init=3, random_state=10 + k).fit(x).cluster_centers_ for k in ks]
    labels = np.stack([solve(-((x[:, None] - c[None]) ** 2).sum(-1) / 10, balance=Balance(exact=True)).labels for c in centres])
    quality = head_quality(labels, ks, features=x, previous=labels, seed=0)
    assert [row["k"] for row in quality] == ks
    assert all(row["stability"] == pytest.approx(1.0) for row in quality)
    assert quality[1]["generalisation"] > 0.95 and quality[1]["balance"] > 0.99
    assert recommend_k(quality)["k"] == 5
    assert recommend_k(head_quality(labels[:1], ks[:1], features=x)) is None  # one K: nothing to choose


def test_metrics_without_truth_shows_label_free_quality(tmp_path):
    truth = np.arange(900) % 3
    heads = np.vstack([noisy_heads(truth, 3, 2, 0.1), noisy_heads(np.arange(900) % 6, 6, 2, 0.6, seed=9)])
    path = tmp_path / "a.parquet"
    Artefact.build([f"s{i:04d}" for i in range(900)], heads, [3, 3, 6, 6]).write(path)
    result = CliRunner().invoke(main, ["metrics", str(path)])
    assert result.exit_code == 0, result.output
    assert "label-free quality" in result.output and "recommended K: 3" in result.output
    data = json.loads(CliRunner().invoke(main, ["metrics", str(path), "--json"]).output)
    assert data["recommended_k"]["k"] == 3 and data["heads"][0]["agreement_heads"] > 0.5


def test_generate_records_quality_appends_consensus_and_solves_with_a_prior(tmp_path):
    run = run_sela(_tiny(tmp_path, clusters=(3, 3, 6), heads=3, consensus=True, prior="powerlaw:0.5", balance=1.0))
    art = read_artefact(run.artefact)
    method = art.metadata["method"]
    assert [h.k for h in art.heads] == [3, 3, 6, 3]  # the consensus is appended as head 3
    assert method["consensus"]["head"] == 3 and method["consensus"]["heads"] == [0, 1, 2]
    assert method["config"]["prior"] == "powerlaw:0.5" and method["config"]["balance"] == 1.0
    quality = method["quality"]
    assert [h["head"] for h in quality["heads"]] == [0, 1, 2]
    from labelkit.quality import recommend_k

    # the K recorded is the one the label-free rule picks from the rows recorded beside it
    assert quality["recommended_k"]["k"] == recommend_k(quality["heads"])["k"]
    assert all(h["stability"] is not None for h in quality["heads"])
    for h in quality["heads"]:  # the probe needs two clusters to tell apart (this tiny relaxed run may collapse)
        sizes = np.bincount(art.labels(h["head"]))
        assert (h["generalisation"] is None) == ((sizes >= 2).sum() < 2), (h, sizes)
    assert run.metrics[3]["k"] == 3 and len(run.metrics) == 4
    # the relaxed, power-law solve was recorded by the label steps
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert any(r["type"] == "quality" for r in history) and any(r["type"] == "consensus" for r in history)


def test_generate_consensus_line_comes_first(tmp_path):
    data = _blobs(tmp_path / "b.npz")
    result = CliRunner().invoke(main, ["generate", "--data", data, "--arch", "labelkit_cnn", "--clusters", "3,3,6",
                                       "--epochs", "2", "--label-steps", "1", "--image-size", "8", "--batch-size", "32",
                                       "--workers", "0", "--out", str(tmp_path / "r"), "--quiet", "--consensus"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    first = next(i for i, line in enumerate(lines) if "NMI" in line)
    assert lines[first].startswith("consensus, head 3 (K=3)")
    assert "which K" in result.output and "recommended" in result.output


def test_prior_options_are_checked_up_front():
    with pytest.raises(ConfigError, match="--prior: .*exponent must be > 0"):
        resolve_config({"prior": "powerlaw:-1"})
    with pytest.raises(ConfigError, match="--prior lists 3 sizes but heads have K=\\[10, 30, 50\\]"):
        resolve_config({"prior": "sizes:3,2,1"})
    with pytest.raises(ConfigError, match="--balance must be a positive number"):
        resolve_config({"balance": 0.0})
    assert resolve_config({"clusters": (5, 10, 20, 40)}).heads == 4  # one head per K listed
    assert resolve_config({"prior": "sizes:3,2,1", "clusters": (3,)}).prior == "sizes:3,2,1"


def test_near_equal_agreements_are_told_apart_by_the_probe():
    rows = [{"head": 0, "k": 5, "agreement": 0.9885, "generalisation": 0.994},
            {"head": 1, "k": 10, "agreement": 0.9887, "generalisation": 0.996},
            {"head": 2, "k": 20, "agreement": 0.886, "generalisation": 0.999}]
    for row in rows:
        row.update(agreement_heads=None, agreement_kmeans=row["agreement"], stability=None, balance=1.0)
    assert recommend_k(rows)["k"] == 10
    rows[0]["generalisation"] = 0.998  # now K=5's labels are the more learnable of the two tied K
    assert recommend_k(rows)["k"] == 5
    rows[0]["agreement"] = 0.95  # no longer tied: agreement alone decides
    assert recommend_k(rows)["k"] == 10


def test_linear_probe_leaves_out_clusters_too_small_to_fold():
    from labelkit.quality import probe_accuracy

    rng = np.random.default_rng(0)
    labels = np.r_[np.repeat(np.arange(5), 40), [5]]  # one cluster of a single sample
    features = rng.standard_normal((len(labels), 8)) + 4.0 * np.eye(8)[labels]
    score = probe_accuracy(features, labels)
    assert score is not None and score > 0.95
    assert probe_accuracy(features[:3], np.array([0, 1, 2])) is None  # nothing left to fold


def test_a_cluster_the_vote_empties_is_kept():
    from labelkit.quality import consensus_labels

    reference = np.repeat([0, 1, 2], [45, 45, 10])  # a small cluster that only the reference has
    merged = np.where(reference == 2, 0, reference)  # two heads fold it into cluster 0
    result = consensus_labels(np.stack([reference, merged, merged]), [3, 3, 3], reference=0)
    sizes = np.bincount(result.labels, minlength=3)
    assert (sizes > 0).all(), sizes
    assert set(np.flatnonzero(result.labels == 2)) <= set(np.flatnonzero(reference == 2))
    assert sizes[2] == round(10 / 3)  # as many as the heads gave it on average


def _dense_vote(labels, ks, k, reference, heads):
    """The vote as first written: an N x K table of votes, argmax per sample (the oracle of the memory-light
    one), with the same alignment, ties and rounds."""
    from labelkit.quality._consensus import _ROUNDS, _mapping

    n = labels.shape[1]
    rows, current = np.arange(n), labels[reference]
    for rounds in range(1, _ROUNDS + 1):
        votes = np.zeros((n, k))
        for h in heads:
            votes[rows, _mapping(labels[h], ks[h], current, k)[labels[h]]] += 1.0
        votes[rows, labels[reference] if rounds == 1 else current] += 0.5
        new = votes.argmax(axis=1)
        if rounds > 1 and np.array_equal(new, current):
            break
        current = new
    return current, votes


@pytest.mark.parametrize("seed", range(6))
def test_the_vote_without_an_n_by_k_table_equals_the_dense_vote(seed):
    rng = np.random.default_rng(seed)
    n, ks = 3000, [10, 10, 10, 30, 7]
    truth = rng.integers(0, 10, n)
    labels = np.stack([np.where(rng.random(n) < 0.6, (truth * k) // 10, rng.integers(0, k, n)) for k in ks])
    result = consensus_labels(labels, ks, reference=1)
    expected, _ = _dense_vote(labels, ks, 10, 1, list(range(5)))
    assert np.bincount(expected, minlength=10).min() > 0  # no cluster emptied: the refill (tested below) is idle
    np.testing.assert_array_equal(result.labels, expected)
    ties = labels[:3, :500].copy()  # three K=10 heads, often one vote each: the ties decide
    ties[1] = rng.integers(0, 10, 500)
    ties[2] = rng.integers(0, 10, 500)
    np.testing.assert_array_equal(consensus_labels(ties, [10] * 3, reference=0).labels,
                                  _dense_vote(ties, [10] * 3, 10, 0, [0, 1, 2])[0])


def test_neighbour_agreement_is_the_chance_corrected_share_of_agreeing_neighbour_pairs():
    from labelkit.quality import neighbour_agreement

    rng = np.random.default_rng(0)
    near = rng.integers(0, 300, size=(300, 5))
    labels = rng.integers(0, 4, 300)
    # the oracle: the share of (sample, neighbour) pairs with one label, against the share that random labels
    # of the same sizes would give
    observed = np.mean([labels[i] == labels[j] for i in range(300) for j in near[i]])
    expected = sum((np.sum(labels == c) / 300) ** 2 for c in range(4))
    assert neighbour_agreement(labels, near) == pytest.approx((observed - expected) / (1 - expected), abs=1e-12)
    assert abs(neighbour_agreement(labels, near)) < 0.05  # random labels on a random graph: about nothing
    same = np.repeat(np.arange(3), 100)
    clustered = np.stack([rng.choice(np.flatnonzero(same == same[i]), 5) for i in range(300)])
    assert neighbour_agreement(same, clustered) == 1.0
    # only the rows asked for, and their neighbours among them, count
    rows = np.arange(0, 300, 2)
    pairs = [(i, j) for i in rows for j in near[i] if j % 2 == 0]
    share = np.mean([labels[i] == labels[j] for i, j in pairs])
    sizes = np.bincount(labels[rows], minlength=4) / len(rows)
    chance = float((sizes**2).sum())
    assert neighbour_agreement(labels, near, rows) == pytest.approx((share - chance) / (1 - chance), abs=1e-12)


def test_a_label_step_that_agrees_less_with_the_neighbours_is_undone_per_head():
    import torch

    from labelkit.training._select import KeepBetter
    from labelkit.training._start import SelaState

    groups = np.repeat(np.arange(2), 50)
    near = torch.from_numpy(np.stack([np.flatnonzero(groups == g)[:5] for g in groups]))
    state = SelaState.initial(100, [2, 2], seed=0)
    state.labels[0] = torch.from_numpy(groups)  # head 0 starts right, head 1 at random
    keep, rows = np.ones(100, bool), torch.arange(100)
    worse = groups.copy()
    worse[::2] = 1 - worse[::2]  # half of each group swapped
    probability = lambda labels: np.full(len(labels), 0.7)  # noqa: E731  the network's p(label | x)
    vectors = torch.from_numpy(groups[:, None] * 10.0 + np.random.default_rng(0).normal(size=(100, 2)))
    judge = KeepBetter(near, vectors).judge

    info = {}
    labels, scores = judge(state, 0, rows, keep, (worse, np.full(100, 0.9)), None, info, probability)
    assert np.array_equal(labels, groups) and np.all(scores == 0.7)  # the old labels, with their probability
    assert info["kept"] == {"neighbour_agreement": 1.0} and info["neighbour_agreement"] < 0.1
    info = {}
    labels, scores = judge(state, 1, rows, keep, (groups, np.full(100, 0.9)), None, info, probability)
    assert np.array_equal(labels, groups) and np.all(scores == 0.9) and "kept" not in info
    # rows a person pinned keep score 1, as a solve gives them
    info = {}
    free = torch.arange(50, 100)
    _, scores = judge(state, 0, rows, keep, (worse, np.full(100, 0.9)), free, info, probability)
    assert np.all(scores[:50] == 1.0) and np.all(scores[50:] == 0.7)
    # the baseline: k-means on the same vectors finds the two groups, whose neighbours all agree
    assert KeepBetter(near, vectors).kmeans_agreement(keep, [2, 2], seed=0) == {2: 1.0}
