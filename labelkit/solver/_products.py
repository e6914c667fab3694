"""How the Sinkhorn sweep multiplies a dense bfloat16 kernel block on this processor, chosen by measuring.

Every iteration reads the N x K bfloat16 kernel once and computes, for each block of rows, s = M v and then
t += u M with u = 1 / s. (A kernel that is mostly zeros never gets here: the solver keeps it as sparse rows.)
Two ways of doing that on a CPU:

* ``"widen"``: copy the block to float32, then two matrix-vector products (torch's BLAS). Needs nothing but
  torch, but the float32 copy is written out and read back twice: on a CPU whose cache does not hold the
  widened block the copy costs more than both products (measured on an Intel Xeon with AVX-512: 91 ms of
  213 ms per 100,000 rows x 3,000 on one thread).
* ``"fused"``: one generated C++ kernel per block (``torch.compile``, TorchInductor) that widens in registers
  and computes s, the over-relaxed u, the row error and t in one pass over a cache-sized tile, threaded by
  OpenMP inside the kernel. It needs a C++ compiler and a compile on first use (seconds; cached on disk by
  Inductor for later processes).

Which is faster depends on the processor (vector width, cache sizes, memory bandwidth), so it is measured,
not assumed: :func:`choose` times both on the first 256 MB of the real kernel's rows and keeps ``fused``
only when it is 10 % faster, for the rest of the process (per K, tile and thread count). On the 2-core Intel
Xeon where this was written the sweep took 233-240 ms widened and 208-225 ms fused at 200,000 x 3,000,
which the margin leaves on ``widen``. ``LABELKIT_PRODUCTS=widen|fused`` forces one. The two
paths sum in a different order, so their potentials differ in float32 rounding (labels are computed from the
float32 logits and agree to rounding ties); the path that ran is reported as ``SinkhornResult.products``.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch

from ._numerics import _EXP_MIN, _LOG_RANGE

PATHS = ("widen", "fused")
_MIN_ENTRIES = 1 << 27  # smaller kernels: a sweep takes milliseconds, so a compile could never pay for itself
_PROBE_BYTES = 256 << 20  # bfloat16 bytes of kernel rows timed per path: past the cache, as the sweeps run
_MARGIN = 0.9  # the compiled path must be this much faster in the probe: its compile and load cost something too
_chosen: dict[tuple, tuple[str, str]] = {}  # (k, tile, threads) -> (path, why)
_compiled: dict[tuple, object] = {}


def tile_rows(k: int) -> int:
    """Rows per fused tile: half this CPU's L2 cache in bfloat16 (so the second read of the tile is a cache
    hit), between 16 and 1024, a multiple of 16."""
    l2 = _cache_bytes(2) or (1 << 20)
    rows = (l2 // 2) // (2 * max(k, 1))
    return int(max(16, min(1024, rows // 16 * 16)))


def _cache_bytes(level: int) -> int | None:
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            folder = os.path.join(base, entry)
            with open(os.path.join(folder, "level")) as f:
                if int(f.read()) != level:
                    continue
            with open(os.path.join(folder, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(folder, "size")) as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            return int(text.rstrip("KMG")) * scale
    except (OSError, ValueError):
        return None
    return None


def _tile_step(m: torch.Tensor, v: torch.Tensor, u: torch.Tensor, w: torch.Tensor):
    """One tile's share of a sweep: the new (over-relaxed) row scalings, the cluster sums u M and the row error.

    m (R, K) bfloat16, v (K,) float32, u (R,) float64 previous scalings, w 0-d float64 over-relaxation.
    The same arithmetic as the widened path in :func:`labelkit.solver._sweep`.
    """
    mf = m.float()
    s = (mf * v).sum(1).double()
    new = s.reciprocal()
    relaxed = torch.exp((1.0 - w) * u.log() + w * new.log())
    new = torch.where(relaxed.log().abs() < _LOG_RANGE, relaxed, new)
    error = (new * s - 1.0).abs().sum()
    sums = (new.float()[:, None] * mf).sum(0)
    return new, sums, error


def _build_tile(e: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One tile of the kernel build from its exponent e (R, K) float32: out (R, K) bfloat16 = exp(e - row max),
    zero below float32's range; returns the column maxima of e - row max. The arithmetic of
    ``labelkit.solver._Kernel.build``."""
    e = e - e.amax(1, keepdim=True)
    out.copy_(torch.where(e <= _EXP_MIN, 0.0, e.clamp(min=_EXP_MIN).exp()).to(torch.bfloat16))
    return e.amax(0)


