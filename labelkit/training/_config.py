"""Typed job configurations: defaults in one place, data-specific recipes, config files, and the resolved
record stored with every artefact and checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..data import AUGMENTATIONS
from .._util.remote import refuse_url
from ..errors import ConfigError

__all__ = ["SelaConfig", "RECIPES", "TransferConfig", "TRANSFER_RECIPES", "TRANSFER_RECIPE_NAMES", "LR_SCHEDULES", "PRECISIONS", "STARTS", "RECIPE_NAMES", "LABEL_SPACINGS", "FROZEN_RECIPE", "TABLE_RECIPE", "WHITEN", "STANDARDIZE", "feature_scaling", "column_scaling", "resolve_config", "read_config_file",
           "default_workers"]

# The choices of --augment and --lr-schedule; the command line offers exactly these.
LR_SCHEDULES = ("step", "cosine", "constant")
PRECISIONS = ("auto", "float32", "bfloat16")  # of the network's forward passes (see training/_loop.py compute_dtype)
STARTS = ("random", "graph")
RECIPE_NAMES = ("auto", "paper", "digits")  # see labelkit.training
TRANSFER_RECIPE_NAMES = ("source", "paper", "digits")  # see labelkit.training.plan_transfer
LABEL_SPACINGS = ("quadratic", "even")


def default_workers() -> int:
    """DataLoader workers when none are asked for: the CPUs this process may use, shared by the processes of
    this node under torchrun, at most 8 (more rarely helps and each one holds a copy of the dataset object)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cpus // per_node))


@dataclass(frozen=True)
class SelaConfig:
    """Everything that determines a ``labelkit generate`` run."""

    data: str = "builtin:digits"
    arch: str = "alexnet"
    clusters: tuple[int, ...] = (3000,)  # K of each head; one value is repeated for every head
    heads: int = 10
    epochs: int = 400
    label_steps: int = 80
    lam: float = 25.0
    batch_size: int = 256
    lr: float = 0.05
    lr_schedule: str = "step"  # the paper's: /10 at 150, 300 and 350 of 400 epochs, scaled to the run
    warmup: float = 0.0  # share of training with a linear learning-rate warm-up
    momentum: float = 0.9
    weight_decay: float = 1e-5
    image_size: int = 224
    head_temperature: float | None = None  # None: the paper's linear heads; t: cosine heads, logits cos / t
    augment: str = "paper"  # paper | heavy | digits | grey | none
    label_augment: bool = False  # augment the images of the label pass too
    start: str = "random"  # first labels: random (the paper), or graph (spectral clusters of the thumbnails)
    start_from: str | None = None  # first labels from an earlier artefact instead (see training/_start.py)
    label_spacing: str = "quadratic"  # label steps at (i/M)^2 of training (the paper's), or even
    settle: float = 0.0  # stop once consecutive label steps agree at this NMI (mean over heads); 0: every epoch
    vote: int = 0  # after training, move each label to the one its this many nearest neighbours hold most; 0: off
    label_views: int = 1  # label pass: average the features of this many views (1 plain + augmented ones)
    workers: int | None = None  # None: default_workers()
    device: str = "auto"
    precision: str = "auto"  # the network's forward passes: auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16
    seed: int = 0
    init: str | None = None
    init_partial: bool = False  # use --init weights that fit only part of the body (the rest stays random)
    pretrained: bool = False  # timm's own pretrained weights (from its local cache; never downloaded)
    freeze: bool = False  # fixed backbone: features cached once, the heads alone are trained
    views: int = 1  # frozen: cached views per image (1 plain + augmented ones)
    pca: int | None = None  # frozen: PCA to this width; None: 98 % of the variance, at most 128; 0: all
    whiten: str | None = None  # frozen: "yes", "no" or "both" (see WHITEN); None: feature_scaling's default
    standardize: str | None = None  # frozen: scale each column to unit variance: "auto", "yes", "no"; None: auto
    head_hidden: int | None = None  # frozen: one hidden layer (Linear + BN + ReLU) under the heads
    neighbours: int = 0  # frozen: also train each sample towards the labels of its k nearest neighbours
    train_rows: int | None = None  # frozen: the heads train on a random sample of this many rows; all are labelled
    keep_better: bool = True  # frozen, with neighbours: a head keeps its labels where a label step agrees less with them
    feature_cache: str | None = None  # frozen: folder of cached features (default: OUT/features)
    skip_bad: bool = False  # embedding tables: leave out NaN/inf vectors instead of failing
    strict: bool = False
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch
    sinkhorn_tol: float = 1e-3
    exact_balance: bool = True  # round Q under capacities (every cluster floor/ceil of N/K); False: argmax
    prior: str = "uniform"  # cluster sizes: uniform, powerlaw:ALPHA, or sizes:S1,S2,... (relative, one per cluster)
    balance: float | None = None  # None: sizes held to the prior; tau: relaxed by a KL penalty of strength tau
    balance_floor: float = 0.2  # with --balance: every cluster keeps at least this share of its prior size
    consensus: bool = False  # append the heads' consensus (labelkit.quality) to the artefact as one more head
    label_memory: str | None = None  # bytes the label step's kernel may take (e.g. 4GB); None: half of what is free
    out: str = "runs/sela"

    @property
    def frozen(self) -> bool:
        """Heads on fixed features: a frozen backbone, or an embedding table (which has no backbone)."""
        return _frozen(self.data, {"freeze": self.freeze})

    def head_clusters(self) -> list[int]:
        ks = list(self.clusters)
        if len(ks) == 1:
            return ks * self.heads
        if len(ks) != self.heads:
            raise ConfigError(f"--clusters lists {len(ks)} values but --heads is {self.heads}; give one K or one per head")
        return ks

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["clusters"] = list(self.clusters)
        return data


