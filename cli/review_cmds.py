"""labelkit review: a local web app to look at one head's clusters and decide about them."""

from __future__ import annotations

import secrets

import click


@click.command(short_help="Review clusters in the browser: name, accept, reject, merge, split, remove, move.")
@click.argument("artefact", type=click.Path())
@click.option("--data", default=None, help="The samples' data spec [the one the artefact records].")
@click.option("--head", type=click.IntRange(min=0), default=None,
              help="Which head to review [the primary head: the consensus where there is one, else 0].")
@click.option("--run", default=None, type=click.Path(file_okay=False),
              help="The generate run of these labels: splits use its network's features, nearest clusters its "
                   "head prototypes [the run folder the artefact is in, if any].")
@click.option("--folder", default=None, type=click.Path(file_okay=False),
              help="Review folder: the decision log, thumbnails and reviewed.parquet [beside ARTEFACT: STEM-review/].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8765, show_default=True,
              help="Port to listen on (0: any free one).")
@click.option("--expose", is_flag=True, help="Allow a --host other machines can reach (the token then guards the data).")
@click.option("--save", "save_only", is_flag=True, help="Do not serve: write reviewed.parquet from the log and exit.")
def review(artefact, data, head, run, folder, host, port, expose, save_only) -> None:
    """Serve a review of ARTEFACT's clusters at http://HOST:PORT/?token=…; every decision is appended to
    FOLDER/decisions.jsonl at once, and "save" (or --save) writes FOLDER/reviewed.parquet, a new version whose
    parent is ARTEFACT.

    \b
    Example: labelkit review runs/digits
    Example: labelkit review runs/digits --save
    """
    from labelkit.artefact import output_beside
    from labelkit.review import ReviewSession, run_folder_of, serve

    folder = folder or output_beside(artefact, "-review")
    session = ReviewSession(artefact, folder, data=data, head=head, run=run or run_folder_of(artefact))
    if save_only:
        path, version = session.save()
        click.echo(f"wrote {path}: {version.num_samples:,} samples, {len(session.state.applied)} decisions of "
                   f"{session.log.path}; id {version.artefact_id[:16]}… (parent {session.art.artefact_id[:16]}…)")
        return
    token = secrets.token_urlsafe(24)
    server = serve(session, token, host=host, port=port, expose=expose)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: serving on {host}: anyone who can reach it and has the URL can see the data", err=True)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    click.echo(f"reviewing head {session.head} of {artefact} (K = {session.state.k}); decisions go to {session.log.path}")
    click.echo(f"open http://{shown}:{server.server_port}/?token={token}   (Ctrl-C stops)")
    try:
        server.serve_forever()
    finally:
        server.server_close()


COMMANDS = [review]
