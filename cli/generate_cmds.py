"""``labelkit generate``: SeLa self-labelling."""

from __future__ import annotations

import os

import click

from labelkit.data import AUGMENTATIONS
from labelkit.training import (FROZEN_RECIPE, LABEL_SPACINGS, LR_SCHEDULES, PRECISIONS, RECIPE_NAMES, RECIPES,
                               STANDARDIZE, STARTS, TABLE_RECIPE, WHITEN, SelaConfig)

from ._options import default, weights_options

# What the auto recipe (the default for images without a recipe of their own) decides each option from; the
# plan printed before a run says what it chose and why.
_AUTO = {
    "arch": "from the images' size and the device",
    "clusters": "one head at each of 10, 30, 100 that the data can fill",
    "heads": "one per K, or 3 of a given K",
    "epochs": "what fits --budget, at most 60",
    "label_steps": "one every 5 epochs",
    "settle": "0.97",
    "vote": "10 for small images that the graph start takes",
    "batch_size": "from the device",
    "image_size": "from the images' size",
    "augment": "from the images (grey or colour, small or photos)",
    "start": "graph for 100-100,000 samples",
    "label_spacing": "even",
    "lr_schedule": "cosine",
    "workers": "from the images and the device",
    "out": "runs/<the data's name>",
}
_RECIPES = (("tables", {**FROZEN_RECIPE, **TABLE_RECIPE}), ("builtin:digits", RECIPES["builtin:digits"]))


def _d(name: str) -> str:
    return default(SelaConfig, name, _RECIPES, _AUTO.get(name))


def _clusters(ctx, param, value):
    if value is None:
        return None
    try:
        ks = tuple(int(k) for k in value.split(","))
    except ValueError:
        raise click.BadParameter("give K, or one K per head separated by commas (3000 or 10,10,30)") from None
    return ks


@click.command(short_help="Self-label a data set with SeLa (artefact + checkpoint).")
@click.option("--recipe", type=click.Choice(RECIPE_NAMES), default=None,
              help="Defaults to build on: auto (chosen from the data and this machine), paper (the paper's ImageNet "
                   "setting) or digits [the data's own recipe; auto for data without one].")
@click.option("--budget", default=None, metavar="DURATION",
              help="Finish within this time (15m, 2h, 1h30m): a probe on the real data sets the epochs [15m on a CPU "
                   "with the auto recipe; none otherwise].")
@click.option("--dry-run", is_flag=True, help="Print the plan (recipe, reasons, time, memory, disk) and exit.")
@click.option("--data", default=None, metavar="SPEC", help=f"Folder, shards, .npz, embedding table (.npy/.parquet/LAION folder) or builtin:NAME {_d('data')}.")
@click.option("--arch", default=None, help=f"Any timm model name, or alexnet / alexnet_small {_d('arch')}.")
@click.option("--clusters", callback=_clusters, default=None, metavar="K[,K…]", help=f"Clusters per head {_d('clusters')}.")
@click.option("--heads", type=int, default=None, help=f"Number of heads T {_d('heads')}.")
@click.option("--epochs", type=int, default=None, help=f"Training epochs {_d('epochs')}.")
@click.option("--label-steps", type=int, default=None, help=f"Label optimisations, spread as (i/M)^2 of training {_d('label_steps')}.")
@click.option("--lam", type=float, default=None, help=f"Sinkhorn lambda {_d('lam')}.")
@click.option("--batch-size", type=int, default=None, help=f"Global batch size {_d('batch_size')}.")
@click.option("--lr", type=float, default=None, help=f"Learning rate {_d('lr')}.")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=None,
              help=f"step: the paper's /10 drops scaled to the run {_d('lr_schedule')}.")
@click.option("--head-temperature", type=float, default=None,
              help=f"Cosine heads on L2-normalised features with this temperature; off: linear heads {_d('head_temperature')}.")
@click.option("--image-size", type=int, default=None, help=f"Input size in pixels {_d('image_size')}.")
@click.option("--augment", type=click.Choice(AUGMENTATIONS), default=None,
              help=f"Training augmentation; heavy adds equalize/autocontrast/sharpness {_d('augment')}.")
