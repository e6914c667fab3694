"""The stabilised kernel M = exp(lam z + g - r) by row blocks: the logits it comes from, the threads that walk its
rows, and where it is held (memory, a scratch file, sparse rows, or nowhere: recomputed)."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import torch

from .._util import collectives
from .._util.files import pread_into, pwrite_all
from ..errors import SolverError
from . import _products as products
from ._numerics import _EXP_FLOOR, _EXP_MIN, _SMALL, _SPARSE_SHARE


class _Logits:
    """Row blocks of the logits, from a full matrix or from features and a linear head."""

    def __init__(self, logits, features, weight, bias, device, dtype):
        if (logits is None) == (features is None):
            raise SolverError("give either logits (N x K) or features (N x D) with weight (K x D)")
        self.device = device
        self.dtype = dtype
        if logits is not None:
            self.logits = _as_tensor(logits, "logits")
            if self.logits.ndim != 2:
                raise SolverError(f"logits must be 2-D (N x K), got shape {tuple(self.logits.shape)}")
            self.n, self.k = self.logits.shape
            self.features = None
        else:
            if weight is None:
                raise SolverError("features need the head's weight (K x D) and optionally its bias (K)")
            self.features = _as_tensor(features, "features")
            self.weight = _as_tensor(weight, "weight").to(device=device, dtype=dtype)
            self.bias = None if bias is None else _as_tensor(bias, "bias").to(device=device, dtype=dtype)
            if self.features.ndim != 2 or self.weight.ndim != 2 or self.features.shape[1] != self.weight.shape[1]:
                raise SolverError(
                    f"features (N x D) and weight (K x D) do not fit: {tuple(self.features.shape)} and "
                    f"{tuple(self.weight.shape)}"
                )
            if self.bias is not None and self.bias.shape != (self.weight.shape[0],):
                raise SolverError(f"bias must have shape ({self.weight.shape[0]},), got {tuple(self.bias.shape)}")
            self.n, self.k = self.features.shape[0], self.weight.shape[0]
            self.logits = None

    def exponent(self, lam: float, g: torch.Tensor):
        """A function (start, stop, out) -> out = lam z + g for rows start:stop, with lam and g folded into
        the head for features (one GEMM with a bias, no separate passes over the block)."""
        if self.logits is not None:
            def rows(start, stop, out):
                torch.mul(self.block(start, stop), lam, out=out)  # out of place: blocks may be the caller's
                return out.add_(g)
            return rows
        weight_t = (self.weight.T * lam).contiguous()
        shift = g if self.bias is None else self.bias * lam + g

        def rows(start, stop, out):
            x = self.features[start:stop].to(device=self.device, dtype=self.dtype, non_blocking=True)
            return torch.addmm(shift, x, weight_t, out=out)
        return rows

    def block(self, start: int, stop: int) -> torch.Tensor:
        if self.logits is not None:
            return self.logits[start:stop].to(device=self.device, dtype=self.dtype, non_blocking=True)
        x = self.features[start:stop].to(device=self.device, dtype=self.dtype, non_blocking=True)
        z = x @ self.weight.T
        return z + self.bias if self.bias is not None else z


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    from ._featurefile import FeatureFile

    if isinstance(value, FeatureFile):
        return value  # read by row blocks from disk; a tensor of those rows each time  # type: ignore[return-value]
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise SolverError(f"{name} must be a torch tensor or numpy array, got {type(value).__name__}")
    return value


def _split(count: int, parts: int) -> list[tuple[int, int]]:
    edges = [round(i * count / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


class _Rows:
    """Runs a function over contiguous parts of the rows, one CPU thread each.

    On the CPU, torch's intra-op threading pays a hand-off between OpenMP and MKL at every small operation;
    one thread per part of the rows, with intra-op threads set to 1 meanwhile, made a blocked pass 5x
    faster (measured on 2 cores at 200k x 3k). On CUDA there is one part.
    """

    def __init__(self, n: int, block: int, device: torch.device, k: int = 1):
        self.block = block
        threads = torch.get_num_threads() if device.type == "cpu" else 1
        if n * k < _SMALL:  # thread hand-offs would cost more than the work
            threads = 1
        blocks = max(1, -(-n // block))
        self.parts = [(a * block, min(n, b * block)) for a, b in _split(blocks, min(threads, blocks))]
        self._pool = None
        self._saved_threads = torch.get_num_threads()
        self.threads = self._saved_threads if device.type == "cpu" else 1  # for kernels threaded inside

    def first(self, count: int) -> "_Rows":
        """The same pool over rows 0:count only, split as evenly (the products probe times these)."""
        view = object.__new__(_Rows)
        view.__dict__.update(self.__dict__)
        blocks = max(1, -(-count // self.block))
        view.parts = [(a * self.block, min(count, b * self.block))
                      for a, b in _split(blocks, min(len(self.parts), blocks))]
        return view

    def __enter__(self) -> "_Rows":
        if len(self.parts) > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(len(self.parts), thread_name_prefix="labelkit-sinkhorn")
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            torch.set_num_threads(self._saved_threads)
            self._pool = None

    def map(self, fn) -> list:
        if self._pool is None:
            return [fn(lo, hi) for lo, hi in self.parts]
        return list(self._pool.map(lambda part: fn(*part), self.parts))

    def blocks(self, lo: int, hi: int):
        for start in range(lo, hi, self.block):
            yield start, min(start + self.block, hi)


class _DiskStore:
    """The bfloat16 kernel in a scratch file, written and read by row blocks (``os.pwrite``/``os.preadv``:
    thread-safe, and the pages stay in the OS cache rather than in the process). The file is unlinked as soon
    as it is created, so it vanishes when the solve ends, even after a crash."""

    def __init__(self, n: int, k: int, folder: str | os.PathLike | None):
        import tempfile

        self.n, self.k = n, k
        folder = folder or tempfile.gettempdir()
        try:
            self.fd, path = tempfile.mkstemp(prefix=".labelkit-kernel-", suffix=".bf16", dir=folder)
        except OSError as exc:
            raise SolverError(f"cannot create the label kernel's scratch file in {folder}: {exc}") from None
        os.unlink(path)
        self.folder = folder

    def __setitem__(self, rows: slice, block: torch.Tensor) -> None:
        data = block.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
        try:
            pwrite_all(self.fd, data, rows.start * self.k * 2)
        except OSError as exc:
            raise SolverError(f"writing the label kernel ({self.n * self.k * 2 / 1e9:.1f} GB) to {self.folder} "
                              f"failed: {exc.strerror or exc}; free space there, or give --label-memory more") from None

    def read(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        raw = torch.empty((stop - start, self.k), dtype=torch.bfloat16)
        if pread_into(self.fd, raw.view(torch.uint8).numpy(), start * self.k * 2) < raw.numel() * 2:
            raise SolverError("the label kernel's scratch file ended early; was it truncated?")
        return out.copy_(raw)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Kernel:
    """The stabilised kernel M = exp(lam z + g - r) (``r`` makes each row's largest entry 1), by row blocks.

    Stored: built once per set of potentials into an N x K bfloat16 tensor and read back by blocks; on disk:
    the same bytes in a scratch file.
    Streamed: never held; every read recomputes the block from the logits (or from the features and the
    head: one GEMM) and rounds it through bfloat16, so both give the same numbers, iterations and labels.
    Memory is then O(block x K) instead of O(N x K), at the price of recomputing the logits every pass.
    """

    def __init__(self, source: "_Logits", storage: "torch.Tensor | _DiskStore | None", device: torch.device):
        self.source = source
        self.data = storage
        self.device = device
        self.products: str | None = None  # how a sweep multiplies blocks, see labelkit.solver; set on first use
        self.products_why = ""
        self.sparse_cap = 0  # most non-zeros a sparse build may hold (0: never sparse)
        self.sparse: dict[int, tuple] | None = None  # part start -> (A, A^T) CSR rows, when the last build was sparse
        self.density: float | None = None  # share of non-zero entries: counted when sparse, else sampled

    def close(self) -> None:
        self.sparse = None
        if isinstance(self.data, _DiskStore):
            self.data.close()

    def _exponent(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        self._rows(start, stop, out)
        return out.sub_(out.amax(dim=1, keepdim=True))

    @staticmethod
    def _exp_(e: torch.Tensor) -> torch.Tensor:
        # exp is 5x slower on arguments below float32's range; clamp, then zero what was clamped
        return e.clamp_(min=_EXP_MIN).exp_().masked_fill_(e <= _EXP_FLOOR, 0.0)

    def build(self, g: torch.Tensor, lam: float, rows: "_Rows", group) -> torch.Tensor:
        """Set the potentials (storing the kernel when stored); returns the column maxima of the exponent."""
        self._rows = self.source.exponent(lam, g.to(torch.float32))
        self.sparse = None
        col_max = self._build_sparse(rows) if self.sparse_cap else None
        if col_max is None and self.products == "fused":
            col_max = self._build_fused(rows)
        elif col_max is None:
            col_max = torch.stack(rows.map(lambda lo, hi: self._build_part(lo, hi, rows.block))).amax(dim=0)
        if group is not None:
            collectives.all_reduce(col_max, group, "max")
        return col_max

    def _build_part(self, lo: int, hi: int, block: int) -> torch.Tensor:
        k = self.source.k
        col_max = torch.full((k,), -math.inf, dtype=torch.float32, device=self.device)
        work = torch.empty((min(block, hi - lo), k), dtype=torch.float32, device=self.device)
        for start in range(lo, hi, block):
            stop = min(start + block, hi)
            e = self._exponent(start, stop, work[: stop - start])
            torch.maximum(col_max, e.amax(dim=0), out=col_max)
            if self.data is not None:
                self.data[start:stop] = self._exp_(e)
        return col_max

    def _build_sparse(self, rows: "_Rows") -> torch.Tensor | None:
        """Build the kernel as sparse rows when it is sparse enough (returns the column maxima), else None.

        At lam = 25 a trained head's kernel is mostly exact zeros (exp below float32's range: on the bench's
        N = 200,000 x K = 3,000 problem 0.8 % of entries are non-zero), so its rows are stored as CSR with
        their transpose and every sweep costs two sparse products instead of a pass over N x K. The same
        bfloat16-rounded values as the dense kernel: only the order of the sums differs. A sample of row
        blocks decides whether to try; a build that passes ``sparse_cap`` non-zeros gives up for the dense one.
        """
        n, k = self.source.n, self.source.k
        self.density = self._sample_density(rows.block)
        if self.density > _SPARSE_SHARE / 2:
            return None
        cap = {lo: self.sparse_cap * (hi - lo) // n for lo, hi in rows.parts}
        built = rows.map(lambda lo, hi: self._sparse_part(lo, hi, rows.block, cap[lo]))
        if any(b is None for b in built):
            return None
        self.sparse = {lo: (a, at) for (lo, _), (_, a, at) in zip(rows.parts, built)}
        self.density = sum(a.values().numel() for a, _ in self.sparse.values()) / max(n * k, 1)
        return torch.stack([b[0] for b in built]).amax(dim=0)

    def _sample_density(self, block: int) -> float:
        """Share of non-zero kernel entries in up to 8 row blocks spread over the rows."""
        n, k = self.source.n, self.source.k
        starts = sorted({int(i * max(n - block, 0) / 7) for i in range(8)})
        work = torch.empty((min(block, n), k), dtype=torch.float32, device=self.device)
        nonzero = total = 0
        for start in starts:
            stop = min(start + block, n)
            e = self._exponent(start, stop, work[: stop - start])
            nonzero += int(torch.count_nonzero(e > _EXP_MIN))
            total += e.numel()
        return nonzero / max(total, 1)

    def _sparse_part(self, lo: int, hi: int, block: int, cap: int):
        """Rows lo:hi as CSR (float32 values rounded through bfloat16, int32 columns) and its transpose, with
        the column maxima; None once more than ``cap`` entries are non-zero. Held: 16 bytes a non-zero, and
        while building, one block's entries more."""
        k = self.source.k
        col_max = torch.full((k,), -math.inf, dtype=torch.float32, device=self.device)
        work = torch.empty((min(block, hi - lo), k), dtype=torch.float32, device=self.device)
        counts = torch.empty(hi - lo, dtype=torch.int64, device=self.device)
        index = torch.int32 if cap < 2**31 else torch.int64
        # room for the cap; the operating system gives pages only as they are written, so unused room costs nothing
        columns = torch.empty(cap, dtype=index, device=self.device)
        values = torch.empty(cap, dtype=torch.float32, device=self.device)
        held = 0
        for start in range(lo, hi, block):
            stop = min(start + block, hi)
            e = self._exponent(start, stop, work[: stop - start])
            torch.maximum(col_max, e.amax(dim=0), out=col_max)
            at = (e > _EXP_MIN).nonzero()  # row-major; only these entries are non-zero after exp
            if held + len(at) > cap:
                return None
            counts[start - lo:stop - lo] = torch.bincount(at[:, 0], minlength=stop - start)
            columns[held:held + len(at)] = at[:, 1]
            values[held:held + len(at)] = e[at[:, 0], at[:, 1]].exp_().bfloat16()  # the dense kernel's rounding
            held += len(at)
        columns, values = columns[:held], values[:held]
        crow = torch.zeros(hi - lo + 1, dtype=index, device=self.device)
        torch.cumsum(counts, 0, out=crow[1:])
        transposed = _csr(*_transpose(crow, columns, values, k), (k, hi - lo))
        return col_max, _csr(crow, columns, values, (hi - lo, k)), transposed

    def _build_fused(self, rows: "_Rows") -> torch.Tensor:
        """The build with the compiled tile kernel (``"fused"`` products, a stored kernel on the CPU), tile after
        tile in this thread, OpenMP inside; the rows after the last whole tile take the eager path."""
        n, k = self.source.n, self.source.k
        tile = products.tile_rows(k)
        finish = products.fused_build(k, tile, rows.threads)
        col_max = torch.full((k,), -math.inf, dtype=torch.float32)
        work = torch.empty((tile, k), dtype=torch.float32)
        whole = n // tile * tile
        with products.intra_op_threads(rows.threads):
            for start in range(0, whole, tile):
                self._rows(start, start + tile, work)
                torch.maximum(col_max, finish(work, self.data[start:start + tile]), out=col_max)
        if whole < n:
            torch.maximum(col_max, self._build_part(whole, n, n - whole), out=col_max)
        return col_max

    def read(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows start:stop of the kernel as float32, written into ``out`` (stop - start, K)."""
        if isinstance(self.data, _DiskStore):
            return self.data.read(start, stop, out)
        if self.data is not None:
            return out.copy_(self.data[start:stop])  # bf16 -> f32 into a reused buffer: no allocation per block
        self._exp_(self._exponent(start, stop, out))
        return out.copy_(out.to(torch.bfloat16))  # the stored kernel's rounding: identical arithmetic


def _csr(crow: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # torch calls its CSR tensors beta; the two products used here are not
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, columns, values, shape, check_invariants=False)  # built sorted, in range


def _transpose(crow: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, k: int, chunk: int = 1 << 21):
    """The CSR arrays of the transpose, by a counting sort on the columns done a chunk of rows at a time, so
    that beside the result only one chunk's work is held (with torch's own conversion and the rest of the
    first sparse build, the 10 M x 1,000 bench peaked at 15.3 GB; built this way and in place, 5.3 GB)."""
    index = columns.dtype
    per_column = torch.bincount(columns, minlength=k)
    tcrow = torch.zeros(k + 1, dtype=index, device=columns.device)
    torch.cumsum(per_column, 0, out=tcrow[1:])
    fill = tcrow[:-1].to(torch.int64, copy=True)  # next free slot of each column
    trows = torch.empty_like(columns)
    tvalues = torch.empty_like(values)
    ends = crow.to(torch.int64)
    r0, rows = 0, len(crow) - 1
    while r0 < rows:
        r1 = int(torch.searchsorted(ends, ends[r0] + chunk, right=True)) - 1
        r1 = min(rows, max(r1, r0 + 1))
        e0, e1 = int(ends[r0]), int(ends[r1])
        c = columns[e0:e1].to(torch.int64)
        order = torch.argsort(c, stable=True)  # rows stay ascending within each column
        c = c[order]
        count = torch.bincount(c, minlength=k)
        rank = torch.arange(e1 - e0, device=c.device) - (torch.cumsum(count, 0) - count)[c]
        slots = fill[c] + rank
        row_of = torch.repeat_interleave(torch.arange(r0, r1, device=c.device), ends[r0 + 1:r1 + 1] - ends[r0:r1])
        trows[slots] = row_of[order].to(index)
        tvalues[slots] = values[e0:e1][order]
        fill += count
        r0 = r1
    return tcrow, trows, tvalues
