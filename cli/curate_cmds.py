"""Commands that turn cluster ids into a data set: name (names and review status), align (ids that stay put
across runs) and diff (how two versions differ)."""

from __future__ import annotations

import click


def _pairs(values: tuple[str, ...], option: str) -> dict[int, str | None]:
    pairs = {}
    for value in values:
        cluster, sep, name = value.partition("=")
        try:
            cluster = int(cluster)
        except ValueError:
            cluster = None
        if not sep or cluster is None:
            raise click.BadParameter(f"{value!r} is not CLUSTER=VALUE (e.g. 3=cat)", param_hint=option)
        if cluster in pairs:
            raise click.BadParameter(f"cluster {cluster} is given twice", param_hint=option)
        pairs[cluster] = name.strip() or None
    return pairs


def _default_named(artefact: str) -> str:
    from labelkit.artefact import output_beside

    path = output_beside(artefact, ".parquet")
    return str(path.with_name(path.name.removesuffix(".parquet").removesuffix("-named") + "-named.parquet"))


def _show_examples(result, head) -> None:
    click.echo(f"examples   {result.used} in the artefact named {len(result.names)} of {head.k} clusters")
    if result.unknown_samples:
        click.echo(f"  {len(result.unknown_samples)} example(s) are not samples of the artefact, e.g. "
                   f"{result.unknown_samples[:3]}")
    if result.without_example:
        click.echo(f"  {len(result.without_example)} cluster(s) without an example stay unnamed: "
                   f"{result.without_example[:20]}")
    for cluster in result.disagreeing:
        votes = ", ".join(f"{name} {n}" for name, n in sorted(result.votes[cluster].items(), key=lambda x: -x[1]))
        click.echo(f"  cluster {cluster}: its examples disagree ({votes}); named {result.names[cluster]!r}")
    for name, clusters in result.shared.items():
        click.echo(f"  {name!r} won {len(clusters)} clusters {clusters}: numbered {name!r}, {name + ' (2)'!r}, …")


@click.command(short_help="Name clusters (by hand, from a file or from a few examples) and mark them reviewed.")
@click.argument("artefact", type=click.Path())
@click.option("--head", type=click.IntRange(min=0), default=None,
              help="Which head to name [the primary head: the consensus where there is one, else 0].")
@click.option("--set", "set_", multiple=True, metavar="CLUSTER=NAME",
              help="Name one cluster (repeatable); an empty name removes it: --set 3=cat --set 7='tabby cat'.")
@click.option("--status", "status_", multiple=True, metavar="CLUSTER=STATE",
              help="Review state of a cluster: unreviewed, accepted or rejected (repeatable).")
@click.option("--from", "from_file", type=click.Path(dir_okay=False), default=None,
              help="CSV with the columns cluster,name[,status].")
@click.option("--from-examples", default=None, metavar="SPEC",
              help="A few labelled samples: a CSV of sample_id,name or a folder of class folders; each cluster "
                   "takes the majority name of its labelled members.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Artefact to write [beside ARTEFACT: its name with -named.parquet].")
def name(artefact, head, set_, status_, from_file, from_examples, out) -> None:
    """Give ARTEFACT's clusters names and review states: a new version of it (same samples and labels) whose
    parent is ARTEFACT. Names carry through export, predict, metrics, report, transfer and info.

    \b
    Example: labelkit name runs/sela --set 3=cat --set 7="tabby cat" --status 3=accepted
    Example: labelkit name runs/sela --from-examples few-labels.csv
    """
    from labelkit.artefact import name_clusters, names_from_examples, read_artefact, read_examples, read_names

    names, status = _pairs(set_, "--set"), _pairs(status_, "--status")
    if not (names or status or from_file or from_examples):
        raise click.UsageError("nothing to change: give --set, --status, --from or --from-examples")
    art = read_artefact(artefact)
    head = art.primary_head if head is None else head
    how = []
    if from_examples:
        result = names_from_examples(art, head, read_examples(from_examples, art.sample_ids))
        _show_examples(result, art.heads[head])
        names = {**result.names, **names}
        how.append(f"examples {from_examples}")
    if from_file:
        file_names, file_status = read_names(from_file)
        names, status = {**file_names, **names}, {**file_status, **status}
        how.append(f"file {from_file}")
    if set_ or status_:
        how.append("by hand")
    named = name_clusters(art, head, names, status, how=", ".join(how))
    out = out or _default_named(artefact)
    named.write(out)
    shown = named.heads[head]
    count = sum(n is not None for n in shown.names or ())
    click.echo(f"wrote {out}: head {head} has {count} of {shown.k} clusters named; id {named.artefact_id[:16]}… "
               f"(parent {art.artefact_id[:16]}…)")


