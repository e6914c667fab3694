"""SeLa: self-labelling via simultaneous clustering and representation learning (Asano et al., ICLR 2020).

The loop, as in the paper: for each epoch, train the backbone and T heads with cross-entropy on the current
labels (step 1); at the scheduled epochs, pass over the data once, and for each head find the labels that
minimise the same cross-entropy under equal cluster sizes with Sinkhorn-Knopp (step 2). The last label step
comes after the last epoch, and its labels are the artefact.
"""

from __future__ import annotations

import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..artefact import producer_versions
from ._budget import label_schedule
from ._config import SelaConfig, feature_scaling, memory_bytes, solver_prior
from ..errors import ConfigError
from ._frozen import TableRows, cached_views, neighbours
from ._whiten import ViewsOnDisk, whitened_views
from ._sharded import Shard, refuse_neighbours, row_share
from ._vote import neighbour_vote
from ._heads import frozen_heads, frozen_record, head_training, seed_prototypes, training_sample
from ._start import SelaState, artefact_start, pinned_balance, store_labels, with_pins
from ._select import KeepBetter
from ._graph import GRAPH_LIMIT, GRAPH_MIN, image_graph_start, vector_graph_start
from ..data import Order, rank_slice, run_transforms
from ..quality import agreement
from ..quality import QUALITY_ROWS
from ._models import SelaModel, create_backbone, feature_dim, init_record
from ._job import Job
from ._outcome import SelaRun, finish as _finish
from ..solver import FeatureFile, FeatureWriter, write_features
from ..solver import Algorithm, Balance, Storage, features_on_disk, kernel_buffer, kernel_path, label_probability, solve
from ._loop import Reporter, autocast, extract_features, make_optimizer, model_to, seed_everything

__all__ = ["run_sela", "label_schedule", "head_balance", "SelaRun", "SelaState"]


def _run_record(config: SelaConfig, ks: list[int], dim: int, plan: dict | None = None) -> dict:
    record = {"kind": "sela", "config": config.to_dict(), "arch": config.arch, "image_size": config.image_size,
              "clusters": ks, "head_temperature": config.head_temperature, "feature_dim": dim,
              "producer": producer_versions()}
    if plan:
        record["plan"] = plan
    return record


def label_view_stream(epoch: int, view: int, views: int) -> int:
    """The random stream of augmented view ``view`` of the label step after ``epoch`` epochs: its own for every
    view and every label step, and never a training epoch's (those are 0, 1, ...), so that the views average
    different augmentations and a resumed run draws the same ones."""
    return -1 - (epoch * views + view)


def head_balance(config: SelaConfig, k: int, n: int) -> Balance:
    """Prior, relaxation and rounding of a head's solve: exact-balance rounding is for equal sizes only."""
    prior = solver_prior(config, k, n)
    equal = prior == "uniform" and config.balance is None
    return Balance(prior=prior, tau=config.balance, floor=config.balance_floor, exact=config.exact_balance and equal)


