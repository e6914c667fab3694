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
        if head["size_min"] is None:
            sizes = f"{'-':>10}{'-':>10}{'-':>10}{'-':>7}"
        else:
            sizes = f"{head['size_min']:>10}{head['size_max']:>10}{head['size_mean']:>10.1f}{head['empty']:>7}"
        click.echo(f"  {head['name']:<8}{head['k']:>7}{sizes}" + ("  consensus of the others" if h == voted else ""))
    for head in summary["heads"]:
        if head["names"] is not None:
            named = [(c, n) for c, n in enumerate(head["names"]) if n is not None]
            shown = ", ".join(f"{c}={n}" for c, n in named[:12]) + (", …" if len(named) > 12 else "")
            click.echo(f"names      {head['name']}: {len(named)} of {head['k']} named: {shown}")
        if head["status"] is not None:
            counts = {s: head["status"].count(s) for s in dict.fromkeys(head["status"])}
            click.echo(f"reviewed   {head['name']}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if summary.get("read", {}).get("footer_only"):
        click.echo("sizes      not read: only the footer of this remote file was fetched (--full reads the labels)")
    which = (method.get("quality") or {}).get("recommended_k")
    if which:
        click.echo(f"which K    {which['k']} recommended (label-free; labelkit metrics ARTEFACT shows the table)")


@click.command(short_help="Heads, K, rows, id, provenance and cluster sizes.")
@click.argument("artefact", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--full/--footer", default=None,
              help="Read the labels for cluster sizes (default: yes for local files; for URLs only the footer).")
def info(artefact: str, as_json: bool, full: bool | None) -> None:
    """Show heads, K, rows, id, provenance and cluster sizes of an artefact (a path, a run directory or
    an fsspec URL: https://, s3://, gs://, hf://datasets/...).

    Example: labelkit info runs/sela/labels.parquet --json
    """
    from labelkit.artefact import read_header, scan_artefact
    from labelkit._util.remote import is_url
    from labelkit.artefact import summarize

    if full is None:
        full = not is_url(artefact)
    summary = summarize(*scan_artefact(artefact)) if full else summarize(read_header(artefact))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)


@click.command(short_help="Check an artefact (and its ids against local data).")
@click.argument("artefact", type=click.Path())
@click.option("--data", "data_spec", default=None, metavar="SPEC",
              help="Also check the labels against a local copy of the data (ids in both, only in one, fingerprint).")
@click.option("--full/--footer", default=None,
              help="Check every row (ids, label ranges, artefact id). Default: yes for local files; for URLs only "
                   "the footer (metadata, columns, types, row count) unless --full or --data is given.")
def validate(artefact: str, data_spec: str | None, full: bool | None) -> None:
    """Check an artefact (path, run directory or fsspec URL); exit 0 when valid, else exit 1 listing every
    problem.

    Example: labelkit validate labels.parquet --data /datasets/imagenet/train
    """
    from labelkit.artefact import ArtefactHeader, read_artefact, read_header, scan_artefact
    from labelkit.errors import ArtefactError
    from labelkit._util.remote import is_url, redact

    if full is None:
        full = not is_url(artefact) or data_spec is not None
    shown = redact(artefact)
    try:  # one read serves the check and the summary (a URL is fetched once)
        if full and data_spec is not None:  # the ids are compared with the data's: read whole
            art, problems = read_artefact(artefact), []
            header = ArtefactHeader(shown, art.metadata, art.num_samples, 0, ())
        elif full:  # streamed by row groups: the same memory at any size
            header, problems = scan_artefact(artefact)[0], []
        else:
            header = read_header(artefact)
            problems = list(header.problems)
    except ArtefactError as exc:
        problems = exc.problems or [str(exc)]
    if problems:
        click.echo(f"{shown}: INVALID ({len(problems)} problem{'s' if len(problems) > 1 else ''})", err=True)
        for problem in problems:
            click.echo(f"  - {problem}", err=True)
        raise SystemExit(1)
    if not full:
        click.echo(f"{shown}: footer valid (metadata v{header.metadata['format_version']}, columns, types, "
                   f"{header.num_rows:,} rows, {len(header.heads)} head(s), id {header.metadata['artefact_id'][:16]}…); "
                   "values not read: --full checks every row against the artefact id")
        return
    click.echo(f"{shown}: valid label artefact v{header.metadata['format_version']}, "
               f"{header.num_rows:,} samples, {len(header.heads)} head(s), id {header.metadata['artefact_id'][:16]}…")
    if data_spec is None:
        return
    from labelkit.data import compare_to_data, describe_match

    report = compare_to_data(art, data_spec)
    click.echo(f"data {redact(data_spec)}: {report['data_count']:,} samples")
    click.echo(f"  in both            {report['in_both']:,}")
    click.echo(f"  only in artefact   {report['only_in_artefact']:,}  e.g. {report['examples_only_in_artefact']}")
    click.echo(f"  only in data       {report['only_in_data']:,}  e.g. {report['examples_only_in_data']}")
    click.echo(f"  compared           {describe_match(report)}")
    if report["in_both"] == 0:
        raise click.ClickException(
            f"no sample id of {shown} is in {redact(data_spec)}: the artefact has e.g. "
            f"{report['examples_only_in_artefact'][:1]}, the data e.g. {report['examples_only_in_data'][:1]}")
    if report["content_match"] is False:
        raise click.ClickException(f"{redact(data_spec)} has the artefact's sample ids but other contents; its labels "
                                   "do not describe these images")