# Recipes: defaults for a known data set, applied under config files and command-line options.
RECIPES: dict[str, dict[str, Any]] = {
    "builtin:digits": {
        "arch": "labelkit_cnn",
        "clusters": (10, 10, 30, 30, 50),
        "heads": 5,
        "epochs": 40,
        "label_steps": 13,
        "batch_size": 128,
        "lr": 0.05,
        "lr_schedule": "cosine",
        "warmup": 0.05,
        "weight_decay": 5e-4,
        "image_size": 16,
        "head_temperature": 0.2,
        "augment": "digits",
        # the first labels from the pixels' kNN graph, a label step every ~3 epochs on features averaged over
        # the plain and two augmented views, and the heads' consensus as the primary labels: head 0 of seeds
        # 0-4 went from NMI 0.80-0.90 (random start) to the figures in README.md. With the images decoded once
        # and augmented by the batch, 40 epochs of 128 gave consensus NMI 0.932-0.955 over seeds 0-4 (100
        # epochs of 64: 0.969 on seed 0, in twice the time)
        "start": "graph",
        "label_spacing": "even",
        "label_views": 3,
        "consensus": True,
        # after the last epoch, each label moves to the one its 10 nearest neighbours in the trained features
        # hold most (training/_vote.py): consensus NMI over seeds 0-4 0.947 / 0.926 / 0.949 / 0.914 / 0.921
        # without, 0.946 / 0.939 / 0.956 / 0.936 / 0.933 with
        "vote": 10,
        "workers": 0,
        "out": "runs/digits",
    }
}

# Defaults for heads on fixed features (--freeze, or an embedding table), under a data recipe, config files and
# options: cosine heads read PCA-whitened features, and lam is lower because cosine logits are bounded: at
# 25 / 0.1 the kernel exp(250 cos) is so peaked that the solve needs many times the iterations for the same
# labels (measured on a Gaussian mixture: NMI equal within 0.01 for lam 2.5 to 25). lam / temperature = 25
# is SwAV's 1 / epsilon = 20-25 on cosine scores.
FROZEN_RECIPE: dict[str, Any] = {
    "clusters": (100,),
    "heads": 5,
    "epochs": 50,
    "label_steps": 6,
    "lam": 2.5,
    "batch_size": 1024,
    "lr": 0.5,
    "lr_schedule": "cosine",
    "head_temperature": 0.1,
    "out": "runs/features",
}


# Embedding tables add to that: the first labels from the spectral clusters of the vectors' kNN graph, heads
# with a hidden layer that train towards their neighbours' labels too. Measured with bench/suite.py on the
# pixels of three sets (digits, glyphs, textures): linear heads on the whitened vectors ended at NMI 0.70, 0.11
# and 0.34, below k-means on the same vectors (0.74, 0.07, 0.63); the graph start alone gives 0.82-0.88,
# 0.21-0.24 and 0.66-0.69, and linear heads trained from it fall back towards linear partitions (0.70 on the
# digits). They settle (--settle 0.97, as the auto recipe's images) where their heads keep the labels their
# neighbours agree with best; the plan turns it off where there is no neighbour graph (see
# _table_plan._table_settle).
TABLE_RECIPE: dict[str, Any] = {"start": "graph", "head_hidden": 512, "neighbours": 10, "settle": 0.97}

