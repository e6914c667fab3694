"""The solver's options, said once: the algorithm, the balance constraint and where the kernel is held. Each
is a frozen dataclass that checks its values when made, so a bad option fails before any work."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SolverError
from ._memory import KERNEL_PATHS
from ._prior import Prior

__all__ = ["Algorithm", "Balance", "Storage"]


@dataclass(frozen=True)
class Algorithm:
    """How Sinkhorn-Knopp runs.

    Attributes:
        lam: the inverse temperature lambda of the paper (25).
        tol: stop when the marginal error (share of misplaced mass) is at most this.
        max_iter: cap on iterations; hitting it returns ``converged=False`` and warns.
        omega: over-relaxation in [1, 2); 1 is the plain iteration; None estimates the best value from the
            convergence rate of the first iterations.
        anneal: when the first iterations show a kernel too peaked to solve directly, or later ones show the
            error too slow to reach ``tol`` within ``max_iter``, solve at lam/8, lam/4, lam/2 and lam in turn,
            each warm-starting the next.
        absorb_at: re-stabilise the kernel when a scaling's log exceeds this.
    """

    lam: float = 25.0
    tol: float = 1e-3
    max_iter: int = 1000
    omega: float | None = None
    anneal: bool = True
    absorb_at: float = 60.0

    def __post_init__(self) -> None:
        if not (self.lam > 0 and math.isfinite(self.lam)):
            raise SolverError(f"lam must be a positive number, got {self.lam}")
        if not self.tol > 0:
            raise SolverError(f"tol must be a positive number, got {self.tol}")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise SolverError(f"max_iter must be a whole number >= 1, got {self.max_iter!r}")
        if self.omega is not None and not (1.0 <= self.omega < 2.0):
            raise SolverError(f"omega must lie in [1, 2), got {self.omega}")
        if not self.absorb_at > 0:
            raise SolverError(f"absorb_at must be a positive number, got {self.absorb_at}")


@dataclass(frozen=True)
class Balance:
    """The cluster sizes the labels must have.

    Attributes:
        prior: ``"uniform"`` (N/K each), ``"powerlaw:ALPHA"`` or K counts summing to N (see :class:`Prior`).
        tau: None holds the sizes to the prior exactly; tau > 0 relaxes them with a KL penalty of strength tau
            (unbalanced optimal transport; large tau approaches the hard constraint).
        floor: with ``tau``, every cluster keeps at least this share of its prior size.
        exact: round the plan so that every cluster holds floor(N/K) or ceil(N/K) samples (the paper's hard
            constraint); for the uniform prior without ``tau`` only.
    """

    prior: Prior | str | Any = None
    tau: float | None = None
    floor: float = 0.2
    exact: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "prior", Prior.parse(self.prior))  # frozen: the parsed form replaces the text
        if self.tau is not None and not (self.tau > 0 and math.isfinite(self.tau)):
            raise SolverError(f"balance must be a positive number (the KL penalty tau), got {self.tau}")
        if not 0.0 <= self.floor < 1.0:
            raise SolverError(f"floor must lie in [0, 1), the share of a cluster's prior size it keeps; "
                              f"got {self.floor}")
        if self.exact and (not self.prior.uniform or self.tau is not None):
            raise SolverError("exact_balance rounds to equal cluster sizes; it applies to the uniform prior with "
                              "no balance relaxation only")


@dataclass(frozen=True)
class Storage:
    """Where the N x K kernel lives and how it is walked. Every choice gives the same labels.

    Attributes:
        kernel: ``"stored"`` holds the bfloat16 kernel in memory; ``"disk"`` keeps the same bytes in a scratch
            file; ``"stream"`` recomputes each row block on every pass and holds O(block x K); ``"auto"`` stores
            it when it fits ``memory``, else uses the disk on a CPU with room, else streams.
        memory: bytes the kernel may take (default: half the device's available memory).
        block_size: rows per block (default: fits the cache on a CPU, large on a GPU).
        scratch: folder for the ``"disk"`` kernel (default: the system's temporary folder).
        sparse: on the CPU, keep a kernel with at most 10 % non-zero entries (a trained head at lam = 25 is
            mostly exact zeros) as sparse rows; False never does.
        device: where the kernel lives (default: the input's device).
        dtype: compute dtype of the logits.
    """

    kernel: str = "auto"
    memory: int | None = None
    block_size: int | None = None
    scratch: str | os.PathLike | None = None
    sparse: bool = True
    device: str | torch.device | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.kernel not in KERNEL_PATHS:
            raise SolverError(f"kernel must be one of {', '.join(KERNEL_PATHS)}, got {self.kernel!r}")
        if self.memory is not None and self.memory <= 0:
            raise SolverError(f"memory must be a positive number of bytes, got {self.memory}")
        if self.block_size is not None and self.block_size < 1:
            raise SolverError(f"block_size must be at least 1, got {self.block_size}")