def _label_step(job: Job, model: SelaModel, dim: int, state: SelaState, ks: list[int], transforms: tuple,
                epoch: int) -> dict:
    """Step 2 after ``epoch`` epochs: one pass for the features of each view, then one Sinkhorn solve per head,
    warm-started."""
    config, dist, source = job.config, job.dist, job.source
    model.eval()
    # the plain view, plus label_views - 1 augmented ones whose features are averaged in: labels then follow
    # what the augmentation leaves unchanged (``label_augment`` replaces the plain view by an augmented one)
    plain, augmented = transforms
    views = [augmented if config.label_augment else plain] + [augmented] * (config.label_views - 1)
    keep = ~job.skips.mask()
    here = len(rank_slice(np.flatnonzero(keep), dist.rank, dist.world))
    writer = None
    if features_on_disk(here, dim, max(ks), job.device, memory_bytes(config.label_memory), scratch=config.out):
        name = "label_features.npy" if dist.world == 1 else f"label_features-rank{dist.rank}.npy"
        writer = FeatureWriter(Path(config.out) / name, len(source), dim)
    try:
        features, seen = None, None
        for v, transform in enumerate(views):
            order = Order(config.batch_size * 2, seed=config.seed, epoch=label_view_stream(epoch, v, len(views)),
                          keep=keep, rank=dist.rank, world=dist.world)
            sink = None if writer is None else lambda rows, out: writer.add(rows, out, len(views))
            with autocast(job.device, config.precision):
                view, view_seen = extract_features(model.features, dim, source, transform, order,
                                                   workers=config.workers, device=job.device, skips=job.skips,
                                                   reporter=job.reporter, sink=sink)
            if writer is None:
                features = view if features is None else features.add_(view)
            seen = view_seen if seen is None else seen & view_seen
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    labelled = state.keep(~job.merge_skips())  # every rank learns which samples any rank could not read
    if writer is None:
        features /= len(views)
        rows = torch.from_numpy(np.flatnonzero(seen & labelled))  # this rank's share
        return _solve_heads(job, model, features[rows].to(job.device), rows, labelled, state, ks)
    file, order = writer.finish()  # rows in the order the pass met them; some may have failed another view
    wanted = np.flatnonzero((seen & labelled)[order])
    try:
        if len(wanted) < len(order):
            compact = file.path.with_name("compact-" + file.path.name)
            blocks = (file.take(wanted[i:i + 65536]) for i in range(0, len(wanted), 65536))
            file.path.unlink()
            file = FeatureFile(write_features(compact, blocks, len(wanted), dim))
        record = _solve_heads(job, model, file, torch.from_numpy(order[wanted]), labelled, state, ks)
    finally:
        file.path.unlink(missing_ok=True)  # written for this step only: N x D float16 need not outlive it
    return {**record, "features": "disk"}


