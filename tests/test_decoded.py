"""Images decoded once and transformed by the batch (issue 32): the same views whatever the batching, the
preset's geometry, the plain view, bad samples, and the memory-mapped copy."""

import numpy as np
import pytest
import torch

from labelkit.data import (Augmentation, BatchTransform, Order, augmentation_preset, eval_transform, keep_decoded,
                           make_loader, resolve)

from conftest import write_image


def _arrays(tmp_path, n=40, side=12, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    path = tmp_path / "a.npz"
    np.savez(path, images=images, labels=np.arange(n) % 4)
    return str(path)


def _views(source, transform, batch, epoch=0):
    out = {}
    for indices, images, _bad in make_loader(source, transform, Order(batch, shuffle=True, seed=3, epoch=epoch)):
        out.update({int(i): x for i, x in zip(indices, images)})
    return out


def _decoded(spec, size):
    source = resolve(spec)
    assert keep_decoded(source, size, budget=1 << 30) is not None
    return source


def test_a_samples_view_depends_on_seed_epoch_and_sample_only(tmp_path):
    source = _decoded(_arrays(tmp_path), 8)
    transform = augmentation_preset("paper", 8)
    small, large = _views(source, transform, 3), _views(source, transform, 32)
    assert sorted(small) == list(range(40))
    for i in small:
        torch.testing.assert_close(small[i], large[i], rtol=0, atol=1e-6)
    other_epoch = _views(source, transform, 32, epoch=1)
    assert all(not torch.equal(large[i], other_epoch[i]) for i in range(40))
    assert len({large[i].sum().item() for i in range(40)}) == 40


def test_identity_geometry_is_the_plain_view_and_flips_mirror_it(tmp_path):
    source = _decoded(_arrays(tmp_path, side=8), 8)
    plain = _views(source, eval_transform(8), 16)
    still = Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, jitter=0.0, grayscale_p=0.0)
    same = _views(source, _batch_only(BatchTransform(8, still, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))), 16)
    for i in plain:
        torch.testing.assert_close(same[i], plain[i], rtol=0, atol=1e-5)
    flipping = Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True, jitter=0.0, grayscale_p=0.0)
    flipped = _views(source, _batch_only(BatchTransform(8, flipping, mean=(0.485, 0.456, 0.406),
                                                        std=(0.229, 0.224, 0.225))), 16)
    mirrored = [torch.allclose(flipped[i], plain[i].flip(-1), atol=1e-5) for i in plain]
    kept = [torch.allclose(flipped[i], plain[i], atol=1e-5) for i in plain]
    assert all(m or k for m, k in zip(mirrored, kept)) and 10 <= sum(mirrored) <= 30


def _batch_only(batch):
    class Transform:  # a transform with a batch form only, as the loader sees it
        pass

    transform = Transform()
    transform.batch = batch
    return transform


def test_the_plain_view_matches_the_per_sample_one(tmp_path):
    spec = _arrays(tmp_path, side=8)
    per_sample = _views(resolve(spec), eval_transform(16), 16)
    batched = _views(_decoded(spec, 16), eval_transform(16), 16)
    for i in per_sample:  # 8 -> 16 px: torch's and PIL's bilinear resize differ by a little, nowhere by much
        assert (batched[i] - per_sample[i]).abs().mean() < 0.1


def test_colour_jitter_and_grey_follow_the_preset(tmp_path):
    source = _decoded(_arrays(tmp_path), 12)
    greyed = Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, jitter=0.0, grayscale_p=1.0)
    views = _views(source, _batch_only(BatchTransform(12, greyed)), 8)
    assert all(torch.allclose(x[0], x[1], atol=1e-6) and torch.allclose(x[1], x[2], atol=1e-6) for x in views.values())
    plain = _views(source, eval_transform(12, mean=(0, 0, 0), std=(1, 1, 1)), 8)
    jittered = _views(source, _batch_only(BatchTransform(12, Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                                                          flip=False, grayscale_p=0.0))), 8)
    changed = [not torch.allclose(jittered[i], plain[i], atol=1e-4) for i in plain]
    assert 20 <= sum(changed) <= 40  # jitter with probability 0.8
    assert all(0 <= x.min() and x.max() <= 1 for x in jittered.values())


def test_undecodable_images_are_bad_in_every_pass_and_io_errors_stop(tmp_path):
    root = tmp_path / "f"
    for i in range(6):
        write_image(root / "a" / f"{i}.png", size=(10, 10), seed=i)
    (root / "a" / "broken.png").write_bytes(b"not a png")
    source = resolve(str(root))
    seen = []
    keep_decoded(source, 8, budget=1 << 30, on_bad=seen.extend)
    assert [source.ids[i] for i, _ in seen] == ["a/broken.png"]
    for _ in range(2):
        bad = [b for _, _, batch_bad in make_loader(source, augmentation_preset("paper", 8), Order(4)) for b in batch_bad]
        assert [source.ids[i] for i, _ in bad] == ["a/broken.png"]

    from labelkit.data import SkipLog
    from labelkit.errors import DataError

    failing = resolve(str(root))

    def unreadable(i):
        raise OSError("disk gone")

    failing.read = unreadable
    with pytest.raises(DataError, match="cannot read sample"):
        keep_decoded(failing, 8, budget=1 << 30, on_bad=SkipLog(failing).add)


def test_above_the_memory_budget_the_images_are_memory_mapped_and_reused(tmp_path, monkeypatch):
    import labelkit.data._decoded as decoded

    spec = _arrays(tmp_path)
    first = resolve(spec)
    assert keep_decoded(first, 8, budget=0, folder=tmp_path / "cache") == (12, "file")
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")
    second = resolve(spec)
    with monkeypatch.context() as patched:
        patched.setattr(decoded, "_decode", lambda *args: pytest.fail("decoded again"))
        assert keep_decoded(second, 8, budget=0, folder=tmp_path / "cache") == (12, "file")
    assert keep_decoded(second, 8, budget=0, folder=tmp_path / "cache") == (12, "file")
    np.testing.assert_array_equal(np.asarray(second.decoded.pixels), np.asarray(first.decoded.pixels))
    transform = augmentation_preset("paper", 8)
    in_memory = _views(_decoded(spec, 8), transform, 16)
    mapped = _views(second, transform, 16)
    for i in in_memory:
        torch.testing.assert_close(mapped[i], in_memory[i], rtol=0, atol=0)
    assert keep_decoded(resolve(spec), 8, budget=0, folder=None) is None  # nowhere to put it: per sample


def test_a_file_rewritten_with_the_same_size_is_decoded_again(tmp_path):
    import os

    root = tmp_path / "f"
    for i in range(6):
        write_image(root / "a" / f"{i}.png", size=(10, 10), seed=i)
    first = resolve(str(root))
    assert keep_decoded(first, 8, budget=0, folder=tmp_path / "cache") == (10, "file")
    victim = root / "a" / "3.png"
    before = victim.stat()
    write_image(victim, size=(10, 10), seed=99)  # other pixels
    data = victim.read_bytes()
    victim.write_bytes(data[: before.st_size].ljust(before.st_size, b"\0") if len(data) > before.st_size else
                       data + b"\0" * (before.st_size - len(data)))  # padded or cut to the old size
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert victim.stat().st_size == before.st_size
    second = resolve(str(root))
    keep_decoded(second, 8, budget=0, folder=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("decoded-*.npy"))) == 2  # a new copy, not the stale one
    i = second.ids.index("a/3.png")
    assert not np.array_equal(np.asarray(second.decoded.pixels[i]), np.asarray(first.decoded.pixels[i]))
