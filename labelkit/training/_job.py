"""The run skeleton that ``generate`` and ``transfer`` share.

A :class:`Job` owns everything around a job's own model: the process group under torchrun, the data source
and its log of undecodable samples, the run directory (``config.json``, ``history.jsonl``, atomic
``checkpoint.pt``, resume), the position in training (epoch, and batch within the epoch), rank-0 writing, and
stop signals.

Preemption: SIGTERM and SIGUSR1 -- what cluster schedulers send before they stop or requeue a job -- let the
current batch finish; then the job writes a checkpoint that records its place in the epoch's seeded order and
raises :class:`~labelkit.errors.Preempted`, which the command line turns into exit status 75
(``PREEMPTED_EXIT_CODE``). ``--resume`` continues from that batch and ends with the same labels as a run that
was never stopped: a sample's augmentation depends on (seed, epoch, sample) only, and the RNG state is saved.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..data import Order, SkipLog, batches_per_rank, keep_decoded, make_loader, resolve
from ..errors import ConfigError, Preempted
from ._distributed import from_environment
from ._loop import Reporter, RunDir, learning_rate, network_precision, resolve_device, seed_everything, train_step

__all__ = ["Job", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# --settle judges the labels after this many label steps at the least: the first steps after a start move
# them most, and a quiet one among them is not yet a plateau
SETTLE_STEPS = 3
_RAN_OUT, _STOP, _SKIP, _TRAIN = 0, 1, 2, 3  # what the ranks agree to do before each step (the smallest wins)


class Job:
    """One training job: use as a context manager, ``start`` it with the parts to checkpoint, then

    .. code-block:: python

        job.run_epochs(lambda: job.train_epoch(model, transform, targets, optimizer, keep),  # step 1
                       label_step)  # step 2, at the epochs of ``job.label_schedule``

    where each epoch ends in a checkpoint (and stops there if a signal came meanwhile or ``--budget`` would
    be passed by the next one).
    """

    def __init__(self, config, *, kind: str, resume: bool = False, reporter: Reporter | None = None):
        self.config, self.kind = config, kind
        self.dist, self.device = from_environment(resolve_device(config.device))
        # under torchrun, rank 0 alone shows progress and writes files
        self.reporter = (reporter or Reporter()) if self.dist.main else Reporter()
        self.source = resolve(config.data)
        self.run_dir = RunDir(config, resume, self.reporter, writer=self.dist.main)
        self.skips = SkipLog(self.source, strict=config.strict)
        self.started = time.perf_counter()
        self.epoch, self.step = 0, 0  # position: epochs done, and batches done of the next epoch
        self._partial: dict | None = None  # running sums of an epoch that was cut short
        self._parts: dict[str, Any] = {}
        self._signal: str | None = None
        self._handlers: dict = {}
        self.resumed = False
        self.plan: dict | None = None  # how the configuration was chosen (labelkit.training), recorded with the run
        self.stopped_early: int | None = None  # the epoch after which training ended before the planned last
        self.stopped_because: str | None = None  # why: "budget" or "settled"
        self.label_schedule: set[int] = set()  # epochs after which a label step runs (the ETA counts them)
        self._label_seconds: list[float] = []
        self.label_weight: dict[int, float] = {}  # label steps of more rows than the recent ones (--train-rows): x rows
        # a sample of the last label step's rows, their features and labels before it: label-free quality
        self.label_features: tuple | None = None
        self.selection = None  # heads on fixed features: training/_select.py's KeepBetter, where it applies
        self.previous_labels = None

    # -- process and signal lifetime -----------------------------------------------------------------------

    def __enter__(self) -> "Job":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for signum in STOP_SIGNALS:
                self._handlers[signum] = signal.signal(signum, self._request_stop)
        return self

    def __exit__(self, kind, value, traceback) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        try:
            if kind is None:
                self.dist.barrier()
        finally:
            self.run_dir.close()
            self.dist.close()

    def _request_stop(self, signum, frame) -> None:
        self._signal = signal.Signals(signum).name

    def _stop_requested(self) -> bool:
        return self._signal is not None

    def _preempted(self) -> Preempted:
        cause = self._signal or "a stop signal to another process"
        return Preempted(f"stopped by {cause} at epoch {self.epoch + 1}, batch {self.step}; the checkpoint in "
                         f"{self.run_dir.out} keeps the place: continue with "
                         f"labelkit {self.kind} --out {self.run_dir.out} --resume")

    # -- run directory and checkpoints ---------------------------------------------------------------------

    def start(self, record: dict, **parts) -> bool:
        """Write ``config.json`` (``record``), or -- resuming -- restore each part (anything with
        ``state_dict``/``load_state_dict``), the position and the skip log from the checkpoint. True when
        resumed."""
        self._parts = parts
        saved = self.run_dir.restore(record)
        self.resumed = saved is not None
        if saved is None:
            return False
        missing = sorted(set(parts) - set(saved))
        if missing:
            raise ConfigError(f"{self.run_dir.checkpoint} was written by another labelkit version (no "
                              f"{', '.join(missing)}); start afresh without --resume")
        for name, part in parts.items():
            try:
                part.load_state_dict(saved[name])
            except RuntimeError as error:  # torch's size mismatch: heads of another width (a table's heads
                # with --whiten both read twice the width in earlier versions)
                first = str(error).strip().splitlines()[-1].strip()
                raise ConfigError(f"{self.run_dir.checkpoint} was written by another labelkit version (its {name} "
                                  f"does not fit this one's: {first}); start afresh without --resume") from error
        self.epoch, self.step, self._partial = saved["epoch"], saved.get("step", 0), saved.get("partial")
        self.stopped_early, self.stopped_because = saved.get("stopped_early"), saved.get("stopped_because")
        self.skips.skipped.update(saved["skipped"])
        if self.step:
            torch.set_rng_state(saved["rng"])
        return True

    def decode_images(self, image_size: int) -> None:
        """Decode the images once for every pass of the run, where they fit (see
        :func:`labelkit.data.keep_decoded`): a quarter of the free memory, else a file in the feature cache
        (one process only: under torchrun each rank keeps its own copy in memory or none)."""
        from .._util.system import system_memory_available

        config = self.config
        folder = None
        if self.dist.world == 1:
            folder = getattr(config, "feature_cache", None) or self.run_dir.out / "features"
        began = time.perf_counter()
        self.reporter.phase("decode", batches_per_rank(self.source, None, 256))
        chosen = keep_decoded(self.source, image_size, budget=system_memory_available() // 4, folder=folder,
                              workers=config.workers, on_bad=self.skips.add, progress=self.reporter.advance)
        self.reporter.end_phase()
        if chosen is not None and not self.resumed:
            self.log({"type": "decoded", "side": chosen[0], "where": chosen[1],
                      "seconds": round(time.perf_counter() - began, 2)})

    @property
    def precision(self) -> str | None:
        """What the network computes in here (see :func:`network_precision`)."""
        return network_precision(self.config, self.device)

    def announce(self, model: torch.nn.Module, **details) -> dict:
        """Tell the reporter what the job is about to do: data, model and checkpoint size, resume point."""
        parameters = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        plan = {"command": self.kind, "data": self.config.data, "samples": len(self.source), "arch": self.config.arch,
                "parameters": parameters, "checkpoint_bytes": state + trainable,  # weights + SGD momentum
                "epochs": self.config.epochs, "out": str(self.run_dir.out), **details}
        if self.precision:
            plan["precision"] = self.precision
        if self.resumed:
            plan.update(resume_epoch=self.epoch, resume_step=self.step)
        self.reporter.begin(plan)
        return plan

    def finish(self) -> None:
        self.run_dir.finish()

    def checkpoint(self) -> None:
        self.run_dir.save({"epoch": self.epoch, "step": self.step, "partial": self._partial,
                           "rng": torch.get_rng_state(), "skipped": dict(self.skips.skipped),
                           "config": self.config.to_dict(), "stopped_early": self.stopped_early,
                           "stopped_because": self.stopped_because,
                           **{name: part.state_dict() for name, part in self._parts.items()}})

    def log(self, record: dict) -> None:
        self.run_dir.log(record)

    def label_step(self, epoch: int, step: Callable[[int], dict]) -> dict:
        """Run the label step after ``epoch`` epochs (``step(epoch)`` returns its record) and log it; its wall
        time feeds the ETA."""
        began = time.perf_counter()
        record = step(epoch)
        self._label_seconds.append(time.perf_counter() - began)
        if self.dist.enabled:  # the collectives the solve went through
            record["group"] = {"backend": self.dist.backend, "ranks": self.dist.world}
        self.log({"type": "label_step", "epoch": epoch, **record})
        return record

    def label_eta(self, epoch: int) -> float:
        """Seconds the label steps after ``epoch`` (0-based, just trained) will take, at the recent pace."""
        left = sum(self.label_weight.get(e, 1.0) for e in self.label_schedule if e > epoch)
        recent = self._label_seconds[-3:]
        return left * sum(recent) / len(recent) if recent else 0.0

    def provenance(self) -> dict:
        """What the data was, the ``data`` of :meth:`Artefact.build`: spec, id fingerprint and count, content
        fingerprint, and the samples that could not be decoded."""
        return self.source.manifest(self.skips.as_list()).record()

    def merge_skips(self):
        """Share the samples each rank found undecodable; returns the mask of all of them."""
        self.skips.skipped.update(self.dist.gather_dict(self.skips.skipped))
        return self.skips.mask()

    # -- the epoch loop ------------------------------------------------------------------------------------

    def parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train: wrapped in DistributedDataParallel under torchrun, itself otherwise."""
        if not self.dist.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if getattr(self.config, "sync_bn", False):
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)

    def epochs(self) -> range:
        return range(self.epoch, self.config.epochs)

    def run_epochs(self, train: Callable[[], dict], label_step: Callable[[int], dict] | None = None) -> None:
        """The SeLa loop from the current epoch on: ``train()`` (step 1) every epoch, ``label_step(epoch)`` (step 2)
        after the epochs of :attr:`label_schedule`, a checkpoint after each epoch. Training ends early where
        ``--settle`` finds the labels settled after a label step, or where ``--budget`` would be passed by another
        epoch (and a last label step); the checkpoint keeps the stop, so a resume does not train on."""
        deadline = (self.plan or {}).get("deadline")
        for epoch in ([] if self.stopped_early else self.epochs()):
            began = time.time()
            train()
            settled = None
            if epoch + 1 in self.label_schedule:
                settled = self._settled(self.label_step(epoch + 1, label_step), epoch + 1)
            if settled:
                self._stop(epoch + 1, "settled", f"stopped after epoch {epoch + 1} of {self.config.epochs}: the "
                           f"labels settled (NMI {settled:.3f} to the previous label step, mean over heads; "
                           f"--settle {self.config.settle:g})", agreement=round(settled, 4))
            elif deadline and epoch + 1 < self.config.epochs and \
                    time.time() + (time.time() - began) + self._last_step_extra() > deadline:
                self._stop(epoch + 1, "budget", f"stopped after epoch {epoch + 1} of {self.config.epochs}: the next "
                           "would pass the budget")
                if label_step is not None and epoch + 1 not in self.label_schedule:
                    self.label_step(epoch + 1, label_step)  # after the stop: a step that knows it is the last
            self.end_epoch()
            if self.stopped_early:
                break

    def _last_step_extra(self) -> float:
        """Seconds the last label step takes beyond a recent one, where it covers more rows (``label_weight``)."""
        recent = self._label_seconds[-3:]
        weight = self.label_weight.get(self.config.epochs, 1.0)
        return (weight - 1.0) * sum(recent) / len(recent) if recent else 0.0

    def _stop(self, epoch: int, why: str, message: str, **figures) -> None:
        self.log({"type": why, "epoch": epoch, "epochs": self.config.epochs, "message": message, **figures})
        self.stopped_early, self.stopped_because = epoch, why

    def _settled(self, record: dict, epoch: int) -> float | None:
        """The labels' agreement with the previous label step (NMI, mean over heads) where it reaches ``--settle``
        after at least SETTLE_STEPS label steps of training; None otherwise. Rank 0 decides (it alone measures)."""
        threshold = getattr(self.config, "settle", 0.0)
        if not threshold or sum(1 for e in self.label_schedule if 0 < e <= epoch) < SETTLE_STEPS:
            return None
        agree = [h["nmi_previous"] for h in record.get("heads", []) if "nmi_previous" in h]
        mean = float(np.mean(agree)) if agree else 0.0
        return self.dist.broadcast(mean if mean >= threshold else None)

    def train_epoch(self, model, transform, targets: torch.Tensor, optimizer, keep) -> dict:
        """Step 1 on images: one epoch of cross-entropy averaged over heads, ``targets`` (heads, N) over the
        source's samples, from the current position of the epoch's seeded order (see :meth:`train_pass`)."""
        config, dist = self.config, self.dist
        batch_size = max(1, config.batch_size // dist.world)

        def batches(start: int):
            order = Order(batch_size, shuffle=True, seed=config.seed, epoch=self.epoch, rank=dist.rank,
                          world=dist.world, keep=keep, skip_batches=start)
            return make_loader(self.source, transform, order, workers=config.workers, device=self.device)

        steps = batches_per_rank(self.source, keep, batch_size, world=dist.world, workers=config.workers,
                                 seed=config.seed, epoch=self.epoch, shuffle=True)
        model.train()
        return self.train_pass(batches, lambda indices, images: train_step(model, optimizer, images,
                                                                           targets[:, indices], self.device,
                                                                           config.precision),
                               optimizer, steps)

    def train_pass(self, batches: Callable[[int], Iterable], step: Callable[[torch.Tensor, Any], float], optimizer,
                   steps: int, min_batch: int = 2) -> dict:
        """One epoch of step 1 from the current position, and its line in the history. ``batches(start)``
        yields ``(indices, inputs, bad)`` from batch ``start`` of the epoch's order; ``step(indices, inputs)``
        takes one optimiser step and returns the loss; ``steps`` batches make the epoch. On a stop signal,
        checkpoint the position and raise :class:`Preempted`."""
        if self.step == 0:  # an epoch's randomness depends on (seed, epoch); mid-epoch, the checkpoint's RNG state
            seed_everything(self.config.seed * 1000 + self.epoch)
        stats = self._pass(batches(self.step), step, optimizer, steps, min_batch)
        self.merge_skips()
        if stats["stopped"]:
            self.step, self._partial = stats["step"], stats["partial"]
            self.checkpoint()
            raise self._preempted()
        self.run_dir.log_epoch(self.epoch, self.config.epochs, stats, self.started, pending=self.label_eta(self.epoch))
        return stats

    def _pass(self, batches: Iterable, step, optimizer, steps: int, min_batch: int) -> dict:
        """The batches of one epoch. Before each step the ranks agree -- one all-reduce of a number -- to train,
        to skip a batch that some rank cannot use (fewer than ``min_batch`` readable samples: BatchNorm needs
        two), or to end the pass because a rank ran out of samples or a stop signal came. So every rank takes
        the same optimiser steps and none waits alone in a collective. Returns the epoch's figures, and
        ``stopped``/``step``/``partial`` to resume a stopped pass."""
        config = self.config
        self.reporter.phase("train", max(1, steps - self.step))
        sums = dict(self._partial or {"loss": 0.0, "images": 0, "seconds": 0.0})
        position, rate, stopped, begin = self.step, None, False, time.perf_counter()
        batches = iter(batches)
        while True:
            indices = inputs = None
            if self._stop_requested():
                status = _STOP
            else:
                indices, inputs, bad = next(batches, (None, None, []))
                self.skips.add(bad)
                status = _RAN_OUT if indices is None else _SKIP if inputs is None or len(indices) < min_batch else _TRAIN
            status = self.dist.agree(status)
            if status in (_RAN_OUT, _STOP):
                stopped = status == _STOP
                break
            position += 1
            if status == _SKIP:
                self.reporter.advance()
                continue
            rate = learning_rate(config.lr, (self.epoch + (position - 1) / steps) / config.epochs, config.lr_schedule,
                                 config.warmup)
            for group in optimizer.param_groups:
                group["lr"] = rate
            value = float(step(indices, inputs))
            sums["loss"] += value * len(indices)
            sums["images"] += len(indices)
            self.reporter.advance(loss=value, lr=rate)
        self.reporter.end_phase()
        sums["seconds"] += time.perf_counter() - begin
        if rate is None:  # no step trained in this call: the rate the schedule gives here
            rate = learning_rate(config.lr, (self.epoch + position / steps) / config.epochs, config.lr_schedule,
                                 config.warmup)
        return {"loss": sums["loss"] / max(sums["images"], 1), "lr": rate, "images": sums["images"],
                "seconds": sums["seconds"], "images_per_s": sums["images"] / max(sums["seconds"], 1e-9),
                "stopped": stopped, "step": position, "partial": sums}

    def end_epoch(self) -> None:
        """The epoch is done: checkpoint, and stop if a signal came after its last batch."""
        self.epoch, self.step, self._partial = self.epoch + 1, 0, None
        self.checkpoint_or_stop()

    def checkpoint_or_stop(self) -> None:
        self.checkpoint()
        if self.dist.any(self._stop_requested()):
            raise self._preempted()