@click.option("--start", type=click.Choice(STARTS), default=None,
              help=f"First labels: random, or graph (spectral clusters of the images' kNN graph) {_d('start')}.")
@click.option("--start-from", default=None, type=click.Path(), metavar="ARTEFACT",
              help="First labels from an earlier artefact of (some of) these samples, in place of --start: a rerun "
                   "on grown data keeps its clusters; samples it lacks start at random. A reviewed version "
                   "(labelkit review) also pins its accepted and moved samples, keeps its cluster sizes and leaves "
                   "removed and rejected samples out.")
@click.option("--label-spacing", type=click.Choice(LABEL_SPACINGS), default=None,
              help=f"Label steps at (i/M)^2 of training (the paper's) or evenly {_d('label_spacing')}.")
@click.option("--settle", type=float, default=None, metavar="NMI",
              help="Stop training once a label step's labels agree with the previous step's at this NMI (mean over "
                   f"heads, from the third label step on); 0 trains every epoch {_d('settle')}.")
@click.option("--vote", type=int, default=None, metavar="N",
              help="After the last epoch, move each label to the one held most by the sample and its N nearest "
                   "neighbours in the trained network's features (cluster sizes then follow the data; reviewed "
                   f"labels stay); 0: the last label step's balanced labels {_d('vote')}.")
@click.option("--label-augment/--no-label-augment", default=None, help=f"Augment the label pass too {_d('label_augment')}.")
@click.option("--label-views", type=int, default=None,
              help=f"Average the features of this many views in the label pass (1 plain + augmented) {_d('label_views')}.")
@click.option("--exact-balance/--argmax", default=None,
              help="Round the transport plan so every cluster holds floor/ceil(N/K) samples, or take the "
                   "paper's plain argmax of Q [exact-balance]; works under torchrun too.")
@click.option("--prior", default=None, metavar="PRIOR",
              help="Cluster sizes each label step solves for: uniform (the paper's equal sizes), powerlaw:ALPHA "
                   "(sizes ~ rank^-ALPHA, largest to the most-predicted cluster) or sizes:S1,S2,… (relative, "
                   "one per cluster) [uniform].")
@click.option("--balance", type=float, default=None, metavar="TAU",
              help="Relax the sizes: a KL penalty TAU instead of a hard constraint, so sizes follow the data; "
                   "smaller is looser (0.1 loose, 10 nearly equal); every cluster keeps 20% of its prior size "
                   "[off: sizes held exactly].")
@click.option("--label-memory", default=None, metavar="SIZE",
              help="Memory the label step's N x K kernel may take, e.g. 4GB; beyond it the kernel goes to scratch "
                   "disk in the run directory (CPU) or is recomputed every iteration (GPU): same labels, slower "
                   "[half of what is free].")
@click.option("--consensus/--no-consensus", default=None,
              help="Append the heads' consensus (aligned by Hungarian matching, then voted) as one more head "
                   f"{_d('consensus')}.")
@click.option("--workers", type=int, default=None, help=f"DataLoader worker processes {_d('workers')}.")
@click.option("--device", default=None, help=f"auto, cpu or cuda[:N] {_d('device')}.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Arithmetic of the network's forward passes: auto is bfloat16 on CUDA, float32 on the CPU; "
                   f"bfloat16 on a CPU with AVX-512 BF16 or AMX trains about 1.5x faster {_d('precision')}.")
@click.option("--seed", type=int, default=None, help=f"Random seed {_d('seed')}.")
@weights_options
@click.option("--freeze", is_flag=True, default=None,
              help="Fix the backbone: cache its features once and train the heads alone (implied for embedding tables).")
@click.option("--views", type=int, default=None, help=f"With --freeze: cached views per image, 1 plain + augmented {_d('views')}.")
@click.option("--pca", type=int, default=None, help="With fixed features: PCA to this width, 0 keeps all [98% of the variance, at most 128].")
@click.option("--whiten", type=click.Choice(WHITEN), default=None,
              help="With fixed features, for the graph start and the heads: yes scales each kept direction to unit "
                   "variance, no keeps the directions' variances, both uses the two at once (README, suite) "
                   "[a table's vectors: both; a backbone's features: yes].")
