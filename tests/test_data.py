import io

import numpy as np
import pytest

from labelkit.data import compare_to_data, resolve
from labelkit.errors import DataError
from labelkit.data import Order, SkipLog, eval_transform, make_loader, train_transform

from conftest import write_image


def _pass(source, workers=0, strict=False, batch_size=2, **kw):
    log = SkipLog(source, strict=strict)
    seen = []
    for indices, images, bad in make_loader(source, eval_transform(16), Order(batch_size, **kw), workers=workers):
        log.add(bad)
        if images is not None:
            assert images.shape[1:] == (3, 16, 16)
        seen += indices.tolist()
    return seen, log


def test_folder_ids_classes_and_truth(image_tree):
    write_image(image_tree / "loose.png")
    source = resolve(str(image_tree))
    assert source.kind == "folder"
    assert source.ids == sorted(["cat/a.png", "cat/b.JPG", "cat/sub/c.jpeg", "dog/d.webp", "dog/e.bmp", "emu/f.png", "loose.png"])
    assert source.classes == ["cat", "dog", "emu"]
    truth = dict(zip(source.ids, source.targets.tolist()))
    assert truth["cat/sub/c.jpeg"] == 0 and truth["dog/e.bmp"] == 1 and truth["emu/f.png"] == 2
    assert truth["loose.png"] == -1
    assert resolve(str(image_tree)).fingerprint == source.fingerprint


