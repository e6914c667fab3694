"""How much memory a solve needs, and so where its kernel lives: in memory, on a scratch disk, or recomputed."""

from __future__ import annotations

import os

import torch

from .._util.system import disk_room, system_memory_available
from ..errors import SolverError

__all__ = ["KERNEL_PATHS", "available_memory", "default_block", "fit_block", "working_bytes", "kernel_path",
           "features_on_disk", "kernel_buffer"]


KERNEL_PATHS = ("auto", "stored", "disk", "stream")


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
    if device.type == "cpu" and disk_room(scratch) >= 1.1 * n * k * 2:
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


def kernel_buffer(n: int, k: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """A bfloat16 (n, k) buffer that several solves (one per head) can share."""
    return torch.empty((n, k), dtype=torch.bfloat16, device=device)
