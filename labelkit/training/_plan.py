"""Recipes that fit the data and the machine, a time budget, and the plan a run shows before it starts.

``--recipe auto`` (the default for data without a recipe of its own) looks at a sample of the images -- how
many, how large, grey or colour -- and at the machine, and chooses the architecture, input size, heads,
augmentation, start and schedule, each with the reason it was chosen. ``--budget`` then times a few real
training batches, a label pass and a solve on this machine, and sets the epochs so that the whole run, label
steps included, ends within the budget. :func:`make_plan` does all of it and returns a :class:`Plan`: the
resolved configuration, the reasons, the probe and the estimates (wall time, label-step memory, disk), which
``generate`` prints before training, ``--dry-run`` prints alone, and the run records in ``config.json`` and
in the artefact.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._config import RECIPE_NAMES, RECIPES, SelaConfig, memory_bytes, resolve_config
from ..errors import ConfigError, DataError
from .._util.system import system_memory_available

__all__ = ["Plan", "make_plan", "plan_transfer", "parse_duration", "profile_data", "machine_info", "auto_recipe", "RECIPE_NAMES",
           "DEFAULT_CPU_BUDGET"]

DEFAULT_CPU_BUDGET = 15 * 60  # seconds: a run on a CPU ends within this unless --budget says otherwise
SMALL_SIDE = 64  # images at most this many pixels on their shorter side are "small" (digits, icons, CIFAR)
AUTO_MAX_EPOCHS = 12  # with the graph start, more epochs drifted: a 10k-image folder gave NMI 0.933 after 12, 0.895 after 20
BUDGET_SHARE = 0.8  # plan to this share of --budget; the run stops early, between epochs, if it must


class BudgetError(ConfigError):
    """The run cannot fit the time budget or the machine."""


# -- looking at the data and the machine -------------------------------------------------------------------


def _sample_images(source, count: int, seed: int) -> list[tuple[str, Any]]:
    """(id, PIL image) of up to ``count`` samples: a seeded random choice, or the first ones of the first shards
    (a stream cannot be sampled without reading all of it)."""
    n = len(source)
    if source.map_style:
        picked = np.sort(np.random.default_rng(seed).choice(n, min(n, count), replace=False))
        out = []
        for i in picked:
            try:
                out.append((source.ids[i], source.load(int(i))))
            except Exception:  # an undecodable image is the loader's business (--strict), not the profile's
                continue
        return out
    out = []
    for i, image, _reason in source.iter_samples(source.urls[:4]):
        if image is not None:
            out.append((source.ids[i], image))
        if len(out) >= count:
            break
    return out


def profile_data(source, count: int = 256, seed: int = 0) -> dict:
    """What the auto recipe needs to know about the data: sample count, and for images the sizes, aspect and
    whether they are grey, from ``count`` sampled images."""
    profile: dict[str, Any] = {"samples": len(source), "kind": source.kind}
    if not source.has_pixels:
        return {**profile, "vectors": True, "dim": int(source.dim)}
    images = _sample_images(source, count, seed)
    if not images:
        raise DataError(f"{source.spec}: none of the {count} sampled images could be decoded")
    sides = np.array([image.size for _, image in images], dtype=np.int64)  # (width, height)
    short = sides.min(axis=1)
    grey = all(_is_grey(image) for _, image in images)
    smallest, largest = int(np.argmin(short)), int(np.argmax(short))
    profile.update(sampled=len(images), side_median=int(np.median(short)), side_min=int(short[smallest]),
                   side_max=int(short[largest]), smallest=images[smallest][0], largest=images[largest][0],
                   aspect_median=round(float(np.median(sides.max(axis=1) / sides.min(axis=1))), 3), grey=grey)
    return profile


def _is_grey(image) -> bool:
    if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return True
    array = np.asarray(image.convert("RGB"), dtype=np.int16)
    return bool(np.abs(array[..., 0] - array[..., 1]).max() <= 2 and np.abs(array[..., 1] - array[..., 2]).max() <= 2)


def machine_info(device: str = "auto") -> dict:
    """Cores, free memory and accelerator of this machine, as the recipe and the plan use them."""
    from ._loop import resolve_device

    resolved = resolve_device(device)
    info: dict[str, Any] = {"device": resolved.type, "cores": _cores(),
                            "ram_available": system_memory_available()}
    if resolved.type == "cuda":
        free, total = torch.cuda.mem_get_info(resolved)
        info.update(gpu=torch.cuda.get_device_name(resolved), gpu_free=int(free), gpu_total=int(total))
    return info


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# -- the auto recipe -----------------------------------------------------------------------------------------


def auto_recipe(profile: dict, machine: dict, clusters_given: bool) -> tuple[dict, dict]:
    """(options, reasons): the recipe for this data on this machine, and why each option was chosen.

    Options the user gives still win; the reasons of options they override are dropped by the caller."""
    from ._graph import GRAPH_LIMIT, GRAPH_MIN

    n, gpu = profile["samples"], machine["device"] == "cuda"
    recipe: dict[str, Any] = {}
    why: dict[str, str] = {}
    small = profile["side_median"] <= SMALL_SIDE
    grey = profile["grey"]
    if small:
        recipe["arch"] = "labelkit_cnn"
        why["arch"] = f"images of {profile['side_median']} px: a compact conv net (0.1 M parameters) fits them"
        size = 16 if grey else 32
        size = min(size, max(8, 4 * round(profile["side_median"] / 4)))
        recipe["image_size"] = size
        why["image_size"] = ("grey shapes keep their form at 16 px, where an epoch costs about a third of one at "
                             "28 px" if grey and size == 16 else f"{size} px: the images' own scale")
        recipe["augment"] = "digits" if grey else "paper"
        why["augment"] = ("small grey images: crops, small rotations, brightness and contrast; no flips (they change "
                          "digits and letters) and no colour jitter" if grey else
                          "small colour images: the paper's crops, flips and colour jitter")
        recipe["head_temperature"] = None
        recipe["batch_size"] = 256 if gpu else 128
        recipe["workers"] = 0 if not gpu else min(8, machine["cores"])
        why["workers"] = ("small images decode in microseconds: loader processes would only compete with training "
                          "for the cores" if not gpu else "one loader process per core, at most 8")
    else:
        recipe["arch"] = "resnet50" if gpu else "resnet18"
        why["arch"] = ("photos on a GPU: ResNet-50" if gpu else
                       "photos on a CPU: ResNet-18, the smallest standard backbone (a pretrained one with --pretrained "
                       "--freeze is faster and better where its weights are cached)")
        recipe["image_size"] = 224 if gpu else 96
        why["image_size"] = ("224 px, the backbone's native size" if gpu else
                             "96 px: on a CPU, 224 px would leave time for too few epochs")
        recipe["augment"] = "grey" if grey else "paper"
        why["augment"] = ("grey photos: the paper's crops and flips with brightness and contrast only" if grey else
                          "colour photos: the paper's crops, flips, colour jitter and random grey")
        recipe["batch_size"] = 256 if gpu else 64
    why["batch_size"] = f"{recipe['batch_size']}: {'fills a GPU' if gpu else 'keeps a CPU step short'}"
    recipe.update(lr=0.05, lr_schedule="cosine", warmup=0.05, weight_decay=5e-4, momentum=0.9)
    why["lr"] = "0.05 with a cosine schedule and 5 % warm-up, the schedule that a run of any length can end on"
    if GRAPH_MIN <= n <= GRAPH_LIMIT:
        recipe["start"] = "graph"
        recipe["label_spacing"] = "even"
        recipe["epochs"], recipe["label_steps"] = AUTO_MAX_EPOCHS, AUTO_MAX_EPOCHS + 1
        why["start"] = ("graph: first labels from the spectral clusters of the thumbnails' kNN graph (seconds for "
                        f"{n:,} images); then a label step after every epoch")
    else:
        recipe["start"] = "random"
        recipe["epochs"], recipe["label_steps"] = 100, 40
        why["start"] = (f"random, as the paper: {n:,} images are outside the graph start's range of "
                        f"{GRAPH_MIN:,}-{GRAPH_LIMIT:,}")
    if not clusters_given:
        ks = [k for k in (10, 30, 100) if k * 20 <= n] or [max(2, n // 20)]
        recipe["clusters"] = tuple(ks)
        recipe["heads"] = len(ks)
        why["clusters"] = (f"no --clusters given: one head at each of K = {', '.join(map(str, ks))} (over-clustering "
                           "is safer than merging classes; ground truth is never used to choose K)")
    else:
        recipe["heads"] = 3
        why["heads"] = "3 heads of the given K: independent starts, whose agreement shows how stable the labels are"
    return recipe, why


# -- durations, probes and estimates -----------------------------------------------------------------------


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


@dataclass
class Plan:
    """A resolved run before it starts: the configuration, why it is so, and what it will cost."""

    config: SelaConfig
    recipe: str
    reasons: dict = field(default_factory=dict)
    profile: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    budget: float | None = None
    probe: dict = field(default_factory=dict)
    estimate: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)  # wall clock when planning began: the budget counts from here

    def record(self) -> dict:
        """What ``config.json`` and the artefact keep of the plan."""
        return {"recipe": self.recipe, "reasons": self.reasons, "profile": self.profile, "machine": self.machine,
                "budget_s": self.budget, "probe": self.probe, "estimate": self.estimate,
                "deadline": self.started + self.budget if self.budget else None}

    def lines(self) -> list[str]:
        """The plan as a person reads it."""
        c, e = self.config, self.estimate
        what = f"recipe {self.recipe}" if isinstance(c, SelaConfig) else "transfer"
        seen = [f"{self.profile['samples']:,} samples"] if "samples" in self.profile else []
        if "side_median" in self.profile:
            seen.append(f"{self.profile['side_median']} px {'grey' if self.profile['grey'] else 'colour'}")
        out = [f"plan: {what} for {c.data}" + (f" ({', '.join(seen)})" if seen else "")
               + f" on {self.machine.get('device', '?')}"
               + (f" ({self.machine['cores']} cores)" if self.machine.get("device") == "cpu" else "")]
        if isinstance(c, SelaConfig):
            if not c.frozen:
                what_trains = f"{c.arch} at {c.image_size} px"
            elif c.freeze:  # heads on a fixed backbone's cached views; the start is k-means of the features
                what_trains = f"heads on {c.arch} (frozen) at {c.image_size} px, {_plural(c.views, 'view')}"
            else:
                what_trains = "heads on the vectors"
            out.append(f"  {what_trains}, heads {c.head_clusters()}, {_plural(c.epochs, 'epoch')}, "
                       f"{_plural(e.get('label_steps', c.label_steps), 'label step')}, batch {c.batch_size}"
                       + ("" if c.frozen else f", augment {c.augment}, start {c.start}")
                       + (f", prior {c.prior}" if c.prior != "uniform" else "")
                       + (f", balance {c.balance:g}" if c.balance is not None else ""))
        else:
            out.append(f"  {c.arch} at {c.image_size} px trained on {c.labels} (heads {c.heads}), {c.epochs} epochs, "
                       f"batch {c.batch_size}, augment {c.augment}")
        for name, reason in self.reasons.items():
            out.append(f"  {name}: {reason}")
        if e:
            budget = f" (budget {_clock(self.budget)})" if self.budget else ""
            step = "label step" if isinstance(c, SelaConfig) else "prediction pass"
            out.append(f"  estimate: {_clock(e['seconds'])} wall time{budget}; {step} peak memory "
                       f"{_bytes(e['label_memory'])}; disk {_bytes(e['disk'])}")
            if "kernel" in e:
                n_k = e["kernel_bytes"]["stored"]
                how = {"stored": f"stored in memory ({_bytes(n_k)})",
                       "disk": f"on scratch disk ({_bytes(n_k)} in {c.out}; {_bytes(e['kernel_bytes']['disk'])} in memory)",
                       "stream": f"streamed: recomputed from the features every iteration "
                                 f"({_bytes(e['kernel_bytes']['stream'])} in memory; stored it would take {_bytes(n_k)})"}
                out.append(f"  label kernel: {how[e['kernel']]}; same labels on every path")
            if e.get("features") == "disk":
                out.append(f"  label features: float16 in {c.out}/label_features.npy during each label step, read "
                           "by blocks (they do not fit the label memory beside the kernel; float16 can move a near-tied "
                           "label)")
            if self.probe:
                out.append(f"  probe: {self.probe['train_images_per_s']:.0f} img/s training, "
                           f"{self.probe['label_images_per_s']:.0f} img/s label pass"
                           + (f", solve {self.probe['solve_s_per_step']:.2f} s per label step"
                              if isinstance(c, SelaConfig) else ""))
        return out


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


def make_plan(options: dict, config_file: str | None = None, *, recipe: str | None = None, budget: str | None = None,
              resume: bool = False, probe: bool = True) -> Plan:
    """Resolve a ``generate`` run: recipe (``auto`` by default for data without one), options, config file,
    budget. ``probe=False`` skips the timing probe (estimates are then left out)."""
    from ..data import resolve

    if recipe is not None and recipe not in RECIPE_NAMES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPE_NAMES)}, got {recipe!r}")
    seconds = parse_duration(budget) if budget is not None else None
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and seconds is not None:
        raise ConfigError("--budget times this one process; under torchrun give --epochs instead")
    if resume:  # the saved configuration is the plan; it was made when the run started
        return Plan(resolve_config(options, config_file, resume=True), recipe="saved")
    given = {k: v for k, v in options.items() if v is not None}
    from_file = {}
    if config_file:
        from ._config import read_config_file

        from_file = read_config_file(config_file)
    chosen = {**from_file, **given}
    data = chosen.get("data", SelaConfig.data)
    name = recipe or ("digits" if data in RECIPES else "auto")
    base = resolve_config(options, config_file, recipes=_recipes_for(name, data))
    source = None  # resolved once (a folder or shard scan can take a while) and shared by profile and probe
    if base.frozen or name != "auto":
        plan = Plan(base, recipe=name if not base.frozen else f"{name} (fixed features)")
    else:
        source = resolve(base.data)
        profile = profile_data(source, seed=base.seed)
        _check_sizes(profile, chosen)
        machine = machine_info(base.device)
        options_auto, reasons = auto_recipe(profile, machine, clusters_given="clusters" in chosen)
        reasons = {k: v for k, v in reasons.items() if k not in chosen}  # an option given needs no reason
        recipes = {data: {**options_auto, "out": _default_out(data)}}
        base = resolve_config(options, config_file, recipes=recipes)
        plan = Plan(base, recipe="auto", reasons=reasons, profile=profile, machine=machine)
    if not plan.machine:
        plan.machine = machine_info(plan.config.device)
    if seconds is None and plan.machine["device"] == "cpu" and name == "auto" and not plan.config.frozen \
            and not distributed:
        seconds = DEFAULT_CPU_BUDGET
        plan.reasons["budget"] = f"{_clock(seconds)} (the default on a CPU; --budget changes it)"
    plan.budget = seconds
    if probe and not plan.config.frozen and not distributed:
        _fit_budget(plan, source or resolve(plan.config.data), epochs_given="epochs" in chosen,
                    steps_given="label_steps" in chosen)
    return plan


def _recipes_for(name: str, data: str) -> dict:
    if name == "digits":
        return {data: RECIPES["builtin:digits"]}
    if name == "paper":
        return {}
    return RECIPES


def _default_out(data: str) -> str:
    stem = os.path.basename(os.path.normpath(str(data))) or "data"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem.split(".")[0]).strip("-") or "data"
    return f"runs/{stem}"


def _check_sizes(profile: dict, chosen: dict) -> None:
    """Images of wildly different sizes have no one input size that suits them all: ask for one."""
    if "image_size" in chosen:
        return
    if profile["side_max"] > 16 * profile["side_min"]:
        raise DataError(f"images of wildly different sizes: {profile['smallest']} is {profile['side_min']} px on its "
                        f"shorter side, {profile['largest']} is {profile['side_max']} px; give --image-size (every "
                        "image is resized to it) or sort them into separate folders")


def _fit_budget(plan: Plan, source, *, epochs_given: bool, steps_given: bool) -> None:
    """Probe this machine, set the epochs (and label steps) to fit the budget, and estimate the run."""
    config = plan.config
    probe = _probe(config, source)
    plan.probe = probe
    n = len(source)
    plan.profile.setdefault("samples", n)
    ks = config.head_clusters()
    fixed = probe["startup_s"] + (probe["graph_s"] if config.start == "graph" else 0.0)
    per_step = config.label_views * n / probe["label_images_per_s"] + probe["solve_s_per_step"]
    per_epoch = n / probe["train_images_per_s"]
    every = config.label_spacing == "even" and config.label_steps >= config.epochs
    epochs, steps = config.epochs, config.label_steps
    if plan.budget is not None and not epochs_given:
        # the last label step comes after the last epoch; the margin is for what a probe of a few batches does
        # not see (measured on a 10k-image folder: whole epochs ran about 20 % slower than the probe's batches)
        room = BUDGET_SHARE * plan.budget - fixed - per_step
        if every:
            epochs = math.floor(room / (per_epoch + per_step))
        else:
            share = min(1.0, steps / max(1, epochs))
            epochs = math.floor(room / (per_epoch + share * per_step))
        if epochs < 1:
            need = fixed + per_epoch + 2 * per_step
            raise BudgetError(f"--budget {_clock(plan.budget)} is too short for one epoch and one label step of "
                              f"{n:,} samples here (about {_clock(need)}); give a longer --budget, or a smaller "
                              "--image-size or --arch")
        cap = AUTO_MAX_EPOCHS if plan.recipe == "auto" else config.epochs
        epochs = min(epochs, cap)
        if every or not steps_given:
            steps = epochs + 1 if every else max(1, round(steps * epochs / max(1, config.epochs)))
        plan.config = dataclasses.replace(config, epochs=epochs, label_steps=steps)
    from ._sela import label_schedule

    count = len(label_schedule(plan.config.epochs, plan.config.label_steps, plan.config.label_spacing))
    if plan.config.start == "graph":
        count -= 1 if 0 in label_schedule(plan.config.epochs, plan.config.label_steps, plan.config.label_spacing) else 0
    seconds = fixed + plan.config.epochs * per_epoch + count * per_step
    if "epochs" in plan.reasons or (plan.budget is not None and not epochs_given):
        plan.reasons["epochs"] = (f"{_plural(plan.config.epochs, 'epoch')} and {_plural(count, 'label step')} fit the "
                                  f"{_clock(plan.budget)} budget at the probed speed"
                                  + (" (the recipe's most)" if plan.config.epochs == AUTO_MAX_EPOCHS
                                     and plan.recipe == "auto" else ""))
    from ..solver import features_on_disk, kernel_path, working_bytes

    # float32 features (or, beyond the label memory, a float16 file read by blocks), and the bf16 kernel when
    # it is stored (on disk or streamed: one block of rows per thread)
    device = "cuda" if plan.machine.get("device") == "cuda" else "cpu"
    memory = memory_bytes(config.label_memory)
    path = kernel_path(n, max(ks), device, memory, scratch=config.out)
    working = working_bytes(n, max(ks), device, memory)
    kernels = {"stored": n * max(ks) * 2, "disk": working, "stream": working}
    spilled = features_on_disk(n, probe["feature_dim"], max(ks), device, memory, scratch=config.out)
    label_memory = (0 if spilled else n * probe["feature_dim"] * 4) + kernels[path]
    if plan.config.start == "graph":
        label_memory = max(label_memory, n * probe["thumbnail_pixels"] * 4 * 2)
    disk = 2 * probe["checkpoint_bytes"] + n * (len(ks) * 8 + 24) + 4096 * (plan.config.epochs + count)
    disk += n * probe["feature_dim"] * 2 if spilled else 0
    plan.estimate = {"seconds": round(seconds, 1), "label_memory": int(label_memory), "disk": int(disk),
                     "kernel": path, "features": "disk" if spilled else "memory", "kernel_bytes": {name: int(b) for name, b in kernels.items()},
                     "label_steps": count, "per_epoch_s": round(per_epoch, 2), "per_label_step_s": round(per_step, 2)}
    _check_memory(plan, label_memory)


def _check_memory(plan: Plan, needed: int) -> None:
    machine = plan.machine
    free = machine.get("gpu_free") if machine.get("device") == "cuda" else machine.get("ram_available")
    if free is not None and needed > 0.9 * free:
        where = "GPU memory" if machine.get("device") == "cuda" else "available RAM"
        raise BudgetError(f"the label step needs about {_bytes(needed)} but this machine has {_bytes(free)} of {where}; "
                          "lower --clusters or --heads, or use --freeze with --pca to label smaller features")


def _probe(config, source, ks: list[int] | None = None) -> dict:
    """Time this run's own pieces on this machine: a few training batches through the real loader and
    augmentation, a label pass batch, and one solve on a sample; returns throughputs and sizes."""
    from ._graph import GRAPH_THUMBNAIL
    from ..data import Order, eval_transform, make_loader
    from ._models import SelaModel, create_backbone, feature_dim
    from ..data import augmentation_preset
    from ._sela import head_balance
    from ..solver import Algorithm, Storage, kernel_path, solve
    from ._loop import resolve_device

    started = time.perf_counter()
    device = resolve_device(config.device)
    state = torch.get_rng_state()
    torch.manual_seed(config.seed)
    try:
        solves = ks is None  # a SeLa run solves; a transfer run (ks given: its heads' K) does not
        ks = config.head_clusters() if solves else ks
        backbone = create_backbone(config.arch, config.image_size, config.init, pretrained=config.pretrained)
        model = SelaModel(backbone, ks, getattr(config, "head_temperature", None)).to(device)
        dim = feature_dim(model.backbone)
        startup = time.perf_counter() - started
        batch = min(config.batch_size, max(8, len(source) // 4))  # at least one timed batch after the first
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        loader = make_loader(source, augmentation_preset(config.augment, config.image_size),
                             Order(batch, shuffle=True, seed=config.seed), workers=config.workers)
        timed, images, t0 = 0, 0, None
        for i, (_indices, x, _bad) in enumerate(loader):
            if x is None:
                continue
            if i == 1:  # the first batch pays for worker start-up and lazy initialisation
                t0 = time.perf_counter()
            x = x.to(device)
            loss = sum(torch.nn.functional.cross_entropy(out, torch.zeros(len(x), dtype=torch.long, device=device))
                       for out in model(x))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if i >= 1:
                images += len(x)
                timed += 1
            if timed >= 6 or images >= len(source):
                break
        train_rate = images / (time.perf_counter() - t0) if images else 1.0
        model.eval()
        label_loader = make_loader(source, eval_transform(config.image_size),
                                   Order(2 * batch, shuffle=True, seed=config.seed), workers=config.workers)
        t1, seen = time.perf_counter(), 0
        with torch.no_grad():
            for i, (_indices, x, _bad) in enumerate(label_loader):
                if x is not None:
                    model.features(x.to(device))
                    seen += len(x)
                if i >= 2:
                    break
        label_rate = seen / (time.perf_counter() - t1) if seen else 1.0
        rows = min(len(source), 20_000)
        solve_s = 0.0
        # the path the run will take at full size, timed on a sample of rows from features of the run's width
        path = kernel_path(len(source), max(ks), device, memory_bytes(getattr(config, "label_memory", None)),
                           scratch=config.out)
        for k in sorted(set(ks)) if solves else []:
            features, weight = torch.randn(rows, dim), torch.randn(k, dim) * (2 / dim**0.5)
            t2 = time.perf_counter()
            solve(features=features, weight=weight, algorithm=Algorithm(lam=config.lam, tol=config.sinkhorn_tol),
                  balance=head_balance(config, k, rows), storage=Storage(kernel=path))
            solve_s += (time.perf_counter() - t2) * ks.count(k) * len(source) / rows
        checkpoint = sum(p.numel() * p.element_size() * 2 for p in model.parameters())
    finally:
        torch.set_rng_state(state)
    side = min(config.image_size, GRAPH_THUMBNAIL)
    return {"train_images_per_s": round(train_rate, 1), "label_images_per_s": round(label_rate, 1),
            "solve_s_per_step": round(solve_s, 3), "startup_s": round(startup + 2.0, 2),
            # the graph start: one thumbnail pass (decoding dominates, as in the label pass) and the spectral
            # embedding (measured: 4.8 s for 10,782 samples on 2 cores, close to linear in N)
            "graph_s": round(len(source) / label_rate + 4.5e-4 * len(source), 2),
            "feature_dim": int(dim), "kernel": path if solves else None, "thumbnail_pixels": 3 * side * side, "checkpoint_bytes": int(checkpoint),
            "probe_s": round(time.perf_counter() - started, 2)}


def plan_transfer(config, *, probe: bool = True) -> Plan:
    """The plan of a ``transfer`` run: its configuration and, probed on this machine, the estimated wall time
    (training epochs and the final prediction pass), the prediction pass's memory and the disk use."""
    from ..artefact import read_artefact
    from ..data import resolve
    from ..quality import parse_heads

    parent = read_artefact(config.labels)
    ks = [parent.heads[h].k for h in parse_heads(config.heads, parent.num_heads, option="--heads")]
    source = resolve(config.data)
    n = len(source)
    plan = Plan(config, recipe="transfer", machine=machine_info(config.device), profile={"samples": n})
    if not probe or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return plan
    plan.probe = _probe(config, source, ks=ks)
    per_epoch = n / plan.probe["train_images_per_s"]
    predict = n / plan.probe["label_images_per_s"]
    seconds = plan.probe["startup_s"] + config.epochs * per_epoch + predict
    memory = n * (plan.probe["feature_dim"] * 4 + sum(ks) * 4)  # features, or each head's scores, of every sample
    disk = 2 * plan.probe["checkpoint_bytes"] + n * (len(ks) * 8 + 24) + 4096 * config.epochs
    plan.estimate = {"seconds": round(seconds, 1), "label_memory": int(memory), "disk": int(disk),
                     "label_steps": 0, "per_epoch_s": round(per_epoch, 2), "per_label_step_s": round(predict, 2)}
    _check_memory(plan, memory)
    return plan