# How fixed features are scaled for the graph start and the heads (--whiten): "yes" each kept principal direction
# to unit variance, "no" each keeps its variance, "both" the two at once (the start joins the eigenvectors of both
# graphs; the heads read one projection with the geometry of the two side by side: see Whiten.fit). Which one
# finds the classes depends on where they lie: in directions of large variance (the textures' colours: whitening
# scales noise up to their size) or of small variance beside a few large ones (a network's features of classes it
# was not trained on). On the 22 tables of bench/suite.py (pixels, networks' features, HOG, histograms, small
# tabular sets) nothing label-free told the two apart, and "both" lost to UMAP + k-means or k-means on 8 of them
# against 13 ("no") and 12 ("yes"), mean margin +0.032 against -0.017 and +0.005, second-worst -0.060 against
# -0.067 and -0.195 (README, the suite); a backbone's features keep "yes", as before.
WHITEN = ("yes", "no", "both")
STANDARDIZE = ("auto", "yes", "no")  # --standardize: see labelkit.training._whiten.column_scale


def column_scaling(config: "SelaConfig") -> str:
    """Whether a run scales each column of its fixed features to unit variance first (``--standardize``):
    "auto" (the default) where the columns' spreads are of different orders, "yes", or "no"."""
    return config.standardize or "auto"


def feature_scaling(config: "SelaConfig", table: bool) -> str:
    """How a run scales its fixed features: ``--whiten`` when given, else "both" for an embedding table's
    vectors and "yes" for a backbone's features."""
    return config.whiten or ("both" if table else "yes")


@dataclass(frozen=True)
class TransferConfig:
    """Everything that determines a ``labelkit transfer`` run."""

    labels: str = ""
    data: str = ""
    arch: str = "alexnet"
    heads: str = "all"
    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.05
    lr_schedule: str = "step"
    warmup: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    image_size: int = 224
    augment: str = "paper"  # paper | heavy (+ equalize/autocontrast/sharpness) | digits | none
    min_coverage: float = 0.99
    min_confidence: float | None = None  # train only on labels this confident (the artefact's primary score)
    workers: int | None = None  # None: labelkit.training.default_workers()
    device: str = "auto"
    precision: str = "auto"  # as for generate
    seed: int = 0
    init: str | None = None
    init_partial: bool = False  # use --init weights that fit only part of the body (the rest stays random)
    pretrained: bool = False  # timm's own pretrained weights (from its local cache)
    strict: bool = False
    out: str = "runs/transfer"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Defaults for a known data set, under config files and options (see labelkit.training.resolve_config).
TRANSFER_RECIPES = {
    "builtin:digits": {"image_size": 16, "augment": "digits", "epochs": 30, "batch_size": 64, "lr": 0.05,
                       "lr_schedule": "cosine", "warmup": 0.05, "weight_decay": 5e-4, "workers": 0,
                       "out": "runs/digits-transfer"},
}


