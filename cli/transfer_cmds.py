"""``labelkit transfer`` and ``labelkit eval``."""

from __future__ import annotations

import json

import click

from labelkit.data import AUGMENTATIONS
from labelkit.training import LR_SCHEDULES, PRECISIONS, TRANSFER_RECIPE_NAMES, TRANSFER_RECIPES, TransferConfig

from ._options import default, deprecated_alias, weights_options

_RECIPES = (("builtin:digits", TRANSFER_RECIPES["builtin:digits"]),)
_SOURCE = "the run that made the labels"
# What the source recipe (the default for labels made by generate on images) takes each option from
_AUTO = {"image_size": _SOURCE, "augment": _SOURCE,
         "batch_size": _SOURCE, "lr": _SOURCE, "lr_schedule": _SOURCE, "workers": _SOURCE,
         "epochs": "what fits --budget, at most 30", "out": "beside the labels' run, as RUN-transfer"}


def _d(name: str) -> str:
    return default(TransferConfig, name, _RECIPES, _AUTO.get(name)).replace("[auto:", "[source:")


@click.command(short_help="Train any architecture from an artefact's labels.")
@click.argument("artefact", required=False, type=click.Path())
@click.option("--labels", default=None, type=click.Path(), hidden=True,
              help="Deprecated: give the artefact as the first argument.")
@click.option("--recipe", type=click.Choice(TRANSFER_RECIPE_NAMES), default=None,
              help="Defaults to build on: source (the input size and training of the run that made the labels), "
                   "paper (the paper's ImageNet setting) or digits [source for labels made by generate on images; "
                   "the data's own recipe where it has one; else paper].")
@click.option("--budget", default=None, metavar="DURATION",
              help="Finish within this time (15m, 2h, 1h30m): a probe on the real data sets the epochs [15m on a CPU "
                   "with the source recipe; none otherwise].")
@click.option("--data", default=None, metavar="SPEC", help="The images the artefact labels, joined by sample id [the data the artefact records].")
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
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=None, metavar="C",
              help="Train only on labels at least this confident (the artefact's primary score) [all labels].")
@click.option("--workers", type=int, default=None, help=f"DataLoader worker processes {_d('workers')}.")
@click.option("--device", default=None, help=f"auto, cpu or cuda[:N] {_d('device')}.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Arithmetic of the network's forward passes: auto is bfloat16 on CUDA, float32 on the CPU; "
                   f"bfloat16 on a CPU with AVX-512 BF16 or AMX trains about 1.5x faster {_d('precision')}.")
