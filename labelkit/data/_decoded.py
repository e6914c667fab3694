"""Images decoded once per run and transformed a batch at a time.

The per-sample path (:func:`~labelkit.data.make_loader` with a torchvision transform) decodes every image
again in every pass and augments it with a few PIL calls: for small images that is most of an epoch. Here the
images of a map-style source are decoded once into a uint8 array ``(N, 3, S, S)`` -- in memory within a budget,
else memory-mapped in a file keyed like the feature cache -- and a pass gathers a batch of them and applies the
same preset at once: a random resized crop, a small rotation and a flip are one ``affine_grid`` +
``grid_sample``; brightness, contrast, saturation, hue and grey are per-sample factors on the batch.

Each sample's randomness still comes from (seed, epoch, sample) alone -- counter-based draws, no shared
generator -- so a resumed run, another batch size or another worker layout gives every sample the same view.
The numbers differ from the per-sample path's (other random draws, bilinear sampling), not its distribution.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._util.files import atomic_path, write_text_atomic
from ._loading import Order, make_loader
from ._source import Source

__all__ = ["BatchTransform", "Decoded", "decode_images", "decoded_size", "decoding", "keep_decoded"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _uniform(seeds: np.ndarray, draw: int) -> np.ndarray:
    """The ``draw``-th uniform number in [0, 1) of each sample's stream: splitmix64 of (seed, draw), so a draw
    depends on nothing but the sample's own seed."""
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64) + np.uint64(draw + 1) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class BatchTransform:
    """A transform applied to a batch of decoded images: ``augmentation`` (an
    :class:`~labelkit.data.Augmentation`) for training views, or ``None`` for the plain view (a centre crop of
    ``crop`` of the side, resized). Returns float images ``(B, 3, size, size)`` normalised by ``mean`` and
    ``std``."""

    size: int
    augmentation: object | None = None
    crop: float = 1.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __call__(self, pixels: torch.Tensor, seeds: np.ndarray) -> torch.Tensor:
        x = pixels.float().div_(255)
        a = self.augmentation
        if a is None:
            x = self._plain(x)
        else:
            x = self._geometry(x, seeds, a)
            x = self._colour(x, seeds, a)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        side = x.shape[-1]
        if self.crop < 1.0:
            keep = max(1, round(side * self.crop))
            start = (side - keep) // 2
            x = x[..., start:start + keep, start:start + keep]
        if x.shape[-1] == self.size:
            return x.contiguous()
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)

    def _geometry(self, x: torch.Tensor, seeds: np.ndarray, a) -> torch.Tensor:
        """Random resized crop (area share in ``a.scale``, aspect in ``a.ratio``), rotation within
        ``a.rotate`` degrees about the crop's centre and a horizontal flip, as one sampling grid per image."""
        area = a.scale[0] + (a.scale[1] - a.scale[0]) * _uniform(seeds, 0)
        log_ratio = math.log(a.ratio[0]) + (math.log(a.ratio[1]) - math.log(a.ratio[0])) * _uniform(seeds, 1)
        aspect = np.exp(log_ratio)
        w = np.minimum(np.sqrt(area * aspect), 1.0)  # crop width and height as shares of the side
        h = np.minimum(np.sqrt(area / aspect), 1.0)
        cx = (1 - w) * (2 * _uniform(seeds, 2) - 1)  # crop centre in [-1, 1] coordinates, inside the image
        cy = (1 - h) * (2 * _uniform(seeds, 3) - 1)
        angle = np.radians(a.rotate * (2 * _uniform(seeds, 4) - 1)) if a.rotate else np.zeros(len(seeds))
        flip = np.where(a.flip & (_uniform(seeds, 5) < 0.5), -1.0, 1.0)
        cos, sin = np.cos(angle), np.sin(angle)
        theta = np.stack([np.stack([w * cos * flip, -h * sin, cx], 1), np.stack([w * sin * flip, h * cos, cy], 1)], 1)
        theta = torch.from_numpy(theta).to(x)
        # sample finely, then average down: bilinear sampling of a crop much larger than the output would alias
        fine = max(1, min(4, math.ceil(x.shape[-1] / self.size)))
        grid = F.affine_grid(theta, [len(x), 3, self.size * fine, self.size * fine], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return F.avg_pool2d(out, fine) if fine > 1 else out

    def _colour(self, x: torch.Tensor, seeds: np.ndarray, a) -> torch.Tensor:
        """Colour jitter with probability ``a.jitter_p`` (brightness, contrast, and for colour presets saturation
        and hue), then grey with probability ``a.grayscale_p``."""
        def factor(draw: int, spread: float, apply: np.ndarray) -> torch.Tensor:
            value = 1 + spread * (2 * _uniform(seeds, draw) - 1)
            return torch.from_numpy(np.where(apply, value, 1.0)).to(x).view(-1, 1, 1, 1)

        if a.jitter:
            apply = _uniform(seeds, 6) < a.jitter_p
            x = (x * factor(7, a.jitter, apply)).clamp_(0, 1)
            mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * factor(8, a.jitter, apply) + mean).clamp_(0, 1)
            if a.colour_jitter:
                grey = _grey(x)
                x = ((x - grey) * factor(9, a.jitter, apply) + grey).clamp_(0, 1)
                hue = min(a.jitter / 4, 0.5) * (2 * _uniform(seeds, 10) - 1) * apply
                x = _rotate_hue(x, hue).clamp_(0, 1)
        if a.grayscale_p:
            grey = torch.from_numpy(_uniform(seeds, 11) < a.grayscale_p).to(x.device).view(-1, 1, 1, 1)
            x = torch.where(grey, _grey(x).expand_as(x), x)
        return x


