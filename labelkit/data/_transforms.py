"""Transforms by name: the augmentation presets a run trains with, the plain view it labels with, and a
pretrained backbone's own input configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["Augmentation", "AUGMENTATION_PRESETS", "AUGMENTATIONS", "train_transform", "augmentation_preset",
           "eval_transform", "pretrained_transforms", "run_transforms", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Augmentation:
    """The paper's augmentation and its variants: random resized crop (``scale``, ``ratio``), small rotations
    (``rotate`` degrees, where flips change the meaning, e.g. digits), horizontal ``flip``, colour ``jitter``
    with probability ``jitter_p`` (brightness and contrast only without ``colour_jitter``, for grey images where
    saturation and hue do nothing but cost time), random grayscale, and with ``heavy`` one of equalize /
    autocontrast / sharpness (the "+ more aug." of the paper's label transfer)."""

    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    jitter: float = 0.4
    jitter_p: float = 0.8
    colour_jitter: bool = True
    grayscale_p: float = 0.2
    rotate: float = 0.0
    heavy: bool = False


AUGMENTATION_PRESETS = {
    "paper": Augmentation(),
    "heavy": Augmentation(heavy=True),  # for fixed labels (transfer)
    # no flips, which change digits; brightness and contrast jitter keep clusters from forming by ink intensity
    "digits": Augmentation(scale=(0.6, 1.0), ratio=(0.8, 1.25), flip=False, colour_jitter=False, grayscale_p=0.0,
                           rotate=12.0),
    "grey": Augmentation(colour_jitter=False, grayscale_p=0.0),  # the paper's geometry, for grey photos
}
AUGMENTATIONS = (*AUGMENTATION_PRESETS, "none")  # "none": the plain (eval) transform


def train_transform(image_size: int, augmentation: Augmentation | None = None,
                    mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
    """The transform of an :class:`Augmentation` (the paper's by default) at ``image_size``, normalised by
    ``mean`` and ``std``."""
    from torchvision import transforms as T

    a = augmentation or Augmentation()
    steps = [T.RandomResizedCrop(image_size, scale=a.scale, ratio=a.ratio, antialias=True)]
    if a.rotate:
        steps.append(T.RandomRotation(a.rotate))
    if a.flip:
        steps.append(T.RandomHorizontalFlip())
    if a.jitter:
        colour = (a.jitter, min(a.jitter / 4, 0.5)) if a.colour_jitter else (0.0, 0.0)  # saturation, hue
        steps.append(T.RandomApply([T.ColorJitter(a.jitter, a.jitter, *colour)], p=a.jitter_p))
    if a.grayscale_p:
        steps.append(T.RandomGrayscale(a.grayscale_p))
    if a.heavy:
        steps.append(T.RandomChoice([T.RandomEqualize(1.0), T.RandomAutocontrast(1.0), T.RandomAdjustSharpness(2.0, 1.0)]))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return _with_batch_form(T.Compose(steps), None if a.heavy else  # equalize has no batch form here
                            dict(size=image_size, augmentation=a, mean=tuple(mean), std=tuple(std)))


def _with_batch_form(transform, form: dict | None):
    """``transform`` with ``.batch``: the same transform on a batch of decoded images (see
    :class:`~labelkit.data.BatchTransform`), used where a run decoded its images once."""
    from ._decoded import BatchTransform

    transform.batch = BatchTransform(**form) if form is not None else None
    return transform


def augmentation_preset(name: str, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Training augmentation by name, one of :data:`AUGMENTATIONS`; ``none`` is the eval transform."""
    if name == "none":
        return eval_transform(image_size, mean=mean, std=std)
    if name not in AUGMENTATION_PRESETS:
        raise ConfigError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {name!r}")
    return train_transform(image_size, AUGMENTATION_PRESETS[name], mean=mean, std=std)


def eval_transform(image_size: int, crop_pct: float | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize and centre-crop (``crop_pct`` 0.875 from 128 px up, none below, where crops cut the object)."""
    from torchvision import transforms as T

    if crop_pct is None:
        crop_pct = 0.875 if image_size >= 128 else 1.0
    if crop_pct >= 1.0:
        resize = [T.Resize((image_size, image_size), antialias=True)]
    else:
        resize = [T.Resize(int(math.floor(image_size / crop_pct)), antialias=True), T.CenterCrop(image_size)]
    return _with_batch_form(T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)]),
                            dict(size=image_size, crop=min(1.0, crop_pct), mean=tuple(mean), std=tuple(std)))


def pretrained_transforms(backbone, augment: str) -> tuple[object, object, dict]:
    """(plain, augmented) transforms for a backbone with pretrained weights, from timm's own pretrained
    configuration (input size, interpolation, crop, mean, std), and that configuration."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=backbone)
    plain = timm.data.create_transform(**cfg, is_training=False)
    size = int(cfg["input_size"][-1])
    return plain, augmentation_preset(augment, size, tuple(cfg["mean"]), tuple(cfg["std"])), cfg


def run_transforms(backbone, image_size: int, augment: str, pretrained: bool) -> tuple[object, object]:
    """The (plain, augmented) transforms of a run: with pretrained weights, the backbone's own input
    configuration (size, interpolation, crop, mean, std: :func:`pretrained_transforms`); otherwise the run's
    ``image_size`` with ImageNet statistics and the ``augment`` preset. Every command chooses here."""
    if pretrained:
        plain, augmented, _ = pretrained_transforms(backbone, augment)
        return plain, augmented
    return eval_transform(image_size), augmentation_preset(augment, image_size)
