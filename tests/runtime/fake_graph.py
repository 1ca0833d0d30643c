"""A CPU stand-in for CUDA-graph capture that has a graph's semantics, not just its interface.

``RecordingGraphBackend.capture`` runs the body once under a dispatch mode that records every aten
call with the tensor objects it read and wrote. ``replay`` re-executes only those recorded calls
on the same tensors, writing functional results back into the recorded outputs: Python code in the
body does not run again, so anything the body decided on the host (a Python scalar, a branch, a
backend choice, a random draw) is frozen at capture time exactly as in a real CUDA graph.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HOST_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
}


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            raise RuntimeError(f"{func}: host read inside a captured body")
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


class RecordedGraph:
    def __init__(self, calls):
        self.calls = calls

    @torch.no_grad()
    def replay(self) -> None:
        for func, args, kwargs, recorded in self.calls:
            result = func(*args, **kwargs)
            returns = func._schema.returns
            new, _ = tree_flatten(result)
            old, _ = tree_flatten(recorded)
            for index, (fresh, kept) in enumerate(zip(new, old, strict=True)):
                if not isinstance(kept, torch.Tensor):
                    continue
                aliased = len(returns) == 1 and returns[0].alias_info is not None
                if index < len(returns) and returns[index].alias_info is not None:
                    aliased = True
                if not aliased:  # functional result: write into the captured output memory
                    kept.copy_(fresh)


class RecordingGraphBackend:
    def __init__(self):
        self.captures = 0

    def capture(self, body, prepare):
        prepare()
        recorder = _Recorder()
        with torch.no_grad(), recorder:
            body()
        self.captures += 1
        return RecordedGraph(recorder.calls), 0


class RunsAlso:
    """Mixin for a fake backend with CudaGraphBackend's compile-ahead pass as GraphCache sees it
    (``compile_ahead`` true): the ``also`` it is handed runs before the capture (nothing
    compiles on CPU), and ``passes`` records, per capture, whether one was handed."""

    compile_ahead = True

    def capture(self, body, prepare, also=None):
        self.__dict__.setdefault("passes", []).append(also is not None)
        if also is not None:
            also()
        return super().capture(body, prepare)
