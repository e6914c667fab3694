"""The Sinkhorn-Knopp loop: over-relaxed iterations with absorption of large scalings, and lambda-annealing when
the kernel is too peaked to solve directly."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._util import collectives
from ..errors import SolverError
from ._numerics import _BAIL_RATE, _BF16_FLOOR, _PATIENCE, _PROBE, _STALL
from ._kernel import _Kernel, _Logits, _Rows
from ._options import Algorithm
from ._prior import _Columns
from ._sweep import _choose_products, _row_scalings, _sweep


@dataclass
class _Problem:
    """What every iteration of one solve reads: the logits, their kernel, the threads over its rows, the column
    step, the number of samples over all ranks and the process group (None in one process)."""

    source: _Logits
    kernel: _Kernel
    rows: _Rows
    columns: _Columns
    n_total: float
    group: Any = None


@dataclass
class _Loop:
    """The state of the loop: column log-potentials ``g`` (absorbed into the kernel) and scalings ``v`` at
    inverse temperature ``lam``, the iterations run, the error after each, whether the error reached the
    tolerance, and the kernel builds."""

    g: torch.Tensor
    lam: float
    v: torch.Tensor | None = None
    iterations: int = 0
    errors: list[float] = field(default_factory=list)
    converged: bool = False
    rebuilds: int = 0


class _Relaxation:
    """The over-relaxation weight w: plain steps (or the given omega) for the first iterations, then the
    optimum estimated from their rate, and plain steps again once the error stops improving."""

    def __init__(self, omega: float | None):
        self.omega = omega
        self.w = 1.0 if omega is None else omega
        self.best, self.since_best = math.inf, 0

    def update(self, errors: list[float]) -> None:
        if len(errors) == _PROBE and self.omega is None:
            self.w = _optimal_omega(errors)
        if errors[-1] < self.best:
            self.best, self.since_best = errors[-1], 0
            return
        self.since_best += 1
        if self.w != 1.0 and self.since_best >= _PATIENCE:
            self.w = 1.0  # over-relaxation transients are normal; stagnation is not: fall back to plain steps
            self.since_best = 0


def solve_annealed(problem: _Problem, algorithm: Algorithm, g: torch.Tensor) -> _Loop:
    """Solve at lambda directly; if that converges too slowly, anneal: solve at lam/8, lam/4, lam/2 and then
    lam, each stage warm-started from the last (the potentials scale with lambda). This is epsilon-scaling,
    the standard remedy for peaked kernels; on a trained digits head it cut the iterations about 20x."""
    lam, max_iter = algorithm.lam, algorithm.max_iter
    start = g.clone()
    state = _iterate(problem, algorithm, g, lam, max_iter, bail_rate=_BAIL_RATE if algorithm.anneal else None)
    if state.converged or not algorithm.anneal or state.iterations >= max_iter:
        return state
    g = start / 8
    for stage in (lam / 8, lam / 4, lam / 2, lam):
        part = _iterate(problem, algorithm, g, stage, max_iter - state.iterations)
        state = _Loop(part.g, stage, part.v, state.iterations + part.iterations, state.errors + part.errors,
                      part.converged, state.rebuilds + part.rebuilds)
        if state.iterations >= max_iter:
            break
        if stage != lam:
            g = (part.g + part.v.log()) * 2
    return state


def _iterate(problem: _Problem, algorithm: Algorithm, g: torch.Tensor, lam: float, budget: int,
             bail_rate: float | None = None) -> _Loop:
    """The Sinkhorn loop at ``lam`` for at most ``budget`` iterations, from potentials ``g`` (updated in place).

    With ``bail_rate``, stops early (not converged) when the first iterations shrink the error by less than
    that factor each: the sign of a kernel too peaked to solve directly.
    """
    kernel, columns, k = problem.kernel, problem.columns, problem.source.k
    state = _Loop(g, lam)
    col_max = _stabilise(problem, state, lam)
    phi = columns.phi(lam)
    if columns.prior.kind == "powerlaw":
        columns.fixed = False  # each stage re-matches the sizes during its first iterations
    # start each column's scaling where its largest entry reaches 1: a free first guess at the potentials
    state.v = torch.exp(-col_max.double().clamp(min=-algorithm.absorb_at))
    _settle_products(problem, state.v)
    u = torch.ones(problem.source.n, dtype=torch.float64, device=kernel.device)
    relax = _Relaxation(algorithm.omega)
    for state.iterations in range(1, budget + 1):
        cluster_sums, row_error = _sweep(kernel, u, state.v, relax.w, problem.rows)
        sums = collectives.all_reduce(torch.cat([cluster_sums, row_error.reshape(1)]), problem.group)
        t = sums[:k]
        if state.iterations > _PROBE:
            columns.fixed = True
        target = columns.desired(state.v * t, t, state.g, phi)
        error = float(((state.v * t - target).abs().sum() + sums[k]) / problem.n_total)
        state.errors.append(error)
        if not math.isfinite(error):
            raise SolverError("Sinkhorn diverged (non-finite error); this is a bug, please report it")
        if error <= algorithm.tol:
            state.converged = True
            break
        if bail_rate is not None and _too_slow(state.errors, algorithm.tol, bail_rate, budget):
            break
        relax.update(state.errors)
        _column_step(problem, state, u, t, target, relax.w, lam, algorithm.absorb_at)
    return state


def _build(problem: _Problem, state: _Loop, lam: float) -> torch.Tensor:
    state.rebuilds += 1
    return problem.kernel.build(state.g, lam, problem.rows, problem.group)


def _stabilise(problem: _Problem, state: _Loop, lam: float) -> torch.Tensor:
    """Build the kernel, raising unreachable clusters until each column has an entry of 1; returns the
    column maxima of the exponent."""
    col_max = _build(problem, state, lam)
    if not bool(torch.isfinite(col_max).all()):
        # a NaN or +inf anywhere turns its row, and so some column maximum, into NaN
        raise SolverError("the input contains NaN or inf; fix the model outputs before labelling")
    for _ in range(3):
        low = col_max < _BF16_FLOOR / 2
        if not bool(low.any()):
            break
        state.g -= torch.where(low, col_max.double(), torch.zeros_like(state.g))
        col_max = _build(problem, state, lam)
    return col_max


def _settle_products(problem: _Problem, v: torch.Tensor) -> None:
    """Choose once per solve how the sweeps multiply dense blocks (see :mod:`labelkit.solver._products`)."""
    kernel, group = problem.kernel, problem.group
    if kernel.products is not None:
        return
    if kernel.sparse is None:
        kernel.products, kernel.products_why = _choose_products(kernel, v, problem.rows)
    else:  # no dense sweep yet; should a later build be dense, it takes the path that needs no probe
        kernel.products, kernel.products_why = "widen", "the first build was sparse"
    if group is not None:  # every rank sums the same way: fused only where all ranks chose it
        fused = torch.tensor([float(kernel.products == "fused")], dtype=torch.float64, device=kernel.device)
        if collectives.all_reduce(fused, group, "min").item() < 1.0 and kernel.products == "fused":
            kernel.products, kernel.products_why = "widen", "another rank chose the widened products"


def _column_step(problem: _Problem, state: _Loop, u: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                 w: float, lam: float, absorb_at: float) -> None:
    """v = target / t, over-relaxed by w; scalings that grow past ``absorb_at`` are absorbed into the kernel
    (rebuilt) before they overflow."""
    step = target / torch.where(t > 0, t, torch.full_like(t, 1e-300))
    state.v = state.v.pow(1.0 - w) * step.pow(w) if w != 1.0 else step
    log_v = state.v.log()
    if float(log_v.abs().max()) > absorb_at:
        state.g += log_v
        state.g -= state.g.max()
        state.v = torch.ones_like(state.v)
        _build(problem, state, lam)
        _row_scalings(problem.kernel, u, problem.rows)


def _too_slow(errors: list[float], tol: float, bail_rate: float, budget: int) -> bool:
    """Whether to give up the direct solve for annealing: after the probe, when the error barely shrinks; later,
    every ``_STALL`` iterations, when the rate of the last ``_STALL`` would not reach ``tol`` within the budget
    left. The second catches kernels that start nearly balanced but are too peaked to move the last samples
    between clusters: the error creeps down at a constant few parts per thousand an iteration."""
    done, error = len(errors), errors[-1]
    if done == _PROBE:
        return _rate(errors) > bail_rate and error > 10 * tol
    if done < 2 * _STALL or done % _STALL:
        return False
    rho = (error / errors[-_STALL - 1]) ** (1 / _STALL) if errors[-_STALL - 1] > 0 else 1.0
    return rho >= 1.0 or math.log(tol / error) / math.log(rho) > budget - done


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
