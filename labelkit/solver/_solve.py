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
  kernel) is measured per processor, see :mod:`labelkit.solver`.
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
  from the bf16 kernel. ``Balance(exact=True)`` rounds Q under capacities so that every cluster gets
  floor(N/K) or ceil(N/K) samples (the paper's hard constraint); scores are q(label | i) of the chosen label.
* **Priors and relaxed balance.** The column marginals b need not be N/K: ``Balance(prior="powerlaw:a")`` asks for
  sizes proportional to rank^-a, the largest size going to the cluster that currently holds the most mass
  (re-matched during the first iterations, then fixed), and explicit counts fix each cluster's size.
  ``Balance(tau=tau)`` relaxes the column constraint into a KL penalty tau * KL(col | b) (unbalanced optimal
  transport, Chizat et al. 2018): the column step becomes v = (b / t)^phi with phi = tau lam / (tau lam + 1),
  so cluster sizes follow the data, and a cluster e times its prior size costs tau nats per sample. ``floor``
  keeps every relaxed cluster at a share of its prior size (the column step is clamped there), so none
  vanishes. The stopping rule measures each column against the mass the step asks of it.
* **Distributed.** With a process group each rank passes its own rows; one all-reduce of a (K+1)-vector per
  iteration (cluster sums and the row error). Every rank sees the same potentials and stops together. The
  exact-balance rounding gathers each row's 8 best candidates (N x 8) and every rank rounds the same way.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .._util import collectives
from ..errors import SolverError
from ._iterate import _Loop, _Problem, solve_annealed
from ._kernel import _DiskStore, _Kernel, _Logits, _Rows
from ._memory import available_memory, fit_block, kernel_path
from ._numerics import _SPARSE_BYTES, _SPARSE_MIN, _SPARSE_SHARE
from ._options import Algorithm, Balance, Storage
from ._prior import _Columns
from ._rounding import balanced_labels, floored_labels
from ._sweep import _assign

__all__ = ["solve", "SinkhornResult", "label_probability"]


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
        posterior: float32 (N,) the model's own probability of each row's label, softmax(z)[label]: P before the
            power lambda and the balancing, so it still tells a confident row from a doubtful one where q, at
            lambda = 25, is 1 for nearly every row.
        seconds: wall time, kernel construction included.
        rebuilds: kernel constructions (1 + re-stabilisations).
        errors: marginal error after every iteration.
        targets: the column marginals solved for.
        kernel: which path ran, ``"stored"``, ``"disk"`` or ``"stream"``.
        products: what the sweeps multiplied: ``"sparse"`` rows (the build found at most 10 % of the kernel
            non-zero), or dense blocks ``"widen"``ed to float32 or ``"fused"`` in a compiled kernel, chosen per
            processor by a timing probe (see :mod:`labelkit.solver`); ``products_why`` says why.
        density: the share of non-zero kernel entries, counted when sparse, sampled from 8 row blocks when the
            kernel stayed dense; None when not measured (small kernels, GPU, ``sparse=False``).
        lam: the lambda the labels were solved at: the asked one, or, when lambda-annealing ran out of
            ``max_iter``, the stage it reached (``potentials`` are then scaled to the asked lambda, as the
            annealing itself scales them between stages, so that a warm start continues from them).
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
    lam: float | None = None  # the lambda the labels were solved at: below the asked one if annealing ran out
    posterior: np.ndarray | None = None  # float32 (N,) softmax(z)[label] of each row


def solve(logits=None, *, features=None, weight=None, bias=None, warm_start: SinkhornResult | np.ndarray | None = None,
          algorithm: Algorithm | None = None, balance: Balance | None = None, storage: Storage | None = None,
          buffer: torch.Tensor | None = None, group=None) -> SinkhornResult:
    """Label N samples into K clusters of the prior's sizes by Sinkhorn-Knopp on P^lam (SeLa, eq. 8).

    Args:
        logits: (N, K) scores of one head, torch tensor or numpy array.
        features, weight, bias: instead of logits, (N, D) features and the head's (K, D) weight and (K,)
            bias; the logits are built in blocks and never exist whole.
        warm_start: a previous :class:`SinkhornResult` (or its ``potentials``) of the same head.
        algorithm: lambda, tolerance, iteration cap, over-relaxation and annealing (:class:`Algorithm`).
        balance: the cluster sizes: prior, relaxation, floor, exact rounding (:class:`Balance`).
        storage: where the kernel lives and how it is walked (:class:`Storage`).
        buffer: a bfloat16 tensor with at least N*K elements to hold the kernel (see :func:`kernel_buffer`).
        group: a ``torch.distributed`` process group; each rank passes its own rows.
    """
    t0 = time.perf_counter()
    algorithm, balance, storage = algorithm or Algorithm(), balance or Balance(), storage or Storage()
    source_tensor = logits if logits is not None else features
    device = storage.device
    if device is None:
        device = source_tensor.device if isinstance(source_tensor, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    source = _Logits(logits, features, weight, bias, device, storage.dtype)
    n_local, k = source.n, source.k
    block = fit_block(n_local, k, device, storage.memory, storage.block_size)
    n_total = collectives.all_reduce(torch.tensor([n_local], dtype=torch.float64, device=device), group).item()
    if n_total == 0 or k == 0:
        raise SolverError(f"nothing to label: N={int(n_total)}, K={k}")
    if k > n_total:
        raise SolverError(f"K={k} clusters cannot all be filled by N={int(n_total)} samples; need K <= N")
    columns = _Columns(balance.prior, balance.tau, balance.floor, k, n_total, device)
    path = kernel_path(n_local, k, device, storage.memory, storage.block_size, storage.kernel, buffer, storage.scratch)
    kernel = _make_kernel(source, path, device, storage, buffer)
    rows = _Rows(n_local, block, device, k)
    problem = _Problem(source, kernel, rows, columns, n_total, group)
    try:
        with rows:
            state = solve_annealed(problem, algorithm, _first_potentials(warm_start, k, device))
            if not state.converged:
                reached = f" during annealing, at lam={state.lam:g} of {algorithm.lam:g}" \
                    if state.lam != algorithm.lam else ""
                warnings.warn(
                    f"Sinkhorn stopped at max_iter={algorithm.max_iter}{reached} with marginal error "
                    f"{state.errors[-1]:.2e} > tol={algorithm.tol:g}; labels are usable but clusters may be less "
                    "balanced (raise max_iter or tol)", RuntimeWarning, stacklevel=2)
            # labels come from the plan that was solved, at the lam it was solved at
            potentials = state.g + state.v.log()
            potentials -= potentials.max()
            assigned = None if balance.exact else _assign(source, kernel, state.v, potentials, state.lam, rows)
        products = _products_of(kernel)
    finally:
        kernel.close()
    labels, scores = _round(problem, state.lam, balance, block, potentials, assigned)
    # a warm start solves at the full lam: potentials scale with lam (annealing doubles them between stages)
    potentials = potentials * (algorithm.lam / state.lam)
    posterior = label_posterior(problem.source, labels, block)
    return _result(problem, state, path, products, potentials, (labels, scores, posterior), time.perf_counter() - t0)


def _first_potentials(warm_start, k: int, device: torch.device) -> torch.Tensor:
    """The column log-potentials to start from: zeros, or a previous result's."""
    if warm_start is None:
        return torch.zeros(k, dtype=torch.float64, device=device)
    previous = warm_start.potentials if isinstance(warm_start, SinkhornResult) else np.asarray(warm_start)
    if previous.shape != (k,):
        raise SolverError(f"warm_start has {previous.shape[0]} potentials but there are {k} clusters")
    return torch.as_tensor(previous, dtype=torch.float64, device=device).clone()


def _make_kernel(source: _Logits, path: str, device: torch.device, storage: Storage,
                 buffer: torch.Tensor | None) -> _Kernel:
    """The kernel on ``path`` (stored in memory or ``buffer``, on disk, or streamed), sparse where it may be."""
    n, k = source.n, source.k
    held = None
    if path == "disk":
        if device.type != "cpu":
            raise SolverError(f"kernel='disk' is for the CPU; on {device} use 'stream'")
        held = _DiskStore(n, k, storage.scratch)
    elif path == "stored" and buffer is not None:
        if buffer.dtype != torch.bfloat16 or buffer.numel() < n * k:
            raise SolverError(f"buffer must be bfloat16 with at least {n * k} elements")
        held = buffer.view(-1)[: n * k].view(n, k)
    elif path == "stored":
        held = torch.empty((n, k), dtype=torch.bfloat16, device=device)
    kernel = _Kernel(source, held, device)
    if storage.sparse and device.type == "cpu" and n * k >= _SPARSE_MIN:
        budget = storage.memory if storage.memory is not None else available_memory(device) // 2
        kernel.sparse_cap = int(min(_SPARSE_SHARE * n * k, budget / _SPARSE_BYTES))
    return kernel


def _products_of(kernel: _Kernel) -> tuple[str, str, float | None]:
    """What the sweeps multiplied, why, and the kernel's density (see :class:`SinkhornResult`)."""
    if kernel.sparse is not None:
        return "sparse", f"{kernel.density:.2%} of the kernel non-zero: sparse rows", kernel.density
    return kernel.products or "widen", kernel.products_why, kernel.density


def _round(problem: _Problem, lam: float, balance: Balance, block: int, potentials: torch.Tensor,
           assigned: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels and scores: the argmax assignment, or the plan rounded under exact balance or the floor."""
    source, group = problem.source, problem.group
    if balance.exact:
        labels, scores = balanced_labels(source, potentials, lam, block, group=group)
    elif balance.tau is not None and balance.floor > 0:
        minimum = np.ceil(balance.floor * problem.columns.b.cpu().numpy() - 1e-9).astype(np.int64)
        labels, scores = floored_labels(source, potentials, lam, block, *assigned, minimum, group=group)
    else:
        return assigned
    return labels.to(potentials.device), scores.to(potentials.device)


def _result(problem: _Problem, state: _Loop, path: str, products: tuple[str, str, float | None],
            potentials: torch.Tensor, rounded: tuple, seconds: float) -> SinkhornResult:
    labels, scores, posterior = rounded
    sizes = torch.bincount(labels, minlength=problem.source.k).to(torch.float64)
    sizes = collectives.all_reduce(sizes, problem.group).to(torch.int64)
    return SinkhornResult(
        labels=labels.cpu().numpy().astype(np.int32), iterations=state.iterations, error=state.errors[-1],
        converged=state.converged, sizes=sizes.cpu().numpy(), potentials=potentials.cpu().numpy(),
        scores=scores.cpu().numpy(), seconds=seconds, rebuilds=state.rebuilds, errors=state.errors,
        targets=problem.columns.b.cpu().numpy(), kernel=path, products=products[0], products_why=products[1],
        density=products[2], lam=state.lam, posterior=posterior)


def label_probability(labels, *, logits=None, features=None, weight=None, bias=None, device=None,
                      block: int = 65536) -> np.ndarray:
    """The model's probability softmax(z)[label] of each row's ``labels``, from (N, K) ``logits`` or from (N, D)
    ``features`` and a head's ``weight`` and ``bias``: the ``posterior`` of a solve, for labels that did not come
    from one."""
    source = _Logits(logits, features, weight, bias, torch.device(device or "cpu"), torch.float32)
    return label_posterior(source, torch.as_tensor(np.asarray(labels)), block)


def label_posterior(source: _Logits, labels: torch.Tensor, block: int) -> np.ndarray:
    """softmax(z)[label] of every row, by row blocks of the logits."""
    out = np.empty(source.n, dtype=np.float32)
    labels = labels.to(torch.int64)
    for start in range(0, source.n, block):
        z = source.block(start, min(start + block, source.n)).float()
        chosen = labels[start : start + len(z)].to(z.device)
        log_p = z.gather(1, chosen[:, None])[:, 0] - torch.logsumexp(z, dim=1)
        out[start : start + len(z)] = log_p.exp().cpu().numpy()
    return out
