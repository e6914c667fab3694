"""``labelkit report``: see the clusters."""

from __future__ import annotations

import click


@click.command(short_help="Offline HTML report: cluster image grids and plots.")
@click.argument("artefact", type=click.Path())
@click.option("--data", default=None, metavar="SPEC", help="The images the artefact labels [the data it records].")
@click.option("--truth", default=None, metavar="SPEC", help="Ground truth, if not the data's own classes.")
@click.option("--run", default=None, type=click.Path(file_okay=False),
              help="A generate/transfer run: training curves [the run directory the artefact is in].")
@click.option("--head", type=int, default=0, show_default=True, help="Head to show.")
@click.option("--per-cluster", type=int, default=16, show_default=True, help="Images per cluster grid.")
@click.option("--show", "shown", type=int, default=24, show_default=True,
              help="How many clusters to show (half the purest, half at random); not K, which the artefact fixes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random selections.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Directory for index.html and the PNGs [ARTEFACT-report beside the artefact].")
def report(artefact, data, truth, run, head, per_cluster, shown, seed, out) -> None:
    """Write an offline HTML page of cluster image grids, histograms and training curves for ARTEFACT (a label
    artefact or a run directory).

    Example: labelkit report runs/digits
    """
    from labelkit.report import build_report

    result = build_report(artefact, data, out, truth=truth, run=run, head=head, per_cluster=per_cluster,
                          clusters=shown, seed=seed)
    if result.warning:
        click.echo(f"warning: {result.warning}", err=True)
    if result.missing:
        click.echo(f"{len(result.missing)} selected image(s) could not be read and were replaced, "
                   f"e.g. {result.missing[0]}")
    click.echo(f"wrote {result.index} ({len(result.figures)} figures)")


COMMANDS = [report]
