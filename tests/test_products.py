"""How the sweeps multiply the kernel: sparse rows, compiled tiles or widened blocks, and what chooses."""

import time

import numpy as np
import pytest
import torch

from labelkit.solver import Algorithm, Balance, Storage, _products as products
from labelkit.errors import SolverError
from labelkit.solver import solve
from test_sinkhorn import _distributed_worker, realistic


@pytest.fixture
def sparse_small(monkeypatch):
    """Let small test problems take the sparse path (in a run only kernels of 1M+ entries do)."""
    from labelkit.solver import _solve

    monkeypatch.setattr(_solve, "_SPARSE_MIN", 0)


def peaked(n=4000, k=300):
    features, weight = realistic(n, k, target=0.5)  # about 3 % of the kernel above float32's range
    return features, weight


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(products, "_chosen", {})
    monkeypatch.delenv("LABELKIT_PRODUCTS", raising=False)


def test_fused_products_give_the_widened_solution(monkeypatch):
    # N is not a multiple of the tile, so the last rows take the widened path inside a fused sweep
    features, weight = realistic(2500, 24)
    logits = features @ weight.T
    monkeypatch.setattr(products, "tile_rows", lambda k: 256)
    monkeypatch.setenv("LABELKIT_PRODUCTS", "widen")
    widened = solve(logits, algorithm=Algorithm(omega=1.5))
    monkeypatch.setenv("LABELKIT_PRODUCTS", "fused")
    fused = solve(logits, algorithm=Algorithm(omega=1.5))
    if fused.products != "fused":
        pytest.skip(f"no compiled kernel on this machine: {fused.products_why}")
    assert widened.products == "widen" and fused.products_why == "LABELKIT_PRODUCTS=fused"
    assert fused.iterations == widened.iterations
    np.testing.assert_allclose(fused.potentials, widened.potentials, atol=1e-4)  # float32 sums, other order
    assert (fused.labels == widened.labels).mean() >= 0.999
    assert abs(fused.sizes - widened.sizes).sum() <= 2 * 0.001 * len(logits)
    # exact balance rounds from the potentials: the same sizes however the sweep multiplied
    balanced = solve(logits, balance=Balance(exact=True))
    assert balanced.sizes.max() - balanced.sizes.min() <= 1
    # a peaked kernel is rebuilt as its potentials grow: the rebuilds take the compiled build
    monkeypatch.setenv("LABELKIT_PRODUCTS", "widen")
    peaked_widened = solve(logits, algorithm=Algorithm(lam=200.0))
    monkeypatch.setenv("LABELKIT_PRODUCTS", "fused")
    peaked_fused = solve(logits, algorithm=Algorithm(lam=200.0))
    assert peaked_fused.rebuilds == peaked_widened.rebuilds >= 2
    assert (peaked_fused.labels == peaked_widened.labels).mean() >= 0.999


def _huge():
    return torch.empty((1 << 20, 3000), dtype=torch.bfloat16, device="meta")  # only its shape is read


def test_probe_keeps_the_faster_path_for_the_process(monkeypatch):
    monkeypatch.setattr(products, "fused_step", lambda k, tile, threads: None)
    calls = {"widen": 0, "fused": 0}

    def sweep(name, pause):
        def run(rows):
            calls[name] += 1
            time.sleep(pause)
        return run

    path, why = products.choose(_huge(), 2, sweep("widen", 0.02), sweep("fused", 0.0))
    assert path == "fused" and "widen" in why and "fused" in why and calls == {"widen": 3, "fused": 3}
    again = products.choose(_huge(), 2, sweep("widen", 0.0), sweep("fused", 0.02))
    assert again == (path, why) and calls == {"widen": 3, "fused": 3}  # cached: no second probe
    slower = products.choose(torch.empty((1 << 20, 1000), dtype=torch.bfloat16, device="meta"), 2,
                             sweep("widen", 0.0), sweep("fused", 0.02))
    assert slower[0] == "widen"


def test_probe_falls_back_when_nothing_compiles(monkeypatch):
    def broken(k, tile, threads):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")

    monkeypatch.setattr(products, "fused_step", broken)
    path, why = products.choose(_huge(), 2, None, None)
    assert path == "widen" and why.startswith("compiled kernel unavailable") and "C++ compiler" in why


def test_small_kernels_and_forced_paths(monkeypatch):
    small = solve(torch.randn(300, 5))
    assert small.products == "widen" and "too few" in small.products_why
    monkeypatch.setenv("LABELKIT_PRODUCTS", "widen")
    assert products.choose(_huge(), 2, None, None) == ("widen", "LABELKIT_PRODUCTS=widen")
    monkeypatch.setenv("LABELKIT_PRODUCTS", "fastest")
    with pytest.raises(SolverError, match="LABELKIT_PRODUCTS must be auto, widen or fused, got 'fastest'"):
        solve(torch.randn(300, 5))


