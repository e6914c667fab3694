"""``labelkit transfer`` and ``labelkit eval``."""

from __future__ import annotations

import json

import click

from labelkit.data import AUGMENTATIONS
from labelkit.training import LR_SCHEDULES, TRANSFER_RECIPES, TransferConfig

from ._options import default, weights_options

_DIGITS = TRANSFER_RECIPES["builtin:digits"]


def _d(name: str) -> str:
    return default(TransferConfig, name, _DIGITS)


@click.command(short_help="Train any architecture from an artefact's labels.")
@click.option("--labels", default=None, type=click.Path(), help="The label artefact (or a run directory) to learn from.")
@click.option("--data", default=None, metavar="SPEC", help="The images the artefact labels (joined by sample id).")
@click.option("--arch", default=None, help=f"Any timm model name, or alexnet / alexnet_small {_d('arch')}.")
@click.option("--heads", default=None, help=f"Artefact heads to learn: all, or a list like 0,3 {_d('heads')}.")
@click.option("--epochs", type=int, default=None, help=f"Training epochs {_d('epochs')}.")
@click.option("--batch-size", type=int, default=None, help=f"Global batch size {_d('batch_size')}.")
@click.option("--lr", type=float, default=None, help=f"Learning rate {_d('lr')}.")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=None,
              help=f"step: /10 at 150, 300 and 350 of 400 parts of the run {_d('lr_schedule')}.")
@click.option("--image-size", type=int, default=None, help=f"Input size in pixels {_d('image_size')}.")
@click.option("--augment", type=click.Choice(AUGMENTATIONS), default=None,
              help=f"paper; heavy adds equalize/autocontrast/sharpness, which fixed labels allow {_d('augment')}.")
@click.option("--min-coverage", type=click.FloatRange(0, 1), default=None,
              help=f"Stop when fewer samples than this share join the labels by id {_d('min_coverage')}.")
@click.option("--workers", type=int, default=None, help=f"DataLoader worker processes {_d('workers')}.")
@click.option("--device", default=None, help=f"auto, cpu or cuda[:N] {_d('device')}.")
@click.option("--seed", type=int, default=None, help=f"Random seed {_d('seed')}.")
@weights_options
@click.option("--out", default=None, type=click.Path(file_okay=False), help=f"Run directory {_d('out')}.")
@click.option("--dry-run", is_flag=True, help="Print the plan (time, memory, disk, probed on this machine) and exit.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False), help="JSON or TOML options file.")
@click.option("--quiet", is_flag=True, help="No progress bars or epoch lines.")
def transfer(dry_run, resume, config_file, quiet, **options) -> None:
    """Train an architecture from scratch on an artefact's labels (label transfer, SeLa section 4.3).

    Writes model.safetensors, config.json, history.jsonl and labels.parquet: the trained model's own
    predictions, an artefact whose parent is the source artefact.

    \b
    Example: labelkit transfer --labels runs/digits/labels.parquet --data builtin:digits --arch alexnet
    Multi-GPU: torchrun --nproc_per_node=8 -m labelkit transfer --labels … --data … --arch alexnet
    """
    from labelkit.training import resolve_config
    from labelkit.training import run_transfer

    from ._progress import BarReporter
    from ._resume import interrupted

    import os

    config = resolve_config(options, config_file, cls=TransferConfig, recipes=TRANSFER_RECIPES, resume=resume)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone reports
    if main_rank and (dry_run or not quiet) and not resume:
        from labelkit.training import plan_transfer

        for line in plan_transfer(config).lines():
            click.echo(line, err=not dry_run)
    if dry_run:
        return
    with interrupted("transfer", config.out):
        run = run_transfer(config, resume=resume, reporter=BarReporter(quiet) if main_rank else None)
    if not main_rank:
        return
    click.echo(f"joined {run.matched:,} samples ({run.missing_labels:,} without a label, "
               f"{run.missing_samples:,} labels without a sample)")
    if run.join["undecodable"]:
        click.echo(f"{run.join['undecodable']:,} sample(s) could not be decoded when the labels were made and "
                   f"have none, e.g. {run.join['undecodable_examples'][0]}")
    if not run.fingerprint_match:
        click.echo("note: the data fingerprint differs from the artefact's (not the same file list)")
    click.echo(f"wrote {run.artefact} (parent {run.labels.metadata['parents'][0][:16]}…) in {run.seconds:.0f} s")


@click.command(name="eval", short_help="kNN or linear-probe accuracy of a trained backbone.")
@click.argument("protocol", type=click.Choice(["knn", "linear"]))
@click.option("--model", "run", default=None, type=click.Path(file_okay=False), help="A generate or transfer run directory.")
@click.option("--arch", default=None, help="Instead of --model: a bare timm arch (untrained unless --init).")
@click.option("--init", default=None, type=click.Path(dir_okay=False), help="Weights for --arch.")
@click.option("--pretrained", is_flag=True, help="With --arch: timm's own pretrained weights (from its local cache).")
@click.option("--data", required=True, metavar="SPEC", help="Training data with ground-truth classes.")
@click.option("--test", default=None, metavar="SPEC", help="Test data (ids disjoint from --data).")
@click.option("--split", type=float, default=0.2, show_default=True, help="Without --test: seeded stratified test share.")
@click.option("--k", type=int, default=50, show_default=True, help="kNN neighbours.")
@click.option("--temperature", type=float, default=0.1, show_default=True, help="kNN vote temperature.")
@click.option("--image-size", type=int, default=None, help="Input size [the run's; with --arch: 224].")
@click.option("--seed", type=int, default=0, show_default=True, help="Split and probe seed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_(protocol, run, arch, init, pretrained, data, test, split, k, temperature, image_size, seed, device, as_json) -> None:
    """Measure frozen features: weighted kNN (k=50, T=0.1) or a linear probe, top-1 and top-5.

    Example: labelkit eval knn --model runs/digits-transfer --data builtin:digits
    """
    from labelkit.training import EvalConfig, evaluate

    from ._progress import BarReporter

    import os

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone reports
    config = EvalConfig(protocol, data=data, model=run, arch=arch, init=init, pretrained=pretrained, test=test,
                        split=split, k=k, temperature=temperature, image_size=image_size, seed=seed, device=device)
    result = evaluate(config, reporter=BarReporter() if main_rank and not as_json else None)
    if not main_rank:
        return
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{protocol}: top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  "
                   f"(train {result['n_train']:,}, test {result['n_test']:,})")


COMMANDS = [transfer, eval_]
