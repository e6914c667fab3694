"""What the console says when a run is interrupted by the user."""

from __future__ import annotations

import contextlib

import click


@contextlib.contextmanager
def interrupted(command: str, out: str):
    """Turn Ctrl-C into one line that says how to continue, and exit 130 (128 + SIGINT) as shells expect."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo(f"\nInterrupted. Continue from the last checkpoint with: labelkit {command} --out {out} --resume",
                   err=True)
        raise SystemExit(130) from None
