"""Multi-process data-parallel training with torch.distributed (launched by torchrun).

    torchrun --nproc_per_node 2 -m lmforge train --preset shakespeare-char
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 -m lmforge train ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; the trainer then runs one process
per rank: each rank draws its own random windows (seed + rank), and the gradients are
averaged over the ranks (the effective batch is batch_size × grad_accum × world size).
Two strategies (`--strategy`):

- ddp (default): DistributedDataParallel. Every rank holds the whole model and
  optimizer; gradients are all-reduced.
- fsdp: PyTorch's FSDP2 (`fully_shard`), for models that do not fit one device. Each
  rank holds 1/world_size of every parameter, gradient and optimizer moment; a block's
  parameters are all-gathered just before it runs and freed after, gradients are
  reduce-scattered. Checkpoints and the resumable state are written whole (gathered to
  rank 0), so they are the same files as a one-process run's.
 Every rank evaluates (so all
take the same early-stopping decisions); only rank 0 writes files and prints. The
resumable state holds every rank's sampler and RNG state, so `--resume` under the
same number of processes continues exactly. Without torchrun nothing changes.
Backends: NCCL on CUDA GPUs, Gloo on CPUs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
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
    sharded: bool = False  # the fsdp strategy: parameters and optimizer state are split over the ranks

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

    def shard(self, model: nn.Module) -> None:
        """fsdp: split the parameters over the ranks (in place; before the optimizer is built).
        Each element of the model's layer lists (its Transformer blocks) is one unit, gathered
        whole just before it runs; the rest (embeddings, final norm, head) is the root unit."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        for layers in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
            for layer in layers:
                fully_shard(layer)
        fully_shard(model)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """What the training forward runs: DistributedDataParallel under ddp, the (sharded) model
        itself under fsdp or in one process."""
        if not self.active or self.sharded:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    @contextmanager
    def no_sync(self, wrapped: nn.Module, accumulating: bool) -> Iterator[None]:
        """Skip the gradient all-reduce (reduce-scatter) on micro-batches before the last one of a step."""
        if not (self.active and accumulating):
            yield
        elif self.sharded:
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)
        else:
            with wrapped.no_sync():
                yield

    def full_state(
        self, model: nn.Module, optimizers: list[torch.optim.Optimizer] = ()
    ) -> tuple[dict[str, torch.Tensor], list[dict]] | None:
        """fsdp: the whole model's tensors and each optimizer's whole state, on the CPU of rank 0
        (every rank must call this: the shards are gathered); None under ddp or in one process."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        tensors = get_model_state_dict(model, options=whole)
        return tensors, [get_optimizer_state_dict(model, opt, options=whole) for opt in optimizers]

    def load_full_state(
        self, model: nn.Module, tensors: dict[str, torch.Tensor], optimizers=(), states=()
    ) -> None:
        """fsdp: put whole tensors (and whole optimizer states) back into the sharded model."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        whole = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, tensors, options=whole)
        for opt, state in zip(optimizers, states, strict=True):
            set_optimizer_state_dict(model, opt, state, options=whole)

    def close(self) -> None:
        if self.started_here and dist.is_initialized():
            dist.destroy_process_group()


def from_environment(device_name: str, strategy: str = "ddp") -> Distributed:
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
    return Distributed(rank, world_size, local_rank, local_world_size, started, sharded=strategy == "fsdp")
