"""tqdm progress bars and epoch lines for long library jobs (the library only calls Reporter hooks)."""

from __future__ import annotations

import click

from labelkit.train import Reporter


class BarReporter(Reporter):
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar = None

    def phase(self, name: str, total: int) -> None:
        if self.quiet:
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
        if self.quiet:
            return
        if record["type"] == "epoch":
            click.echo(f"epoch {record['epoch']:>4}/{record['epochs']}  loss {record['loss']:.4f}  "
                       f"lr {record['lr']:.4g}  {record['images_per_s']:.0f} img/s  "
                       f"elapsed {_clock(record['elapsed_s'])}  eta {_clock(record['eta_s'])}", err=True)
        elif record["type"] == "label_step":
            heads = record["heads"]
            iters = sum(h["iterations"] for h in heads)
            line = f"  label step after epoch {record['epoch']}: {len(heads)} heads, {iters} Sinkhorn iterations, " \
                   f"{record['seconds']:.1f} s, NMI to previous {heads[0]['nmi_previous']:.3f}"
            if "nmi" in heads[0]:
                line += f", head 0 NMI to truth {heads[0]['nmi']:.3f}"
            click.echo(line, err=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"
