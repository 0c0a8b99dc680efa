"""Multi-process data-parallel training with torch.distributed (launched by torchrun).

    torchrun --nproc_per_node 2 -m lmforge train --preset shakespeare-char
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 -m lmforge train ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; the trainer then runs one process
per rank: each rank draws its own random windows (seed + rank), DistributedDataParallel
averages the gradients, so every rank holds the same weights after each step (the
effective batch is batch_size × grad_accum × world size). Every rank evaluates (so all
take the same early-stopping decisions); only rank 0 writes files and prints. The
resumable state holds every rank's sampler and RNG state, so `--resume` under the
same number of processes continues exactly. Without torchrun nothing changes.
Backends: NCCL on CUDA GPUs, Gloo on CPUs.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from lmforge.errors import UserError


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    started_here: bool = False  # this module initialised the process group (and so ends it)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The average of `tensor` over all ranks."""
        if self.active:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if `flag` is true on any (so that all ranks stop together)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def no_sync(self, wrapped: nn.Module, accumulating: bool):
        """Skip the gradient all-reduce on micro-batches before the last one of a step."""
        return wrapped.no_sync() if self.active and accumulating else nullcontext()

    def close(self) -> None:
        if self.started_here and dist.is_initialized():
            dist.destroy_process_group()


def from_environment(device_name: str) -> Distributed:
    """The process group torchrun asked for (a single process when not under torchrun)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if device_name.startswith("cuda:"):
        raise UserError(
            "Under torchrun each process takes the GPU of its LOCAL_RANK; set the device to cuda.",
            settings=("device",),
        )
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    started = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        started = True
    return Distributed(rank, world_size, local_rank, local_world_size, started)