def _solve_heads(job: Job, model: SelaModel, features: torch.Tensor, rows: torch.Tensor, labelled: np.ndarray,
                 state: SelaState, ks: list[int], sized: int | None = None, compare: np.ndarray | None = None) -> dict:
    """One Sinkhorn solve per head on ``features`` (this rank's ``rows``; its kernel stored as for ``sized`` rows,
    where given), warm-started; the new labels and scores go into ``state``; returns the label step's record,
    with each head's agreement with the previous labels on the ``compare`` rows (default: all labelled)."""
    config, dist, source = job.config, job.dist, job.source
    count = int(labelled.sum())
    if dist.main:  # the history's figures, which rank 0 alone computes: at 10 M rows 160 MB the others need not hold
        measured = np.flatnonzero(labelled if compare is None else labelled & compare)
        previous = state.labels[:, measured].numpy()
    # what the label-free quality of the last step reads: a sample of the (compared) rows, not N x D features
    eligible = np.arange(len(rows)) if compare is None else np.flatnonzero(compare[rows.numpy()])
    sample = np.sort(np.random.default_rng(config.seed).permutation(eligible)[:QUALITY_ROWS])
    picked = features.take(sample) if isinstance(features, FeatureFile) else features[torch.from_numpy(sample)]
    job.label_features = (rows.numpy()[sample], picked.float().cpu())
    job.previous_labels = state.labels[:, rows[torch.from_numpy(sample)]].clone()
    memory = memory_bytes(config.label_memory)
    path = kernel_path(sized or len(rows), max(ks), job.device, memory, scratch=config.out)
    buffer = kernel_buffer(len(rows), max(ks), device=job.device) if path == "stored" else None
    job.reporter.phase("solve", len(ks))
    heads = []
    start = time.perf_counter()
    for h in range(len(model.heads)):
        weight, bias = model.head_weights(h)
        bias = None if bias is None else bias.detach().float()
        free, balance = pinned_balance(state, h, rows, head_balance(config, ks[h], count))
        with warnings.catch_warnings():  # an unconverged solve is recorded in the history instead
            warnings.simplefilter("ignore", RuntimeWarning)
            result = solve(features=features if free is None or not len(free) else _rows_of(features, free),
                           weight=weight.detach().float(), bias=bias, warm_start=state.potentials[h],
                           algorithm=Algorithm(lam=config.lam, tol=config.sinkhorn_tol), balance=balance,
                           storage=Storage(kernel=path, memory=memory, scratch=config.out, device=job.device),
                           buffer=buffer, group=dist.group)
        state.potentials[h] = torch.from_numpy(result.potentials)
        labels, posterior = with_pins(state, h, rows, free, result.labels, result.posterior)
        info = _solve_record(h, ks[h], result, None if free is None else len(rows) - len(free))
        if job.selection is not None:  # heads on fixed features keep labels their neighbours agree with more
            labels, posterior = job.selection.judge(
                state, h, rows, labelled, (labels, posterior), free, info,
                partial(label_probability, features=features, weight=weight.detach().float(), bias=bias,
                        device=job.device))
        store_labels(dist, state, h, rows, labels, posterior)
        if dist.main:  # the figures go to the history, which rank 0 writes
            info["nmi_previous"] = agreement(state.labels[h, measured].numpy(), previous[h])["nmi"]
            if source.has_truth:  # ground truth is only ever measured, never trained on
                everyone = np.flatnonzero(labelled)
                truth = source.targets[everyone]
                known = truth >= 0
                scores = agreement(state.labels[h, everyone].numpy()[known], truth[known], accuracy=True)
                info.update(nmi=scores["nmi"], ari=scores["ari"], accuracy=scores["accuracy"])
        heads.append(info)
        job.reporter.advance(head=h)
    job.reporter.end_phase()
    held = (0 if isinstance(features, FeatureFile) else features.numel() * features.element_size()) \
        + (0 if buffer is None else buffer.numel() * buffer.element_size())
    del buffer
    return {"labelled": count, "seconds": round(time.perf_counter() - start, 3), "heads": heads,
            "memory_bytes": held}


def _solve_record(h: int, k: int, result, pinned: int | None) -> dict:
    """What the history keeps of head ``h``'s solve."""
    return {"head": h, "k": k, "kernel": result.kernel, "products": result.products,
            "density": None if result.density is None else round(result.density, 5),
            "iterations": result.iterations, "seconds": round(result.seconds, 3),
            "error": result.error, "converged": result.converged, "lam": result.lam,
            "size_min": int(result.sizes.min()), "size_max": int(result.sizes.max()),
            "empty": int((result.sizes == 0).sum()), **({} if pinned is None else {"pinned": pinned})}


def _rows_of(features, free: torch.Tensor):
    if isinstance(features, FeatureFile):
        raise ConfigError("a start from a reviewed version solves with pinned rows, which needs the label step's "
                          "features in memory; raise --label-memory")
    return features[free.to(features.device)]