@contextmanager
def intra_op_threads(count: int):
    """torch's intra-op (OpenMP) thread count set to ``count`` meanwhile: the compiled kernels thread
    inside, while the solver's row pool otherwise keeps it at 1."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def fused_step(k: int, tile: int, threads: int):
    """The compiled sweep tile (:func:`_tile_step`) for (tile, K) on ``threads`` OpenMP threads; raises
    whatever compiling raises."""
    return _compile(_tile_step, k, tile, threads, (
        torch.ones((tile, k), dtype=torch.bfloat16), torch.ones(k), torch.ones(tile, dtype=torch.float64),
        torch.tensor(1.0, dtype=torch.float64)))


def fused_build(k: int, tile: int, threads: int):
    """The compiled build tile (:func:`_build_tile`) for (tile, K) on ``threads`` OpenMP threads."""
    return _compile(_build_tile, k, tile, threads,
                    (torch.zeros((tile, k)), torch.empty((tile, k), dtype=torch.bfloat16)))


def _compile(fn, k: int, tile: int, threads: int, example: tuple):
    key = (fn.__name__, k, tile, threads)
    if key not in _compiled:
        import torch._inductor.config as inductor_config

        compiled = torch.compile(fn, dynamic=False, fullgraph=True)
        # Inductor writes the thread count into the kernel it generates; no compile worker pool for one kernel
        with intra_op_threads(threads), inductor_config.patch(compile_threads=1):
            compiled(*example)
        _compiled[key] = compiled
    return _compiled[key]


def choose(data: torch.Tensor, threads: int, widen_sweep, fused_sweep) -> tuple[str, str]:
    """The faster path for sweeping the stored kernel ``data`` (N x K bfloat16 on the CPU) and why.

    ``widen_sweep(rows)`` and ``fused_sweep(rows)`` each run a sweep over the first ``rows`` rows with
    throw-away scalings; both are timed three times, alternately, and the faster minimum wins.
    """
    n, k = data.shape
    tile = tile_rows(k)
    key = (k, tile, threads)
    forced = os.environ.get("LABELKIT_PRODUCTS", "auto").strip().lower() or "auto"
    if forced not in PATHS + ("auto",):
        from ..errors import SolverError

        raise SolverError(f"LABELKIT_PRODUCTS must be auto, widen or fused, got {forced!r}")
    if forced == "widen":
        return "widen", "LABELKIT_PRODUCTS=widen"
    if forced == "auto" and key in _chosen:
        return _chosen[key]
    if forced == "auto" and n * k < _MIN_ENTRIES:
        return "widen", f"{n * k:,} kernel entries: too few for a compiled kernel to pay off"
    try:
        fused_step(k, tile, threads)
        fused_build(k, tile, threads)
    except Exception as exc:  # no C++ compiler, an unsupported platform, ...: the widened path always works
        reason = f"compiled kernel unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        _chosen[key] = ("widen", reason)
        return _chosen[key]
    if forced == "fused":
        return "fused", "LABELKIT_PRODUCTS=fused"
    rows = min(n, max(tile, _PROBE_BYTES // (2 * k) // tile * tile))
    times = {"widen": [], "fused": []}
    for _ in range(3):
        for name, sweep in (("widen", widen_sweep), ("fused", fused_sweep)):
            t0 = time.perf_counter()
            sweep(rows)
            times[name].append(time.perf_counter() - t0)
    widen, fused = min(times["widen"]), min(times["fused"])
    path = "fused" if fused < _MARGIN * widen else "widen"
    _chosen[key] = (path, f"probe on {rows:,} rows: widen {widen * 1e3:.1f} ms, fused {fused * 1e3:.1f} ms")
    return _chosen[key]
