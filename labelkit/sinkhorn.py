"""Self-labelling by optimal transport: the Sinkhorn-Knopp step of SeLa (Asano et al., ICLR 2020, eq. 7-8).

For N samples and K clusters, find Q = diag(u) P^lam diag(v) whose rows each carry one sample's mass and whose
columns each carry N/K (equal cluster sizes), then label every sample by its argmax in Q.

How it is computed:

* **Stabilised kernel.** The softmax normaliser of each row is a per-row factor absorbed by u, so the kernel is
  exp(lam * z_ik + g_k - r_i): ``g`` are column log-potentials, ``r_i`` makes each row's largest entry 1. It is
  stored in bfloat16 (float32's range at half the bytes; float16 underflows) and read in blocks that are
  widened to float32; sums accumulate in float64.
* **Unreachable clusters.** A column whose entries all underflow is detected when the kernel is built and its
  potential is raised until its largest entry is 1; potentials that grow past ``absorb_at`` are absorbed into
  the kernel and the kernel is rebuilt, so the scalings never overflow and the result is never NaN or inf.
* **One pass per iteration.** For each block of rows: s = M v, u = 1/s, and the cluster sums t += u M in the
  same pass; then v = (N/K) / t. How a dense block is multiplied (widened to float32, or a compiled tile
  kernel) is measured per processor, see :mod:`labelkit.products`.
* **Sparse kernels.** At lam = 25 most entries of a trained head's kernel are exact zeros (below float32's
  range). On the CPU a build that finds at most 10 % non-zeros keeps the rows as CSR with their transpose,
  and an iteration is two sparse products per thread; the same values, summed in another order.
* **Fewer iterations.** Over-relaxation (u and v move by the power ``omega`` of the plain Sinkhorn step, Thibault
  et al. 2017; Lehmann et al. 2021), omega estimated from the rate of the first plain iterations and dropped
  to 1 if the error stops improving; warm starts from a previous result's potentials; and, when the first
  iterations show a kernel too peaked to solve directly, lambda-annealing (lam/8, lam/4, lam/2, lam).
* **Threads.** Rows are split into one contiguous part per CPU thread, with torch's intra-op threads set to
  1 meanwhile (restored afterwards); small kernels run on one thread.
* **Stopping rule.** The marginal error is the share of mass in the wrong place: (sum_i |row_i - 1| +
  sum_k |col_k - N/K|) / N, the same quantity at every N (the paper's summed change of beta tightens with N).
* **Labels** come from the float32 logits and the final potentials, argmax_k lam * z_ik + g_k + log v_k, not
  from the bf16 kernel. ``exact_balance=True`` rounds Q under capacities so that every cluster gets
  floor(N/K) or ceil(N/K) samples (the paper's hard constraint); scores are q(label | i) of the chosen label.
* **Priors and relaxed balance.** The column marginals b need not be N/K: ``prior="powerlaw:a"`` asks for
  sizes proportional to rank^-a, the largest size going to the cluster that currently holds the most mass
  (re-matched during the first iterations, then fixed), and explicit counts fix each cluster's size.
  ``balance=tau`` relaxes the column constraint into a KL penalty tau * KL(col | b) (unbalanced optimal
  transport, Chizat et al. 2018): the column step becomes v = (b / t)^phi with phi = tau lam / (tau lam + 1),
  so cluster sizes follow the data, and a cluster e times its prior size costs tau nats per sample. ``floor``
  keeps every relaxed cluster at a share of its prior size (the column step is clamped there), so none
  vanishes. The stopping rule measures each column against the mass the step asks of it.
* **Distributed.** With a process group each rank passes its own rows; one all-reduce of a (K+1)-vector per
  iteration (cluster sums and the row error). Every rank sees the same potentials and stops together. The
  exact-balance rounding gathers each row's 8 best candidates (N x 8) and every rank rounds the same way.
"""

from __future__ import annotations

import heapq
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._io import pread_into, pwrite_all
from .errors import SolverError

__all__ = ["solve", "SinkhornResult", "Prior", "kernel_buffer", "kernel_path", "features_on_disk",
           "available_memory", "balanced_labels", "floored_labels",
           "KERNEL_PATHS", "fit_block", "working_bytes"]

_BF16_FLOOR = -80.0  # exp(-80) ~ 1.8e-35: still a normal bfloat16 number
_EXP_MIN = -87.0  # exp(-87) ~ 1.6e-38: the smallest exponent whose exp is a normal float32 and bfloat16
_EXP_FLOOR = math.exp(_EXP_MIN)
_PROBE = 12  # plain iterations that estimate the convergence rate before over-relaxing
_LOG_RANGE = 75.0  # |log| bound of scalings used in float32 products (float32 tops out near e^88)
_PATIENCE = 40
_SMALL = 1 << 20  # kernels with fewer entries are solved on one thread
_SPARSE_SHARE = 0.10  # a kernel with at most this share of non-zero entries is kept as sparse rows (CSR)
_SPARSE_MIN = _SMALL  # fewer entries: kept dense (small solves stay exactly as before)
_SPARSE_BYTES = 16  # per non-zero: float32 value and int32 column, in the rows and again in the transpose
_BAIL_RATE = 0.99  # a probe shrinking the error by less than 1 % an iteration switches to annealing  # over-relaxed iterations without a new best error before relaxing less


