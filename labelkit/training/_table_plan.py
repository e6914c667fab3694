"""The plan of heads on an embedding table: the batch, the neighbour term, and a budget that the run fits by
its epochs and, where one epoch of the recipe's heads cannot fit, by leaner heads -- with time and memory
estimated from a probe of this machine."""

from __future__ import annotations

import dataclasses
import math

from ._budget import BUDGET_SHARE, BudgetError, _bytes, _clock, _plural, label_step_count
from ._config import SelaConfig, feature_scaling, memory_bytes
from ._sharded import refuse_neighbours

__all__ = []


def table_batch(n: int) -> int:
    """The batch of heads on a table of ``n`` vectors: 1,024 where that leaves at least 12 steps an epoch, else
    the largest power of two that does (at least 64). With 1,024 on 1,797 digits (two steps an epoch) the first label
    step came after 4 updates and lost NMI 0.87 -> 0.69 of the graph start; with 128, 0.87 -> 0.72 and the other
    head ended at 0.84 instead of 0.81 (bench/suite.py digits-pixels, textures-pixels)."""
    batch = 1024
    while batch > 64 and n < 12 * batch:
        batch //= 2
    return batch


# the neighbour term's search (training/_frozen.py neighbours) costs about probes x N^1.5 and holds N x 32 cell
# lists; beyond this many vectors a table trains on its own labels only, unless --neighbours is given
NEIGHBOURS_LIMIT = 500_000


def fit_table(plan, n: int, chosen: dict, distributed: bool = False) -> None:
    """The batch, the neighbour term of heads on a table of ``n`` vectors (off under torchrun: the search
    reads every vector, and each process holds its share) and where they settle, with their reasons."""
    if "batch_size" not in chosen:
        plan.config = dataclasses.replace(plan.config, batch_size=table_batch(n))
        plan.reasons["batch_size"] = (f"{plan.config.batch_size}: at least 12 steps an epoch, so that the heads "
                                      "fit the first labels before they are solved again")
    if "neighbours" not in chosen and plan.config.neighbours and n > NEIGHBOURS_LIMIT:
        plan.config = dataclasses.replace(plan.config, neighbours=0)
        plan.reasons["neighbours"] = (f"0: {n:,} vectors are beyond the neighbour search's {NEIGHBOURS_LIMIT:,} "
                                      "(its time grows as N^1.5); the heads train on their own labels only")
    elif distributed and "neighbours" in chosen:
        refuse_neighbours(plan.config.neighbours)
    elif distributed and plan.config.neighbours:
        plan.config = dataclasses.replace(plan.config, neighbours=0)
        plan.reasons["neighbours"] = ("0: under torchrun each process holds its share of the vectors, and the "
                                      "neighbour search reads them all; the heads train on their own labels only")
    _table_settle(plan, chosen)


def _table_settle(plan, chosen: dict) -> None:
    """The table recipe's --settle where its heads keep the labels their neighbours agree with best: there a
    head's label steps only ever replace its labels by ones its neighbours agree with more. On the five tables
    of bench/suite.py (pixels and network features) every step kept the start's labels; the runs now stop
    after epoch 18 of 50 with the same labels (9-17 s a command instead of 12-22). Without the neighbour graph
    the heads' labels move at every step, and the large tables' figures were measured over every epoch: those
    train every epoch."""
    config = plan.config
    if "settle" in chosen or not config.settle:
        return
    if config.neighbours and config.keep_better:
        plan.reasons["settle"] = (f"{config.settle:g}: each head keeps the labels its neighbours agree with best, "
                                  "and training ends once a label step moves them no further than that (NMI to "
                                  "the previous step's, mean over heads)")
    else:  # as every table did before: no line in the plan
        plan.config = dataclasses.replace(config, settle=0.0)


# Heads on a table whose recipe cannot train all its epochs in the budget are made leaner (fewer heads, no
# hidden layer) until they can: on the 1 M mixture of bench/scale.py (1,000 components, no neighbour term at
# that size) the recipe's five heads on a hidden layer fit 3 of 50 epochs of 15 minutes and labelled at NMI
# 0.31, two of them 12 epochs at 0.34, and one linear head all 50 epochs, with 6 label steps, at 0.93 in 7
# minutes. Where no rung fits every epoch, the one that fits the most is taken.


