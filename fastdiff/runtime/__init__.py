"""The fast path: dtype, channels-last, fused QKV, kernel swap and CUDA-graph capture per shape.

``optimize(pipe)`` prepares a loaded ``fastdiff.Pipeline`` in place (``Pipeline.optimize`` calls
it). The pieces it is made of are usable on their own: ``GraphCache`` (bounded LRU of captured
graphs keyed by shape), ``GraphedDenoiser`` (the sampling loop on static buffers, whole-loop or
per-step graphs), ``GraphedCall`` (any tensor function, e.g. the VAE decoder or one U-Net call).
"""

from fastdiff.runtime.denoise import DenoiseCall, GraphedDenoiser
from fastdiff.runtime.graphed_call import GraphedCall
from fastdiff.runtime.graphs import (
    CudaGraphBackend,
    EagerGraphBackend,
    GraphCache,
    GraphKey,
)
from fastdiff.runtime.memory import MemorySnapshot, memory_snapshot
from fastdiff.runtime.optimize import OptimizedRuntime, OptimizeReport, optimize, prepare_module

__all__ = [
    "CudaGraphBackend",
    "DenoiseCall",
    "EagerGraphBackend",
    "GraphCache",
    "GraphKey",
    "GraphedCall",
    "GraphedDenoiser",
    "MemorySnapshot",
    "OptimizeReport",
    "OptimizedRuntime",
    "memory_snapshot",
    "optimize",
    "prepare_module",
]
