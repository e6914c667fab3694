"""``labelkit predict``: label new samples with a trained run."""

from __future__ import annotations

import os

import click


@click.command(short_help="Label new images (or vectors) with a trained generate/transfer run.")
@click.argument("run_dir", metavar="RUN", required=False, type=click.Path(file_okay=False))
@click.option("--model", "model_dir", default=None, type=click.Path(file_okay=False), hidden=True,
              help="Deprecated: give the run directory as the first argument.")
@click.option("--data", required=True, metavar="SPEC", help="Images (folder, shards, .npz) or vectors to label.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="The artefact to write (.parquet) [RUN/predicted-<the data's name>.parquet].")
@click.option("--names", default=None, type=click.Path(),
              help="A named or aligned version of RUN's labels (labelkit name / align): predictions take its "
                   "cluster ids and names [the newest RUN/labels-*named.parquet or labels-aligned.parquet].")
@click.option("--novelty", type=click.Choice(["knn", "prototype"]), default=None, is_flag=False, flag_value="knn",
              help="Also score how far each sample lies from the run's training data and flag the novel ones "
                   "(\"none of these\"): knn (default) = 1 - mean cosine similarity to the 10 nearest training "
                   "samples; prototype = to the nearest cluster mean. Calibrated once on the run's data.")
@click.option("--novelty-fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True, help="Share of samples like the training data that --novelty flags.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Samples per forward pass.")
@click.option("--workers", type=int, default=None, help="DataLoader worker processes [CPUs, at most 8].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def predict(run_dir, model_dir, data, out, names, novelty, novelty_fpr, batch_size, workers, device, quiet) -> None:
    """Label every sample of --data with each head of RUN (a finished generate or transfer run directory): its
    argmax and softmax score.

    The artefact's parent is the run's own artefact. Under torchrun each process labels its share.

    \b
    Example: labelkit predict runs/digits --data new-images/
    """
    from labelkit.training import default_workers
    from labelkit.training import run_predict

    from ._progress import BarReporter, plural

    from ._options import deprecated_alias

    model_dir = deprecated_alias("predict")(run_dir, model_dir, "--model", "run")
    if model_dir is None:
        raise click.UsageError("give the run directory whose model labels the data: labelkit predict RUN --data SPEC")
    if out is None:
        stem = os.path.basename(os.path.normpath(data)).split(".")[0] or "data"
        out = os.path.join(model_dir, f"predicted-{stem.replace(':', '-')}.parquet")
    main_rank = os.environ.get("RANK", "0") == "0"
    run = run_predict(model_dir, data, out, batch_size=batch_size,
                      workers=default_workers() if workers is None else workers, device=device,
                      reporter=BarReporter(quiet) if main_rank else None, names=names,
                      novelty=novelty, novelty_fpr=novelty_fpr)
    if not main_rank:
        return
    artefact = run.artefact
    click.echo(f"wrote {out} ({plural(artefact.num_samples, 'sample')}, {plural(artefact.num_heads, 'head')}) "
               f"in {run.seconds:.0f} s")
    if artefact.metadata["method"].get("names"):
        named = [h for h in artefact.heads if h.names is not None]
        click.echo(f"ids and names of {artefact.metadata['method']['names'][:16]}… ({len(named)} named head(s); "
                   "columns name_H)")
    record = artefact.metadata["method"].get("novelty")
    if record:
        flagged = int(artefact.table.column("novel").to_numpy(zero_copy_only=False).sum())
        click.echo(f"novel: {flagged:,} of {artefact.num_samples:,} samples ({flagged / artefact.num_samples:.1%}) "
                   f"score past {record['threshold']:.4f}, the threshold that flags {record['fpr']:.0%} of samples like "
                   f"the training data ({record['method']}); columns novelty and novel")
    if run.skipped:
        click.echo(f"skipped {len(run.skipped)} unreadable sample(s), e.g. {run.skipped[0]['sample_id']}")


COMMANDS = [predict]