def _table_ladder(config: SelaConfig, chosen: dict) -> list[tuple[SelaConfig, bool]]:
    """The table recipe, then leaner heads for a budget that cannot hold all its epochs: two heads (still a
    consensus), then no hidden layer, then one head -- each step only where the user did not choose it."""
    ladder = [(config, False)]
    same_k = len(set(config.head_clusters())) == 1

    def heads(c: SelaConfig, count: int) -> SelaConfig:
        return dataclasses.replace(c, heads=count, clusters=c.clusters[:1])

    if "heads" not in chosen and same_k and config.heads > 2:
        config = heads(config, 2)
        ladder.append((config, True))
    if "head_hidden" not in chosen and config.head_hidden:
        config = dataclasses.replace(config, head_hidden=None)
        ladder.append((config, True))
    if "heads" not in chosen and same_k and config.heads > 1:
        config = heads(config, 1)
        ladder.append((config, True))
    return ladder


def _table_costs(config: SelaConfig, n: int, probe: dict) -> tuple[float, float, float]:
    """(fixed seconds, seconds an epoch, seconds a label step) of heads on a table of ``n`` vectors; with
    ``--train-rows`` the epochs and the label steps cover the sample, and the last label step's extra rows are
    part of the fixed cost."""
    from ._graph import GRAPH_LIMIT, GRAPH_MIN
    from ._whiten import whitened_storage

    sample = min(n, 100_000)  # what the whitening is fitted on: random rows, then a covariance
    trained = min(n, config.train_rows or n)
    # the budget counts from the start of planning: the probe's own seconds are spent already; about a second
    # more goes to reading the table's ids, writing the artefact and the process's end (0.8-1.2 s on 2 cores
    # for the small tables of bench/suite.py, untimed by the probe)
    fixed = probe["probe_s"] + 1.0 + sample / probe["rows_read_per_s"] * 4 + n / probe["rows_whitened_per_s"]
    fixed += probe["whiten_fit_s"]
    # each head's centroid start, and after training each head's label-free checks (and, where the neighbour
    # graph keeps the better labels, k-means of each K to compare with: about one more head's checks)
    checked = config.heads + (len(set(config.head_clusters())) if config.neighbours else 0)
    fixed += config.heads * probe["head_seed_s"] + checked * probe["head_check_s"]
    per_row = 1 / probe["label_rows_per_s"] + probe["solve_s_per_step"] / n  # a label step's pass and solve
    fixed += (n - trained) * per_row  # the last label step labels every row
    per_epoch = trained / probe["train_rows_per_s"]
    if whitened_storage(1, n, probe["width"]) == "disk":
        fixed += n * probe["width"] * 2 / 400e6  # written once as float16 (400 MB/s assumed: the probe writes nothing)
        per_epoch += trained * probe["random_read_s_per_row"]  # each batch reads its rows from the file
    if config.start == "graph" and not config.start_from and GRAPH_MIN <= n <= GRAPH_LIMIT:
        fixed += 4.5e-4 * n * (2 if feature_scaling(config, table=True) == "both" else 1)  # a graph per scaling
    if config.neighbours:  # the exact search costs N^2; above 50,000 rows the inverted file's probes x N^1.5
        exact = probe["neighbours_s"] * (n / probe["neighbours_rows"]) ** 2
        fixed += exact if n <= 50_000 else exact * 32 / math.sqrt(n)
    return fixed, per_epoch, trained * per_row


def _table_memory(config: SelaConfig, n: int, probe: dict) -> int:
    """Peak resident bytes of a table run: the process, the sorted ids, the labels of every head, the whitened
    vectors where they stay in memory, and the label step (features, or none beyond the label memory, and
    its kernel)."""
    from ..solver import features_on_disk, kernel_path, working_bytes
    from ._whiten import whitened_storage

    k, heads = max(config.head_clusters()), config.heads
    memory = memory_bytes(config.label_memory)
    whitened = {"float32": n * probe["width"] * 4, "float16": n * probe["width"] * 2,
                "disk": 0}[whitened_storage(1, n, probe["width"])]
    path = kernel_path(n, k, "cpu", memory, scratch=config.out)
    kernel = n * k * 2 if path == "stored" else working_bytes(n, k, "cpu", memory)
    features = 0 if features_on_disk(n, probe["feature_dim"], k, "cpu", memory, scratch=config.out) \
        else n * probe["feature_dim"] * 4
    # per row, beyond the features and the kernel, the label step holds its labels, posteriors, their gathered
    # copies and the rounding's candidates: about 220 bytes, read off the RSS of the 10 M run of bench/scale.py
    # (+2.2 GB over the epochs' plateau; the process, ids, labels and whitened copy matched the plateau within
    # 10 %), less the 105 that the rounding no longer holds (int32 candidates, rows walked by chunks: the same
    # run's peak went from 6.64 to 5.59 GB)
    return int(450e6 + 110 * n + heads * n * 12 + whitened + features + kernel + 115 * n)