def _grey(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _rotate_hue(x: torch.Tensor, hue: np.ndarray) -> torch.Tensor:
    """Shift each image's hue by ``hue`` turns: a rotation about the grey axis in YIQ space."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=x.dtype,
                          device=x.device)
    angle = torch.from_numpy(2 * np.pi * hue).to(x)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros((len(x), 3, 3), dtype=x.dtype, device=x.device)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
    matrix = torch.linalg.inv(to_yiq) @ rotation @ to_yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", matrix, x)


@dataclass
class Decoded:
    """A source's images, decoded once: ``pixels`` (N, 3, S, S) uint8 (in memory or memory-mapped) and the
    reasons of the samples that could not be decoded, by index."""

    pixels: np.ndarray
    bad: dict[int, str]

    @property
    def size(self) -> int:
        return int(self.pixels.shape[-1])

    def batch(self, indices: np.ndarray) -> torch.Tensor:
        """uint8 (B, 3, S, S) of ``indices``, read in index order (a memory-mapped file is read forward)."""
        if isinstance(self.pixels, np.memmap):
            order = np.argsort(indices)
            rows = np.empty((len(indices), *self.pixels.shape[1:]), dtype=np.uint8)
            rows[order] = self.pixels[indices[order]]
            return torch.from_numpy(rows)
        return torch.from_numpy(self.pixels[indices])


def decoded_size(source: Source, image_size: int, sample: int = 64) -> int:
    """The side the images are kept at: their own (the median shorter side of a sample of them), at most twice
    the input size -- a crop of a quarter of the area still has every pixel it needs."""
    picked = np.linspace(0, len(source) - 1, min(len(source), sample)).astype(np.int64)
    sides = []
    for i in picked:
        try:
            sides.append(min(source.load(int(i)).size))
        except Exception:  # an undecodable image is the pass's business, not the size's
            continue
    native = int(np.median(sides)) if sides else image_size
    return max(1, min(native, 2 * image_size))


def decode_images(source: Source, size: int, *, budget: int, folder: str | os.PathLike | None, workers: int = 0,
                  on_bad=None, progress=None, existing_only: bool = False) -> Decoded | None:
    """Decode every image of ``source`` once, resized to ``size`` x ``size``: in memory when that takes at most
    ``budget`` bytes, else memory-mapped in ``folder`` (reused by a later run on the same files; None: no
    file, and None is returned -- the caller keeps the per-sample path). ``on_bad(list of (index, reason))``
    sees the undecodable samples (and raises for an I/O error, as a pass's skip log does); ``progress(done)``
    counts batches. ``existing_only``: a file left by an earlier run, or None."""
    nbytes = len(source) * 3 * size * size
    path = None
    if nbytes > budget:
        if folder is None:
            return None
        key = hashlib.sha256(f"{source.fingerprint}\n{_stamp(source)}\n{size}".encode()).hexdigest()[:20]
        path = Path(folder) / f"decoded-{key}.npy"
        if path.is_file() and path.with_suffix(".json").is_file():
            bad = {int(i): reason for i, reason in json.loads(path.with_suffix(".json").read_text()).items()}
            if on_bad:
                on_bad(list(bad.items()))
            return Decoded(np.load(path, mmap_mode="r"), bad)
    if existing_only:
        return None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return _decode(source, size, path, workers, on_bad, progress)


def _stamp(source: Source) -> str:
    """What a decoded file must match besides the ids: for local files, each one's size and modification time (a
    file rewritten with the same size is decoded again, never served stale); for other sources, their content
    fingerprint (the bytes of an array, the sizes of remote files)."""
    root = getattr(source, "root", None)
    if not isinstance(root, Path):
        return source.content["sha256"]
    digest = hashlib.sha256()
    for sample_id in source.ids:
        stat = os.stat(root / sample_id)
        digest.update(f"{sample_id}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _decode(source: Source, size: int, path: Path | None, workers: int, on_bad, progress) -> Decoded:
    n, bad = len(source), {}
    shape = (n, 3, size, size)
    with atomic_path(path) if path is not None else contextlib.nullcontext() as tmp:
        pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape) if path is not None \
            else np.zeros(shape, dtype=np.uint8)
        for indices, images, failed in make_loader(source, _stored(size), Order(256), workers=workers):
            if failed and on_bad:
                on_bad(failed)
            bad.update((int(i), str(reason)) for i, reason in failed)
            if images is not None:
                pixels[indices.numpy()] = images.numpy()
            if progress:
                progress()
        if path is not None:
            pixels.flush()
            del pixels
            write_text_atomic(path.with_suffix(".json"), json.dumps(bad))
    if path is not None:
        pixels = np.load(path, mmap_mode="r")
    return Decoded(pixels, bad)


def _stored(size: int):
    """PIL image -> uint8 tensor (3, size, size)."""
    def convert(image):
        from PIL import Image

        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR, reducing_gap=None)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())
    return convert


def decoding(source: Source, image_size: int, *, budget: int, folder=None) -> tuple[int, str] | None:
    """Whether a run keeps the images of ``source`` decoded (see :func:`keep_decoded`): ``(side, "memory" |
    "file")``, or None for the per-sample path (shards, vectors, data that fits neither ``budget`` bytes of
    memory nor half the free disk in ``folder``)."""
    if not source.map_style or not source.has_pixels or len(source) == 0:
        return None
    size = decoded_size(source, image_size)
    nbytes = len(source) * 3 * size * size
    if nbytes <= budget:
        return size, "memory"
    if folder is not None:
        import shutil

        existing = os.path.abspath(folder)
        while not os.path.isdir(existing):  # the folder may not exist yet: the disk it will be on
            existing = os.path.dirname(existing)
        if nbytes <= shutil.disk_usage(existing).free // 2:
            return size, "file"
    return None


def keep_decoded(source: Source, image_size: int, *, budget: int, folder=None, workers: int = 0, on_bad=None,
                 progress=None, existing_only: bool = False) -> tuple[int, str] | None:
    """Decode the images of a map-style ``source`` once (see :mod:`labelkit.data._decoded`) so that its loaders
    read them from memory, or from a memory-mapped file in ``folder`` above ``budget`` bytes; returns what
    :func:`decoding` chose, None where the per-sample path stays. ``existing_only``: only a file that an
    earlier run left in ``folder`` (a single pass gains nothing from decoding first)."""
    chosen = decoding(source, image_size, budget=0 if existing_only else budget, folder=folder)
    if chosen is not None and getattr(source, "decoded", None) is None:
        size, where = chosen
        source.decoded = decode_images(source, size, budget=budget if where == "memory" else 0, folder=folder,
                                       workers=workers, on_bad=on_bad, progress=progress, existing_only=existing_only)
        if source.decoded is None:
            return None
    return chosen
