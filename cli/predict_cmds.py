"""``labelkit predict``: label new samples with a trained run."""

from __future__ import annotations

import os

import click


@click.command(short_help="Label new images (or vectors) with a trained generate/transfer run.")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="A finished generate or transfer run directory.")
@click.option("--data", required=True, metavar="SPEC", help="Images (folder, shards, .npz) or vectors to label.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The artefact to write (.parquet).")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Samples per forward pass.")
@click.option("--workers", type=int, default=None, help="DataLoader worker processes [CPUs, at most 8].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def predict(model_dir, data, out, batch_size, workers, device, quiet) -> None:
    """Label every sample of --data with each head of the run in --model: its argmax and softmax score.

    The artefact's parent is the run's own artefact. Under torchrun each process labels its share.

    \b
    Example: labelkit predict --model runs/digits --data builtin:digits --out predicted.parquet
    """
    from labelkit.training import default_workers
    from labelkit.training import run_predict

    from ._progress import BarReporter, plural

    main_rank = os.environ.get("RANK", "0") == "0"
    run = run_predict(model_dir, data, out, batch_size=batch_size,
                      workers=default_workers() if workers is None else workers, device=device,
                      reporter=BarReporter(quiet) if main_rank else None)
    if not main_rank:
        return
    artefact = run.artefact
    click.echo(f"wrote {out} ({plural(artefact.num_samples, 'sample')}, {plural(artefact.num_heads, 'head')}) "
               f"in {run.seconds:.0f} s")
    if run.skipped:
        click.echo(f"skipped {len(run.skipped)} unreadable sample(s), e.g. {run.skipped[0]['sample_id']}")


COMMANDS = [predict]