def read_config_file(path: str | os.PathLike) -> dict:
    """A JSON or TOML file of options (the same names as the command line, with underscores)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--config {path}: cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a table of options")
    return {key.replace("-", "_"): value for key, value in data.items()}


def resolve_config(options: dict[str, Any], config_file: str | None = None, cls=SelaConfig, recipes=None,
                   resume: bool = False):
    """Defaults < recipe of the data < config file < options given (``None`` means not given).

    With ``resume``, the configuration saved in the run directory (``--out``) comes between the recipe and the
    config file, so a resumed run needs no option but ``--out``; an option given that differs from the saved
    run is then reported by the run directory."""
    recipes = RECIPES if recipes is None else recipes
    known = {f.name for f in fields(cls)}
    given = {k: v for k, v in options.items() if v is not None}
    from_file = read_config_file(config_file) if config_file else {}
    unknown = sorted(set(from_file) - known)
    if unknown:
        raise ConfigError(f"--config: unknown option(s) {unknown}; known: {sorted(known)}")
    data = given.get("data", from_file.get("data", cls.data))
    saved = {}
    if resume:
        out = given.get("out", from_file.get("out", recipes.get(data, {}).get("out", cls.out)))
        saved = {k: v for k, v in saved_config(out).items() if k in known}
        data = given.get("data", from_file.get("data", saved.get("data", data)))
    recipe = dict(recipes.get(data, {}))
    if cls is SelaConfig and _frozen(data, {**saved, **from_file, **given}):
        # the data recipe keeps what is about the data (arch, size, K, augmentation); training is the heads'
        kept = {k: recipe[k] for k in ("arch", "image_size", "augment", "clusters", "heads", "workers") if k in recipe}
        table = TABLE_RECIPE if _is_table(data) else {}
        recipe = {**FROZEN_RECIPE, **table, "warmup": 0.0, "weight_decay": SelaConfig.weight_decay, **kept,
                  "out": recipe["out"] + "-frozen" if "out" in recipe else FROZEN_RECIPE["out"]}
    chosen = {**from_file, **given}
    if chosen.get("train_rows") is not None and "neighbours" not in chosen:
        recipe["neighbours"] = 0  # the neighbour term needs every row trained (see _check_train_rows)
    if isinstance(chosen.get("clusters"), (list, tuple)) and len(chosen["clusters"]) > 1 and "heads" not in chosen:
        recipe["heads"] = len(chosen["clusters"])  # one head per K listed, unless --heads says otherwise
    merged = {**recipe, **saved, **from_file, **given}
    merged = {k: v for k, v in merged.items() if k in known}
    if "clusters" in merged:
        value = merged["clusters"]
        merged["clusters"] = tuple(int(k) for k in (value if isinstance(value, (list, tuple)) else [value]))
    if isinstance(merged.get("whiten"), bool):  # a run configured while --whiten was a yes/no flag
        merged["whiten"] = "yes" if merged["whiten"] else "no"
    if saved and "standardize" not in saved and "standardize" in known:  # configured before --standardize
        merged.setdefault("standardize", "no")
    if merged.get("workers") is None and "workers" in known:
        merged["workers"] = default_workers()  # resolved here, so the stored config says what ran
    config = cls(**merged)
    _check(config)
    return config


def _frozen(data: str, chosen: dict) -> bool:
    return bool(chosen.get("freeze")) or _is_table(data)


def _is_table(data: str) -> bool:
    from ..data import is_embedding_spec

    return is_embedding_spec(str(data))


def saved_config(out: str | os.PathLike) -> dict:
    """The resolved configuration stored in a run directory's ``config.json`` ({} when there is none)."""
    path = Path(out) / "config.json"
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("config", {}))
    except ValueError as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}") from None


def _prior_sizes(config: "SelaConfig") -> list[float] | None:
    """The relative sizes of a ``sizes:S1,S2,…`` prior; None for a named prior."""
    text = config.prior.strip().lower()
    if not text.startswith("sizes:"):
        return None
    try:
        return [float(v) for v in text[len("sizes:"):].split(",")]
    except ValueError:
        raise ConfigError(f"--prior {config.prior!r}: sizes must be numbers, e.g. sizes:5,3,2") from None


def solver_prior(config: "SelaConfig", k: int, n: float):
    """The solver's prior for a head of K clusters over N samples (``sizes:`` lists become counts summing to N)."""
    sizes = _prior_sizes(config)
    if sizes is None:
        return config.prior.strip().lower()
    total = sum(sizes)
    return [v * n / total for v in sizes]


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def memory_bytes(text: str | int | None, option: str = "--label-memory") -> int | None:
    """``4GB``, ``512MiB``, ``1.5g`` or a plain byte count as bytes; None or ``auto`` stays None."""
    if text is None or str(text).strip().lower() in ("", "auto"):
        return None
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _UNITS:
        raise ConfigError(f"{option} {text!r}: give a size such as 4GB, 512MiB or a number of bytes")
    value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise ConfigError(f"{option} must be positive, got {text!r}")
    return value


def _check_whiten(config: SelaConfig) -> None:
    if config.whiten is not None and config.whiten not in WHITEN:
        raise ConfigError(f"--whiten is one of {', '.join(WHITEN)}; got {config.whiten!r}")
    if config.whiten is not None and not config.frozen:
        raise ConfigError("--whiten sets how fixed features are scaled: give an embedding table, or --freeze")
    if config.standardize is not None and config.standardize not in STANDARDIZE:
        raise ConfigError(f"--standardize is one of {', '.join(STANDARDIZE)}; got {config.standardize!r}")
    if config.standardize is not None and not config.frozen:
        raise ConfigError("--standardize scales the columns of fixed features: give an embedding table, or --freeze")


def _check_train_rows(config: SelaConfig) -> None:
    rows = config.train_rows
    if rows is None:
        return
    if not config.frozen:
        raise ConfigError("--train-rows samples the rows that heads on fixed features train on: give an embedding "
                          "table, or --freeze")
    if rows < max(config.head_clusters()):
        raise ConfigError(f"--train-rows {rows:,} is fewer than the {max(config.head_clusters()):,} clusters of a head")
    if config.neighbours:
        raise ConfigError("--train-rows cannot go with --neighbours: the neighbour term trains every row towards "
                          "its neighbours' labels, which a sample leaves untrained; give --neighbours 0")