def _table_schedule(config: SelaConfig, n: int, fixed: float, per_epoch: float, per_step: float, budget: float,
                    steps_given: bool) -> SelaConfig | None:
    """The most epochs (at most the recipe's) whose run -- with the recipe's share of label steps, and at least
    two of them solved so that the labels follow the training -- ends within :data:`BUDGET_SHARE` of the budget;
    None where not even one epoch does."""
    for epochs in range(config.epochs, 0, -1):
        steps = config.label_steps if steps_given else max(1, round(config.label_steps * epochs / config.epochs))
        candidate = dataclasses.replace(config, epochs=epochs, label_steps=steps)
        while not steps_given and label_step_count(candidate, n) < 2 and candidate.label_steps <= epochs:
            candidate = dataclasses.replace(candidate, label_steps=candidate.label_steps + 1)
        seconds = fixed + epochs * per_epoch + label_step_count(candidate, n) * per_step
        if seconds <= BUDGET_SHARE * budget:
            return candidate
    return None


def fit_table_budget(plan, source, chosen: dict, *, fit: bool) -> None:
    """Probe heads on a table, fit the epochs to the budget and estimate the run's time and memory. Where the
    recipe's heads cannot train all the recipe's epochs in the budget, leaner heads that can are taken (or,
    where none can, those that fit the most epochs)."""
    from ._timing import _table_probe

    n = len(source)
    probe = _table_probe(plan.config, source)
    recipe, steps_given = plan.config, "label_steps" in chosen
    rungs, fits = [], []  # (config, lean, rates) of each rung probed; (config, lean, rates, costs) of each that fits
    for candidate, lean in _table_ladder(recipe, chosen):
        rates, costs = _rung_costs(candidate, lean, n, probe)
        rungs.append((candidate, lean, rates))
        if not fit:
            fits = [(candidate, lean, rates, costs)]
            break
        fitted = _table_schedule(candidate, n, *costs, plan.budget, steps_given)
        if fitted is not None:
            fits.append((fitted, lean, rates, costs))
            if fitted.epochs >= recipe.epochs:
                break
    # the first rung that trains every epoch, else one that trains every epoch on a sample of the rows (also
    # where not one epoch of any rung fits on every row), else the one that trains the most (the richest of equals)
    picked = next((f for f in fits if f[0].epochs >= recipe.epochs), None)
    if picked is None and fit and "train_rows" not in chosen and not recipe.neighbours:
        picked = _sampled_rung(rungs, n, plan.budget, steps_given)  # every rung was probed: none trains it all
        if picked is not None:
            plan.reasons["train_rows"] = _sample_reason(picked[0], n, plan.budget)
    if picked is None and not fits:
        need = costs[0] + costs[1] + 2 * costs[2]
        raise BudgetError(f"--budget {_clock(plan.budget)} is too short for one epoch and two label steps of heads on "
                          f"{n:,} vectors here, even with one head and no hidden layer (about {_clock(need)} at "
                          f"{_bytes(_table_memory(candidate, n, rates))}); give --budget {_clock(need / BUDGET_SHARE)} "
                          "or more, or fewer --clusters")
    picked = picked or max(fits, key=lambda f: f[0].epochs)
    plan.config, lean, rates, (fixed, per_epoch, per_step) = picked
    if lean and fit:  # the recipe's own epochs, where it fitted one at all (the first rung is the recipe)
        recipe_epochs = None if not fits or fits[0][1] else fits[0][0].epochs
        plan.reasons["heads"] = _lean_reason(recipe, plan.config, recipe_epochs, n, plan.budget)
    count = label_step_count(plan.config, n)
    if fit:
        plan.reasons["epochs"] = (f"{_plural(plan.config.epochs, 'epoch')} and {_plural(count, 'label step')} fit "
                                  f"the {_clock(plan.budget)} budget at the probed speed"
                                  + (" (the recipe's most)" if plan.config.epochs == recipe.epochs else ""))
    plan.probe = rates
    plan.estimate = {"seconds": round(fixed + plan.config.epochs * per_epoch + count * per_step, 1),
                     "peak_memory": _table_memory(plan.config, n, rates), "label_steps": count,
                     "fixed_s": round(fixed, 2), "per_epoch_s": round(per_epoch, 2), "per_label_step_s": round(per_step, 2),
                     "kernel": rates["kernel"]}


