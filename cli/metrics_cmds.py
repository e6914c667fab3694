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
@click.option("--per-cluster", is_flag=True,
              help="Also a table of every cluster: name, size, majority reference label, purity, entropy.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write cluster-size and per-cluster-entropy histograms to this PNG.")
def metrics(artefact, truth, against, heads, average, min_coverage, as_json, per_cluster, plot) -> None:
    """NMI, AMI, ARI, accuracy, purity, per-cluster entropy and cluster sizes, per head.

    With neither --truth nor --against: label-free quality per head (agreement with the other heads of its K,
    stability, linear-probe generalisation, size balance) and, when heads differ in K, the K to keep.

    \b
    Example: labelkit metrics runs/sela/labels.parquet --truth builtin:digits --plot metrics.png
    Example: labelkit metrics runs/sela/labels.parquet
    """
    from labelkit.artefact import read_artefact
    from labelkit.quality import label_free, score_artefact

    if truth is None and against is None:
        _label_free(artefact, label_free(read_artefact(artefact), heads), as_json)
        return
    # the library reads two artefact files side by side, a batch of rows at a time, where it can
    result = score_artefact(artefact, truth=truth, against=against, heads=heads, min_coverage=min_coverage,
                            average=average, per_cluster=per_cluster)
    if plot:
        from labelkit.report import metrics_figure

        art = read_artefact(artefact)
        metrics_figure([art.cluster_sizes(h["head"]) for h in result["heads"]], result, plot)
    if as_json:
        out = {k: v for k, v in result.items() if k != "heads"}
        out["heads"] = [{k: h.get(k) for k in _JSON_KEYS + (("clusters",) if per_cluster else ())}
                        for h in result["heads"]]
        click.echo(json.dumps(out, indent=2))
        return
    from labelkit._util.remote import redact

    reference = f"truth {redact(truth)}" if truth else f"artefact {redact(against)}"
    click.echo(f"{redact(artefact)} vs {reference}: {result['matched']:,} of {result['n']:,} samples matched "
               f"({result['coverage']:.1%})")
    click.echo(f"{'head':>4} {'K':>6} {'NMI':>7} {'AMI':>7} {'ARI':>7} {'acc':>7} {'purity':>7} "
               f"{'H/clust':>7} {'sizes min..max':>15} {'empty':>6}")
    for h in result["heads"]:
        click.echo(f"{h['head']:>4} {h['k']:>6} {_fmt(h['nmi'])} {_fmt(h['ami'])} {_fmt(h['ari'])} "
                   f"{_fmt(h['accuracy']):>7} {_fmt(h['purity'])} {_fmt(h['entropy_mean'], 3):>7} "
                   f"{str(h['size_min']) + '..' + str(h['size_max']):>15} {h['empty']:>6}")
    for h in result["heads"] if per_cluster else ():
        click.echo(f"head {h['head']}: {'cluster':>7} {'name':<20} {'size':>8} {'majority':>9} {'purity':>7} "
                   f"{'entropy':>7}")
        for row in h["clusters"]:
            cells = [_fmt(row[key], 3) for key in ("purity", "entropy")]
            click.echo(f"        {row['cluster']:>7} {(row['name'] or '-')[:20]:<20} {row['size']:>8,} "
                       f"{'-' if row['majority'] is None else row['majority']:>9} {cells[0]:>7} {cells[1]:>7}")
    if plot:
        click.echo(f"wrote {plot}")


def _label_free(path: str, result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from labelkit._util.remote import redact

    click.echo(f"{redact(path)}: label-free quality of {result['n']:,} samples (no ground truth)")
    click.echo(f"{'head':>4} {'K':>6} {'k-means':>8} {'heads':>8} {'stability':>9} {'probe acc':>9} {'balance':>8}")
    for h in result["heads"]:
        click.echo(f"{h['head']:>4} {h['k']:>6} {_fmt(h['agreement_kmeans'], 3):>8} {_fmt(h['agreement_heads'], 3):>8} "
                   f"{_fmt(h['stability'], 3):>9} {_fmt(h['generalisation'], 3):>9} {_fmt(h['balance'], 3):>8}")
    which = result["recommended_k"]
    if which:
        click.echo(f"recommended K: {which['k']} (its labels agree most with an independent clustering: AMI "
                   f"{next(r['agreement'] for r in which['table'] if r['k'] == which['k']):.3f})")
    click.echo("k-means: AMI with k-means of K clusters on the run's features (as the run recorded it); heads: mean "
               "AMI with the other heads of that K; stability: NMI with the previous label step; probe acc: "
               "cross-validated linear probe; balance: size entropy / log K")


@click.command(short_help="Consensus labels of an artefact's heads (aligned, then voted).")
@click.argument("artefact", type=click.Path())
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Artefact to write (.parquet) [ARTEFACT-consensus.parquet beside the artefact].")
@click.option("--k", "k", type=int, default=None, help="K of the consensus [that of the reference head, else head 0].")
@click.option("--reference", type=int, default=None,
              help="Head the others are aligned to [the head of that K agreeing most with the others].")
@click.option("--head", "heads", default="all", show_default=True, help="Heads that vote: a list (0,1,3) or all.")
def consensus(artefact, out, k, reference, heads) -> None:
    """Align the heads of an artefact (Hungarian matching for the same K, contingency for others) and vote.

    The result has one head and a score column (each label's confidence: the mean over the voting heads of
    their probability of their label where they agree with it, 0 where not; without head scores, the share of
    heads that agree); its parent
    is ARTEFACT.

    Example: labelkit consensus runs/digits        # writes runs/digits/labels-consensus.parquet
    """
    from labelkit.artefact import output_beside, read_artefact
    from labelkit.quality import consensus_artefact
    from labelkit.quality import parse_heads

    art = read_artefact(artefact)
    voting = None if heads == "all" else parse_heads(heads, art.num_heads)
    result, info = consensus_artefact(art, k=k, reference=reference, heads=voting)
    out = out or output_beside(artefact, "-consensus.parquet")
    result.write(out)
    click.echo(f"wrote {out}: consensus of heads {info.heads} (K={info.k}, reference head {info.reference}); "
               f"{info.scores.mean():.1%} of votes agree with it; NMI of each head with it: "
               + ", ".join(f"{a:.3f}" for a in info.agreement))


COMMANDS = [metrics, consensus]
