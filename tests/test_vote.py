"""The neighbour vote after an image run's last epoch (labelkit/training/_vote.py)."""

import json

import numpy as np
import pytest

from labelkit.artefact import read_artefact
from labelkit.errors import ConfigError
from labelkit.training import resolve_config, run_sela
from labelkit.training._vote import vote_labels


def _chain_groups():
    """Two groups of five rows, each row's neighbours the other four of its group."""
    groups = [np.arange(5), np.arange(5, 10)]
    near = np.stack([np.setdiff1d(g, [i]) for g in groups for i in g])
    return near


def test_a_label_against_all_its_neighbours_moves_to_theirs():
    near = _chain_groups()
    labels = np.array([0, 0, 1, 0, 0, 1, 1, 1, 0, 1])  # row 2 and row 8 sit in the other group's cluster
    assert vote_labels(labels, near, 2).tolist() == [0] * 5 + [1] * 5


def test_the_vote_is_one_round_on_the_given_labels():
    """A chain 0-1-2-3, each row's neighbours the two nearest along it: one round moves row 1 only; a second round
    would move row 0 too, by the label the first round gave row 1 (votes that cascade empty small clusters)."""
    near = np.array([[1, 2], [2, 3], [3, 1], [2, 1]])
    labels = np.array([0, 1, 2, 2])
    assert vote_labels(labels, near, 3).tolist() == [0, 2, 2, 2]


def test_a_tie_keeps_the_label_and_a_pinned_label_never_moves():
    near = np.array([[1, 2], [0, 2], [0, 1], [0, 1]])
    labels = np.array([0, 1, 2, 0])  # rows 0-2: one vote each for 0, 1 and 2 besides their own
    assert vote_labels(labels, near, 3)[:3].tolist() == [0, 1, 2]
    labels = np.array([1, 1, 1, 0])  # row 3: its two neighbours hold 1 against its own 0 (+ half a vote)
    assert vote_labels(labels, near, 3)[3] == 1
    pinned = np.array([-1, -1, -1, 0])  # a person put row 3 in cluster 0
    assert vote_labels(labels, near, 3, pinned).tolist() == [1, 1, 1, 0]


def _blobs(path, n=150, seed=0):
    """Grey 12-px images of three kinds (a bright quarter in different corners), noisy, some of them faint."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = rng.integers(0, 90, (n, 12, 12), dtype=np.uint8)
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 2)
        images[i, r * 6:(r + 1) * 6, col * 6:(col + 1) * 6] += np.uint8(rng.integers(60, 160))
    np.savez(path, images=images, labels=labels)
    return str(path)


def _run(tmp_path, vote: int):
    config = resolve_config(dict(data=_blobs(tmp_path / "blobs.npz"), arch="labelkit_cnn", clusters=(3,), heads=2,
                                 epochs=2, label_steps=2, batch_size=32, image_size=12, workers=0, device="cpu",
                                 augment="none", vote=vote, out=str(tmp_path / f"run-{vote}")))
    return run_sela(config)


def test_a_run_with_a_vote_writes_the_voted_labels_and_says_what_moved(tmp_path):
    plain, voted = _run(tmp_path, 0), _run(tmp_path, 4)  # the same seed: the same labels until the vote
    before, after = read_artefact(plain.artefact), read_artefact(voted.artefact)
    history = [json.loads(line) for line in voted.history.read_text().splitlines()]
    votes = [r for r in history if r["type"] == "vote"]
    assert len(votes) == 1 and votes[0]["neighbours"] == 4 and votes[0]["rows"] == 150
    assert not [r for r in plain.history.read_text().splitlines() if '"type": "vote"' in r]
    moved_any = False
    for h in range(2):
        moved = before.labels(h) != after.labels(h)
        record = votes[0]["heads"][h]
        assert record["moved"] == int(moved.sum())
        sizes = np.bincount(after.labels(h), minlength=3)
        assert (record["size_min"], record["size_max"]) == (sizes.min(), sizes.max())
        assert record["nmi"] == pytest.approx(voted.metrics[h]["nmi"])  # the artefact holds the voted labels
        # a moved label's score is the model's probability of it; the others keep the label step's
        assert np.array_equal(before.scores(h)[~moved], after.scores(h)[~moved])
        assert np.all(after.scores(h)[moved] != before.scores(h)[moved])
        moved_any |= bool(moved.any())
    assert moved_any, "the data must leave the vote something to move, or this test shows nothing"


def test_a_vote_is_refused_where_it_cannot_run(tmp_path):
    with pytest.raises(ConfigError, match="--vote is a number of neighbours"):
        resolve_config(dict(data="builtin:digits", vote=-1))
    with pytest.raises(ConfigError, match="--vote moves labels in the features of the backbone"):
        resolve_config(dict(data="builtin:digits", vote=5, freeze=True))
