"""``labelkit metrics``: clustering metrics of an artefact against ground truth or another artefact."""

from __future__ import annotations

import json

import click

_JSON_KEYS = ("head", "k", "nmi", "ami", "ari", "accuracy", "purity", "homogeneity", "completeness",
              "entropy_mean", "entropy_median", "size_min", "size_max", "empty", "size_entropy", "size_entropy_max",
              "clusters_used", "classes")


def _fmt(value, digits=4):
    return "-" if value is None else f"{value:.{digits}f}"


@click.command(short_help="Clustering metrics against ground truth or another artefact.")
@click.argument("artefact", type=click.Path())
@click.option("--truth", default=None, metavar="SPEC",
              help="Ground truth: a data spec (class folders, shard cls, npz labels, builtin:NAME) or a "
                   "sample_id,label Parquet/CSV file.")
@click.option("--against", default=None, type=click.Path(),
              help="Another artefact (label stability between label steps or runs).")
@click.option("--head", "heads", default="all", show_default=True, help="Head index, list (0,3) or all.")
@click.option("--average", type=click.Choice(["arithmetic", "geometric", "min", "max"]), default="arithmetic",
              show_default=True, help="Mean of the two entropies that normalises NMI and AMI.")
@click.option("--min-coverage", type=click.FloatRange(0, 1), default=0.99, show_default=True,
              help="Fail when fewer of the artefact's samples than this share have a reference label.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write cluster-size and per-cluster-entropy histograms to this PNG.")
def metrics(artefact, truth, against, heads, average, min_coverage, as_json, plot) -> None:
    """NMI, AMI, ARI, accuracy, purity, per-cluster entropy and cluster sizes, per head.

    Example: labelkit metrics runs/sela/labels.parquet --truth builtin:digits --plot metrics.png
    """
    from labelkit.artefact import read_artefact
    from labelkit.scoring import score_artefact

    art = read_artefact(artefact)
    result = score_artefact(art, truth=truth, against=against, heads=heads, min_coverage=min_coverage, average=average)
    if plot:
        from labelkit.plots import metrics_figure

        metrics_figure([art.cluster_sizes(h["head"]) for h in result["heads"]], result, plot)
    if as_json:
        out = {k: v for k, v in result.items() if k != "heads"}
        out["heads"] = [{k: h.get(k) for k in _JSON_KEYS} for h in result["heads"]]
        click.echo(json.dumps(out, indent=2))
        return
    reference = f"truth {truth}" if truth else f"artefact {against}"
    click.echo(f"{artefact} vs {reference}: {result['matched']:,} of {result['n']:,} samples matched "
               f"({result['coverage']:.1%})")
    click.echo(f"{'head':>4} {'K':>6} {'NMI':>7} {'AMI':>7} {'ARI':>7} {'acc':>7} {'purity':>7} "
               f"{'H/clust':>7} {'sizes min..max':>15} {'empty':>6}")
    for h in result["heads"]:
        click.echo(f"{h['head']:>4} {h['k']:>6} {_fmt(h['nmi'])} {_fmt(h['ami'])} {_fmt(h['ari'])} "
                   f"{_fmt(h['accuracy']):>7} {_fmt(h['purity'])} {_fmt(h['entropy_mean'], 3):>7} "
                   f"{str(h['size_min']) + '..' + str(h['size_max']):>15} {h['empty']:>6}")
    if plot:
        click.echo(f"wrote {plot}")


COMMANDS = [metrics]
