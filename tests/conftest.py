import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest


def write_image(path, size=(12, 10), color=None, mode="RGB", seed=0):
    """A small real image file (format from the suffix)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    if color is not None:
        array[:] = color
    image = Image.fromarray(array[..., 0] if channels == 1 else array, mode=None)
    image.save(path)
    return path


@pytest.fixture
def image_tree(tmp_path):
    """An ImageNet-style tree: class folders with nested files, mixed formats."""
    root = tmp_path / "train"
    files = ["cat/a.png", "cat/b.JPG", "cat/sub/c.jpeg", "dog/d.webp", "dog/e.bmp", "emu/f.png"]
    for i, rel in enumerate(files):
        write_image(root / rel, seed=i)
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def rng():
    return np.random.default_rng(0)