@dataclass
class SinkhornResult:
    """Outcome of :func:`solve`.

    Attributes:
        labels: int32 (N,) cluster of each sample (this rank's rows when distributed).
        iterations: Sinkhorn iterations run.
        error: final marginal error (share of mass misplaced, see the module docstring).
        converged: whether ``error <= tol`` was reached before ``max_iter``.
        sizes: int64 (K,) number of samples per cluster (global when distributed).
        potentials: float64 (K,) column log-potentials; pass the result as ``warm_start`` to re-solve.
        scores: float32 (N,) assignment confidence q(label | sample) of each row.
        seconds: wall time, kernel construction included.
        rebuilds: kernel constructions (1 + re-stabilisations).
        errors: marginal error after every iteration.
        targets: the column marginals solved for.
        kernel: which path ran, ``"stored"``, ``"disk"`` or ``"stream"``.
        products: what the sweeps multiplied: ``"sparse"`` rows (the build found at most 10 % of the kernel
            non-zero), or dense blocks ``"widen"``ed to float32 or ``"fused"`` in a compiled kernel, chosen per
            processor by a timing probe (see :mod:`labelkit.products`); ``products_why`` says why.
        density: the share of non-zero kernel entries, counted when sparse, sampled from 8 row blocks when the
            kernel stayed dense; None when not measured (small kernels, GPU, ``sparse=False``).
    """

    labels: np.ndarray
    iterations: int
    error: float
    converged: bool
    sizes: np.ndarray
    potentials: np.ndarray
    scores: np.ndarray
    seconds: float
    rebuilds: int = 1
    errors: list[float] = field(default_factory=list)
    targets: np.ndarray | None = None  # float64 (K,) the column marginals b solved for (after matching a prior)
    kernel: str = "stored"  # "stored" (N x K bfloat16 held), "disk" (in a scratch file) or "stream" (recomputed)
    products: str = "widen"  # how the sweeps multiplied: "sparse" rows, or dense blocks "widen"ed or "fused"
    products_why: str = ""  # what chose it: the probe's timings, the environment, or why only one path applied
    density: float | None = None  # share of non-zero kernel entries: counted when sparse, else from the sample


@dataclass(frozen=True)
class Prior:
    """Cluster sizes to solve for: ``uniform`` (N/K each, SeLa's equipartition), ``powerlaw`` (sizes
    proportional to rank^-alpha, matched to clusters by their current mass) or ``counts`` (one size per cluster,
    summing to N)."""

    kind: str = "uniform"
    alpha: float | None = None
    counts: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, value: Any) -> "Prior":
        """``None``, ``"uniform"``, ``"powerlaw:1.2"``, a Prior, or a sequence/array of counts."""
        if value is None or isinstance(value, Prior):
            return value or cls()
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "uniform":
                return cls()
            if text.startswith("powerlaw:"):
                try:
                    alpha = float(text.split(":", 1)[1])
                except ValueError:
                    raise SolverError(f"prior {value!r}: powerlaw needs a number, e.g. powerlaw:1.0") from None
                if not (alpha > 0 and math.isfinite(alpha)):
                    raise SolverError(f"prior {value!r}: the power-law exponent must be > 0")
                return cls("powerlaw", alpha=alpha)
            raise SolverError(f"prior {value!r}: give uniform, powerlaw:ALPHA or a list of cluster sizes")
        counts = np.asarray(value, dtype=np.float64).reshape(-1)
        if not np.isfinite(counts).all() or (counts <= 0).any():
            zero = np.flatnonzero(~(counts > 0))
            raise SolverError(f"prior counts must all be positive; cluster {int(zero[0]) if len(zero) else '?'} "
                              f"has {counts[zero[0]] if len(zero) else 'a non-finite size'}")
        return cls("counts", counts=tuple(counts.tolist()))

    @property
    def uniform(self) -> bool:
        return self.kind == "uniform"

    def targets(self, k: int, n: float) -> np.ndarray:
        """The K column marginals, largest first for a power law (matched to clusters later)."""
        if self.kind == "uniform":
            return np.full(k, n / k)
        if self.kind == "powerlaw":
            sizes = np.arange(1, k + 1, dtype=np.float64) ** -self.alpha
            sizes *= n / sizes.sum()
            if sizes[-1] < 1.0:
                raise SolverError(f"prior powerlaw:{self.alpha:g} over K={k} clusters gives the smallest one "
                                  f"{sizes[-1]:.2g} samples of N={int(n)}; lower the exponent or K")
            return sizes
        counts = np.asarray(self.counts)
        if len(counts) != k:
            raise SolverError(f"prior counts have {len(counts)} values but there are K={k} clusters")
        if abs(counts.sum() - n) > 0.5:
            raise SolverError(f"prior counts sum to {counts.sum():g} but there are N={int(n)} samples")
        return counts.copy()

    def __str__(self) -> str:
        if self.kind == "powerlaw":
            return f"powerlaw:{self.alpha:g}"
        return "uniform" if self.uniform else "counts"


KERNEL_PATHS = ("auto", "stored", "disk", "stream")


