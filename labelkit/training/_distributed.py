"""Data-parallel runs under ``torchrun``: rank and world size from the environment, NCCL on GPUs and gloo on
CPUs, and the few collective steps the SeLa loop needs. One process (``world == 1``) needs none of it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .._util import collectives

__all__ = ["Distributed", "from_environment"]


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collective tensors live (NCCL needs CUDA tensors)
    joined: bool = False  # in a process group: under torchrun, even with one process
    owned: bool = False  # labelkit created the group (and so destroys it), rather than the program calling it

    @property
    def enabled(self) -> bool:
        return self.joined

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        """The process group's backend ("nccl" or "gloo"), None when not in one."""
        if not self.enabled:
            return None
        import torch.distributed as dist

        return str(dist.get_backend())

    @property
    def group(self):
        import torch.distributed as dist

        return dist.group.WORLD if self.enabled else None

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, status: int) -> int:
        """The smallest ``status`` over all ranks. The training loop calls it once per step with what this
        rank can do (train, skip the batch, stop, or it has run out), so that all ranks then do the same and
        none waits alone in a collective that the others never reach."""
        if not self.enabled:
            return status
        value = torch.tensor([status], dtype=torch.int64, device=self.device)
        return int(collectives.all_reduce(value, self.group, "min").item())

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any."""
        return self.agree(0 if flag else 1) == 0

    def gather_rows(self, rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every rank's ``rows`` (sample indices) and ``values[..., rows]`` on every rank."""
        rows, values = collectives.gather_arrays(self.group, rows, np.moveaxis(values, -1, 0))
        return rows, np.moveaxis(values, 0, -1)

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        return collectives.broadcast(value, self.group)

    def gather_dict(self, local: dict) -> dict:
        merged = {}
        for part in collectives.all_gather(dict(local), self.group):
            merged.update(part)
        return merged

    def close(self) -> None:
        """Leave the process group if labelkit created it; a group the calling program made stays."""
        if self.owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def from_environment(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK), if any.

    A run that torchrun started joins even alone (``--nproc_per_node=1``), so that one process goes through
    the same collectives, DistributedDataParallel and NCCL as many do; a plain process joins nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "TORCHELASTIC_RUN_ID" in os.environ and "MASTER_ADDR" in os.environ and "RANK" in os.environ
    if world <= 1 and not launched:
        return Distributed(), device
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world, local_rank, device, joined=True, owned=owned), device
