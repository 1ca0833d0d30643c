"""Graph-captured calls of a tensor function (the VAE decoder, a single U-Net forward).

``GraphedCall(fn, cache, kind)`` behaves like ``fn`` on tensors: the first call with a new set of
input shapes captures a graph on static copies of the inputs; later calls copy the inputs in,
replay, and return a copy of the static output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastdiff.ops.backend import requested_backend
from fastdiff.runtime.graphs import GraphCache, GraphKey, autocast_state


@dataclass
class CallBuffers:
    args: list[torch.Tensor]
    kwargs: dict[str, torch.Tensor | dict[str, torch.Tensor]]
    output: torch.Tensor


def _signature(value) -> tuple:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), str(value.dtype), value.is_contiguous())
    if isinstance(value, dict):
        return tuple(sorted((name, _signature(item)) for name, item in value.items()))
    raise TypeError(f"GraphedCall takes tensors (or dicts of tensors), got {type(value).__name__}")


def _static_copy(value):
    if isinstance(value, dict):
        return {name: _static_copy(item) for name, item in value.items()}
    return value.clone(memory_format=torch.preserve_format)


def _load(static, value) -> None:
    if isinstance(static, dict):
        for name, item in static.items():
            item.copy_(value[name])
    else:
        static.copy_(value)


class GraphedCall:
    """``fn(*tensors, **tensors)`` replayed from one captured graph per input signature.

    Falls back to calling ``fn`` directly when a capture fails (and remembers that shape).
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        cache: GraphCache,
        kind: str,
        state: Callable[[], tuple] | None = None,
    ):
        """``state()``: what ``fn`` decides on the host besides its inputs' shapes (settings
        that change which kernels run or constants in its arithmetic), part of the graph key
        so a changed setting captures a new graph instead of replaying the old one."""
        self.fn = fn
        self.cache = cache
        self.kind = kind
        self.state = state
        self.eager_fallbacks: dict[GraphKey, str] = {}

    def key_for(self, args: tuple, kwargs: dict) -> GraphKey:
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        if not tensors:
            given = [type(v).__name__ for v in (*args, *kwargs.values())]
            raise ValueError(
                "GraphedCall needs at least one tensor argument (besides any dicts of tensors), "
                f"got {given or 'no arguments'}"
            )
        first = tensors[0]
        return GraphKey(
            kind=self.kind,
            batch=int(first.shape[0]),
            height=int(first.shape[-2]) if first.dim() >= 3 else 0,
            width=int(first.shape[-1]) if first.dim() >= 3 else 0,
            dtype=first.dtype,
            extra=(
                tuple(_signature(a) for a in args),
                tuple(sorted((k, _signature(v)) for k, v in kwargs.items())),
                requested_backend(),  # a graph replays the kernels chosen when it was captured
                autocast_state(first.device.type),  # and the casts of torch.autocast
                self.state() if self.state is not None else (),
            ),
        )

    def build(self, args: tuple, kwargs: dict):
        static_args = [_static_copy(a) for a in args]
        static_kwargs = {k: _static_copy(v) for k, v in kwargs.items()}
        # Only the output's shape, dtype and layout are used: the backend may run the probe
        # inside its compile-ahead pass, where Triton kernels compile instead of running.
        with torch.no_grad():
            probe = self.cache.first_run(lambda: self.fn(*static_args, **static_kwargs))
        buffers = CallBuffers(static_args, static_kwargs, torch.empty_like(probe))

        def body() -> None:
            buffers.output.copy_(self.fn(*buffers.args, **buffers.kwargs))

        def prepare() -> None:
            for static, value in zip(buffers.args, args, strict=True):
                _load(static, value)
            for name, value in kwargs.items():
                _load(buffers.kwargs[name], value)

        return buffers, body, prepare

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        key = self.key_for(args, kwargs)
        if key in self.eager_fallbacks:
            with torch.no_grad():
                return self.fn(*args, **kwargs)
        try:
            entry = self.cache.get(key, lambda: self.build(args, kwargs))
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            self.eager_fallbacks[key] = reason
            print(
                f"fastdiff.runtime: graph capture failed for {key.describe()} ({reason}); "
                "calling it eagerly"
            )
            with torch.no_grad():
                return self.fn(*args, **kwargs)
        for static, value in zip(entry.buffers.args, args, strict=True):
            _load(static, value)
        for name, value in kwargs.items():
            _load(entry.buffers.kwargs[name], value)
        entry.replay()
        return entry.buffers.output.clone()