@click.option("--seed", type=int, default=None, help=f"Random seed {_d('seed')}.")
@weights_options
@click.option("--out", default=None, type=click.Path(file_okay=False), help=f"Run directory {_d('out')}.")
@click.option("--dry-run", is_flag=True, help="Print the plan (time, memory, disk, probed on this machine) and exit.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False), help="JSON or TOML options file.")
@click.option("--quiet", is_flag=True, help="No progress bars or epoch lines.")
def transfer(artefact, recipe, budget, dry_run, resume, config_file, quiet, **options) -> None:
    """Train an architecture from scratch on the labels of ARTEFACT (a label artefact or a run directory):
    label transfer, SeLa section 4.3.

    Writes model.safetensors, config.json, history.jsonl and labels.parquet: the trained model's own
    predictions, an artefact whose parent is the source artefact. Ends with how its labels keep the source's,
    and their scores against the data's classes where it has them.

    
    Example: labelkit transfer runs/digits --arch alexnet
    Multi-GPU: torchrun --nproc_per_node=8 -m labelkit transfer runs/r50 --data … --arch alexnet --epochs 90
    """
    from labelkit.training import plan_transfer, run_transfer

    from ._progress import BarReporter, plural
    from ._resume import interrupted

    import os

    options["labels"] = deprecated_alias("transfer")(artefact, options["labels"], "--labels", "artefact")
    if options["labels"] is None and not resume:
        raise click.UsageError("give the artefact (or run directory) whose labels to learn: labelkit transfer ARTEFACT")
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone reports
    plan = plan_transfer(options, config_file, recipe=recipe, budget=budget, resume=resume,
                         probe=main_rank and (dry_run or not quiet))  # and whenever the budget sets the epochs
    config = plan.config
    if main_rank and (dry_run or not quiet):
        for line in plan.lines():
            click.echo(line, err=not dry_run)
    if dry_run:
        return
    with interrupted("transfer", config.out):
        run = run_transfer(config, resume=resume, reporter=BarReporter(quiet) if main_rank else None,
                           plan=None if resume else plan.record())
    if not main_rank:
        return
    click.echo(f"joined {run.matched:,} samples ({run.missing_labels:,} without a label, "
               f"{run.missing_samples:,} labels without a sample)")
    if "confident" in run.join:
        click.echo(f"trained on the {run.join['confident']:,} samples whose labels are at least "
                   f"{options['min_confidence']:g} confident ({run.join['confident'] / run.matched:.1%})")
    if run.join["undecodable"]:
        click.echo(f"{run.join['undecodable']:,} sample(s) could not be decoded when the labels were made and "
                   f"have none, e.g. {run.join['undecodable_examples'][0]}")
    if not run.fingerprint_match:
        click.echo("note: the data fingerprint differs from the artefact's (not the same file list)")
    click.echo(f"wrote {run.artefact} ({plural(run.labels.num_samples, 'sample')}, parent "
               f"{run.labels.metadata['parents'][0][:16]}…) in {run.seconds:.0f} s")
    truth = {m["head"]: m for m in run.metrics or []}
    for row in run.against_source or []:
        line = (f"head {row['head']} (K={row['k']}, source head {row['source_head']}): keeps the source's label on "
                f"{row['same']:.1%} of samples (NMI {row['nmi']:.3f})")
        if row["head"] in truth:
            m = truth[row["head"]]
            line += f"; vs truth NMI {m['nmi']:.3f}  ARI {m['ari']:.3f}  purity {m['purity']:.3f}" \
                + (f"  accuracy {m['accuracy']:.3f}" if m["accuracy"] is not None else "")
        click.echo(line)


_PROTOCOLS = ("knn", "linear")


@click.command(name="eval", short_help="kNN or linear-probe accuracy of a trained backbone.")
@click.argument("arguments", nargs=-1, metavar="[RUN]")
@click.option("--protocol", type=click.Choice(_PROTOCOLS), default=None,
              help="knn: weighted kNN (k=50, T=0.1); linear: a linear probe [knn].")
@click.option("--model", "run", default=None, type=click.Path(file_okay=False), hidden=True,
              help="Deprecated: give the run directory as the first argument.")
@click.option("--arch", default=None, help="Instead of RUN: a bare timm arch (untrained unless --init).")
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
def eval_(arguments, protocol, run, arch, init, pretrained, data, test, split, k, temperature, image_size, seed,
          device, as_json) -> None:
    """Measure the frozen features of RUN (a generate or transfer run directory): weighted kNN (k=50, T=0.1) or a
    linear probe, top-1 and top-5.

    \b
    Example: labelkit eval runs/digits-transfer --data builtin:digits --protocol linear
    """
    from labelkit.training import EvalConfig, evaluate

    from ._progress import BarReporter

    import os

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone reports
    words = list(arguments)
    if words and words[0] in _PROTOCOLS and not os.path.isdir(words[0]):  # the old `eval knn --model RUN`
        if protocol is not None and protocol != words[0]:
            raise click.UsageError(f"give the protocol once: {words[0]} or --protocol {protocol}")
        protocol = words.pop(0)
        click.echo(f"warning: `eval {protocol}` is deprecated and goes in the next release: "
                   f"labelkit eval RUN --protocol {protocol}", err=True)
    if len(words) > 1:
        raise click.UsageError(f"one run directory, not {len(words)}: {' '.join(words)}")
    run = deprecated_alias("eval")(words[0] if words else None, run, "--model", "run")
    if run is None and arch is None:
        raise click.UsageError("give the run directory to measure (labelkit eval RUN --data SPEC), or --arch")
    protocol = protocol or "knn"
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
