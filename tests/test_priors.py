"""Cluster priors and relaxed balance in the solver, against POT's unbalanced Sinkhorn as the oracle."""

import warnings

import numpy as np
import ot
import pytest
import torch

from labelkit.errors import SolverError
from labelkit.quality import agreement
from labelkit.solver import Algorithm, Balance, Prior, solve


def column_mass(logits, result, lam):
    """Column sums of the plan Q the solver converged to: rows are softmax(lam z + potentials)."""
    q = torch.softmax(torch.as_tensor(logits, dtype=torch.float64) * lam + torch.from_numpy(result.potentials), 1)
    return q.sum(0).numpy()


def pot_plan(logits, b, lam, tau):
    """POT's unbalanced Sinkhorn with hard rows (one unit per sample) and KL-relaxed columns (tau)."""
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), 1).numpy()
    with warnings.catch_warnings():  # reg_type="entropy" warns that it ignores the reference measure
        warnings.simplefilter("ignore")
        return ot.unbalanced.sinkhorn_unbalanced(np.ones(len(logp)), np.asarray(b, dtype=np.float64), -logp, 1 / lam,
                                                 (float("inf"), tau if tau else float("inf")), reg_type="entropy",
                                                 numItermax=100_000, stopThr=1e-13)


def skewed(n=600, k=6, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 1.5
    z[:, 0] += 1.0  # one cluster the data prefers
    return torch.tensor(z, dtype=torch.float32)


@pytest.mark.parametrize("tau, counts", [(1.0, None), (0.2, None), (3.0, None), (1.0, [200, 160, 100, 60, 50, 30]),
                                         (None, [200, 160, 100, 60, 50, 30])])
def test_matches_pot_unbalanced_sinkhorn(tau, counts):
    logits, lam = skewed(), 5.0
    b = np.full(6, 100.0) if counts is None else np.asarray(counts, dtype=np.float64)
    result = solve(logits, algorithm=Algorithm(lam=lam, tol=1e-7, max_iter=5000, anneal=False), balance=Balance(tau=tau, prior=counts, floor=0.0))
    plan = pot_plan(logits, b, lam, tau)
    assert result.converged
    assert (result.labels == plan.argmax(1)).mean() >= 0.995
    np.testing.assert_allclose(column_mass(logits, result, lam), plan.sum(0), rtol=2e-3)
    np.testing.assert_allclose(result.targets, b)


def test_relaxed_sizes_follow_the_data_and_tighten_with_tau():
    logits, lam = skewed(), 5.0
    spread = []
    for tau in (0.1, 1.0, 10.0, None):
        result = solve(logits, algorithm=Algorithm(lam=lam, tol=1e-6), balance=Balance(tau=tau, floor=0.0))
        spread.append(result.sizes.max() - result.sizes.min())
        if tau is not None:
            assert result.sizes.argmax() == 0  # the preferred cluster is the largest under any relaxation
    assert spread[0] > spread[1] > spread[2] > spread[3]


def test_floor_keeps_an_unwanted_cluster_alive():
    logits, lam = skewed(), 5.0
    logits[:, 5] -= 6.0  # nobody wants cluster 5
    free = solve(logits, algorithm=Algorithm(lam=lam, tol=1e-6), balance=Balance(tau=0.3, floor=0.0))
    held = solve(logits, algorithm=Algorithm(lam=lam, tol=1e-6), balance=Balance(tau=0.3, floor=0.5))
    assert column_mass(logits, free, lam)[5] < 10
    assert column_mass(logits, held, lam)[5] == pytest.approx(50.0, rel=1e-3)  # 0.5 of its prior size, N/K = 100
    assert held.sizes[5] >= 40


def long_tailed_logits(seed=0, lam=25.0):
    """Samples drawn from 5 well-separated classes of sizes 400, 200, 133, 100, 80 (Zipf): a head that
    predicts the class with some noise."""
    rng = np.random.default_rng(seed)
    sizes = (400 / np.arange(1, 6)).astype(int)
    truth = np.repeat(np.arange(5), sizes)
    z = rng.normal(scale=1.2, size=(len(truth), 5))
    z[np.arange(len(truth)), truth] += 2.5
    order = rng.permutation(5)  # clusters need not come in size order
    return torch.tensor(z[:, order] / 5, dtype=torch.float32), np.argsort(order)[truth], sizes


def test_powerlaw_prior_matches_sizes_by_mass_and_recovers_the_long_tail():
    logits, truth, sizes = long_tailed_logits()
    uniform = solve(logits, algorithm=Algorithm(tol=1e-5))
    powerlaw = solve(logits, algorithm=Algorithm(tol=1e-5), balance=Balance(prior="powerlaw:1"))
    relaxed = solve(logits, algorithm=Algorithm(tol=1e-5), balance=Balance(tau=0.1))
    assert powerlaw.converged and relaxed.converged
    expected = Prior.parse("powerlaw:1").targets(5, len(truth))
    # the largest prior size went to the cluster of the largest class, and so on down
    assert np.argsort(-powerlaw.targets).tolist() == np.argsort(-np.bincount(truth)).tolist()
    np.testing.assert_allclose(np.sort(powerlaw.targets)[::-1], expected)
    nmi = {name: agreement(r.labels, truth)["nmi"] for name, r in
           [("uniform", uniform), ("powerlaw", powerlaw), ("relaxed", relaxed)]}
    assert nmi["powerlaw"] > nmi["uniform"] + 0.05
    assert nmi["relaxed"] > nmi["uniform"] + 0.05


def test_warm_start_with_a_prior_and_balance():
    logits, _, _ = long_tailed_logits()
    for balance in (Balance(prior="powerlaw:1"), Balance(tau=0.5), Balance(prior="powerlaw:0.5", tau=2.0)):
        cold = solve(logits, balance=balance, algorithm=Algorithm(tol=1e-6))
        warm = solve(logits, warm_start=cold, balance=balance, algorithm=Algorithm(tol=1e-6))
        assert (warm.labels == cold.labels).mean() >= 0.999
        assert warm.iterations < cold.iterations


def test_uniform_prior_is_unchanged():
    logits, _, _ = long_tailed_logits()
    plain, named = solve(logits), solve(logits, balance=Balance(prior="uniform"))
    assert (plain.labels == named.labels).all() and plain.iterations == named.iterations


@pytest.mark.parametrize("kwargs, message", [
    ({"prior": "powerlaw:0"}, "exponent must be > 0"),
    ({"prior": "powerlaw:-1"}, "exponent must be > 0"),
    ({"prior": "powerlaw:x"}, "powerlaw needs a number"),
    ({"prior": "zipf"}, "give uniform, powerlaw"),
    ({"prior": "powerlaw:9"}, "smallest one"),
    ({"tau": 0.0}, "balance must be a positive number"),
    ({"tau": -1.0}, "balance must be a positive number"),
    ({"prior": [10, 10, 10]}, "3 values but there are K=4"),
    ({"prior": [10, 10, 10, 11]}, "sum to 41 but there are N=40"),
    ({"prior": [20, 10, 10, 0]}, "cluster 3 has 0"),
    ({"prior": "powerlaw:1", "exact": True}, "uniform prior"),
    ({"tau": 1.0, "exact": True}, "uniform prior"),
    ({"tau": 1.0, "floor": 1.0}, "floor must lie in"),
])
def test_bad_prior_is_a_clear_error(kwargs, message):
    with pytest.raises(SolverError, match=message):
        solve(torch.randn(40, 4), balance=Balance(**kwargs))


def test_peaked_kernel_with_a_prior_and_balance_is_annealed():
    from test_sinkhorn import realistic

    features, weight = realistic(3000, 30, target=0.97)
    logits = features @ weight.T
    relaxed = solve(logits, algorithm=Algorithm(max_iter=2000), balance=Balance(tau=2.0))
    reference = solve(logits, algorithm=Algorithm(anneal=False, max_iter=50000, tol=1e-4), balance=Balance(tau=2.0))
    assert relaxed.converged
    assert reference.converged and (relaxed.labels == reference.labels).mean() >= 0.995
    # a power law is matched to clusters by their mass along the way, so the annealed path may give two
    # clusters of near-equal mass each other's sizes; what must hold is the sizes asked for
    ranked = solve(logits, algorithm=Algorithm(max_iter=2000), balance=Balance(prior="powerlaw:0.7"))
    assert ranked.converged and ranked.rebuilds > 1
    np.testing.assert_allclose(np.sort(ranked.sizes)[::-1], np.sort(ranked.targets)[::-1], atol=3)


def test_floor_holds_for_labels_when_the_plan_spreads_a_cluster_thinly():
    rng = np.random.default_rng(3)
    logits, lam = skewed(), 5.0
    runner_up = logits[:, :5].max(1).values
    # every row gives cluster 5 a little mass and none gives it the most: its mass is spread thinly, so plain
    # argmax labels would leave it (nearly) empty while the plan holds its floor
    logits[:, 5] = runner_up - 0.4 - torch.from_numpy(rng.uniform(0, 0.3, len(logits))).float()
    held = solve(logits, algorithm=Algorithm(lam=lam, tol=1e-6), balance=Balance(tau=0.3, floor=0.5))
    argmax = (torch.as_tensor(logits, dtype=torch.float64) * lam + torch.from_numpy(held.potentials)).argmax(1)
    assert column_mass(logits, held, lam)[5] >= 50 - 0.5 and (argmax == 5).sum() < 25
    assert held.sizes[5] >= 50 and held.sizes.sum() == len(logits)  # ceil(0.5 x 100) samples
    assert (held.sizes >= np.ceil(0.5 * held.targets - 1e-9)).all()  # nobody was taken below their own floor
    score = (torch.as_tensor(logits, dtype=torch.float64) * lam + torch.from_numpy(held.potentials)).numpy()
    loss = score.max(1) - score[:, 5]  # log q(argmax) - log q(5): what a row loses by moving to cluster 5
    moved = (held.labels == 5) & (argmax != 5).numpy()
    assert set(np.flatnonzero(moved)) == set(np.argsort(loss)[(argmax == 5).sum().item():][: moved.sum()])
    q = torch.softmax(torch.as_tensor(logits, dtype=torch.float64) * lam + torch.from_numpy(held.potentials), 1)
    np.testing.assert_allclose(held.scores, q[np.arange(len(q)), held.labels].numpy(), rtol=2e-2)


def _floor_worker(rank, world, init, logits, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        part = np.array_split(np.arange(len(logits)), world)[rank]
        result = solve(logits[part], group=dist.group.WORLD, algorithm=Algorithm(lam=5.0, tol=1e-6), balance=Balance(tau=0.3, floor=0.5))
        torch.save({"labels": torch.from_numpy(result.labels), "rows": torch.from_numpy(part)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_label_floor_across_ranks_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    logits = skewed()
    logits[:, 5] = logits[:, :5].max(1).values - 0.5  # cluster 5 below its floor by argmax
    single = solve(logits, algorithm=Algorithm(lam=5.0, tol=1e-6), balance=Balance(tau=0.3, floor=0.5))
    assert single.sizes[5] >= 50
    mp.spawn(_floor_worker, args=(2, f"file://{tmp_path}/rdzv", logits.numpy(), str(tmp_path / "out")), nprocs=2,
             join=True)
    labels = np.empty(len(logits), dtype=np.int32)
    for rank in range(2):
        part = torch.load(tmp_path / f"out.{rank}")
        labels[part["rows"].numpy()] = part["labels"].numpy()
    assert (labels == single.labels).all()
