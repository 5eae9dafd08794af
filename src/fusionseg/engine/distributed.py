"""Training under ``torchrun``: where this process sits (:class:`Dist`), the process group (NCCL on CUDA, gloo
on CPU), and the trained head wrapped in PyTorch's :class:`~torch.nn.parallel.DistributedDataParallel`.

The gradient of one step is that of the global batch: each rank's loss is its share of the summed loss
divided by the global count of (pixel, class) pairs, so the ranks' gradients must be *summed*, not averaged
(DDP's default); :func:`wrap_for_training` installs a summing communication hook.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    """Where this process sits under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (env RANK / WORLD_SIZE / LOCAL_RANK): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world <= 1:
        return Dist(), dev
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local), dev


def _sum_hook(_state, bucket):
    """DDP communication hook: all-reduce a gradient bucket as a SUM (the default hook divides by the world)."""
    fut = torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_for_training(head: torch.nn.Module, dist: Dist, device: torch.device, find_unused: bool = False):
    """The module to call in the training step: ``head`` itself alone, or ``head`` under DDP with summed
    gradients under torchrun. ``find_unused``: some parameters may get no gradient in a step (the unknown-name
    token of a ``bridge_prior`` model when no name is dropped); DDP then leaves their gradient None as one
    process would."""
    if not dist.enabled:
        return head
    ddp = torch.nn.parallel.DistributedDataParallel(
        head, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp
