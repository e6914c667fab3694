"""Commands that inspect and share label artefacts: info, validate, export, import."""

from __future__ import annotations

import json

import click


def _print_summary(summary: dict) -> None:
    data, method = summary["data"], summary["method"]
    click.echo(f"artefact   {summary['artefact_id']}")
    click.echo(f"format     v{summary['format_version']}")
    click.echo(f"samples    {summary['num_samples']:,}")
    click.echo(f"data       {data['spec'] or '-'}  (fingerprint {data['fingerprint'][:16]}…, {data['count']:,} samples)")
    detail = ""
    if method.get("source"):
        detail = f"  from {method['source']} (sha256 {method['sha256'][:16]}…)"
    elif method.get("config"):
        config = method["config"]
        keys = [k for k in ("arch", "clusters", "heads", "epochs", "lam", "seed") if k in config]
        detail = "  " + " ".join(f"{k}={config[k]}" for k in keys)
    click.echo(f"method     {method['name']}{detail}")
    producer = summary["producer"]
    click.echo(
        "producer   " + " ".join(f"{name} {version}" for name, version in producer.items() if version)
    )
    click.echo(f"created    {summary['created_at']}")
    parents = summary["parents"]
    click.echo(f"parents    {', '.join(p[:16] + '…' for p in parents) if parents else '-'}")
    click.echo(f"heads      {summary['num_heads']}")
    click.echo(f"  {'head':<8}{'K':>7}{'min size':>10}{'max size':>10}{'mean':>10}{'empty':>7}")
    voted = (method.get("consensus") or {}).get("head")
    for h, head in enumerate(summary["heads"]):
        click.echo(
            f"  {head['name']:<8}{head['k']:>7}{head['size_min']:>10}{head['size_max']:>10}"
            f"{head['size_mean']:>10.1f}{head['empty']:>7}" + ("  consensus of the others" if h == voted else "")
        )
    which = (method.get("quality") or {}).get("recommended_k")
    if which:
        click.echo(f"which K    {which['k']} recommended (label-free; labelkit metrics ARTEFACT shows the table)")


@click.command(short_help="Heads, K, rows, id, provenance and cluster sizes.")
@click.argument("artefact", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def info(artefact: str, as_json: bool) -> None:
    """Show heads, K, rows, id, provenance and cluster sizes of an artefact.

    Example: labelkit info runs/sela/labels.parquet --json
    """
    from labelkit.artefact import read_artefact
    from labelkit.sharing import summarize

    summary = summarize(read_artefact(artefact))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)


@click.command(short_help="Check an artefact (and its ids against local data).")
@click.argument("artefact", type=click.Path())
@click.option("--data", "data_spec", default=None, metavar="SPEC",
              help="Also check the labels against a local copy of the data (ids in both, only in one, fingerprint).")
def validate(artefact: str, data_spec: str | None) -> None:
    """Check an artefact; exit 0 when valid, else exit 1 listing every problem.

    Example: labelkit validate labels.parquet --data /datasets/imagenet/train
    """
    from labelkit.artefact import check_artefact, read_artefact

    problems = check_artefact(artefact)
    if problems:
        click.echo(f"{artefact}: INVALID ({len(problems)} problem{'s' if len(problems) > 1 else ''})", err=True)
        for problem in problems:
            click.echo(f"  - {problem}", err=True)
        raise SystemExit(1)
    art = read_artefact(artefact)
    click.echo(f"{artefact}: valid label artefact v{art.metadata['format_version']}, "
               f"{art.num_samples:,} samples, {art.num_heads} head(s), id {art.artefact_id[:16]}…")
    if data_spec is None:
        return
    from labelkit.data import compare_to_data, describe_match

    report = compare_to_data(art, data_spec)
    click.echo(f"data {data_spec}: {report['data_count']:,} samples")
    click.echo(f"  in both            {report['in_both']:,}")
    click.echo(f"  only in artefact   {report['only_in_artefact']:,}  e.g. {report['examples_only_in_artefact']}")
    click.echo(f"  only in data       {report['only_in_data']:,}  e.g. {report['examples_only_in_data']}")
    click.echo(f"  compared           {describe_match(report)}")
    if report["in_both"] == 0:
        raise click.ClickException(
            f"no sample id of {artefact} is in {data_spec}: the artefact has e.g. "
            f"{report['examples_only_in_artefact'][:1]}, the data e.g. {report['examples_only_in_data'][:1]}")
    if report["content_match"] is False:
        raise click.ClickException(f"{data_spec} has the artefact's sample ids but other contents; its labels "
                                   "do not describe these images")


@click.command()
@click.argument("artefact", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["csv", "npy", "json"]), required=True,
              help="csv: sample_id + one column per head; npy: (heads, N) int32 in sample-id order; json.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="File to write.")
def export(artefact: str, fmt: str, out: str) -> None:
    """Export labels for tools outside labelkit.

    Example: labelkit export labels.parquet --format csv --out labels.csv
    """
    from labelkit.artefact import read_artefact
    from labelkit.sharing import export_artefact

    path = export_artefact(read_artefact(artefact), fmt, out)
    click.echo(f"wrote {path}")


@click.command(name="import", short_help="Artefact from released SeLa labels (.pth), CSV, JSON export or .npy.")
@click.argument("src", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Artefact (.parquet) to write.")
@click.option("--keys", type=click.Path(dir_okay=False), default=None,
              help="Text file with one sample id a line, in the order of the label columns.")
@click.option("--image-root", type=click.Path(file_okay=False), default=None,
              help="Image tree whose ImageFolder order the labels follow (class folders, then files, sorted).")
@click.option("--clusters", type=click.IntRange(min=1), default=None,
              help="K of every head (default: largest label + 1).")
def import_(src: str, out: str, keys: str | None, image_root: str | None, clusters: int | None) -> None:
    """Build an artefact from released SeLa labels (.pth), a label CSV, an `export --format json` file or .npy.

    Example: labelkit import resnet-10x3k.pth --image-root /datasets/imagenet/train --out sela-r50.parquet
    """
    from labelkit.sharing import import_labels

    art = import_labels(src, keys=keys, image_root=image_root, clusters=clusters)
    art.write(out)
    click.echo(f"wrote {out}: {art.num_samples:,} samples, {art.num_heads} head(s), id {art.artefact_id[:16]}…")


COMMANDS = [info, validate, export, import_]