def _rung_costs(config: SelaConfig, lean: bool, n: int, probe: dict) -> tuple[dict, tuple[float, float, float]]:
    """The probe's rates for a rung of the ladder (a leaner one's heads timed anew) and its costs."""
    from ._timing import _head_rates

    rates = probe if not lean else {**probe, **_head_rates(config, n, probe["width"])}
    return rates, _table_costs(config, n, rates)


def _lean_reason(recipe: SelaConfig, config: SelaConfig, recipe_epochs: int | None, n: int, budget: float) -> str:
    hidden = f" on a {recipe.head_hidden}-wide hidden layer" if recipe.head_hidden else ""
    what = (f"{config.heads} of K = {config.clusters[0]}" + ("" if config.head_hidden else ", no hidden layer"))
    if recipe_epochs is None:
        return (f"{what}: one epoch of the recipe's {recipe.heads} heads{hidden} and two label steps do not fit the "
                f"{_clock(budget)} budget with {n:,} vectors here")
    return (f"{what}: the recipe's {recipe.heads} heads{hidden} fit only {recipe_epochs} of its {recipe.epochs} epochs "
            f"in the {_clock(budget)} budget with {n:,} vectors here; heads trained that little label far worse")


# A table too large for any rung to train every epoch on every row trains its heads on a random sample of the
# rows, and its last label step labels them all. On the 1 M mixture of bench/scale.py (1,000 components, one
# linear head, 50 epochs, 6 label steps) samples of 100, 250 and 1,000 rows a cluster labelled the whole
# table at NMI 0.874, 0.910 and 0.928, where the 10 M table trained on every row fitted 6 epochs and 2 label
# steps of 15 minutes and labelled at 0.745. So the plan takes the richest rung whose sample reaches
# SAMPLE_ROWS_PER_CLUSTER rows a cluster, else the largest sample of at least SAMPLE_LEAST a cluster.
SAMPLE_ROWS_PER_CLUSTER = 1000
SAMPLE_LEAST = 100


def _sampled_rung(rungs, n: int, budget: float, steps_given: bool):
    """(config with ``train_rows``, lean, rates, costs) of the rung that trains every epoch on a sample, or None;
    ``rungs`` are the ladder's (config, lean, probed rates)."""
    found = []
    for candidate, lean, rates in rungs:
        fitted = _largest_sample(candidate, lean, rates, n, budget, steps_given)
        if fitted is not None and fitted[0].train_rows >= SAMPLE_ROWS_PER_CLUSTER * max(candidate.head_clusters()):
            return fitted
        found += [fitted] if fitted is not None else []
    return max(found, key=lambda f: f[0].train_rows, default=None)


def _largest_sample(candidate: SelaConfig, lean: bool, rates: dict, n: int, budget: float, steps_given: bool):
    """The rung trained on the largest sample (at least SAMPLE_LEAST rows a cluster, fewer than ``n``) on which it
    trains every epoch in the budget, as (config, lean, rates, costs); None where none does."""
    def fitted(rows: int):
        config = dataclasses.replace(candidate, train_rows=rows)
        costs = _table_costs(config, n, rates)
        config = _table_schedule(config, n, *costs, budget, steps_given)
        return (config, lean, rates, costs) if config is not None and config.epochs >= candidate.epochs else None

    low, high = SAMPLE_LEAST * max(candidate.head_clusters()), n - 1
    if low > high or fitted(low) is None:
        return None
    while low < high:  # the cost grows with the rows
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fitted(middle) is not None else (low, middle - 1)
    return fitted(low)


def _sample_reason(config: SelaConfig, n: int, budget: float) -> str:
    return (f"{config.train_rows:,} of {n:,} rows, at random: no heads train all {config.epochs} epochs on every row "
            f"in the {_clock(budget)} budget here; the heads train on the sample, and the last label step labels "
            "every row")