def run_sela(config: SelaConfig, *, resume: bool = False, reporter: Reporter | None = None,
             plan: dict | None = None) -> SelaRun:
    """Run SeLa as configured and write ``labels.parquet``, ``model.safetensors``, ``config.json`` and
    ``history.jsonl`` into ``config.out``. Checkpoints every epoch and on SIGTERM/SIGUSR1 (then raises
    :class:`~labelkit.errors.Preempted`); ``resume`` continues a stopped or killed run. ``plan`` (see
    :meth:`labelkit.training.Plan.record`) is kept in ``config.json`` and the artefact: the recipe, its reasons and
    the estimates."""
    with Job(config, kind="generate", resume=resume, reporter=reporter) as job:
        job.plan = plan
        ks = config.head_clusters()
        if max(ks) > len(job.source):
            raise ConfigError(f"--clusters {max(ks)} is more than the {len(job.source)} samples of {config.data}; "
                              "give a K below the number of samples, e.g. --clusters 10")
        seed_everything(config.seed)
        if config.frozen:
            return _run_frozen(job, ks)
        backbone = create_backbone(config.arch, config.image_size, config.init, pretrained=config.pretrained,
                               init_partial=config.init_partial)
        model = SelaModel(backbone, ks, config.head_temperature)
        model = model_to(model, job.device)
        dim = feature_dim(model.backbone)
        optimizer = make_optimizer(model, config.lr, config.momentum, config.weight_decay)
        state = SelaState.initial(len(job.source), ks, config.seed)
        resumed = job.start(_run_record(config, ks, dim, job.plan), model=model, optimizer=optimizer, sela=state)
        if not resumed and init_record(backbone):
            job.log(init_record(backbone))  # what --init filled and what stayed random
        schedule = set(label_schedule(config.epochs, config.label_steps, config.label_spacing))
        if config.start == "graph" or config.start_from:  # the start takes the place of the label step at epoch 0
            schedule.discard(0)
        job.label_schedule = schedule
        job.announce(model, heads=ks, label_steps=len(schedule))
        if not config.pretrained:  # a pretrained backbone's own transforms work per sample
            job.decode_images(config.image_size)
        train_model = job.parallel(model)
        transforms = run_transforms(backbone, config.image_size, config.augment, config.pretrained)
        if not resumed and config.start_from:  # the first labels come from an earlier artefact
            job.log({"type": "start", "epoch": 0, **artefact_start(job, state, ks)})
            job.checkpoint_or_stop()
        elif not resumed and config.start == "graph":  # the first labels come from the images' kNN graph
            job.log({"type": "start", "epoch": 0, **image_graph_start(job, state.labels, ks)})
            job.checkpoint_or_stop()
        elif not resumed and 0 in schedule:  # the first labels come from the untrained network
            job.label_step(0, lambda epoch: _label_step(job, model, dim, state, ks, transforms, epoch))
            job.checkpoint_or_stop()
        job.run_epochs(lambda: job.train_epoch(train_model, transforms[1], state.labels, optimizer,
                                               keep=state.keep(~job.skips.mask())),
                       lambda epoch: _label_step(job, model, dim, state, ks, transforms, epoch))
        if config.vote:  # recomputed from the last checkpoint's labels on a resume: never voted twice
            job.log(neighbour_vote(job, model, dim, state, ks, transforms[0]))
        job.merge_skips()
        run = _finish(job, model, state, ks)
        job.finish()
        return run


def _frozen_features(job: Job) -> tuple[torch.nn.Module | None, torch.Tensor, dict]:
    """The fixed features to label: an embedding table's vectors, or the cached views of a frozen backbone.
    Returns (the backbone or None, (V, N, D) views -- for a table one lazy view read by chunks --, where they
    came from)."""
    config, source, dist = job.config, job.source, job.dist
    if not source.has_pixels:  # under torchrun each rank checks its share of the rows for NaN and inf
        bad = dist.gather_dict(source.find_bad(row_share(len(source), dist)))
        job.skips.skipped.update(source.check_finite(config.skip_bad, bad))
        return None, [TableRows(source)], {"type": "features", "source": "embeddings"}  # read by chunks
    net = create_backbone(config.arch, config.image_size, config.init, pretrained=config.pretrained,
                               init_partial=config.init_partial)
    plain, augmented = run_transforms(net, config.image_size, config.augment, config.pretrained)
    views, record = cached_views(job, net, plain, augmented, feature_dim(net))
    return net, views, record


