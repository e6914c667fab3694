"""Exceptions raised by labelkit. The CLI turns each into one ``Error: …`` line and the error's ``exit_code``: 1
for a failure, 2 for an option that is invalid or impossible (as for click's own usage errors), 75 for a run
that stopped to be resumed."""

from __future__ import annotations

__all__ = [
    "LabelkitError",
    "ArtefactError",
    "DataError",
    "ConfigError",
    "SolverError",
    "ImportSourceError",
    "Preempted",
    "PREEMPTED_EXIT_CODE",
]

# Exit status of a run stopped by SIGTERM or SIGUSR1 after writing its checkpoint: EX_TEMPFAIL from
# sysexits.h, "try again later" -- a requeue script resumes on it and treats every other non-zero as a failure.
PREEMPTED_EXIT_CODE = 75


class LabelkitError(Exception):
    """Base class for every error that labelkit reports to a user."""

    exit_code = 1


class ArtefactError(LabelkitError):
    """A label artefact is invalid, unreadable, or of an unsupported version.

    ``problems`` lists every problem found, one sentence each.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class DataError(LabelkitError):
    """A data source is missing, empty, malformed or has duplicate sample ids."""


class ConfigError(LabelkitError):
    """An option or configuration value is invalid or impossible: a usage error, exit code 2."""

    exit_code = 2


class SolverError(LabelkitError):
    """Invalid input to the Sinkhorn label solver."""


class ImportSourceError(LabelkitError):
    """A file given to ``labelkit import`` cannot be turned into an artefact."""


class Preempted(LabelkitError):
    """The run was asked to stop (SIGTERM or SIGUSR1) and saved a checkpoint; ``--resume`` continues it."""

    exit_code = PREEMPTED_EXIT_CODE
