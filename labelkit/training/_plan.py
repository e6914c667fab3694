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

import torch

from ._budget import (BUDGET_SHARE, DEFAULT_CPU_BUDGET, BudgetError, _bytes, _clock, _plural, label_step_count,
                      parse_duration)
from ._loop import native_bfloat16, network_precision
from ._config import RECIPE_NAMES, RECIPES, SelaConfig, memory_bytes, resolve_config
from ..errors import ConfigError, DataError
from ._table_plan import fit_table, fit_table_budget
from ._recipe import AUTO_MAX_EPOCHS, auto_recipe, machine_info, profile_data
from ._timing import _probe

__all__ = ["Plan", "make_plan", "parse_duration", "RECIPE_NAMES", "DEFAULT_CPU_BUDGET"]

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

    @property
    def precision(self) -> str | None:
        """What the network will compute in on this machine (see :func:`network_precision`)."""
        return network_precision(self.config, torch.device(self.machine.get("device", "cpu")))

    def record(self) -> dict:
        """What ``config.json`` and the artefact keep of the plan."""
        return {"recipe": self.recipe, "reasons": self.reasons, "profile": self.profile, "machine": self.machine,
                "precision": self.precision, "budget_s": self.budget, "probe": self.probe, "estimate": self.estimate,
                "planned_at": self.started, "deadline": self.started + self.budget if self.budget else None}

    def _where(self) -> str:
        """The machine as the plan's first line names it, e.g. ``cpu (2 cores, float32)``."""
        cpu = self.machine.get("device") == "cpu"
        where = [f"{self.machine['cores']} cores"] if cpu else []
        if self.precision:
            emulated = cpu and self.precision == "bfloat16" and not native_bfloat16()
            where.append(self.precision + (" emulated by this CPU, slower than float32" if emulated else ""))
        return self.machine.get("device", "?") + (f" ({', '.join(where)})" if where else "")

    def lines(self) -> list[str]:
        """The plan as a person reads it."""
        c, e = self.config, self.estimate
        what = f"recipe {self.recipe}" if isinstance(c, SelaConfig) else f"transfer, recipe {self.recipe},"
        seen = [f"{self.profile['samples']:,} samples"] if "samples" in self.profile else []
        if "side_median" in self.profile:
            seen.append(f"{self.profile['side_median']} px {'grey' if self.profile['grey'] else 'colour'}")
        out = [f"plan: {what} for {c.data}" + (f" ({', '.join(seen)})" if seen else "") + f" on {self._where()}"
               + f", into {c.out}"]
        if isinstance(c, SelaConfig):
            if not c.frozen:
                what_trains = f"{c.arch} at {c.image_size} px"
            elif c.freeze:  # heads on a fixed backbone's cached views; the start is k-means of the features
                what_trains = f"heads on {c.arch} (frozen) at {c.image_size} px, {_plural(c.views, 'view')}"
            else:
                what_trains = "heads on the vectors"
            out.append(f"  {what_trains}, heads {c.head_clusters()}, {_plural(c.epochs, 'epoch')}, "
                       f"{_plural(label_step_count(c, self.profile.get('samples')), 'label step')}, batch {c.batch_size}"
                       + ("" if c.frozen else f", augment {c.augment}, start {f'from {c.start_from}' if c.start_from else c.start}")
                       + (f", prior {c.prior}" if c.prior != "uniform" else "")
                       + (f", balance {c.balance:g}" if c.balance is not None else ""))
        else:
            out.append(f"  {c.arch} at {c.image_size} px trained on {c.labels} (heads {c.heads}), {c.epochs} epochs, "
                       f"batch {c.batch_size}, augment {c.augment}")
        for name, reason in self.reasons.items():
            out.append(f"  {name}: {reason}")
        upto = " for every epoch" if getattr(c, "settle", 0) else ""  # --settle may end it sooner
        if e and "peak_memory" in e:  # heads on a table
            budget = f" (budget {_clock(self.budget)})" if self.budget else ""
            out.append(f"  estimate: {_clock(e['seconds'])} wall time{upto}{budget}; peak memory {_bytes(e['peak_memory'])}; "
                       f"label kernel {e['kernel']}")
            p = self.probe
            out.append(f"  probe: {p['train_rows_per_s']:,.0f} vectors/s training, {p['label_rows_per_s']:,.0f} "
                       f"vectors/s label pass, {p['rows_whitened_per_s']:,.0f} vectors/s read and whitened, solve "
                       f"{p['solve_s_per_step']:.1f} s per label step; once: whitening fit {p['whiten_fit_s']:.1f} s, "
                       f"per head {p['head_seed_s']:.1f} s centroid start and {p['head_check_s']:.1f} s checks")
        elif e:
            budget = f" (budget {_clock(self.budget)})" if self.budget else ""
            step = "label step" if isinstance(c, SelaConfig) else "prediction pass"
            out.append(f"  estimate: {_clock(e['seconds'])} wall time{upto}{budget}; {step} peak memory "
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


def make_plan(options: dict, config_file: str | None = None, *, recipe: str | None = None, budget: str | None = None,
              resume: bool = False, probe: bool | None = None) -> Plan:
    """Resolve a ``generate`` run: recipe (``auto`` by default for data without one), options, config file,
    budget. The timing probe runs where it decides something -- a budget sets the epochs -- or where ``probe``
    asks for the estimates (a dry run); ``probe=False`` never runs it (estimates are then left out)."""
    from ..data import is_embedding_spec, resolve

    seconds, distributed = check_recipe_and_budget(recipe, RECIPE_NAMES, budget)
    if resume:  # the plan was made when the run started: the saved configuration and what it was chosen from
        return resumed_plan(resolve_config(options, config_file, resume=True))
    chosen = chosen_options(options, config_file)
    data = chosen.get("data", SelaConfig.data)
    name = recipe or ("digits" if data in RECIPES else "auto")
    base = resolve_config(options, config_file, recipes=_recipes_for(name, data))
    source = None  # resolved once (a folder or shard scan can take a while) and shared by profile and probe
    if base.frozen or name != "auto":
        plan = Plan(base, recipe=name if not base.frozen else f"{name} (fixed features)")
        if base.frozen and is_embedding_spec(str(base.data)):
            source = resolve(base.data)
            _check_count(len(source), source.spec, chosen.get("clusters"))
            plan.profile = {"samples": len(source)}
            fit_table(plan, len(source), chosen, distributed)
    else:
        source = resolve(base.data)
        _check_count(len(source), source.spec, chosen.get("clusters"))
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
    table = plan.config.frozen and is_embedding_spec(str(plan.config.data))
    if seconds is None and plan.machine["device"] == "cpu" and name == "auto" and (table or not plan.config.frozen) \
            and not distributed:
        seconds = DEFAULT_CPU_BUDGET
        plan.reasons["budget"] = f"{_clock(seconds)} (the default on a CPU; --budget changes it)"
    plan.budget = seconds

    refuse_used_out(plan.config.out)
    fits = plan.budget is not None and "epochs" not in chosen
    if (probe or (probe is None and fits)) and table and not distributed:
        fit_table_budget(plan, source or resolve(plan.config.data), chosen, fit=fits)
    elif (probe or (probe is None and fits)) and not plan.config.frozen and not distributed:
        _fit_budget(plan, source or resolve(plan.config.data), epochs_given="epochs" in chosen,
                    steps_given="label_steps" in chosen)
    return plan


def chosen_options(options: dict, config_file: str | None) -> dict:
    """What the user chose: the config file's options under the command line's (``None``: not given)."""
    from ._config import read_config_file

    return {**(read_config_file(config_file) if config_file else {}),
            **{k: v for k, v in options.items() if v is not None}}


def refuse_used_out(out) -> None:
    """Before the probe: a run folder in use is refused in seconds (by rank 0 alone: the others may look after
    it wrote config.json)."""
    from ._loop import check_run_dir

    if os.environ.get("RANK", "0") == "0":
        check_run_dir(out, resume=False)


def check_recipe_and_budget(recipe: str | None, names: tuple, budget: str | None) -> tuple[float | None, bool]:
    """(the budget in seconds or None, whether this is one of several torchrun processes), refusing a recipe
    not in ``names`` and a budget under torchrun (it times one process)."""
    if recipe is not None and recipe not in names:
        raise ConfigError(f"--recipe must be one of {', '.join(names)}, got {recipe!r}")
    seconds = parse_duration(budget) if budget is not None else None
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and seconds is not None:
        raise ConfigError("--budget times this one process; under torchrun give --epochs instead")
    return seconds, distributed


def resumed_plan(config) -> Plan:
    """The plan of a resumed run: its saved configuration, the recipe and profile it was chosen from."""
    from pathlib import Path

    from ._loop import check_run_dir, saved_record

    check_run_dir(config.out, resume=True)
    saved = saved_record(Path(config.out)).get("plan") or {}
    return Plan(config, recipe=f"{saved.get('recipe') or 'saved'} (resumed)", profile=saved.get("profile") or {},
                machine=machine_info(config.device), budget=saved.get("budget_s"))


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


def _check_count(n: int, spec: str, clusters) -> None:
    """Refuse, before any probe or training, data with fewer samples than clusters."""
    if clusters is None:
        if n < 2:
            raise DataError(f"{spec} holds {n} sample{'' if n == 1 else 's'}: too few to cluster (no --clusters was "
                            "given and the fewest clusters that mean anything is 2, so at least 2 samples are needed)")
        return
    ks = (clusters,) if isinstance(clusters, int) else tuple(clusters)
    if max(ks) > n:
        raise ConfigError(f"K = {','.join(map(str, ks))} clusters but {spec} holds only {n:,} "
                          f"sample{'' if n == 1 else 's'} and every cluster needs at least one: give a smaller --clusters")


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
    _check_count(len(source), source.spec, config.head_clusters())
    probe = _probe(config, source)
    plan.probe = probe
    n = len(source)
    plan.profile.setdefault("samples", n)
    graph = config.start == "graph" and not config.start_from
    fixed = probe["startup_s"] + (probe["graph_s"] if graph else 0.0)
    if config.vote:  # one plain pass and the neighbours' search, like the graph start's
        fixed += probe["graph_s"]
    per_step = config.label_views * n / probe["label_images_per_s"] + probe["solve_s_per_step"]
    per_epoch = n / probe["train_images_per_s"]
    if plan.budget is not None and not epochs_given:
        plan.config = _epochs_in_budget(plan, n, fixed, per_epoch, per_step, steps_given)
    count = label_step_count(plan.config)
    seconds = fixed + plan.config.epochs * per_epoch + count * per_step
    if "epochs" in plan.reasons or (plan.budget is not None and not epochs_given):
        plan.reasons["epochs"] = (f"{_plural(plan.config.epochs, 'epoch')} and {_plural(count, 'label step')} fit the "
                                  f"{_clock(plan.budget)} budget at the probed speed"
                                  + (" (the recipe's most)" if plan.config.epochs == AUTO_MAX_EPOCHS
                                     and plan.recipe == "auto" else ""))
    plan.estimate = {"seconds": round(seconds, 1), **_resources(plan, probe, n, count), "label_steps": count,
                     "fixed_s": round(fixed, 2), "per_epoch_s": round(per_epoch, 2), "per_label_step_s": round(per_step, 2)}
    check_memory(plan, plan.estimate["label_memory"])


def _epochs_in_budget(plan: Plan, n: int, fixed: float, per_epoch: float, per_step: float,
                      steps_given: bool, smaller: str = "a smaller --image-size or --arch") -> SelaConfig:
    """The config with as many epochs (and label steps) as the budget holds at the probed speed."""
    config = plan.config
    epochs, steps = config.epochs, config.label_steps
    every = config.label_spacing == "even" and config.label_steps >= config.epochs
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
                          f"{n:,} samples here (about {_clock(need)}); give a longer --budget, or {smaller}")
    epochs = min(epochs, AUTO_MAX_EPOCHS if plan.recipe == "auto" else config.epochs)
    if every or not steps_given:  # at least the steps at the start, the middle and the end, where epochs allow
        steps = epochs + 1 if every else max(min(3, epochs + 1), round(steps * epochs / max(1, config.epochs)))
    return dataclasses.replace(config, epochs=epochs, label_steps=steps)