def test_tile_fits_half_the_l2_cache(monkeypatch):
    monkeypatch.setattr(products, "_cache_bytes", lambda level: 2 << 20)
    assert products.tile_rows(3000) == 160  # 1 MiB of bfloat16 rows of 3,000: 174, down to a multiple of 16
    assert products.tile_rows(10) == 1024 and products.tile_rows(10**6) == 16
    monkeypatch.setattr(products, "_cache_bytes", lambda level: None)
    assert products.tile_rows(3000) == 80


@pytest.mark.parametrize("kwargs", [
    {},
    {"algorithm": Algorithm(lam=200.0)},  # annealed, several rebuilds
    {"balance": Balance(prior="powerlaw:1", tau=1.0)},
    {"balance": Balance(exact=True)},
], ids=["plain", "peaked", "powerlaw-relaxed", "exact"])
def test_sparse_kernel_gives_the_dense_solution(kwargs, sparse_small):
    features, weight = peaked()
    logits = features @ weight.T
    sparse = solve(logits, **kwargs)
    dense = solve(logits, **kwargs, storage=Storage(sparse=False))
    assert sparse.products == "sparse" and "non-zero: sparse rows" in sparse.products_why
    assert dense.products == "widen"
    assert abs(sparse.iterations - dense.iterations) <= 2 and sparse.rebuilds == dense.rebuilds
    assert (sparse.labels == dense.labels).mean() >= 0.999
    np.testing.assert_allclose(sparse.scores, dense.scores, atol=5e-3)
    assert abs(sparse.sizes - dense.sizes).sum() <= 0.002 * len(logits)
    warm = solve(logits, warm_start=sparse, **kwargs)
    warm_dense = solve(logits, warm_start=dense, **kwargs, storage=Storage(sparse=False))
    assert warm.products == "sparse" and (warm.labels == warm_dense.labels).mean() >= 0.999


@pytest.mark.parametrize("path", ["disk", "stream"])
def test_sparse_kernel_is_the_same_on_every_path(path, sparse_small, tmp_path):
    features, weight = peaked()
    stored = solve(features=features, weight=weight, algorithm=Algorithm(lam=50.0), storage=Storage(kernel="stored"))
    other = solve(features=features, weight=weight, algorithm=Algorithm(lam=50.0), storage=Storage(kernel=path, scratch=tmp_path))
    assert (stored.products, other.products, other.kernel) == ("sparse", "sparse", path)
    assert other.iterations == stored.iterations and (other.labels == stored.labels).all()
    np.testing.assert_array_equal(other.potentials, stored.potentials)


def test_dense_kernels_stay_dense(sparse_small, monkeypatch):
    from labelkit.solver import _kernel

    logits = torch.randn(3000, 400) * 0.02  # a nearly uniform head: every entry counts
    flat = solve(logits)
    assert flat.products == "widen"
    # a sample that looks sparse when the kernel is not: the build passes its cap, gives up, builds densely
    monkeypatch.setattr(_kernel._Kernel, "_sample_density", lambda self, block: 0.0)
    fooled = solve(logits)
    reference = solve(logits, storage=Storage(sparse=False))
    assert fooled.products == "widen" and (fooled.labels == reference.labels).all()
    np.testing.assert_array_equal(fooled.potentials, reference.potentials)


@pytest.mark.distributed
def test_sparse_kernel_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    features, weight = peaked(8000, 300)  # 4,000 x 300 per rank: sparse without help
    logits = features @ weight.T
    single = solve(logits, algorithm=Algorithm(tol=1e-4))
    assert single.products == "sparse"
    mp.spawn(_distributed_worker, args=(2, f"file://{tmp_path}/rendezvous", logits, str(tmp_path / "out")),
             nprocs=2, join=True)
    labels = np.empty(len(logits), dtype=np.int32)
    for rank in range(2):
        part = torch.load(tmp_path / f"out.{rank}")
        labels[part["rows"].numpy()] = part["labels"].numpy()
        assert abs(part["iterations"] - single.iterations) <= 2
    assert (labels == single.labels).mean() >= 0.999


def test_transpose_of_sparse_rows_by_chunks():
    from labelkit.solver._kernel import _transpose

    gen = torch.Generator().manual_seed(0)
    dense = torch.rand(700, 90, generator=gen) * (torch.rand(700, 90, generator=gen) < 0.05)
    dense[3] = 0.0  # an empty row, and columns no row uses
    dense[:, 7] = 0.0
    a = dense.to_sparse_csr()
    crow, columns, values = a.crow_indices().int(), a.col_indices().int(), a.values()
    tcrow, trows, tvalues = _transpose(crow, columns, values, 90, chunk=37)  # many chunks, rows split across none
    expected = dense.T.contiguous().to_sparse_csr()
    assert tcrow.tolist() == expected.crow_indices().tolist()
    assert trows.tolist() == expected.col_indices().tolist()
    assert torch.equal(tvalues, expected.values())