def test_folder_without_class_folders_has_no_truth(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", seed=i)
    source = resolve(str(tmp_path))
    assert source.targets is None and source.classes is None and not source.has_truth


def test_grayscale_becomes_three_channels(tmp_path):
    write_image(tmp_path / "g.png", mode="L")
    source = resolve(str(tmp_path))
    assert source.load(0).mode == "RGB"


def test_missing_empty_and_bad_specs(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="unknown built-in data set; available: builtin:digits"):
        resolve("builtin:nope")


def test_corrupt_image_is_skipped_and_counted_or_fails_under_strict(image_tree):
    (image_tree / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = (image_tree / "dog" / "d.webp").read_bytes()
    (image_tree / "dog" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    source = resolve(str(image_tree))
    seen, log = _pass(source, workers=2)
    bad = {"cat/broken.png", "dog/truncated.jpg"}
    assert set(log.skipped) == bad
    assert sorted(source.ids[i] for i in seen) == sorted(set(source.ids) - bad)
    with pytest.raises(DataError, match="bad sample 'cat/broken.png'"):
        _pass(source, strict=True)
    assert source.manifest(log.as_list()).to_dict()["skipped"][0]["sample_id"] == "cat/broken.png"


def test_folder_pass_sees_every_sample_once_with_two_workers_and_two_ranks(tmp_path):
    for i in range(23):
        write_image(tmp_path / f"c{i % 3}" / f"{i:03d}.png", seed=i)
    source = resolve(str(tmp_path))
    seen, _ = _pass(source, workers=2, batch_size=4)
    assert sorted(seen) == list(range(23))
    parts = [_pass(source, workers=2, batch_size=4, rank=r, world=2)[0] for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(23)) and not set(parts[0]) & set(parts[1])


def _write_shards(tmp_path, n=20, per_shard=6, duplicate=False, corrupt=None):
    import webdataset as wds

    keys = []
    paths = []
    for shard in range((n + per_shard - 1) // per_shard):
        path = tmp_path / f"train-{shard:06d}.tar"
        paths.append(path)
        with wds.TarWriter(str(path)) as sink:
            for i in range(shard * per_shard, min(n, (shard + 1) * per_shard)):
                buffer = io.BytesIO()
                from PIL import Image

                Image.fromarray(np.full((9, 9, 3), i * 10 % 255, np.uint8)).save(buffer, format="PNG")
                key = f"s{i:04d}"
                payload = buffer.getvalue() if key != corrupt else b"garbage"
                sink.write({"__key__": key, "png": payload, "cls": i % 4})
                keys.append(key)
        if duplicate and shard == 1:
            with wds.TarWriter(str(tmp_path / "extra-000000.tar")) as sink:
                sink.write({"__key__": "s0000", "png": payload, "cls": 0})
    return keys, paths


def test_shards_ids_truth_and_brace_patterns(tmp_path):
    keys, _ = _write_shards(tmp_path)
    source = resolve(str(tmp_path / "train-{000000..000003}.tar"))
    assert source.kind == "shards" and source.ids == keys
    assert source.targets.tolist() == [i % 4 for i in range(20)]
    assert resolve(str(tmp_path / "train-*.tar")).ids == keys
    assert resolve(f"pipe:cat {tmp_path}/train-000000.tar").ids == keys[:6]


@pytest.mark.parametrize("shards", ["{000000..000003}", "000000"])
def test_shard_pass_sees_every_sample_once_with_two_workers(tmp_path, shards):
    keys, _ = _write_shards(tmp_path)
    source = resolve(str(tmp_path / f"train-{shards}.tar"))
    seen, _ = _pass(source, workers=2, batch_size=3)
    assert sorted(seen) == list(range(len(source)))
    parts = [_pass(source, workers=2, batch_size=3, rank=r, world=2)[0] for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(len(source)))


def test_shards_duplicate_key_and_corrupt_sample(tmp_path):
    _write_shards(tmp_path, duplicate=True)
    with pytest.raises(DataError, match="duplicate sample id 's0000'"):
        resolve(str(tmp_path / "*.tar"))
    other = tmp_path / "b"
    other.mkdir()
    _write_shards(other, corrupt="s0003")
    source = resolve(str(other / "train-{000000..000003}.tar"))
    seen, log = _pass(source, workers=2)
    assert list(log.skipped) == ["s0003"] and len(seen) == 19
    with pytest.raises(DataError, match="missing|does not exist"):
        resolve(str(other / "train-{000000..000009}.tar"))


def test_npz_arrays(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (12, 5, 6), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(12) % 3)
    source = resolve(str(tmp_path / "a.npz"))
    assert source.ids[:2] == ["000000", "000001"] and source.ids[-1] == "000011"
    assert source.classes == ["0", "1", "2"] and source.targets[4] == 1
    assert np.asarray(source.load(3)).shape == (5, 6, 3)
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 4, 4, 2), np.uint8))
    with pytest.raises(DataError, match=r"must be \(N,H,W\) or \(N,H,W,C\)"):
        resolve(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "float.npz", images=np.zeros((3, 4, 4), np.float32))
    with pytest.raises(DataError, match="must be uint8"):
        resolve(str(tmp_path / "float.npz"))
    np.savez(tmp_path / "noimg.npz", labels=np.zeros(3))
    with pytest.raises(DataError, match="no 'images' array"):
        resolve(str(tmp_path / "noimg.npz"))


def test_builtin_digits_loads_offline():
    source = resolve("builtin:digits")
    assert len(source) == 1797 and source.classes == [str(i) for i in range(10)]
    assert np.bincount(source.targets).tolist()[0] == 178
    image = source.load(0)
    assert image.size == (8, 8) and image.mode == "RGB"
    seen, log = _pass(source, batch_size=512)
    assert sorted(seen) == list(range(1797)) and len(log) == 0


def test_training_pass_shuffles_reproducibly():
    source = resolve("builtin:digits")
    def order(epoch):
        return next(iter(make_loader(source, train_transform(16), Order(64, shuffle=True, seed=3, epoch=epoch))))[0]
    assert order(0).tolist() == order(0).tolist()
    assert order(0).tolist() != order(1).tolist()


def test_compare_to_data(image_tree):
    from labelkit.artefact import Artefact

    art = Artefact.build(["cat/a.png", "dog/d.webp", "zebra/z.png"], [0, 1, 0], 2)
    report = compare_to_data(art, str(image_tree))
    assert report["in_both"] == 2 and report["only_in_artefact"] == 1 and report["only_in_data"] == 4
    assert report["examples_only_in_artefact"] == ["zebra/z.png"] and not report["fingerprint_match"]


def test_a_registered_kind_of_data_is_resolved_before_folders(tmp_path, monkeypatch):
    from labelkit.data import SOURCE_KINDS, ArraySource, MapSource, register_source

    monkeypatch.setattr("labelkit.data._resolve.SOURCE_KINDS", list(SOURCE_KINDS))
    images = np.zeros((3, 4, 4), dtype=np.uint8)
    register_source("dots", lambda spec: spec.startswith("dots:"), lambda spec: ArraySource(spec, images, None))
    assert len(resolve("dots:three")) == 3
    with pytest.raises(DataError, match="no such file or directory"):
        resolve(str(tmp_path / "nothing"))  # other specs still reach the built-in kinds

    class Incomplete(MapSource):  # a source must say how to load, read and size its samples
        pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete("x", ["a"], None, None)


def test_truth_tables_are_read_with_their_own_separator(tmp_path):
    from labelkit.quality import load_truth

    for name, sep in (("t.csv", ","), ("t.tsv", "\t")):
        path = tmp_path / name
        path.write_text(f"sample_id{sep}label\n007{sep}cat\n010{sep}dog\n")
        ids, labels = load_truth(str(path))
        assert ids.to_pylist() == ["007", "010"] and labels.tolist() == [0, 1]


class _FlakyFolder:
    """A folder source whose one file fails to read (an I/O error, as a network share or bucket gives)."""

    def __init__(self, source, failing: str, fail_times: int):
        self.source, self.failing, self.left, self.calls = source, failing, fail_times, 0
        self.read = source.read

    def __call__(self, i: int) -> bytes:
        if self.source.ids[i] == self.failing:
            self.calls += 1
            if self.left:
                self.left -= 1
                raise OSError(5, "Input/output error")
        return self.read(i)


def test_io_errors_are_retried_then_stop_the_run_and_are_never_recorded_as_bad_images(image_tree, monkeypatch):
    monkeypatch.setattr("labelkit._util.files.time.sleep", lambda seconds: None)
    (image_tree / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    source = resolve(str(image_tree))
    flaky = _FlakyFolder(source, "dog/e.bmp", fail_times=2)  # fails twice, then reads: a dropped connection
    monkeypatch.setattr(source, "read", flaky)
    seen, log = _pass(source)
    assert flaky.calls == 3 and set(log.skipped) == {"cat/broken.png"}  # the bad image alone is skipped
    assert len(seen) == len(source) - 1
    down = _FlakyFolder(source, "dog/e.bmp", fail_times=99)  # an outage: no number of tries helps
    monkeypatch.setattr(source, "read", down)
    with pytest.raises(DataError, match=r"cannot read sample 'dog/e.bmp' \(OSError: \[Errno 5\] Input/output error\)"):
        _pass(source)
    assert down.calls == 3


def test_folders_with_link_loops_dangling_links_odd_names_and_tar_in_their_path(tmp_path):
    import os

    root = tmp_path / "v1.target"  # ".tar" in a folder's name: still a folder, not shards
    for i in range(6):
        write_image(root / f"c{i % 2}" / f"{i}.png", seed=i)
    os.symlink("..", root / "c0" / "up")  # a link back up the tree: walked once, not forever
    os.symlink(root / "c1", root / "again")  # a second way into one folder adds nothing
    source = resolve(str(root))
    assert len(source) == 6 and type(source).__name__ == "FolderSource"
    os.symlink(tmp_path / "nowhere.png", root / "c1" / "gone.png")
    with pytest.raises(DataError, match=r"c1/gone.png: a link to nothing"):
        resolve(str(root))
    os.unlink(root / "c1" / "gone.png")
    odd = os.fsencode(str(root / "c0")) + b"/caf\xe9.png"  # Latin-1, not UTF-8
    with open(odd, "wb") as handle:
        handle.write((root / "c0" / "0.png").read_bytes())
    with pytest.raises(DataError, match=r"caf\\xe9\.png': the file name is not UTF-8"):
        resolve(str(root))


def test_a_tables_ids_are_one_arrow_array_that_reads_as_the_list(tmp_path):
    """An embedding table's ids are held in Arrow, not as N Python strings, and behave as the sorted list they
    replace: length, index, slice, iteration, equality, positions of given ids (in their order), ids of rows."""
    import pyarrow as pa

    np.save(tmp_path / "v.npy", np.zeros((12, 2), dtype=np.float32))
    (tmp_path / "k.npy").write_bytes((tmp_path / "v.npy").read_bytes())
    (tmp_path / "k.keys.txt").write_text("\n".join(f"s{i}" for i in range(12)) + "\n")
    source, keyed = resolve(str(tmp_path / "v.npy")), resolve(str(tmp_path / "k.npy"))
    rows = [f"{i:06d}" for i in range(12)]
    assert source.ids == rows and list(source.ids) == rows and len(source.ids) == 12
    assert source.ids[3] == "000003" and source.ids[np.int64(11)] == "000011" and source.ids[2:4] == rows[2:4]
    assert keyed.ids == sorted(f"s{i}" for i in range(12))  # codepoint order: s0, s1, s10, s11, s2, ...
    assert keyed.ids[2] == "s10"
    assert list(keyed.positions_of(["s2", "s0", "s11"])) == [4, 0, 3]
    with pytest.raises(KeyError):
        keyed.positions_of(["s0", "s99"])
    assert keyed.ids_at(np.array([4, 0])) == pa.array(["s2", "s0"])
    assert keyed.vectors(np.array([2])).shape == (1, 2)


def test_a_million_row_tables_ids_take_no_python_string_each(tmp_path):
    """1,000,000 ids as Python strings would take about 65 MB of Python objects (str and list slot each); held in
    Arrow they take about 14 MB of Arrow memory and almost no Python memory, to resolve and to fingerprint."""
    import tracemalloc

    import pyarrow as pa

    np.save(tmp_path / "v.npy", np.zeros((1_000_000, 1), dtype=np.float16))
    before = pa.total_allocated_bytes()
    tracemalloc.start()
    source = resolve(str(tmp_path / "v.npy"))
    assert len(source.fingerprint) == 64 and source.ids[999_999] == "999999"
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert python_peak < 20e6, python_peak
    assert pa.total_allocated_bytes() - before < 40e6
