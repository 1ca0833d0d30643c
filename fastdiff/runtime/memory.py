"""Device-memory figures for reports: what is allocated, reserved and the peak."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def format_mib(num_bytes: int | float) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


@dataclass(frozen=True)
class MemorySnapshot:
    allocated: int
    reserved: int
    peak_allocated: int

    def __str__(self) -> str:
        return (
            f"allocated {format_mib(self.allocated)}, reserved {format_mib(self.reserved)}, "
            f"peak {format_mib(self.peak_allocated)}"
        )


def memory_snapshot(device: torch.device | str | None = None) -> MemorySnapshot:
    """Current CUDA allocator figures for ``device`` (zeros without CUDA)."""
    if not torch.cuda.is_available():
        return MemorySnapshot(0, 0, 0)
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda":
        return MemorySnapshot(0, 0, 0)
    return MemorySnapshot(
        int(torch.cuda.memory_allocated(device)),
        int(torch.cuda.memory_reserved(device)),
        int(torch.cuda.max_memory_allocated(device)),
    )
