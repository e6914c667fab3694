"""The ``labelkit`` command: thin click commands over the library.

Library errors (:class:`labelkit.errors.LabelkitError`) become one ``Error: …`` line and the error's exit code:
2 for an invalid or impossible option (:class:`~labelkit.errors.ConfigError`, like click's own usage errors), 75
for a run stopped by SIGTERM/SIGUSR1 after its checkpoint (ready for ``--resume``), 1 for any other failure. Heavy imports happen inside command bodies so ``labelkit --help`` is instant.
"""

from __future__ import annotations

import logging

import click

from labelkit import __version__
from labelkit.errors import LabelkitError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LabelkitError as exc:
            message = " ".join(str(exc).split("\n"))
            error = click.ClickException(message)
            error.exit_code = exc.exit_code
            raise error from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # in the order they were added: the order of the workflow


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="labelkit")
def main() -> None:
    """labelkit: make, store, share and reuse self-labels (SeLa).

    \b
    Typical use:
      labelkit generate --data images/ --clusters 10 --out runs/sela   # self-label a folder into 10 clusters
      labelkit metrics runs/sela/labels.parquet --truth images/
      labelkit info runs/sela/labels.parquet
    """
    # The solver's compiled CPU kernels (torch.compile) make torch look for a CUDA toolkit and log a warning that
    # no CUDA runtime was found; on a CPU run that line is noise, on a GPU run it never appears.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def run(prog_name: str = "labelkit") -> None:
    """The ``labelkit`` program: :func:`main`, then a quick exit. Python's last garbage collections at exit walk
    every object that torch, scikit-learn and pyarrow made (1.3-1.5 s after a ``generate`` on 2 cores); moved
    out of the collector's reach first (``gc.freeze``), the process ends in a fraction of that, with the same
    files and output. Only the program does this: the library, and ``main`` run in-process, leave the collector
    alone."""
    import gc

    try:
        main(prog_name=prog_name)
    finally:
        gc.freeze()


def _register() -> None:
    from . import (artefact_cmds, curate_cmds, data_cmds, generate_cmds, metrics_cmds, predict_cmds, report_cmds,
                   review_cmds, transfer_cmds)

    for module in (generate_cmds, transfer_cmds, predict_cmds, metrics_cmds, report_cmds, curate_cmds, review_cmds,
                   artefact_cmds, data_cmds):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
