"""The time budget's parts that every plan shares: the default budget, durations, the error of a run that does
not fit, how many label steps a schedule solves, and how figures are written in a plan."""

from __future__ import annotations

import re

from ._config import SelaConfig
from ..errors import ConfigError

__all__ = ["parse_duration", "DEFAULT_CPU_BUDGET", "label_schedule"]

DEFAULT_CPU_BUDGET = 15 * 60  # seconds: a run on a CPU ends within this unless --budget says otherwise
BUDGET_SHARE = 0.8  # plan to this share of --budget; the run stops early, between epochs, if it must


class BudgetError(ConfigError):
    """The run cannot fit the time budget or the machine."""


_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``15m``, ``2h``, ``1h30m``, ``90s``, or a bare number of minutes."""
    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text) * 60
    else:
        match = _DURATION.match(text)
        if not text or match is None or not any(match.groups()):
            raise ConfigError(f"--budget {text!r}: give a duration such as 15m, 2h, 1h30m or 90s")
        hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds <= 0:
        raise ConfigError(f"--budget {text!r}: the budget must be longer than 0 s")
    return seconds


def label_schedule(epochs: int, steps: int, spacing: str = "quadratic") -> list[int]:
    """Epochs after which the labels are re-solved: the i-th of M at t_i = ((i - 1) / (M - 1))^2 of training
    (paper, appendix A.1), or at even intervals (``spacing="even"``: for runs that start from meaningful labels,
    which need no burst of early steps). Epoch 0 means before any training; the last comes after the final
    epoch. At most one per epoch.
    """
    if steps == 1:
        return [epochs]
    power = 1 if spacing == "even" else 2
    return sorted({round(epochs * ((i - 1) / (steps - 1)) ** power) for i in range(1, steps + 1)})


def label_step_count(config: SelaConfig, n: int | None = None) -> int:
    """The label steps a run of ``n`` samples solves: its schedule, less the one before the first epoch that the
    graph start or ``--start-from`` replaces (fixed features outside the graph's range start from the untrained heads instead)."""
    from ._graph import GRAPH_LIMIT, GRAPH_MIN

    schedule = label_schedule(config.epochs, config.label_steps, config.label_spacing)
    graph = config.start == "graph" and (not config.frozen or n is None or GRAPH_MIN <= n <= GRAPH_LIMIT)
    replaced = graph or bool(config.start_from)
    return len(schedule) - (1 if replaced and 0 in schedule else 0)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return ""
