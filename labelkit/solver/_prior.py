"""Cluster sizes to solve for: the prior (uniform, power law, counts) and the column step that enforces it, hard
or relaxed (unbalanced optimal transport)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import SolverError

__all__ = ["Prior"]


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
