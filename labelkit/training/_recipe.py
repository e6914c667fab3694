"""The auto recipe: what the data looks like (a sample's image sizes, grey or colour, count), what the machine
has, and from both the options a run starts with, each with the reason it was chosen."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from .._util.system import system_memory_available
from ..errors import DataError

__all__ = ["profile_data", "machine_info", "auto_recipe", "SMALL_SIDE", "AUTO_MAX_EPOCHS"]

SMALL_SIDE = 64  # images at most this many pixels on their shorter side are "small" (digits, icons, CIFAR)


# The graph start's schedule: at most 60 epochs, a label step every 5. Measured with bench/suite.py on images
# decoded once and augmented by the batch (2-core AMD EPYC): 12 epochs with a label step after each gave NMI
# digits 0.855, glyphs 0.21, the 10.8k folder of bench/digits_folder.py 0.884; 60 epochs with a step every 5
# gave 0.954, 0.24-0.32 and 0.90-0.93, in 22 s, 66 s and 222 s. Steps further apart let the network fit the
# labels before they are solved again: digits 12 epochs 0.855 with 12 steps, 0.907 with 3; 30 epochs 0.881
# with 12, 0.936 with 5. Beyond 60 nothing was gained (digits 100 epochs, 19 steps: 0.949).
AUTO_MAX_EPOCHS = 60
AUTO_LABEL_EVERY = 5
# Training stops once a label step leaves the labels where the previous one put them (NMI >= 0.97 between
# them, mean over heads): replayed on the histories of 43 earlier runs on the suite's image sets and digits
# folders (24 would have stopped), the labels at the stop were within -0.010..+0.009 NMI (to the truth, mean
# over heads) of the run's last ones; 0.97 stops the 10.8k folder at epoch 20 of 60 and the digits at 30,
# where glyphs and long tails, whose labels keep moving, run on. Measured with the graph start only; a random
# start (the paper's, for large data) trains every epoch.
AUTO_SETTLE = 0.97
# Neighbours of the vote after the last epoch (training/_vote.py). Replayed on bench/suite.py's image sets with
# 5, 10 and 20 (votes repeated until none moved, before the vote became one round): 5 did as well as 10 on the
# digits and less on the rest; 20 did best on glyphs, glyphs-tail and textures but put two of six digits seeds
# below no vote; 10 raised every set and seed. Small images only, where the graph start runs (at most 100,000
# samples): the photo recipe was not measured.
AUTO_VOTE = 10


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


def auto_recipe(profile: dict, machine: dict, clusters_given: bool) -> tuple[dict, dict]:
    """(options, reasons): the recipe for this data on this machine, and why each option was chosen.

    Options the user gives still win; the reasons of options they override are dropped by the caller."""
    gpu = machine["device"] == "cuda"
    recipe: dict[str, Any] = {}
    why: dict[str, str] = {}
    if profile["side_median"] <= SMALL_SIDE:
        _small_images(profile, machine, recipe, why)
    else:
        _photos(profile, gpu, recipe, why)
    why["batch_size"] = f"{recipe['batch_size']}: {'fills a GPU' if gpu else 'keeps a CPU step short'}"
    recipe.update(lr=0.05, lr_schedule="cosine", warmup=0.05, weight_decay=5e-4, momentum=0.9)
    why["lr"] = "0.05 with a cosine schedule and 5 % warm-up, the schedule that a run of any length can end on"
    _schedule(profile["samples"], recipe, why)
    if recipe["arch"] == "labelkit_cnn" and recipe["start"] == "graph":
        recipe["vote"] = AUTO_VOTE
        why["vote"] = (f"{AUTO_VOTE}: after the last epoch each label moves to the one most held among the image "
                       f"and its {AUTO_VOTE} nearest neighbours in the trained network's features")
    _heads(profile["samples"], clusters_given, recipe, why)
    return recipe, why


def _small_images(profile: dict, machine: dict, recipe: dict, why: dict) -> None:
    gpu, grey = machine["device"] == "cuda", profile["grey"]
    from ._models import create_backbone

    side = profile["side_median"]
    size = 16 if grey else 32
    size = min(size, max(8, 4 * round(side / 4)))
    recipe["image_size"] = size
    if size < side:
        why["image_size"] = (f"{size} px, down from the images' {side} px: small "
                             + ("grey shapes keep their form" if grey else "colour images keep their objects")
                             + f" at {size} px, where an epoch costs about {(size / side) ** 2:.0%} of one at {side} px")
    else:
        why["image_size"] = f"{size} px: the images' own size ({side} px), nothing to gain by upscaling"
    recipe["arch"] = "labelkit_cnn"
    weights = sum(p.numel() for p in create_backbone("labelkit_cnn", size).parameters())
    why["arch"] = (f"images of {side} px: a compact conv net ({weights / 1e6:.1f} M parameters before the heads) "
                   "fits them")
    recipe["augment"] = "digits" if grey else "paper"
    why["augment"] = ("small grey images: crops, small rotations, brightness and contrast; no flips (they change "
                      "digits and letters) and no colour jitter" if grey else
                      "small colour images: the paper's crops, flips and colour jitter")
    recipe["head_temperature"] = None
    recipe["batch_size"] = 256 if gpu else 128
    recipe["workers"] = 0 if not gpu else min(8, machine["cores"])
    why["workers"] = ("small images decode in microseconds: loader processes would only compete with training "
                      "for the cores" if not gpu else "one loader process per core, at most 8")


def _photos(profile: dict, gpu: bool, recipe: dict, why: dict) -> None:
    recipe["arch"] = "resnet50" if gpu else "resnet18"
    why["arch"] = ("photos on a GPU: ResNet-50" if gpu else
                   "photos on a CPU: ResNet-18, the smallest standard backbone (a pretrained one with --pretrained "
                   "--freeze is faster and better where its weights are cached)")
    recipe["image_size"] = 224 if gpu else 96
    why["image_size"] = ("224 px, the backbone's native size" if gpu else
                         "96 px: on a CPU, 224 px would leave time for too few epochs")
    recipe["augment"] = "grey" if profile["grey"] else "paper"
    why["augment"] = ("grey photos: the paper's crops and flips with brightness and contrast only" if profile["grey"]
                      else "colour photos: the paper's crops, flips, colour jitter and random grey")
    recipe["batch_size"] = 256 if gpu else 64


def _schedule(n: int, recipe: dict, why: dict) -> None:
    from ._graph import GRAPH_LIMIT, GRAPH_MIN

    if GRAPH_MIN <= n <= GRAPH_LIMIT:
        recipe["start"] = "graph"
        recipe["label_spacing"] = "even"
        recipe["epochs"], recipe["label_steps"] = AUTO_MAX_EPOCHS, AUTO_MAX_EPOCHS // AUTO_LABEL_EVERY + 1
        why["start"] = ("graph: first labels from the spectral clusters of the thumbnails' kNN graph (seconds for "
                        f"{n:,} images); then a label step every {AUTO_LABEL_EVERY} epochs")
        recipe["settle"] = AUTO_SETTLE
        why["settle"] = (f"{AUTO_SETTLE:g}: training ends once a label step moves the labels no further than that "
                         "(NMI to the previous step's, mean over heads)")
    else:
        recipe["start"] = "random"
        recipe["epochs"], recipe["label_steps"] = 100, 40
        why["start"] = (f"random, as the paper: {n:,} images are outside the graph start's range of "
                        f"{GRAPH_MIN:,}-{GRAPH_LIMIT:,}")


def _heads(n: int, clusters_given: bool, recipe: dict, why: dict) -> None:
    if not clusters_given:
        ks = [k for k in (10, 30, 100) if k * 20 <= n] or [max(2, n // 20)]
        recipe["clusters"] = tuple(ks)
        recipe["heads"] = len(ks)
        why["clusters"] = (f"no --clusters given: one head at each of K = {', '.join(map(str, ks))} (over-clustering "
                           "is safer than merging classes; ground truth is never used to choose K)")
    else:
        recipe["heads"] = 3
        why["heads"] = "3 heads of the given K: independent starts, whose agreement shows how stable the labels are"