def _check_prior(config: "SelaConfig") -> None:
    from ..errors import SolverError
    from ..solver import Prior

    sizes = _prior_sizes(config)
    try:
        Prior.parse(sizes if sizes is not None else config.prior.strip().lower())
    except SolverError as exc:
        raise ConfigError(f"--prior: {exc}") from None
    wrong = sorted({k for k in config.head_clusters() if sizes is not None and k != len(sizes)})
    if wrong:
        raise ConfigError(f"--prior lists {len(sizes)} sizes but heads have K={wrong}; give one size per "
                          "cluster and heads of that K (--clusters)")
    if config.balance is not None and not config.balance > 0:
        raise ConfigError(f"--balance must be a positive number (the KL penalty tau; larger is stricter), got "
                          f"{config.balance}")
    if not 0.0 <= config.balance_floor < 1.0:
        raise ConfigError(f"balance_floor must lie in [0, 1), got {config.balance_floor}")
    memory_bytes(config.label_memory)


def _check_solver(config) -> None:
    """The label step's options, checked by the solver's own option objects before anything runs."""
    from ..errors import SolverError
    from ..solver import Algorithm

    if config.head_temperature is not None and not config.head_temperature > 0:
        raise ConfigError(f"--head-temperature must be a positive number (or unset for linear heads), got "
                          f"{config.head_temperature}")
    try:
        Algorithm(lam=config.lam, tol=config.sinkhorn_tol)
    except SolverError as exc:
        option = "--lam" if "lam" in str(exc) else "--sinkhorn-tol"
        raise ConfigError(f"{option}: {exc}") from None


def _one_of(option: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


def _check(config) -> None:
    refuse_url(config.out, "--out", "a run directory must be on a local disk (it holds checkpoints, replaced "
                                    "atomically); copy labels.parquet afterwards, or `labelkit export` it to a URL")
    if isinstance(config, SelaConfig):
        if config.heads < 1:
            raise ConfigError(f"--heads must be at least 1, got {config.heads}")
        if any(k < 2 for k in config.clusters):
            raise ConfigError(f"--clusters must be at least 2, got {list(config.clusters)}")
        config.head_clusters()
        if config.label_views < 1:
            raise ConfigError(f"--label-views must be at least 1, got {config.label_views}")
        _one_of("--start", config.start, STARTS)
        if config.start_from:
            from ..artefact import read_header

            read_header(config.start_from)  # a wrong path fails now, not after the features are cached
        _one_of("--label-spacing", config.label_spacing, LABEL_SPACINGS)
        if config.label_steps < 1:
            raise ConfigError(f"--label-steps must be at least 1, got {config.label_steps}")
        if config.vote < 0:
            raise ConfigError(f"--vote is a number of neighbours (0: no vote); got {config.vote}")
        if config.vote and config.frozen:
            raise ConfigError("--vote moves labels in the features of the backbone a run trains; heads on fixed "
                              "features (--freeze, embedding tables) judge their labels by their neighbours already: "
                              "drop --vote")
        if not 0.0 <= config.settle <= 1.0:
            raise ConfigError(f"--settle is an NMI between label steps, in [0, 1] (0: train every epoch); got "
                              f"{config.settle}")
        for name in ("views", "pca", "head_hidden", "neighbours"):
            value, least = getattr(config, name), 1 if name == "views" else 0  # 0: no PCA, hidden layer, neighbours
            if value is not None and value < least:
                raise ConfigError(f"--{name.replace('_', '-')} must be {least} or more, got {value}")
        _check_train_rows(config)
        _check_whiten(config)
        _check_prior(config)
        _check_solver(config)
        if config.freeze and config.label_augment:
            raise ConfigError("--label-augment needs a trained backbone; with --freeze use --views for augmented views")
    if isinstance(config, TransferConfig):
        for name, what in (("labels", "the label artefact to learn from"), ("data", "the images it labels")):
            if not getattr(config, name):
                raise ConfigError(f"--{name} is required: {what}")
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    _one_of("--augment", config.augment, AUGMENTATIONS)
    _one_of("--lr-schedule", config.lr_schedule, LR_SCHEDULES)
    _one_of("--precision", config.precision, PRECISIONS)
    if config.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {config.workers}")
    if config.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {config.lr}")
    if not 0.0 <= config.warmup < 1.0:
        raise ConfigError(f"--warmup is the share of training spent warming up, in [0, 1); got {config.warmup}")
    if not 0.0 <= config.momentum < 1.0:
        raise ConfigError(f"--momentum must lie in [0, 1), got {config.momentum}")
    if config.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be 0 or more, got {config.weight_decay}")