def _resources(plan: Plan, probe: dict, n: int, label_steps: int) -> dict:
    """Memory of the label step and disk of the run: float32 features (or, beyond the label memory, a float16
    file read by blocks), and the bf16 kernel when it is stored (on disk or streamed: one block of rows per
    thread)."""
    from ..solver import features_on_disk, kernel_path, working_bytes

    config, k = plan.config, max(plan.config.head_clusters())
    device = "cuda" if plan.machine.get("device") == "cuda" else "cpu"
    memory = memory_bytes(config.label_memory)
    path = kernel_path(n, k, device, memory, scratch=config.out)
    working = working_bytes(n, k, device, memory)
    kernels = {"stored": n * k * 2, "disk": working, "stream": working}
    spilled = features_on_disk(n, probe["feature_dim"], k, device, memory, scratch=config.out)
    label_memory = (0 if spilled else n * probe["feature_dim"] * 4) + kernels[path]
    if config.start == "graph" and not config.start_from:
        label_memory = max(label_memory, n * probe["thumbnail_pixels"] * 4 * 2)
    disk = 2 * probe["checkpoint_bytes"] + n * (len(config.head_clusters()) * 8 + 24) + 4096 * (config.epochs + label_steps)
    disk += n * probe["feature_dim"] * 2 if spilled else 0
    return {"label_memory": int(label_memory), "disk": int(disk), "kernel": path,
            "features": "disk" if spilled else "memory", "kernel_bytes": {name: int(b) for name, b in kernels.items()}}


def check_memory(plan: Plan, needed: int) -> None:
    machine = plan.machine
    free = machine.get("gpu_free") if machine.get("device") == "cuda" else machine.get("ram_available")
    if free is not None and needed > 0.9 * free:
        where = "GPU memory" if machine.get("device") == "cuda" else "available RAM"
        raise BudgetError(f"the label step needs about {_bytes(needed)} but this machine has {_bytes(free)} of {where}; "
                          "lower --clusters or --heads, or use --freeze with --pca to label smaller features")