@click.option("--standardize", type=click.Choice(STANDARDIZE), default=None,
              help="With fixed features: scale each column to unit variance before the PCA; auto does so where "
                   "the widest column's spread is over 100x the median column's (measurements in different "
                   "units) [auto].")
@click.option("--head-hidden", type=int, default=None,
              help="With fixed features: a hidden layer of this width under the heads, 0 for none "
                   "[tables: 512, fewer on a budget; off otherwise].")
@click.option("--neighbours", type=int, default=None,
              help=f"With fixed features: train each sample towards the labels of its k nearest neighbours too {_d('neighbours')}.")
@click.option("--train-rows", type=int, default=None, metavar="N",
              help="With fixed features: the heads train on a seeded random sample of N rows, and the last label "
                   "step labels every row [all rows; on a large table, a sample where the budget cannot train all].")
@click.option("--keep-better/--no-keep-better", default=None,
              help="With fixed features and --neighbours: a head whose new labels agree less with the features' "
                   f"nearest neighbours than its old ones keeps the old {_d('keep_better')}.")
@click.option("--feature-cache", default=None, type=click.Path(file_okay=False),
              help="Folder of cached frozen features, shared between runs [OUT/features].")
@click.option("--skip-bad", is_flag=True, default=None, help="Embedding tables: leave out NaN/inf vectors (recorded) instead of failing.")
@click.option("--strict", is_flag=True, default=None, help="Fail on the first undecodable sample instead of skipping it.")
@click.option("--sync-bn", is_flag=True, default=None, help="Under torchrun: SyncBatchNorm over the global batch.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help=f"Run directory {_d('out')}.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="JSON or TOML file of these options; command-line options win.")
@click.option("--align-to", default=None, type=click.Path(), metavar="ARTEFACT",
              help="At the end, also write OUT/labels-aligned.parquet: the labels with the ids (and names) of this "
                   "earlier artefact's clusters (labelkit align).")
