"""Data-parallel set-up for ``torchrun``: gloo on CPU, nccl on CUDA.

``torchrun --nproc_per_node N -m fastdiff train --config ...`` sets RANK / WORLD_SIZE /
LOCAL_RANK; without them everything runs in one process and no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(request: str, local_rank: int = 0) -> torch.device:
    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    if request == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if request != "cpu":
        raise ValueError(f"device: unknown value {request!r}; allowed values: auto, cpu, cuda")
    return torch.device("cpu")


def setup_distributed(device_request: str = "auto") -> DistContext:
    """Join the ``torchrun`` process group when launched by it; else a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_request, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, device=device)


def shutdown_distributed(context: DistContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Mean of ``value`` over the ranks (the value itself in a single process)."""
    if not context.enabled:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / context.world_size


def barrier(context: DistContext) -> None:
    if context.enabled:
        dist.barrier()
