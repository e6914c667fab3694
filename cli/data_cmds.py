"""``labelkit data``: what a data spec resolves to."""

from __future__ import annotations

import json

import click


@click.command(name="data", short_help="What a data spec resolves to: count, fingerprint, classes.")
@click.argument("spec", default="builtin:digits")
@click.option("--check", is_flag=True, help="Decode every sample, list the ones that fail, and exit 1 if any does.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Decoding workers for --check.")
@click.option("--hash", "full_hash", is_flag=True,
              help="Also hash every sample's bytes (reads everything) to compare two copies exactly.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def data(spec: str, check: bool, workers: int, full_hash: bool, as_json: bool) -> None:
    """Show the manifest of a data spec: kind, count, fingerprint, classes (and bad samples with --check).

    SPEC is a folder, WebDataset shards (shards/train-{000000..000009}.tar), an .npz, or builtin:NAME.

    Example: labelkit data /datasets/imagenet/train --check
    """
    from labelkit.data import resolve

    source = resolve(spec)
    skipped = []
    if check:
        from labelkit.data import Order, SkipLog, eval_transform, make_loader

        log = SkipLog(source)
        for _, _, bad in make_loader(source, eval_transform(32), Order(256), workers=workers):
            log.add(bad)
        skipped = log.as_list()
    manifest = source.manifest(skipped).to_dict()
    if full_hash:
        manifest["content_sha256"] = source.content_hash()
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        if check and skipped:
            raise SystemExit(1)
        return
    classes = manifest["classes"]
    click.echo(f"{spec}: {manifest['kind']}, {manifest['count']:,} samples, fingerprint {manifest['fingerprint'][:16]}…")
    click.echo(f"content ({manifest['content']['method']}) {manifest['content']['sha256'][:16]}…"
               + (f", bytes sha256 {manifest['content_sha256']}" if full_hash else ""))
    if classes:
        shown = ", ".join(classes[:10]) + (", …" if len(classes) > 10 else "")
        click.echo(f"classes ({len(classes)}): {shown}")
    else:
        click.echo("no ground-truth classes")
    if check:
        click.echo(f"bad samples: {len(skipped)}")
        for item in skipped[:20]:
            click.echo(f"  {item['sample_id']}: {item['reason']}")
        if skipped:
            raise click.ClickException(f"{len(skipped)} sample(s) of {spec} cannot be decoded; training skips them "
                                       "(or stops at the first under --strict)")


COMMANDS = [data]