def _run_frozen(job: Job, ks: list[int]) -> SelaRun:
    """SeLa with the backbone fixed: step 1 trains the heads on cached views, step 2 solves on the plain view.
    Under torchrun each rank holds the views of its own rows (training/_sharded.py)."""
    config, source, dist = job.config, job.source, job.dist
    net, views, origin = _frozen_features(job)
    keep = ~job.skips.mask()
    raw = views[0]
    shard = Shard.of(keep, dist)
    if shard is not None:
        refuse_neighbours(config.neighbours)
    whiten, views, whitened = whitened_views(views, keep, config, feature_scaling(config, table=net is None),
                                             reporter=job.reporter,
                                             shard=shard)
    heads, model = frozen_heads(net, whiten, ks, config)
    seed_prototypes(heads, views[0] if shard is None else views.gathered(0), keep, config.seed)
    if shard is not None:  # every rank starts from rank 0's heads, whatever its k-means threads did
        heads.load_state_dict(dist.broadcast(heads.state_dict()))
    optimizer = make_optimizer(heads, config.lr, config.momentum, config.weight_decay)
    state = SelaState.initial(len(source), ks, config.seed)
    record = {**_run_record(config, ks, whiten.num_features, job.plan), "frozen": frozen_record(whiten, config, net)}
    resumed = job.start(record, model=heads, optimizer=optimizer, sela=state)
    job.announce(heads, heads=ks, label_steps=len(label_schedule(config.epochs, config.label_steps, config.label_spacing)),
                 arch=f"{config.arch} (frozen)" if net is not None else "heads on vectors", views=int(views.shape[0]),
                 width=whiten.num_features)
    job.log(origin)
    job.log(whitened)
    if not resumed and net is not None and init_record(net):
        job.log(init_record(net))
    near = neighbours(views[0][:], config.neighbours) if config.neighbours else None
    graph, job.label_schedule = _frozen_schedule(job, int(keep.sum()), resumed)
    job.selection = KeepBetter(near, views[0]) if near is not None and config.keep_better else None

    sample = training_sample(config.train_rows, keep, config.seed)
    labelled_all = [False]  # whether the latest label step labelled every row, not only the training sample
    if sample is not None:  # the ETA and the budget: the last label step passes over every row
        job.label_weight[config.epochs] = keep.sum() / (keep & sample).sum()
    label_step = _frozen_label_step(job, heads, views[0], shard, state, ks, lambda: keep, sample, labelled_all)
    train = head_training(job, heads, optimizer, views, near, shard, state,
                          lambda: keep if sample is None else keep & sample)
    if not resumed:
        _first_labels(job, raw, keep, state, ks, graph, label_step, whiten.column_scale)
    keep = state.keep(keep)  # a reviewed start leaves samples out: the closures above read these
    job.run_epochs(train, label_step)
    if sample is not None and not labelled_all[0]:  # stopped early: the heads label every row, once
        job.label_step(job.epoch, lambda epoch: label_step(config.epochs))
        job.checkpoint()
    run = _finish(job, model, state, ks)
    job.finish()
    local = views if shard is None else views.local
    if isinstance(local, ViewsOnDisk):  # a derived copy of the table: not worth its disk once the run is done
        local.file.path.unlink(missing_ok=True)
    return run


def _frozen_label_step(job: Job, heads: SelaModel, view, shard, state: SelaState, ks: list[int], kept, sample,
                       done: list):
    """Step 2 of heads on fixed features (the plain view), as ``label_step(epoch)``: a solve on every kept row
    (``kept()``) or, before the last epoch of a run trained on a ``sample``, on the sample's -- with its kernel and
    features where the whole table's step keeps them (the run's peak), which measures its agreement on the sample."""
    def held(mask: np.ndarray) -> np.ndarray:  # this rank's rows
        return np.flatnonzero(mask) if shard is None else shard.rows[mask[shard.rows]]

    def label_step(epoch: int) -> dict:
        heads.eval()
        keep = kept()
        rows = keep if sample is None or epoch >= job.config.epochs or job.stopped_early else keep & sample
        done[0] = rows is keep
        compare = keep & sample if sample is not None and rows is keep else None
        whole = held(keep)
        return _solve_on_features(job, heads, view, torch.from_numpy(whole if rows is keep else held(rows)), rows,
                                  state, ks, sized=len(whole), compare=compare)

    return label_step


