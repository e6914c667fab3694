"""``labelkit generate``: SeLa self-labelling."""

from __future__ import annotations

import click


def _clusters(ctx, param, value):
    if value is None:
        return None
    try:
        ks = tuple(int(k) for k in value.split(","))
    except ValueError:
        raise click.BadParameter("give K, or one K per head separated by commas (3000 or 10,10,30)") from None
    return ks


@click.command(short_help="Self-label a data set with SeLa (artefact + checkpoint).")
@click.option("--data", default=None, metavar="SPEC", help="Folder, shards, .npz or builtin:NAME [builtin:digits].")
@click.option("--arch", default=None, help="Any timm model name, or alexnet / alexnet_small [alexnet; digits: labelkit_cnn].")
@click.option("--clusters", callback=_clusters, default=None, metavar="K[,K…]", help="Clusters per head [3000].")
@click.option("--heads", type=int, default=None, help="Number of heads T [10].")
@click.option("--epochs", type=int, default=None, help="Training epochs [400].")
@click.option("--label-steps", type=int, default=None, help="Label optimisations, spread as (i/M)^2 of training [80].")
@click.option("--lam", type=float, default=None, help="Sinkhorn lambda [25].")
@click.option("--batch-size", type=int, default=None, help="Batch size [256].")
@click.option("--lr", type=float, default=None, help="Learning rate [0.05].")
@click.option("--lr-schedule", type=click.Choice(["step", "cosine", "constant"]), default=None,
              help="step: the paper's /10 drops scaled to the run [step].")
@click.option("--head-temperature", type=float, default=None,
              help="Cosine heads on L2-normalised features with this temperature (digits: 0.2) [off: linear heads].")
@click.option("--image-size", type=int, default=None, help="Input size in pixels [224].")
@click.option("--augment", type=click.Choice(["paper", "digits", "none"]), default=None, help="Training augmentation [paper].")
@click.option("--label-augment/--no-label-augment", default=None, help="Augment the label pass too [off].")
@click.option("--label-views", type=int, default=None,
              help="Average the features of this many views in the label pass (1 plain + augmented) [1].")
@click.option("--exact-balance/--argmax", default=None,
              help="Round the transport plan so every cluster holds floor/ceil(N/K) samples, or take the "
                   "paper's plain argmax of Q [exact-balance].")
@click.option("--workers", type=int, default=None, help="DataLoader worker processes [4].")
@click.option("--device", default=None, help="auto, cpu or cuda[:N] [auto].")
@click.option("--seed", type=int, default=None, help="Random seed [0].")
@click.option("--init", default=None, type=click.Path(dir_okay=False), help="Local backbone weights to start from.")
@click.option("--strict", is_flag=True, default=None, help="Fail on the first undecodable sample instead of skipping it.")
@click.option("--sync-bn", is_flag=True, default=None, help="Under torchrun: SyncBatchNorm over the global batch.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Run directory [runs/sela; digits: runs/digits].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="JSON or TOML file of these options; command-line options win.")
@click.option("--quiet", is_flag=True, help="No progress bars or epoch lines.")
def generate(resume, config_file, quiet, **options) -> None:
    """Self-label a data set with SeLa and write a label artefact and a checkpoint.

    With no options it runs the digits recipe on builtin:digits (about 2 minutes on 2 CPU cores) and prints
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
    from labelkit.config import resolve_config
    from labelkit.sela import run_sela

    from ._progress import BarReporter

    import os

    config = resolve_config(options, config_file)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone reports
        run_sela(config, resume=resume, reporter=BarReporter(quiet=True))
        return
    click.echo(f"labelkit generate: {config.data} with {config.arch}, heads {list(config.head_clusters())}, "
               f"{config.epochs} epochs, {config.label_steps} label steps -> {config.out}", err=True)
    run = run_sela(config, resume=resume, reporter=BarReporter(quiet))
    click.echo(f"wrote {run.artefact} ({run.labels.num_samples:,} samples, {run.labels.num_heads} heads) "
               f"in {run.seconds:.0f} s")
    if run.skipped:
        click.echo(f"skipped {len(run.skipped)} undecodable sample(s), e.g. {run.skipped[0]['sample_id']}")
    if run.metrics:
        for m in run.metrics:
            acc = f"  accuracy {m['accuracy']:.3f}" if m["accuracy"] is not None else ""
            click.echo(f"head {m['head']} (K={m['k']}): NMI {m['nmi']:.3f}  ARI {m['ari']:.3f}  purity {m['purity']:.3f}{acc}")


COMMANDS = [generate]