@click.command()
@click.argument("artefact", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["csv", "npy", "json", "hub", "label-studio", "fiftyone", "folders"]),
              required=True,
              help="csv: sample_id + one column per head; npy: (heads, N) int32 in sample-id order; json; "
                   "hub: a Hugging Face Hub dataset folder (data/*.parquet + README.md card); label-studio, "
                   "fiftyone, folders: one head for that tool (a folder; see `labelkit import --onto`).")
@click.option("--head", type=click.IntRange(min=0), default=None,
              help="label-studio, fiftyone, folders: the head [the primary head].")
@click.option("--data", default=None, help="label-studio, fiftyone, folders: the image folder [the one recorded].")
@click.option("--copy", is_flag=True, help="fiftyone, folders: copy the images instead of linking them.")
@click.option("--document-root", default=None, type=click.Path(file_okay=False),
              help="label-studio: Label Studio's LOCAL_FILES_DOCUMENT_ROOT [the data folder's parent].")
@click.option("--out", default=None, type=click.Path(),
              help="File to write, a folder for --format hub [beside the artefact: its name with .csv, .npy, .json or -hub].")
@click.option("--repo", default=None, metavar="USER/NAME", help="hub: the Hub repository, for the card's snippets.")
@click.option("--license", "license_", default="unknown", show_default=True,
              help="hub: the card's license id (that of the images' terms, e.g. cc-by-4.0, other).")
@click.option("--pretty-name", default=None, help="hub: the card's title.")
@click.option("--source-dataset", "source_datasets", multiple=True,
              help="hub: a data set the labels describe, e.g. extended|imagenet-1k (repeatable).")
@click.option("--truth", default=None, metavar="SPEC", help="hub: also measure and show metrics against this truth.")
@click.option("--rows-per-file", type=click.IntRange(min=1), default=None,
              help="hub: rows per Parquet file (default 5,000,000).")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=None, metavar="C",
              help="Only the samples whose confidence (the primary head's score) is at least C; the rest are "
                   "left out and counted.")
def export(artefact: str, fmt: str, out: str, repo, license_, pretty_name, source_datasets, truth,
           rows_per_file, min_confidence, **tool) -> None:
    """Export labels for tools outside labelkit, or as a folder ready to upload to the Hugging Face Hub.

    \b
    Example: labelkit export runs/sela --format csv            # writes runs/sela/labels.csv
    Example: labelkit export runs/sela --format hub --out hub/ --repo me/digits-selflabels
             hf upload me/digits-selflabels hub/ --repo-type dataset
    """
    from labelkit.artefact import read_artefact
    from labelkit.artefact import HUB_ROWS_PER_FILE, export_artefact, export_hub, output_beside
    from labelkit._util.remote import is_url

    tools = ("label-studio", "fiftyone", "folders")
    out = out or output_beside(artefact, f"-{fmt}" if fmt in ("hub", *tools) else f".{fmt}")
    # a local file goes to the Hub layout a batch of rows at a time; everything else reads it whole
    art = artefact if fmt == "hub" and min_confidence is None and not is_url(artefact) else read_artefact(artefact)
    if min_confidence is not None:
        whole = art.num_samples
        art = art.subset(art.confidence() >= min_confidence, {"min_confidence": min_confidence})
        click.echo(f"confidence >= {min_confidence:g}: {art.num_samples:,} of {whole:,} samples "
                   f"({art.num_samples / whole:.1%}) exported")
    if fmt in tools:
        from labelkit.review import export_for_tool

        path = export_for_tool(art, fmt, out, **tool)
        click.echo(f"wrote {path}/ ({art.num_samples:,} samples); after editing, `labelkit import {path} --format "
                   f"{fmt} --onto {artefact}` brings the changes back")
        return
    if fmt != "hub":
        path = export_artefact(art, fmt, out)
        click.echo(f"wrote {path}")
        return
    scores = None
    if truth:
        from labelkit.quality import score_artefact

        scores = score_artefact(art, truth=truth)
    path = export_hub(art, out, repo=repo, license=license_, pretty_name=pretty_name,
                      source_datasets=list(source_datasets) or None, truth=scores,
                      rows_per_file=rows_per_file or HUB_ROWS_PER_FILE)
    files = sorted(p.name for p in (path / "data").iterdir())
    click.echo(f"wrote {path}/README.md and {len(files)} Parquet file(s) under {path}/data/")
    click.echo(f"upload: hf upload {repo or 'USER/NAME'} {path} --repo-type dataset")