def _first_labels(job: Job, raw, keep: np.ndarray, state: SelaState, ks: list[int], graph: bool, label_step,
                  columns: np.ndarray | None) -> None:
    """The labels a frozen run starts from: an earlier artefact's, the features' kNN graph's (computed by rank 0
    under torchrun: it reads at most GRAPH_LIMIT rows; each column divided by ``columns`` where the whitening
    standardized them), or a label step of the untrained heads."""
    dist = job.dist
    if job.config.start_from:
        job.log({"type": "start", "epoch": 0, **artefact_start(job, state, ks)})
    elif graph:
        record = vector_graph_start(job, raw, keep, state.labels, ks, columns) if dist.main else None
        if job.selection is not None:  # what every label step is judged against first
            record["neighbour_agreement"] = [round(job.selection.score(row, keep), 4) for row in state.labels]
        if dist.world > 1:
            record = dist.broadcast(record)
            state.labels.copy_(dist.broadcast(state.labels))
        job.log({"type": "start", "epoch": 0, **record})
    elif 0 in job.label_schedule:
        job.label_step(0, label_step)
    else:
        return
    job.checkpoint_or_stop()


_BLOCK = 65536  # rows per block of a pass over the features


def _solve_on_features(job: Job, heads: SelaModel, view, rows: torch.Tensor, keep: np.ndarray, state: SelaState,
                       ks: list[int], sized: int | None = None, compare: np.ndarray | None = None) -> dict:
    """The label step of heads on fixed features: the heads' input features of ``rows`` (a pass over ``view``,
    block by block), held in memory or, where the label step's memory would not hold them (for ``sized`` rows,
    where given), written to a float16 file for the solver to read by blocks; then one solve per head."""
    config = job.config
    dim = feature_dim(heads.backbone)
    starts = range(0, len(rows), _BLOCK)
    job.reporter.phase("label", len(starts))

    def blocks():
        with torch.no_grad():
            for i in starts:
                yield heads.features(view[rows[i:i + _BLOCK]].float())
                job.reporter.advance()

    if not features_on_disk(sized or len(rows), dim, max(ks), job.device, memory_bytes(config.label_memory),
                            scratch=config.out):
        features = torch.cat(list(blocks()))
        job.reporter.end_phase()
        return _solve_heads(job, heads, features, rows, keep, state, ks, sized, compare)
    path = Path(config.out) / ("label_features.npy" if job.dist.world == 1 else f"label_features-rank{job.dist.rank}.npy")
    try:
        file = FeatureFile(write_features(path, blocks(), len(rows), dim))
        job.reporter.end_phase()
        record = _solve_heads(job, heads, file, rows, keep, state, ks, sized, compare)
    finally:
        path.unlink(missing_ok=True)  # written for this step only
    return {**record, "features": "disk"}


def _frozen_schedule(job: Job, n: int, resumed: bool) -> tuple[bool, set[int]]:
    """Whether the first labels come from the features' kNN graph (the recipe asks for it and ``n`` is in the
    graph's range), and the epochs whose end has a label step."""
    config = job.config
    schedule = set(label_schedule(config.epochs, config.label_steps, config.label_spacing))
    graph = config.start == "graph" and not config.start_from and GRAPH_MIN <= n <= GRAPH_LIMIT
    if graph or config.start_from:  # the graph start takes the place of the label step at epoch 0
        schedule.discard(0)
    elif config.start == "graph" and not config.start_from and not resumed:
        job.log({"type": "start", "epoch": 0, "graph": False,
                 "why": f"{n:,} samples are outside the graph start's range of {GRAPH_MIN:,}-{GRAPH_LIMIT:,}: "
                        "the first labels come from the untrained heads"})
    return graph, schedule
