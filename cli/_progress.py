"""How long library jobs look on the console: a start line, tqdm bars on a terminal, and a plain line per
epoch and label step (the only progress written when the output goes to a file). The library itself only
calls :class:`~labelkit.training.Reporter` hooks."""

from __future__ import annotations

import contextlib
import sys

import click

from labelkit.training import Reporter


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""


def describe(plan: dict) -> str:
    """The start line of a job, from the plan that the library announces."""
    if plan["command"] == "eval":
        weights = f"the run {plan['model']}" if plan["model"] else f"{plan['arch']} (not trained by labelkit)"
        return (f"labelkit eval {plan['protocol']}: {weights} at {plan['image_size']} px on {plan['data']} "
                f"({plural(plan['samples'], 'sample')})" + (f", tested on {plan['test']}" if plan["test"] else ""))
    what = (f"{plan['arch']} ({plan['parameters'] / 1e6:.1f} M parameters with the heads"
            + (f", {plan['precision']})" if "precision" in plan else ")"))
    line = f"labelkit {plan['command']}: {plan['data']} ({plural(plan['samples'], 'sample')}) with {what}"
    if "heads" in plan:
        line += f", heads {plan['heads']}"
    line += f", {plural(plan['epochs'], 'epoch')}"
    if "label_steps" in plan:
        line += f", {plural(plan['label_steps'], 'label step')}"
    line += f" -> {plan['out']} (checkpoint about {_size(plan['checkpoint_bytes'])})"
    if "resume_epoch" in plan:
        line += f"\nresuming at epoch {plan['resume_epoch'] + 1} of {plan['epochs']}"
        if plan.get("resume_step"):
            line += f", batch {plan['resume_step'] + 1}"
    return line


class BarReporter(Reporter):
    """Bars when stderr is a terminal; ``quiet`` keeps only the start line and why training ended early."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bars = not quiet and sys.stderr.isatty()  # carriage returns have no place in a log file
        self.bar = None

    def begin(self, plan: dict) -> None:
        click.echo(describe(plan), err=True)

    def phase(self, name: str, total: int) -> None:
        if not self.bars:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=f"{name:>5}", leave=False, dynamic_ncols=True, unit="batch")

    def advance(self, batches: int = 1, **info) -> None:
        if self.bar is not None:
            self.bar.update(batches)
            if "loss" in info:
                self.bar.set_postfix(loss=f"{info['loss']:.3f}", refresh=False)

    def end_phase(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def record(self, record: dict) -> None:
        if record["type"] in ("settled", "budget"):  # why training ended early is a result, not progress
            click.echo(record["message"], err=True)
        if self.quiet:
            return
        if record["type"] == "epoch":
            click.echo(f"epoch {record['epoch']:>4}/{record['epochs']}  loss {record['loss']:.4f}  "
                       f"lr {record['lr']:.4g}  {record['images_per_s']:.0f} img/s  "
                       f"elapsed {_clock(record['elapsed_s'])}  eta {_clock(record['eta_s'])}", err=True)
        elif record["type"] == "decoded":
            where = "memory" if record["where"] == "memory" else "a memory-mapped file"
            click.echo(f"decoded the images once at {record['side']} px into {where} ({record['seconds']:.1f} s); "
                       "every pass augments them by the batch", err=True)
        elif record["type"] == "whiten" and record.get("columns", {}).get("standardized"):
            click.echo(f"scaled every column to unit variance: the widest column's spread is "
                       f"{record['columns']['spread']:,.0f}x the median column's (--standardize no keeps them)",
                       err=True)
        elif record["type"] == "label_step":
            heads = record["heads"]
            iterations = [h["iterations"] for h in heads]
            spread = f"{min(iterations)}" if min(iterations) == max(iterations) else f"{min(iterations)}-{max(iterations)}"
            line = (f"  label step after epoch {record['epoch']}: {plural(len(heads), 'head')}, {spread} Sinkhorn "
                    f"iterations per head, {record['seconds']:.1f} s, NMI to previous {_to_previous(heads)}")
            if "nmi" in heads[0]:
                line += f", head 0 NMI to truth {heads[0]['nmi']:.3f}"
            stalled = [h["error"] for h in heads if not h.get("converged", True)]
            if stalled:
                line += f"; {len(stalled)} stopped at the iteration cap (error up to {max(stalled):.1e})"
            click.echo(line, err=True)
        elif record["type"] == "vote":
            heads = record["heads"]
            moved = " / ".join(f"{h['moved']:,}" for h in heads)
            line = (f"  vote of {record['neighbours']} neighbours: moved {moved} of {record['rows']:,} labels "
                    f"({'per head, ' if len(heads) > 1 else ''}{record['seconds']:.1f} s)")
            if "nmi" in heads[0]:
                line += f", head 0 NMI to truth {heads[0]['nmi_before']:.3f} -> {heads[0]['nmi']:.3f}"
            click.echo(line, err=True)


def _to_previous(heads: list[dict]) -> str:
    """Head 0's agreement with the previous label step, and the mean over heads that ``--settle`` reads."""
    first = f"{heads[0]['nmi_previous']:.3f}"
    if len(heads) == 1:
        return first
    return f"{first} (mean over heads {sum(h['nmi_previous'] for h in heads) / len(heads):.3f})"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


@contextlib.contextmanager
def download_bar(source: str):
    """A ``progress(done, total)`` callback for downloads (``sela:NAME`` imports): a byte bar on a terminal,
    a start and an end line otherwise; ``None`` for local files, which need none."""
    if not source.startswith("sela:"):
        yield None
        return
    state = {}

    def progress(done: int, total: int | None) -> None:
        if "bar" not in state:
            from tqdm.auto import tqdm

            resumed = f", resuming at {_size(done)}" if done else ""
            click.echo(f"downloading {source} ({_size(total) if total else 'size unknown'}{resumed})", err=True)
            state["bar"] = tqdm(total=total, initial=done, unit="B", unit_scale=True, leave=False,
                                disable=None, dynamic_ncols=True)
            state["done"] = done
        state["bar"].update(done - state["done"])
        state["done"] = done

    try:
        yield progress
    finally:
        if "bar" in state:
            state["bar"].close()
            click.echo(f"downloaded {_size(state['done'])}", err=True)