@click.command(name="import", short_help="Artefact from released SeLa labels (sela:NAME, .pth, CSV), JSON or .npy.")
@click.argument("src")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Artefact (.parquet) to write [SRC's name with .parquet, in the current folder].")
@click.option("--keys", type=click.Path(dir_okay=False), default=None,
              help="Text file with one sample id a line, in the order of the label columns.")
@click.option("--image-root", type=click.Path(file_okay=False), default=None,
              help="Image tree whose ImageFolder order the labels follow (class folders, then files, sorted).")
@click.option("--clusters", type=click.IntRange(min=1), default=None,
              help="K of every head (default: the release's K, else largest label + 1).")
@click.option("--format", "fmt", type=click.Choice(["label-studio", "fiftyone", "folders"]), default=None,
              help="SRC is a tool's edited export (Label Studio's JSON export, a FiftyOne classification folder, "
                   "class folders): its changes become decisions on --onto.")
@click.option("--onto", default=None, type=click.Path(), metavar="ARTEFACT",
              help="With --format: the artefact that was exported; the result is its reviewed version.")
def import_(src: str, out: str, keys: str | None, image_root: str | None, clusters: int | None, fmt, onto) -> None:
    """Build an artefact from released SeLa labels, a label CSV or .npy; or bring back a labelkit JSON export or
    artefact (a file, run directory or Hub export folder) whole, with its id, data, method and parents.

    SRC is a file, or sela:NAME for a label set released with the SeLa paper, downloaded once to the cache
    ($LABELKIT_CACHE, else ~/.cache/labelkit; $LABELKIT_SELA_MIRROR replaces the download site):
    sela:resnet50-10x3k, sela:resnet50-1k, sela:resnet18-1k, sela:resnet-10x3k-csv, sela:alexnet-10x3k-csv.

    \b
    Example: labelkit import sela:resnet50-10x3k --image-root /datasets/imagenet/train --out sela-r50.parquet
    Example: labelkit import labels.csv --keys ids.txt --out labels.parquet
    """
    from labelkit.artefact import import_labels

    from ._progress import download_bar

    import os

    if fmt or onto:
        return _import_tool(src, out, fmt, onto)

    with download_bar(src) as progress:
        art = import_labels(src, keys=keys, image_root=image_root, clusters=clusters, progress=progress)
    if out is None:
        name = os.path.basename(os.path.normpath(src.replace("sela:", "sela-", 1))) or "labels"
        out = os.path.splitext(name)[0] + ".parquet"
    if os.path.exists(out) and os.path.samefile(out, src):
        raise click.UsageError(f"--out {out} is the file being imported; give another --out")
    art.write(out)
    click.echo(f"wrote {out}: {art.num_samples:,} samples, {art.num_heads} head(s), id {art.artefact_id[:16]}…")


def _import_tool(src: str, out: str | None, fmt: str | None, onto: str | None) -> None:
    from labelkit.artefact import output_beside
    from labelkit.review import import_from_tool

    if not (fmt and onto):
        raise click.UsageError("--format and --onto go together: the tool's files, and the artefact they came from")
    out = out or str(output_beside(onto, f"-{fmt}-reviewed.parquet"))
    art, counts = import_from_tool(fmt, src, onto, out + ".decisions.jsonl")
    art.write(out)
    click.echo(f"{src}: {counts['moved']:,} moved, {counts['removed']:,} removed, {counts['unchanged']:,} as they "
               f"were; wrote {out}: id {art.artefact_id[:16]}…")


COMMANDS = [info, validate, export, import_]
