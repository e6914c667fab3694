"""Training machinery shared by ``generate`` and ``transfer``: devices, schedules, one epoch of
multi-head cross-entropy, feature passes, checkpoints, and progress reporting hooks.

The library never prints: long jobs report through a :class:`Reporter`, which the CLI renders as progress bars.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

import json

from .._util.files import atomic_path, write_text_atomic
from ..data import Source
from ..errors import ConfigError
from ..data import Order, SkipLog, batches_per_rank, make_loader
from ._config import PRECISIONS

__all__ = [
    "Reporter",
    "RunDir",
    "resolve_device",
    "autocast",
    "compute_dtype",
    "network_precision",
    "native_bfloat16",
    "learning_rate",
    "make_optimizer",
    "train_step",
    "model_to",
    "images_to",
    "extract_features",
    "save_checkpoint",
    "load_checkpoint",
    "seed_everything",
]


class Reporter:
    """Progress hooks; the default does nothing. The CLI subclasses it with tqdm bars and epoch lines."""

    def begin(self, plan: dict) -> None:
        """A job has resolved its data and model and is about to start; ``plan`` says what it will do
        (``command``, ``data``, ``samples``, ``arch``, ``parameters``, ``checkpoint_bytes``, ``epochs``, ``out``,
        ``resume_epoch``/``resume_step`` when resuming, and the command's own entries)."""

    def phase(self, name: str, total: int) -> None:
        """A pass of ``total`` batches begins (``train``, ``label``, ``solve``)."""

    def advance(self, batches: int = 1, **info: Any) -> None:
        """``batches`` more batches done; ``info`` holds running figures such as the loss."""

    def end_phase(self) -> None:
        """The current pass ended."""

    def record(self, record: dict) -> None:
        """An epoch or label-step record (the lines of ``history.jsonl``)."""


def resolve_device(name: str | None) -> torch.device:
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


@functools.cache
def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX). There oneDNN's bf16 convolutions
    train 1.3-1.8x faster than float32 (``bench/precision.py`` on a 2-core AMD EPYC with AVX-512 BF16:
    labelkit_cnn, ResNet-18, AlexNet); a CPU without it emulates bf16, slower than float32."""
    try:  # torch's own CPU feature table (private; a torch without it gets float32)
        flags = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False
    return bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype the network's forward passes run in (``--precision``): ``auto`` is bfloat16 on CUDA and
    float32 on the CPU, where bfloat16 has to be asked for: on the development suite's image sets it trained
    faster, but over three seeds its labels were no better and on some sets lower (README, "bfloat16 on the
    CPU, when asked")."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bfloat16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def network_precision(config, device: torch.device) -> str | None:
    """What a run's network computes in on ``device`` (``float32`` or ``bfloat16``), as its start line, plan and
    artefact say; None for heads on an embedding table, which have no network (they train in float32)."""
    if getattr(config, "frozen", False) and not config.freeze:
        return None
    return str(compute_dtype(device, config.precision)).removeprefix("torch.")


def autocast(device: torch.device, precision: str = "auto"):
    """bfloat16 autocast where :func:`compute_dtype` says so (no loss scaling needed: float32's range); the
    weights, the optimiser and the losses stay float32."""
    if compute_dtype(device, precision) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def learning_rate(base: float, progress: float, schedule: str, warmup: float = 0.0) -> float:
    """Learning rate at ``progress`` in [0, 1] of training.

    ``step``: the paper's schedule scaled to the run (divide by 10 at 150/400, 300/400 and 350/400 of it);
    ``cosine``: linear warm-up over ``warmup`` of the run, then cosine decay to zero.
    """
    if warmup > 0 and progress < warmup:
        return base * (progress + 1e-3) / warmup
    if schedule == "step":
        drops = sum(progress >= edge for edge in (150 / 400, 300 / 400, 350 / 400))
        return base * 0.1**drops
    if schedule == "cosine":
        rest = (progress - warmup) / max(1e-9, 1.0 - warmup)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, rest)))
    if schedule == "constant":
        return base
    raise ConfigError(f"unknown learning-rate schedule {schedule!r}; use step, cosine or constant")


def make_optimizer(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float):
    """SGD with momentum; no weight decay on biases and normalisation parameters."""
    decay, no_decay = [], []
    for _name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False)


def model_to(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device``, channels_last: the layout convolutions run fastest in with cuDNN's bf16 and with
    oneDNN on a CPU (the images follow, see :func:`images_to`). Measured on a 2-core AMD EPYC, training images/s:
    labelkit_cnn at 16 px +7-23 %, ResNet-18 at 96 px +13 %, AlexNet at 32 px +10 %; its label pass about 2x."""
    return model.to(device).to(memory_format=torch.channels_last)


def images_to(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on ``device``; images (4-d) channels_last to match :func:`model_to`."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


def train_step(model: torch.nn.Module, optimizer, images: torch.Tensor, labels: torch.Tensor,
               device: torch.device, precision: str = "auto") -> torch.Tensor:
    """One optimiser step on the mean cross-entropy over the heads; ``labels`` is (heads, batch). The images go
    channels_last and the forward pass runs under :func:`autocast`. Returns the loss, detached."""
    images = images_to(images, device)
    labels = labels.to(device, non_blocking=True)
    with autocast(device, precision):
        outputs = model(images)
        loss = sum(F.cross_entropy(out.float(), labels[h]) for h, out in enumerate(outputs)) / len(outputs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


# What a rank can do at a training step. The ranks agree on the smallest, so all of them do the same.
@torch.no_grad()
def extract_features(model_features, dim: int, source: Source, transform, order: Order, *, workers: int,
                     device: torch.device, skips: SkipLog, reporter: Reporter,
                     sink: Callable[[np.ndarray, torch.Tensor], None] | None = None) -> tuple[torch.Tensor | None, np.ndarray]:
    """One pass over the samples of ``order`` (a labelling pass: every kept sample exactly once across ranks);
    returns (N, dim) float32 features and a seen mask. A random ``transform`` draws each sample's randomness
    from (``order.seed``, ``order.epoch``, sample). With a ``sink(rows, features)`` (e.g. adding to a
    :class:`~labelkit.solver.FeatureWriter`) the features go there and the first value returned is None:
    nothing of size N x dim is held. The model computes in what the caller's :func:`autocast` says."""
    loader = make_loader(source, transform, order, workers=workers, device=device)
    features = torch.zeros((len(source), dim), dtype=torch.float32) if sink is None else None
    seen = np.zeros(len(source), dtype=bool)
    reporter.phase("label", batches_per_rank(source, order.keep, order.batch_size, world=order.world, workers=workers))
    for indices, images, bad in loader:
        skips.add(bad)
        if images is not None:
            out = model_features(images_to(images, device))
            if sink is None:
                features[indices] = out.float().cpu()
            else:
                sink(indices.numpy(), out)
            seen[indices.numpy()] = True
        reporter.advance()
    reporter.end_phase()
    return features, seen


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Atomic: a crash while saving leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{path}: cannot read the checkpoint ({str(exc).splitlines()[0]}); start afresh "
                          "without --resume or use another --out") from None


# options that may change when a run is resumed
RESUMABLE_CHANGES = {"out", "workers", "device", "strict"}


def saved_record(out: Path) -> dict:
    try:
        return json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def run_finished(out: Path) -> bool:
    """The run in ``out`` wrote its results and dropped its checkpoint."""
    out = Path(out)
    return (out / "labels.parquet").is_file() and (out / "model.safetensors").is_file() \
        and not (out / "checkpoint.pt").exists()


def check_run_dir(out, resume: bool) -> None:
    """Refuse, before any work, a fresh run into a folder that holds one, and a resume of a finished run. (A
    resume into an empty folder starts the run: a requeue script may pass ``--resume`` from the first launch.)"""
    out = Path(out)
    if not (out / "config.json").exists():
        return
    if run_finished(out):
        raise ConfigError(f"{out} holds a finished run (labels.parquet, model.safetensors)"
                          + ("; there is nothing to resume" if resume else "") + ": choose another --out")
    if not resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")


class RunDir:
    """A run directory: refuses to mix runs, keeps ``history.jsonl`` in step with ``checkpoint.pt``.

    ``restore()`` returns the last checkpoint (and trims the history to it) when resuming; ``log`` appends a
    record; ``save`` writes the checkpoint atomically with the number of history lines it covers.
    """

    def __init__(self, config, resume: bool, reporter: Reporter, writer: bool = True):
        self.out = Path(config.out)
        self.writer = writer  # under torchrun only rank 0 writes
        self.weights = self.out / "model.safetensors"
        self.reporter = reporter
        self.resume = resume
        self.history = self.out / "history.jsonl"
        self.checkpoint = self.out / "checkpoint.pt"
        self._lock = self._take_lock() if writer else None
        try:
            self._check_reuse(config)
        except BaseException:
            self.close()
            raise
        self.lines = 0
        self._epoch_seconds: list[float] = []

    def _take_lock(self):
        """Hold ``OUT/.lock`` for the run's lifetime: a second run started into the same folder (even at the
        same moment) is refused instead of interleaving its history and checkpoints. The operating system drops
        the lock when the process ends, so a crashed run leaves no stale lock."""
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock, the checks below still apply
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        handle = open(self.out / ".lock", "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"{self.out} is in use by another labelkit run ({holder}); wait for it to end or "
                              "choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        return handle

    def close(self) -> None:
        """Release the run directory (its lock)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _check_reuse(self, config) -> None:
        """Refuse to mix runs: a finished or started run needs ``--resume`` with the same settings."""
        stored = self.out / "config.json"
        if self.writer:
            check_run_dir(self.out, self.resume)
        if self.writer and stored.exists():
            previous = json.loads(stored.read_text()).get("config", {})
            ours = config.to_dict()
            changed = sorted(k for k in ours if k not in RESUMABLE_CHANGES and previous.get(k) != ours[k])
            if changed:
                detail = ", ".join(f"{k}: {previous.get(k)!r} -> {ours[k]!r}" for k in changed)
                raise ConfigError(f"--resume: {self.out} holds a run with other settings ({detail})")
        self.out.mkdir(parents=True, exist_ok=True)

    def restore(self, record: dict) -> dict | None:
        """Write ``config.json`` (``record``); return the checkpoint to resume from, if resuming."""
        saved = load_checkpoint(self.checkpoint) if self.resume and self.checkpoint.exists() else None
        self.lines = saved["history_lines"] if saved else 0
        if not self.writer:
            return saved
        kept = self.history.read_text().splitlines()[: self.lines] if saved and self.history.exists() else []
        write_text_atomic(self.history, "".join(line + "\n" for line in kept))
        if saved and "plan" not in record:  # the plan was made when the run started; a resume keeps it
            record = {**record, **{k: v for k, v in saved_record(self.out).items() if k == "plan"}}
        write_text_atomic(self.out / "config.json", json.dumps(record, indent=2))
        return saved

    @property
    def finished(self) -> bool:
        """The run wrote its results and dropped its checkpoint."""
        return run_finished(self.out)

    def finish(self) -> None:
        """Results are written: the checkpoint (weights and optimizer state, often the largest file of the
        run) is no longer needed to resume anything."""
        if self.writer:
            self.checkpoint.unlink(missing_ok=True)

    def log(self, record: dict) -> None:
        if not self.writer:
            self.lines += 1
            return
        with open(self.history, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.lines += 1
        self.reporter.record(record)

    def save(self, state: dict) -> None:
        if not self.writer:
            return
        save_checkpoint(self.checkpoint, {**state, "history_lines": self.lines})

    def log_epoch(self, epoch: int, epochs: int, stats: dict, started: float, pending: float = 0.0) -> None:
        """The per-epoch line: loss, learning rate, images/s, elapsed and ETA (the last 5 epochs' pace, plus
        ``pending`` seconds of label steps still to come)."""
        self._epoch_seconds.append(stats["seconds"])
        left = (epochs - epoch - 1) * float(np.mean(self._epoch_seconds[-5:])) + pending
        self.log({"type": "epoch", "epoch": epoch + 1, "epochs": epochs, "loss": round(stats["loss"], 5),
                  "lr": stats["lr"], "images_per_s": round(stats["images_per_s"], 1),
                  "elapsed_s": round(time.perf_counter() - started, 1), "eta_s": round(left, 1)})

    def save_weights(self, model, arch: str, kind: str) -> Path:
        from safetensors.torch import save_file

        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        path = self.weights
        with atomic_path(path) as tmp:
            save_file(weights, str(tmp), metadata={"arch": arch, "labelkit": kind})
        return path
