"""Process group set-up for `torchrun`: DDP on NCCL (GPU) or gloo (CPU), or a single process.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the run
is one process and nothing is initialised. Multi-node is the same code: `torchrun --nnodes N
--node_rank I --rdzv_endpoint HOST:PORT ...` on every node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0 logs, saves and exports; the others only compute."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str | None = None) -> Dist:
    """Join the torchrun job if there is one; this process's device: cuda:LOCAL_RANK or cpu."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}") if cuda else torch.device(device or "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local_rank, dev)


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DDP-wrap the student when there are several processes (saved keys unwrap `.module`)."""
    if not d.enabled:
        return model
    ids = [d.device.index] if d.device.type == "cuda" else None
    # BatchNorm statistics stay per-rank (as the original under accelerate); params are synced.
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
