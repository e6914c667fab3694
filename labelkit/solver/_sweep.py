"""One pass over the kernel per Sinkhorn iteration (dense, sparse or fused), and the final assignment."""

from __future__ import annotations

import torch

from . import _products as products
from ._kernel import _Rows
from ._numerics import _LOG_RANGE


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
    """Which products the sweeps of this kernel use (see :mod:`labelkit.solver`), and why."""
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