_SHOWN = 8  # changes listed per head; --json has all of them


def _show_transitions(transitions, a_name: str, b_name: str, aligned: bool) -> None:
    for t in transitions:
        counts = t.counts()
        click.echo(f"head {t.head}: {t.common:,} common samples; ARI {t.scores['ari']:.3f}, AMI {t.scores['ami']:.3f}; "
                   + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
        if aligned:
            click.echo(f"  ids held on the common samples: {t.held:.1%} after alignment ({t.held_before:.1%} before)")
        else:
            click.echo(f"  same id in both: {t.held_before:.1%} of the common samples ({t.held:.1%} once "
                       f"{b_name} is aligned to {a_name})")
        changes = [event for event in t.events if event["kind"] != "kept"]
        for event in changes[:_SHOWN]:
            kind = event["kind"]
            if kind == "split":
                parts = ", ".join(f"{c} ({n:,})" for c, n in zip(event["new"], event["shared"]))
                click.echo(f"  split   {a_name} {event['old'][0]} ({event['old_size']:,}) -> {b_name} {parts}")
            elif kind == "merged":
                parts = ", ".join(f"{c} ({n:,})" for c, n in zip(event["old"], event["shared"]))
                click.echo(f"  merged  {a_name} {parts} -> {b_name} {event['new'][0]} ({event['new_size']:,})")
            elif kind == "born":
                click.echo(f"  born    {b_name} {event['new'][0]} ({event['new_size']:,}): matches no {a_name} cluster")
            else:
                click.echo(f"  died    {a_name} {event['old'][0]} ({event['old_size']:,}): no {b_name} cluster "
                           "takes it")
        if len(changes) > _SHOWN:
            click.echo(f"  … and {len(changes) - _SHOWN} more changes (--json lists them all)")


@click.command(short_help="Relabel a new run's clusters so that each keeps the id (and name) of the old one it matches.")
@click.argument("new", type=click.Path())
@click.option("--to", "old", required=True, type=click.Path(), help="The earlier artefact whose ids to keep.")
@click.option("--head", type=click.IntRange(min=0), default=None, help="Align one head [every head].")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Artefact to write [beside NEW: its name with -aligned.parquet].")
@click.option("--json", "as_json", is_flag=True, help="Print the transitions as one JSON object.")
def align(new, old, head, out, as_json) -> None:
    """Relabel NEW so that each cluster keeps the id, name and review status of the OLD cluster it matches on
    their common samples (K may differ); a cluster that matches none gets a fresh id above OLD's. Prints what
    happened to each cluster: kept, split, merged, born, died. The result's parents are NEW and OLD.

    \b
    Example: labelkit align runs/sela-v2 --to runs/sela/labels-named.parquet
    """
    import json

    from labelkit.artefact import output_beside, read_artefact
    from labelkit.quality import align_artefact

    new_art, old_art = read_artefact(new), read_artefact(old)
    aligned, transitions = align_artefact(new_art, old_art, head)
    out = out or output_beside(new, "-aligned.parquet")
    aligned.write(out)
    if as_json:
        click.echo(json.dumps({"out": str(out), "artefact_id": aligned.artefact_id,
                               "heads": [t.as_dict() for t in transitions]}))
        return
    _show_transitions(transitions, "old", "new", aligned=True)
    click.echo(f"wrote {out}: id {aligned.artefact_id[:16]}… (parents {new_art.artefact_id[:16]}…, "
               f"{old_art.artefact_id[:16]}…)")


@click.command(short_help="How two versions of the labels differ: kept, split, merged, born, died; ARI, AMI.")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--head", type=click.IntRange(min=0), default=None, help="Compare one head [every head].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def diff(a, b, head, as_json) -> None:
    """Compare B's clusters with A's on their common samples: which were kept, split, merged, born or died
    (overlap: at least a quarter of the smaller cluster), the share of samples with the same id, ARI and AMI.

    \b
    Example: labelkit diff runs/sela/labels.parquet runs/sela-v2/labels-aligned.parquet
    """
    import json

    from labelkit.artefact import read_artefact
    from labelkit.quality import compare_artefacts

    transitions = compare_artefacts(read_artefact(a), read_artefact(b), head)
    if as_json:
        click.echo(json.dumps({"a": a, "b": b, "heads": [t.as_dict() for t in transitions]}))
        return
    _show_transitions(transitions, "A", "B", aligned=False)


COMMANDS = [name, align, diff]