@click.option("--quiet", is_flag=True, help="No progress bars or epoch lines.")
def generate(recipe, budget, dry_run, resume, config_file, quiet, align_to, **options) -> None:
    """Self-label a data set with SeLa and write a label artefact and a checkpoint.

    With no options it runs the digits recipe on builtin:digits (under a minute on 2 CPU cores) and prints
    the NMI against the true digits.

    \b
    Example: labelkit generate
    Example: labelkit generate --data /data/imagenet/train --arch resnet50 --clusters 3000 --heads 10 \\
                 --epochs 400 --image-size 224 --out runs/r50
    Multi-GPU (DDP; --batch-size and --lr are for the global batch, split over the processes):
      torchrun --nproc_per_node=8 -m labelkit generate --data shards/train-{000000..001023}.tar …
    SLURM, one task per node:
      srun torchrun --nnodes=$SLURM_NNODES --nproc_per_node=8 --rdzv-backend=c10d \\
           --rdzv-endpoint=$MASTER_ADDR:29500 -m labelkit generate …
    """
    from labelkit.training import make_plan
    from labelkit.training import run_sela

    from ._progress import BarReporter, plural
    from ._resume import interrupted

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone reports
    plan = make_plan(options, config_file, recipe=recipe, budget=budget, resume=resume,
                     probe=True if dry_run else None)  # otherwise only where a budget sets the epochs
    config = plan.config
    if main_rank and (dry_run or not quiet):
        for line in plan.lines():
            click.echo(line, err=not dry_run)
    if dry_run:
        return
    if align_to and main_rank:
        from labelkit.artefact import read_header

        read_header(align_to)  # a wrong path fails now, not after the run
    with interrupted("generate", config.out):
        run = run_sela(config, resume=resume, reporter=BarReporter(quiet) if main_rank else None,
                       plan=None if resume else plan.record())
    if not main_rank:
        return
    from labelkit.artefact import read_header

    written = read_header(run.artefact)  # the footer: the rows themselves stay on disk
    click.echo(f"wrote {run.artefact} ({plural(written.num_rows, 'sample')}, "
               f"{plural(len(written.heads), 'head')}) in {run.seconds:.0f} s")
    if run.skipped:
        click.echo(f"skipped {len(run.skipped)} undecodable sample(s), e.g. {run.skipped[0]['sample_id']}")
    solver = run.solver or {}
    if solver.get("unconverged"):
        click.echo(f"{solver['unconverged']} of {plural(solver['solves'], 'Sinkhorn solve')} stopped at the iteration "
                   f"cap short of the tolerance {solver['tolerance']:g} (worst marginal error "
                   f"{solver['worst_error']:.1e}): their labels are usable, their clusters less exactly balanced")
    if run.metrics:
        first = run.consensus["head"] if run.consensus else None
        order = ([first] if first is not None else []) + [m["head"] for m in run.metrics if m["head"] != first]
        for h in order:
            m = run.metrics[h]
            acc = f"  accuracy {m['accuracy']:.3f}" if m["accuracy"] is not None else ""
            name = f"consensus, head {h}" if h == first else f"head {h}"
            click.echo(f"{name} (K={m['k']}): NMI {m['nmi']:.3f}  ARI {m['ari']:.3f}  purity {m['purity']:.3f}{acc}")
    elif run.consensus:
        c = run.consensus
        click.echo(f"consensus, head {c['head']} (K={c['k']}): heads agree with it on {c['mean_score']:.1%} of votes")
    _neighbour_check(run.quality)
    if align_to:
        _align_run(run.artefact, align_to)
    which = (run.quality or {}).get("recommended_k")
    if which:
        click.echo("which K (no ground truth used): k-means = AMI with k-means of K clusters on the label step's "
                   "features, heads = AMI between heads of that K")
        click.echo(f"  {'K':>6} {'k-means':>9} {'heads':>9} {'stability':>9} {'probe acc':>9} {'balance':>9}")
        for row in which["table"]:
            cells = [row[name] for name in ("agreement_kmeans", "agreement_heads", "stability", "generalisation", "balance")]
            text = " ".join("        -" if v is None else f"{v:>9.3f}" for v in cells)
            click.echo(f"  {row['k']:>6} {text}{'   <- recommended' if row['k'] == which['k'] else ''}")


def _neighbour_check(quality: dict | None) -> None:
    """A table run's label-free check of every head against k-means on the same vectors."""
    from ._progress import plural

    kmeans = (quality or {}).get("kmeans_neighbour_agreement")
    if not kmeans:
        return
    click.echo("neighbour agreement (no ground truth used; 1: every sample's nearest neighbours share its label, "
               "0: no more than chance)")
    below = []
    for row in quality["heads"]:
        epoch, baseline = row["labels_from_epoch"], kmeans[str(row["k"])]
        origin = "the start" if epoch == 0 else f"the label step after epoch {epoch}"
        if row["neighbour_agreement"] < baseline:
            below.append(row["head"])
        click.echo(f"  head {row['head']} (K={row['k']}): {row['neighbour_agreement']:.3f}, labels from {origin}; "
                   f"k-means on the same vectors {baseline:.3f}{'   <- below k-means' if row['head'] in below else ''}")
    if below:
        click.echo(f"{plural(len(below), 'head')} ended below k-means on the same vectors by this measure: "
                   "k-means's labels may serve these data better")


def _align_run(labels, old) -> None:
    from labelkit.artefact import read_artefact
    from labelkit.quality import align_artefact

    aligned, transitions = align_artefact(read_artefact(labels), read_artefact(old))
    out = os.path.join(os.path.dirname(labels), "labels-aligned.parquet")
    aligned.write(out)
    for t in transitions:
        counts = ", ".join(f"{n} {kind}" for kind, n in t.counts().items())
        click.echo(f"aligned head {t.head} to {old}: ids held on {t.held:.1%} of {t.common:,} common samples "
                   f"({t.held_before:.1%} before); {counts}")
    click.echo(f"wrote {out} (labelkit diff {old} {out} lists the changes)")


COMMANDS = [generate]