def system_memory_available() -> int | None:
    """The system's available memory (``MemAvailable``, which counts reclaimable caches), None if unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes free for new data on ``device``: CUDA's free memory, or the system's available memory on the CPU
    (16 GiB assumed where the system does not say)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return system_memory_available() or 1 << 34


def default_block(n: int, k: int, device: torch.device) -> int:
    """Rows per block: about 4 MB of float32 per block on the CPU (cache-sized), 65,536 rows on a GPU."""
    return max(16, min(n, (1 << 20) // max(k, 1))) if device.type == "cpu" else 1 << 16


def _per_row(k: int, device: torch.device) -> int:
    """Working bytes per row of a block, over all threads: a float32 block and its bfloat16 rounding."""
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    return k * (4 + 2) * threads


def fit_block(n: int, k: int, device: str | torch.device = "cpu", memory: int | None = None,
              block_size: int | None = None) -> int:
    """Rows per block: the default, made smaller when ``memory`` bytes cannot hold it; an error when they
    cannot hold 16 rows."""
    device = torch.device(device)
    block = block_size or default_block(n, k, device)
    if memory is None:
        return block
    room = memory // _per_row(k, device)
    if room < min(n, 16):
        need = min(n, 16) * _per_row(k, device)
        raise SolverError(f"a label memory of {memory:,} bytes is too small for one block of rows: 16 rows "
                          f"x K={k} need {need:,} bytes on {device}; give at least that")
    return int(min(block, room))


def working_bytes(n: int, k: int, device: str | torch.device = "cpu", memory: int | None = None,
                  block_size: int | None = None) -> int:
    """Memory every path needs beside the kernel itself: one block of rows per thread."""
    device = torch.device(device)
    return min(n, fit_block(n, k, device, memory, block_size)) * _per_row(k, device)


def kernel_path(n: int, k: int, device: str | torch.device = "cpu", memory: int | None = None,
                block_size: int | None = None, kernel: str = "auto", buffer: torch.Tensor | None = None,
                scratch: str | os.PathLike | None = None) -> str:
    """``"stored"``, ``"disk"`` or ``"stream"``: which kernel :func:`solve` uses for an (n, k) problem under
    ``memory`` bytes (default: half the device's available memory): in memory when it fits, else on the
    ``scratch`` disk on a CPU with room there, else recomputed every pass."""
    device = torch.device(device)
    if kernel not in KERNEL_PATHS:
        raise SolverError(f"kernel must be one of {', '.join(KERNEL_PATHS)}, got {kernel!r}")
    working = working_bytes(n, k, device, memory, block_size)  # also checks that the budget holds a block
    if kernel != "auto":
        return kernel
    if buffer is not None and buffer.numel() >= n * k:
        return "stored"  # the caller already paid for it
    budget = memory if memory is not None else available_memory(device) // 2
    if n * k * 2 + working <= budget:
        return "stored"
    # beyond memory: on a GPU recomputing a block is one GEMM, cheaper than any disk; on a CPU the GEMM costs
    # 2D flops an entry where the disk costs 2 bytes (measured on 2 cores, D = 128: 6 ns an entry recomputed,
    # 1.3 ns read back), so the kernel goes to scratch disk when there is room
    if device.type == "cpu" and _disk_room(scratch) >= 1.1 * n * k * 2:
        return "disk"
    return "stream"


def features_on_disk(n: int, d: int, k: int, device: str | torch.device = "cpu", memory: int | None = None,
                     scratch: str | os.PathLike | None = None) -> bool:
    """Whether a label step's (n, d) features should go to a float16 file on disk (read by blocks) rather
    than stay in memory as float32: when the kernel itself does not fit in memory (a problem beyond memory),
    or when the features and the stored kernel together would pass the budget."""
    path = kernel_path(n, k, device, memory, scratch=scratch)
    if path != "stored":
        return True
    budget = memory if memory is not None else available_memory(device) // 2
    return n * d * 4 + n * k * 2 > budget  # on a GPU both are in its memory, on a CPU both in RAM


def _disk_room(folder: str | os.PathLike | None) -> int:
    import shutil
    import tempfile

    from pathlib import Path

    path = Path(folder or tempfile.gettempdir()).absolute()
    while not path.exists() and path != path.parent:  # a run directory not made yet: the disk it will be on
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def kernel_buffer(n: int, k: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """A bfloat16 (n, k) buffer that several solves (one per head) can share."""
    return torch.empty((n, k), dtype=torch.bfloat16, device=device)


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
    from .featurefile import FeatureFile

    if isinstance(value, FeatureFile):
        return value  # read by row blocks from disk; a tensor of those rows each time  # type: ignore[return-value]
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise SolverError(f"{name} must be a torch tensor or numpy array, got {type(value).__name__}")
    return value


def _all_reduce(tensor: torch.Tensor, group, op=None) -> torch.Tensor:
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group)
    return tensor


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
        self.products: str | None = None  # how a sweep multiplies blocks, see labelkit.products; set on first use
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
            import torch.distributed as dist

            _all_reduce(col_max, group, dist.ReduceOp.MAX)
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
        from . import products

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


def _sweep(kernel, u, v, w, rows: _Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the kernel: new row scalings u (in place) and, in the same pass, the cluster sums u M.

    Returns the cluster sums and the row error sum_i |u_i (M v)_i - 1| of the (over-relaxed) row step.
    """
    if kernel.sparse is not None:
        return _sweep_sparse(kernel, u, v, w, rows)
    if kernel.products == "fused":
        return _sweep_fused(kernel, u, v, w, rows)
    k = kernel.source.k
    v32 = v.to(torch.float32)

    def part(lo, hi):
        widened = torch.empty((min(rows.block, hi - lo), k), dtype=torch.float32, device=kernel.device)
        sums = torch.zeros(k, dtype=torch.float64, device=kernel.device)
        row_error = torch.zeros((), dtype=torch.float64, device=kernel.device)
        for start, stop in rows.blocks(lo, hi):
            _widened_block(kernel, u, v32, w, start, stop, widened[: stop - start], sums, row_error)
        return sums, row_error

    results = rows.map(part)
    return sum(r[0] for r in results), sum(r[1] for r in results)


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


def _sweep_sparse(kernel, u, v, w, rows: _Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """The sweep over a sparse kernel: per part of the rows, s = A v and t = A^T u, two sparse products."""
    v32 = v.to(torch.float32)

    def part(lo, hi):
        a, at = kernel.sparse[lo]
        s = (a @ v32).double()
        new = _row_step(u[lo:hi], s, w)
        u[lo:hi] = new
        return (at @ new.float()).double(), (new * s - 1.0).abs().sum()

    results = rows.map(part)
    return sum(r[0] for r in results), sum(r[1] for r in results)


def _row_step(u: torch.Tensor, s: torch.Tensor, w: float) -> torch.Tensor:
    """New row scalings from the row sums s = M v: 1 / s, over-relaxed by w from the previous ``u``."""
    new = s.reciprocal()
    if w != 1.0:
        relaxed = u.pow(1.0 - w).mul_(new.pow(w))
        # an over-relaxed scaling must stay inside float32's range for the product below
        new = torch.where(relaxed.log().abs() < _LOG_RANGE, relaxed, new)
    return new


def _widened_block(kernel, u, v32, w, start, stop, widened, sums, row_error) -> None:
    """The sweep over rows start:stop with the block widened to float32 (the ``"widen"`` products)."""
    m = kernel.read(start, stop, widened)
    s = (m @ v32).double()
    new = _row_step(u[start:stop], s, w)
    u[start:stop] = new
    row_error += (new * s - 1.0).abs().sum()
    sums += new.float() @ m


def _sweep_fused(kernel, u, v, w, rows: _Rows, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sweep with the compiled tile kernel (``"fused"`` products) over rows 0:stop, tile after tile in this
    thread, each threaded inside by OpenMP; the rows after the last whole tile take the widened path."""
    from . import products

    n, k = (kernel.source.n if stop is None else stop), kernel.source.k
    tile = products.tile_rows(k)
    step = products.fused_step(k, tile, rows.threads)
    v32 = v.to(torch.float32)
    w_t = torch.tensor(w, dtype=torch.float64)
    sums = torch.zeros(k, dtype=torch.float64)
    row_error = torch.zeros((), dtype=torch.float64)
    whole = n // tile * tile
    with products.intra_op_threads(rows.threads):
        for start in range(0, whole, tile):
            new, t, error = step(kernel.data[start:start + tile], v32, u[start:start + tile], w_t)
            u[start:start + tile] = new
            sums += t
            row_error += error
    if whole < n:
        widened = torch.empty((n - whole, k), dtype=torch.float32)
        _widened_block(kernel, u, v32, w, whole, n, widened, sums, row_error)
    return sums, row_error


def _choose_products(kernel, v, rows: _Rows) -> tuple[str, str]:
    """Which products the sweeps of this kernel use (see :mod:`labelkit.products`), and why."""
    from . import products

    if kernel.device.type != "cpu":
        return "widen", f"on {kernel.device.type}, the widened products are the GPU's own"
    if not isinstance(kernel.data, torch.Tensor):
        return "widen", "the kernel is read from disk or recomputed: its blocks arrive in float32"
    scratch = torch.ones(kernel.source.n, dtype=torch.float64)  # the probe's sweeps must not touch u
    return products.choose(
        kernel.data, rows.threads,
        lambda count: _sweep(kernel, scratch, v, 1.0, rows.first(count)),
        lambda count: _sweep_fused(kernel, scratch, v, 1.0, rows, count),
    )


def _row_scalings(kernel, u, rows: _Rows) -> None:
    """u = 1 / (M 1): the row scalings of a freshly built kernel with v = 1."""

    def part(lo, hi):
        if kernel.sparse is not None:
            a = kernel.sparse[lo][0]
            u[lo:hi] = (a @ torch.ones(a.shape[1], device=kernel.device)).double().reciprocal_()
            return
        widened = torch.empty((min(rows.block, hi - lo), kernel.source.k), dtype=torch.float32, device=kernel.device)
        for start, stop in rows.blocks(lo, hi):
            u[start:stop] = kernel.read(start, stop, widened[: stop - start]).sum(1).double().reciprocal_()

    rows.map(part)


def _assign(source, kernel, v, potentials, lam, rows: _Rows):
    """Labels argmax_k lam z_ik + potential_k from the float32 logits; scores q(label | i) from the kernel."""
    pot = potentials.to(torch.float32)
    v32 = v.to(torch.float32)
    labels = torch.empty(source.n, dtype=torch.int64, device=pot.device)
    scores = torch.empty(source.n, dtype=torch.float32, device=pot.device)

    def part(lo, hi):
        if kernel.sparse is not None:
            a = kernel.sparse[lo][0]
            ends = a.crow_indices().to(torch.int64)
            row_mass = a @ v32
            for start, stop in rows.blocks(lo, hi):
                idx = (source.block(start, stop).float() * lam).add_(pot).argmax(dim=1)
                e0, e1 = int(ends[start - lo]), int(ends[stop - lo])
                row_of = torch.repeat_interleave(torch.arange(stop - start, device=pot.device),
                                                 ends[start - lo + 1:stop - lo + 1] - ends[start - lo:stop - lo])
                hit = a.col_indices()[e0:e1] == idx[row_of]  # at most one entry per row: the label's
                chosen = torch.zeros(stop - start, dtype=torch.float32, device=pot.device)
                chosen[row_of[hit]] = a.values()[e0:e1][hit]
                labels[start:stop] = idx
                scores[start:stop] = chosen * v32[idx] / row_mass[start - lo:stop - lo]
            return None
        widened = torch.empty((min(rows.block, hi - lo), source.k), dtype=torch.float32, device=pot.device)
        for start, stop in rows.blocks(lo, hi):
            idx = (source.block(start, stop).float() * lam).add_(pot).argmax(dim=1)
            m = kernel.read(start, stop, widened[: stop - start])
            row_mass = m @ v32
            chosen = m.gather(1, idx[:, None]).squeeze(1) * v32[idx]
            labels[start:stop] = idx
            scores[start:stop] = chosen / row_mass
        return None

    rows.map(part)
    return labels, scores


def solve(
    logits=None,
    *,
    features=None,
    weight=None,
    bias=None,
    lam: float = 25.0,
    tol: float = 1e-3,
    max_iter: int = 1000,
    warm_start: SinkhornResult | np.ndarray | None = None,
    omega: float | None = None,
    exact_balance: bool = False,
    block_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    buffer: torch.Tensor | None = None,
    group=None,
    absorb_at: float = 60.0,
    anneal: bool = True,
    prior: Prior | str | Any = None,
    balance: float | None = None,
    floor: float = 0.2,
    kernel: str = "auto",
    memory: int | None = None,
    scratch: str | os.PathLike | None = None,
    sparse: bool = True,
) -> SinkhornResult:
    """Label N samples into K equal-sized clusters by Sinkhorn-Knopp on P^lam (SeLa, eq. 8).

    Args:
        logits: (N, K) scores of one head, torch tensor or numpy array.
        features, weight, bias: instead of logits, (N, D) features and the head's (K, D) weight and (K,)
            bias; the logits are built in blocks and never exist whole.
        lam: the inverse temperature lambda of the paper (25).
        tol: stop when the marginal error (share of misplaced mass) is at most this.
        max_iter: cap on iterations; hitting it returns ``converged=False`` and warns.
        warm_start: a previous :class:`SinkhornResult` (or its ``potentials``) of the same head.
        omega: over-relaxation in [1, 2); 1 is the plain Sinkhorn iteration; None (default) estimates the
            best value from the convergence rate of the first iterations.
        exact_balance: round Q so that every cluster holds floor(N/K) or ceil(N/K) samples.
        block_size: rows per block (default: fits the cache on CPU, large on GPU).
        device: where the kernel lives (default: the input's device).
        dtype: compute dtype of the logits (float32).
        buffer: a bfloat16 tensor with at least N*K elements to hold the kernel (see :func:`kernel_buffer`).
        group: a ``torch.distributed`` process group; each rank passes its own rows.
        absorb_at: re-stabilise when a scaling's log exceeds this.
        anneal: when the first iterations show a kernel too peaked to solve directly, solve at lam/8, lam/4,
            lam/2 and lam in turn, each warm-starting the next.
        prior: cluster sizes: ``"uniform"`` (default, N/K each), ``"powerlaw:ALPHA"`` or K counts summing to N
            (see :class:`Prior`).
        balance: None (default) holds the cluster sizes to the prior exactly; tau > 0 relaxes them with a KL
            penalty of strength tau (unbalanced optimal transport; large tau approaches the hard constraint).
        floor: with ``balance``, every cluster keeps at least this share of its prior size.
        kernel: ``"stored"`` holds the N x K bfloat16 kernel (or uses ``buffer``); ``"disk"`` keeps the same
            bytes in a scratch file; ``"stream"`` recomputes each row block from the logits or features on
            every pass and holds O(block x K); ``"auto"`` (default) stores it when it fits ``memory``, else
            uses the disk on a CPU with room, else streams. Every path gives the same labels.
        memory: bytes the kernel may take (default: :func:`available_memory` of the device, halved).
        scratch: folder for the ``"disk"`` kernel (default: the system's temporary folder).
        sparse: on the CPU, keep a kernel with at most 10 % non-zero entries (a trained head at lam = 25 is
            mostly exact zeros) as sparse rows, whichever ``kernel`` path holds the dense one; False never does.
    """
    t0 = time.perf_counter()
    source_tensor = logits if logits is not None else features
    if device is None:
        device = source_tensor.device if isinstance(source_tensor, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    source = _Logits(logits, features, weight, bias, device, dtype)
    n_local, k = source.n, source.k
    if omega is not None and not (1.0 <= omega < 2.0):
        raise SolverError(f"omega must lie in [1, 2), got {omega}")
    if lam <= 0 or not math.isfinite(lam):
        raise SolverError(f"lam must be a positive number, got {lam}")
    prior = Prior.parse(prior)
    if balance is not None and not (balance > 0 and math.isfinite(balance)):
        raise SolverError(f"balance must be a positive number (the KL penalty tau), got {balance}")
    if not 0.0 <= floor < 1.0:
        raise SolverError(f"floor must lie in [0, 1), the share of a cluster's prior size it keeps; got {floor}")
    if exact_balance and (not prior.uniform or balance is not None):
        raise SolverError("exact_balance rounds to equal cluster sizes; it applies to the uniform prior with no "
                          "balance relaxation only")
    block_size = fit_block(n_local, k, device, memory, block_size)
    n_total = _all_reduce(torch.tensor([n_local], dtype=torch.float64, device=device), group).item()
    if n_total == 0 or k == 0:
        raise SolverError(f"nothing to label: N={int(n_total)}, K={k}")
    if k > n_total:
        raise SolverError(f"K={k} clusters cannot all be filled by N={int(n_total)} samples; need K <= N")
    columns = _Columns(prior, balance, floor, k, n_total, device)

    path = kernel_path(n_local, k, device, memory, block_size, kernel, buffer, scratch)
    storage = None
    if path == "disk":
        if device.type != "cpu":
            raise SolverError(f"kernel='disk' is for the CPU; on {device} use 'stream'")
        storage = _DiskStore(n_local, k, scratch)
    elif path == "stored":
        if buffer is not None:
            if buffer.dtype != torch.bfloat16 or buffer.numel() < n_local * k:
                raise SolverError(f"buffer must be bfloat16 with at least {n_local * k} elements")
            storage = buffer.view(-1)[: n_local * k].view(n_local, k)
        else:
            storage = torch.empty((n_local, k), dtype=torch.bfloat16, device=device)
    kernel = _Kernel(source, storage, device)
    if sparse and device.type == "cpu" and n_local * k >= _SPARSE_MIN:
        budget = memory if memory is not None else available_memory(device) // 2
        kernel.sparse_cap = int(min(_SPARSE_SHARE * n_local * k, budget / _SPARSE_BYTES))

    g = torch.zeros(k, dtype=torch.float64, device=device)
    if warm_start is not None:
        previous = warm_start.potentials if isinstance(warm_start, SinkhornResult) else np.asarray(warm_start)
        if previous.shape != (k,):
            raise SolverError(f"warm_start has {previous.shape[0]} potentials but there are {k} clusters")
        g = torch.as_tensor(previous, dtype=torch.float64, device=device).clone()
    rows = _Rows(n_local, block_size, device, k)
    try:
        with rows:
            g, v, iterations, errors, converged, rebuilds = _solve_annealed(
                source, kernel, g, lam, tol, max_iter, omega, absorb_at, n_total, rows, group, anneal, columns)
            if not converged:
                warnings.warn(
                    f"Sinkhorn stopped at max_iter={max_iter} with marginal error {errors[-1]:.2e} > tol={tol:g}; "
                    "labels are usable but clusters may be less balanced (raise max_iter or tol)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            potentials = g + v.log()
            potentials -= potentials.max()
            if not exact_balance:  # else the balanced rounding below makes the labels
                labels, scores = _assign(source, kernel, v, potentials, lam, rows)
        products, products_why, density = kernel.products or "widen", kernel.products_why, kernel.density
        if kernel.sparse is not None:
            products, products_why = "sparse", f"{kernel.density:.2%} of the kernel non-zero: sparse rows"
    finally:
        kernel.close()
    if exact_balance:
        labels, scores = balanced_labels(source, potentials, lam, block_size, group=group)
        labels, scores = labels.to(potentials.device), scores.to(potentials.device)
    elif balance is not None and floor > 0:
        minimum = np.ceil(floor * columns.b.cpu().numpy() - 1e-9).astype(np.int64)
        labels, scores = floored_labels(source, potentials, lam, block_size, labels, scores, minimum, group=group)
        labels, scores = labels.to(potentials.device), scores.to(potentials.device)
    sizes = torch.bincount(labels, minlength=k).to(torch.float64)
    sizes = _all_reduce(sizes, group).to(torch.int64)
    return SinkhornResult(
        labels=labels.cpu().numpy().astype(np.int32),
        iterations=iterations,
        error=errors[-1],
        converged=converged,
        sizes=sizes.cpu().numpy(),
        potentials=potentials.cpu().numpy(),
        scores=scores.cpu().numpy(),
        seconds=time.perf_counter() - t0,
        rebuilds=rebuilds,
        errors=errors,
        targets=columns.b.cpu().numpy(),
        kernel=path,
        products=products,
        products_why=products_why,
        density=density,
    )


class _Columns:
    """The column step: what mass each cluster should hold, given the cluster sums t = u M of this iteration.

    Hard marginals (``balance`` None) ask for b exactly; relaxed ones for b^phi t^(1-phi), the proximal step of
    tau KL(. | b) at entropic regularisation 1/lam, clamped below at ``floor`` b. A power-law prior re-matches
    its sorted sizes to the clusters by current mass until it is ``fixed``.
    """

    def __init__(self, prior: Prior, balance, floor, k, n_total, device):
        self.prior, self.balance, self.floor = prior, balance, floor
        self.sorted = torch.as_tensor(prior.targets(k, n_total), dtype=torch.float64, device=device)
        self.b = self.sorted.clone()
        self.fixed = prior.kind != "powerlaw"

    def phi(self, lam: float) -> float:
        return 1.0 if self.balance is None else self.balance * lam / (self.balance * lam + 1.0)

    def desired(self, mass: torch.Tensor, t: torch.Tensor, g: torch.Tensor, phi: float) -> torch.Tensor:
        """``mass`` = v t is each column's current mass; ``g`` the column potentials the kernel was built with."""
        if not self.fixed:  # the largest size to the cluster holding the most mass, and so on down
            self.b = torch.empty_like(self.sorted).index_copy_(0, torch.argsort(mass, descending=True), self.sorted)
        if phi == 1.0:
            return self.b
        # the proximal step needs the sums of P^lam itself; the stored kernel carries exp(g) in its columns
        log_t = torch.where(t > 0, t, torch.full_like(t, 1e-300)).log() - g
        return torch.maximum((phi * self.b.log() + (1.0 - phi) * log_t).exp(), self.floor * self.b)


def _solve_annealed(source, kernel, g, lam, tol, max_iter, omega, absorb_at, n_total, rows, group, anneal, columns):
    """Solve at ``lam`` directly; if that converges too slowly, anneal: solve at lam/8, lam/4, lam/2 and then
    lam, each stage warm-started from the last (the potentials scale with lambda). This is epsilon-scaling,
    the standard remedy for peaked kernels; on a trained digits head it cut the iterations about 20x."""
    start = g.clone()
    result = _iterate(source, kernel, g, lam, tol, max_iter, omega, absorb_at, n_total, rows, group, columns,
                      bail_rate=_BAIL_RATE if anneal else None)
    if result[4] or not anneal or result[2] >= max_iter:
        return result
    iterations, errors, rebuilds = result[2], list(result[3]), result[5]
    g = start / 8
    for stage in (lam / 8, lam / 4, lam / 2, lam):
        g, v, its, errs, converged, builds = _iterate(source, kernel, g, stage, tol, max_iter - iterations, omega,
                                                      absorb_at, n_total, rows, group, columns)
        iterations, errors, rebuilds = iterations + its, errors + errs, rebuilds + builds
        if iterations >= max_iter:
            break
        if stage != lam:
            g = (g + v.log()) * 2
    return g, v, iterations, errors, converged, rebuilds


def _iterate(source, kernel, g, lam, tol, max_iter, omega, absorb_at, n_total, rows, group, columns, bail_rate=None):
    """The Sinkhorn loop; returns potentials g and scalings v, iterations, errors, converged, rebuilds.

    With ``bail_rate``, stops early (not converged) when the first iterations shrink the error by less than
    that factor each: the sign of a kernel too peaked to solve directly.
    """
    k, device = source.k, kernel.device
    rebuilds = 0

    def build():
        nonlocal rebuilds
        rebuilds += 1
        return kernel.build(g, lam, rows, group)

    col_max = build()
    if not bool(torch.isfinite(col_max).all()):
        # a NaN or +inf anywhere turns its row, and so some column maximum, into NaN
        raise SolverError("the input contains NaN or inf; fix the model outputs before labelling")
    for _ in range(3):  # raise unreachable clusters until each column has an entry of 1
        low = col_max < _BF16_FLOOR / 2
        if not bool(low.any()):
            break
        g -= torch.where(low, col_max.double(), torch.zeros_like(g))
        col_max = build()

    phi = columns.phi(lam)
    if columns.prior.kind == "powerlaw":
        columns.fixed = False  # each stage re-matches the sizes during its first iterations
    # start each column's scaling where its largest entry reaches 1: a free first guess at the potentials
    v = torch.exp(-col_max.double().clamp(min=-absorb_at))
    if kernel.products is None:
        if kernel.sparse is None:
            kernel.products, kernel.products_why = _choose_products(kernel, v, rows)
        else:  # no dense sweep yet; should a later build be dense, it takes the path that needs no probe
            kernel.products, kernel.products_why = "widen", "the first build was sparse"
        if group is not None:  # every rank sums the same way: fused only where all ranks chose it
            fused = torch.tensor([float(kernel.products == "fused")], dtype=torch.float64, device=device)
            if _all_reduce(fused, group, _min_op()).item() < 1.0 and kernel.products == "fused":
                kernel.products, kernel.products_why = "widen", "another rank chose the widened products"
    u = torch.ones(source.n, dtype=torch.float64, device=device)
    errors: list[float] = []
    converged = False
    w = 1.0 if omega is None else omega
    best, since_best = math.inf, 0
    iterations = 0
    for iterations in range(1, max_iter + 1):
        cluster_sums, row_error = _sweep(kernel, u, v, w, rows)
        sums = _all_reduce(torch.cat([cluster_sums, row_error.reshape(1)]), group)
        t = sums[:k]
        if iterations > _PROBE:
            columns.fixed = True
        target = columns.desired(v * t, t, g, phi)
        error = float(((v * t - target).abs().sum() + sums[k]) / n_total)
        errors.append(error)
        if not math.isfinite(error):
            raise SolverError("Sinkhorn diverged (non-finite error); this is a bug, please report it")
        if error <= tol:
            converged = True
            break
        if iterations == _PROBE:
            if bail_rate is not None and _rate(errors) > bail_rate and error > 10 * tol:
                break
            if omega is None:
                w = _optimal_omega(errors)
        if error < best:
            best, since_best = error, 0
        else:
            since_best += 1
            if w != 1.0 and since_best >= _PATIENCE:
                w = 1.0  # over-relaxation transients are normal; stagnation is not: fall back to plain steps
                since_best = 0
        step = target / torch.where(t > 0, t, torch.full_like(t, 1e-300))
        v = v.pow(1.0 - w) * step.pow(w) if w != 1.0 else step
        log_v = v.log()
        if float(log_v.abs().max()) > absorb_at:  # absorb the scalings into the kernel before they overflow
            g += log_v
            g -= g.max()
            v = torch.ones_like(v)
            build()
            _row_scalings(kernel, u, rows)
    return g, v, iterations, errors, converged, rebuilds


def _min_op():
    import torch.distributed as dist

    return dist.ReduceOp.MIN


def _rate(errors: list[float]) -> float:
    """Average factor by which the error shrank over the last few iterations."""
    tail = np.asarray(errors[-6:])
    if len(tail) < 3 or (tail <= 0).any():
        return 1.0
    return float(np.exp(np.mean(np.log(tail[1:] / tail[:-1]))))


def _optimal_omega(errors: list[float]) -> float:
    """Over-relaxation from the observed rate rho of the plain iteration: 2 / (1 + sqrt(1 - rho)).

    The classical optimum for successive over-relaxation; for Sinkhorn near its fixed point see Thibault et
    al. 2017, "Overrelaxed Sinkhorn-Knopp algorithm for regularized optimal transport".
    """
    rho = _rate(errors)
    if not 0.0 < rho < 1.0:
        return 1.0
    return float(min(1.9, 2.0 / (1.0 + math.sqrt(1.0 - rho))))


def _candidates(source, potentials, lam, block, c) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``c`` best clusters under the plan and their log q(k | i) (comparable across rows)."""
    pot = torch.as_tensor(potentials, dtype=torch.float32)
    n = source.n
    top_logq = np.empty((n, c), dtype=np.float32)
    top_idx = np.empty((n, c), dtype=np.int64)
    for start in range(0, n, block):
        e = (source.block(start, start + block).float().cpu() * lam).add_(pot)
        e -= torch.logsumexp(e, dim=1, keepdim=True)
        values, idx = e.topk(c, dim=1)
        top_logq[start : start + block], top_idx[start : start + block] = values.numpy(), idx.numpy()
    return top_logq, top_idx


def _log_q(source, rows: np.ndarray, potentials, lam) -> np.ndarray:
    """Full rows of log q(k | i) for a few ``rows``."""
    if len(rows) == 0:
        return np.zeros((0, source.k), dtype=np.float32)
    e = torch.cat([source.block(int(i), int(i) + 1).float().cpu() for i in rows]) * lam
    e += torch.as_tensor(potentials, dtype=torch.float32)
    return (e - torch.logsumexp(e, dim=1, keepdim=True)).numpy()


def _gather(group, *arrays):
    """Every rank's arrays concatenated in rank order (each array unchanged in one process)."""
    if group is None:
        return arrays
    import torch.distributed as dist

    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, arrays, group=group)
    return tuple(np.concatenate([p[j] for p in parts]) for j in range(len(arrays)))


def balanced_labels(source, potentials, lam, block, candidates: int = 8, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round the transport plan to labels with every cluster holding floor(N/K) or ceil(N/K) samples; returns
    the labels of this rank's rows and their scores q(label | i).

    Greedy under capacities: (sample, cluster) pairs among each row's ``candidates`` best are taken in order
    of decreasing plan score; once N mod K clusters are at ceil(N/K) the others close at floor(N/K). Rows left
    without a place (rare, when all their candidates filled) go to the open clusters by score. Across ranks,
    every rank sends its rows' candidates (N x candidates, not N x K) and runs the same rounding.
    """
    if not isinstance(source, _Logits):
        source = _Logits(source, None, None, None, torch.device("cpu"), torch.float32)
    k = source.k
    c = min(candidates, k)
    local_logq, local_idx = _candidates(source, potentials, lam, block, c)
    sizes = _gather(group, np.array([source.n]))[0]
    offset = int(sizes[: _rank(group)].sum())
    top_logq, top_idx = _gather(group, local_logq, local_idx)
    n = len(top_logq)
    floor, extra = divmod(n, k)
    capacity = np.full(k, floor + (1 if extra else 0), dtype=np.int64)
    labels = np.full(n, -1, dtype=np.int64)
    scores = np.zeros(n, dtype=np.float32)
    at_ceiling = 0
    # The pairs in order of decreasing score (ties: by row, then rank), without walking all N x c of them: a
    # row's next candidate matters only once its previous one was refused, and scores fall along a row, so
    # the pairs are the rows' first candidates in sorted order merged with a heap of the refused rows' next.
    best = top_logq[:, 0].tolist()
    first = np.argsort(-top_logq[:, 0], kind="stable").tolist()
    pending: list[tuple[float, int, int]] = []  # (-score, row, rank) of next candidates
    i = 0
    while i < n or pending:
        if pending and (i == n or (pending[0][0], pending[0][1]) < (-best[first[i]], first[i])):
            _, row, col = heapq.heappop(pending)
        else:
            row, col = first[i], 0
            i += 1
        cluster = int(top_idx[row, col])
        if capacity[cluster] == 0:
            if col + 1 < c:
                heapq.heappush(pending, (-float(top_logq[row, col + 1]), row, col + 1))
            continue
        labels[row] = cluster
        scores[row] = top_logq[row, col]
        capacity[cluster] -= 1
        if extra and capacity[cluster] == 0:
            at_ceiling += 1
            if at_ceiling == extra:  # the remaining clusters may only reach floor(N/K)
                capacity[capacity > 0] -= 1
                extra = 0
    mine = np.flatnonzero(labels[offset : offset + source.n] < 0)
    left, left_logq = _gather(group, mine + offset, _log_q(source, mine, potentials, lam))
    for row, logq in zip(left.tolist(), left_logq):
        open_clusters = np.flatnonzero(capacity > 0)
        cluster = open_clusters[np.argmax(logq[open_clusters])]
        labels[row] = cluster
        scores[row] = logq[cluster]
        capacity[cluster] -= 1
    window = slice(offset, offset + source.n)
    return torch.from_numpy(labels[window]), torch.from_numpy(np.exp(scores[window]))


def floored_labels(source, potentials, lam, block, labels: torch.Tensor, scores: torch.Tensor, minimum: np.ndarray,
                   candidates: int = 8, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The floor of relaxed balance at the level of labels: argmax labels can leave a cluster nearly empty even
    when the plan gives it its floor of mass (the mass spread thinly over many rows), so clusters holding fewer
    than ``minimum[k]`` samples take the rows that lose least by moving to them -- log q(label | i) - log q(k | i),
    smallest first, among each row's ``candidates`` best clusters -- from clusters above their own minimum.
    Returns this rank's labels and scores q(label | i); unchanged when every cluster holds its minimum.
    Across ranks every rank runs the same moves on the gathered candidates, as :func:`balanced_labels` does."""
    if not isinstance(source, _Logits):
        source = _Logits(source, None, None, None, torch.device("cpu"), torch.float32)
    k = source.k
    counts = _all_reduce(torch.bincount(labels, minlength=k).to(torch.float64), group).cpu().numpy().astype(np.int64)
    if (counts >= minimum).all():
        return labels, scores
    local_logq, local_idx = _candidates(source, potentials, lam, block, min(candidates, k))
    sizes = _gather(group, np.array([source.n]))[0]
    offset = int(sizes[: _rank(group)].sum())
    top_logq, top_idx, current, chosen = _gather(group, local_logq, local_idx, labels.cpu().numpy().astype(np.int64),
                                                 scores.cpu().numpy().astype(np.float32))
    current, chosen = current.copy(), chosen.copy()
    need = minimum - counts
    rows, cols = np.nonzero((need[top_idx] > 0) & (top_idx != current[:, None]))
    loss = np.log(np.maximum(chosen[rows], 1e-30)) - top_logq[rows, cols]
    moved = np.zeros(len(current), dtype=bool)
    for i in np.argsort(loss, kind="stable").tolist():
        row, col = int(rows[i]), int(cols[i])
        cluster, source_cluster = int(top_idx[row, col]), int(current[row])
        if need[cluster] <= 0 or moved[row] or counts[source_cluster] <= minimum[source_cluster]:
            continue
        current[row], chosen[row], moved[row] = cluster, math.exp(float(top_logq[row, col])), True
        counts[source_cluster] -= 1
        counts[cluster] += 1
        need[cluster] -= 1
    window = slice(offset, offset + source.n)
    return torch.from_numpy(current[window]), torch.from_numpy(chosen[window])


def _rank(group) -> int:
    if group is None:
        return 0
    import torch.distributed as dist

    return dist.get_rank(group)
