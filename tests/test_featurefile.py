"""Features on disk (labelkit.solver._featurefile) and the solver reading them by blocks."""

import pickle

import numpy as np
import pytest
import torch

from labelkit.errors import DataError
from labelkit.solver import FeatureFile, FeatureWriter, Storage, write_features
from labelkit.solver import solve


def _features(n=3000, d=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randn(40, d, generator=gen) * 0.8


def test_round_trip_and_numpy_reads_it_too(tmp_path):
    x, _ = _features()
    path = write_features(tmp_path / "f.npy", torch.split(x, 700), len(x), x.shape[1])
    ff = FeatureFile(path)
    assert ff.shape == (3000, 24) and len(ff) == 3000
    assert torch.equal(ff[100:130], x[100:130].half())
    assert np.array_equal(np.load(path, mmap_mode="r")[2999], x[2999].half().numpy())
    part = ff.rows(1000, 2000)
    assert part.shape == (1000, 24) and torch.equal(part[0:5], x[1000:1005].half())
    again = pickle.loads(pickle.dumps(part))
    assert torch.equal(again[10:11], part[10:11])


@pytest.mark.parametrize("path", ["stored", "disk", "stream"])
def test_the_solver_reads_a_features_file_by_blocks(tmp_path, path):
    x, w = _features()
    write_features(tmp_path / "f.npy", [x], len(x), x.shape[1])
    from_file = solve(features=FeatureFile(tmp_path / "f.npy"), weight=w, storage=Storage(kernel=path, scratch=tmp_path))
    in_memory = solve(features=x.half().float(), weight=w, storage=Storage(kernel="stored"))
    assert (from_file.labels == in_memory.labels).all() and from_file.iterations == in_memory.iterations


def test_bad_features_files_are_one_clear_error(tmp_path):
    x, _ = _features(100, 8)
    good = write_features(tmp_path / "f.npy", [x], 100, 8)
    data = good.read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"cut.npy: its header says 100 x 8 float16 .* \(truncated"):
        FeatureFile(tmp_path / "cut.npy")
    (tmp_path / "long.npy").write_bytes(data + b"\0" * 16)
    with pytest.raises(DataError, match="longer than its header says"):
        FeatureFile(tmp_path / "long.npy")
    (tmp_path / "text.npy").write_text("sample_id,x\n")
    with pytest.raises(DataError, match="text.npy: not a .npy array"):
        FeatureFile(tmp_path / "text.npy")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4), np.float16))
    with pytest.raises(DataError, match="must be 2-D"):
        FeatureFile(tmp_path / "cube.npy")
    np.save(tmp_path / "ints.npy", np.zeros((2, 3), np.int32))
    with pytest.raises(DataError, match="labelkit reads float16 or float32"):
        FeatureFile(tmp_path / "ints.npy")
    with pytest.raises(DataError, match="holds 100 rows; expected 120"):
        FeatureFile(good, expect_rows=120)
    with pytest.raises(DataError, match="no such file|No such file"):
        FeatureFile(tmp_path / "absent.npy")


def test_writing_refuses_bad_values_and_leaves_nothing(tmp_path):
    x, _ = _features(100, 8)
    x[57, 3] = float("nan")
    with pytest.raises(DataError, match="row 57 is not finite"):
        write_features(tmp_path / "f.npy", torch.split(x, 30), 100, 8)
    with pytest.raises(DataError, match="beyond float16's range"):
        write_features(tmp_path / "f.npy", [torch.full((100, 8), 1e5)], 100, 8)
    with pytest.raises(DataError, match="90 rows written but 100 announced"):
        write_features(tmp_path / "f.npy", [torch.zeros(90, 8)], 100, 8)
    assert list(tmp_path.iterdir()) == []
    write_features(tmp_path / "f.npy", [torch.full((100, 8), 1e5)], 100, 8, dtype=np.float32)
    assert FeatureFile(tmp_path / "f.npy")[0:1].dtype == torch.float32


def test_writer_appends_rows_as_samples_arrive_and_averages_views(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 50, 6
    views = [torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32)) for _ in range(3)]
    order = np.r_[np.arange(10, 50), np.arange(0, 10)]  # samples arrive out of index order
    writer = FeatureWriter(tmp_path / "f.npy", samples=n, dim=d)
    for view in views:
        for start in range(0, n, 7):
            batch = order[start:start + 7]
            writer.add(batch, view[torch.from_numpy(batch)], views=3)
    assert not (tmp_path / "f.npy").exists()  # nothing published before finish
    file, samples = writer.finish()
    assert np.array_equal(samples, order) and file.shape == (n, d)
    expected = (views[0] + views[1] + views[2])[torch.from_numpy(order)] / 3
    assert torch.allclose(file[0:n].float(), expected, atol=3e-3)  # float16 storage, three additions
    assert np.array_equal(np.load(tmp_path / "f.npy").astype(np.float32), file[0:n].numpy().astype(np.float32))
    assert torch.equal(file.take(np.array([0, 1, 2, 7, 40, 41])), file[0:n][[0, 1, 2, 7, 40, 41]])
    assert [p.name for p in tmp_path.iterdir()] == ["f.npy"]


def test_writer_abandoned_leaves_nothing_and_refuses_float16_overflow(tmp_path):
    writer = FeatureWriter(tmp_path / "f.npy", samples=4, dim=2)
    with pytest.raises(DataError, match="float16's range"):
        writer.add(np.array([0, 1]), torch.tensor([[1.0, 2.0], [7e4, 0.0]]))
    writer.abandon()
    assert list(tmp_path.iterdir()) == []
