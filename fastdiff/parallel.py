"""Multi-process generation with torch.distributed: one process per device, started by torchrun.

No scheduler of our own: torchrun starts the processes and sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; each rank takes every ``world_size``-th work item, and at the end the
ranks' results are gathered to rank 0 over a gloo group (gloo carries Python objects on any
backend, so the same code serves nccl runs on GPUs and gloo runs on CPUs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# How long a rank waits in the final gather for the others. torch's default (30 min for gloo) is
# shorter than a large prompt file takes: a rank that failed to load the model, or got the last,
# shorter share, would time out there, exit non-zero, and torchrun would stop the ranks still
# generating. The gather is the only collective, so a long wait blocks nothing else.
GATHER_TIMEOUT = timedelta(days=7)


@dataclass
class DistributedContext:
    """Where this process stands: its rank, the world size and the device it should use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    object_group: Any = None  # gloo group used to gather Python objects

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def wants_cuda(device: str | None) -> bool:
    """``device``: "cpu", "cuda" or None (CUDA when available)."""
    if device is not None and device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available")
    return use_cuda


def init_distributed(device: str | None = None) -> DistributedContext:
    """Join the process group torchrun set up (nccl on CUDA, gloo on CPU), each rank on GPU
    LOCAL_RANK; a plain single-process run gets a trivial context."""
    use_cuda = wants_cuda(device)
    if not launched_by_torchrun():
        return DistributedContext(device=torch.device("cuda" if use_cuda else "cpu"))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        run_device = torch.device("cuda", local_rank)
    else:
        run_device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, timeout=GATHER_TIMEOUT
        )
    object_group = dist.new_group(backend="gloo", timeout=GATHER_TIMEOUT)
    return DistributedContext(rank, world_size, local_rank, run_device, backend, object_group)


def shard(items: Sequence[T], rank: int, world_size: int) -> list[tuple[int, T]]:
    """This rank's share of ``items`` as (global index, item), round-robin so that ranks get
    equal counts within one and neighbouring (similar-length) prompts spread over ranks."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return [(index, items[index]) for index in range(rank, len(items), world_size)]


def gather_to_main(context: DistributedContext, value: T) -> list[T] | None:
    """Every rank's ``value`` in rank order on rank 0 (None on the other ranks)."""
    if not context.is_distributed:
        return [value]
    gathered: list[Any] | None = [None] * context.world_size if context.is_main else None
    dist.gather_object(value, gathered, dst=0, group=context.object_group)
    return gathered


def broadcast_from_main(context: DistributedContext, value: Callable[[], T]) -> T:
    """``value()`` computed on rank 0 only, and every rank gets that result (a picklable
    object); an exception raised there is raised again on every rank."""
    outcome: list[Any] = [None]
    if context.is_main:
        try:
            outcome[0] = ("value", value())
        except Exception as error:  # every rank must learn it, or the others would wait
            outcome[0] = ("error", error)
    if context.is_distributed:
        dist.broadcast_object_list(outcome, src=0, group=context.object_group)
    kind, result = outcome[0]
    if kind == "error":
        raise result
    return result


def shutdown(context: DistributedContext) -> None:
    if context.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
