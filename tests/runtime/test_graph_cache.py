"""The graph cache: one capture per shape key, LRU bound, failure memory; capture abstracted."""

from __future__ import annotations

import pytest
import torch

from fastdiff.runtime.graphs import EagerReplay, GraphCache, GraphKey, tensor_bytes
from tests.runtime.fake_graph import RunsAlso


class CountingBackend:
    """Records captures; 'replay' re-runs the body like the eager backend."""

    def __init__(self, pool_bytes: int = 100):
        self.captured = 0
        self.pool_bytes = pool_bytes

    def capture(self, body, prepare):
        prepare()
        self.captured += 1
        return EagerReplay(body), self.pool_bytes


def key(batch=1, height=8, width=8, **kw) -> GraphKey:
    return GraphKey(kind="loop", batch=batch, height=height, width=width, dtype=torch.float16, **kw)


def build_counter(log: list):
    buffer = torch.zeros(4)

    def body():
        buffer.add_(1)
        log.append("body")

    return lambda: (buffer, body, lambda: buffer.zero_())


def test_also_reaches_only_a_backend_that_compiles_ahead_with_the_new_entrys_buffers():
    """GraphCache.get's ``also(buffers)`` goes to the capture of a miss, bound to the buffers
    built for it, and only where the backend has a compile-ahead pass: other backends keep
    their two-argument capture."""
    seen = []

    class AheadBackend(RunsAlso, CountingBackend):
        pass

    cache = GraphCache(AheadBackend())
    entry = cache.get(key(), build_counter([]), also=seen.append)
    assert seen == [entry.buffers]
    cache.get(key(), build_counter([]), also=seen.append)  # a hit: nothing captured
    assert seen == [entry.buffers]
    plain = GraphCache(CountingBackend())  # capture(body, prepare) only: no also
    plain.get(key(), build_counter([]), also=seen.append)
    assert len(seen) == 1 and plain.backend.captured == 1


def test_same_key_captures_once_and_replays():
    backend = CountingBackend()
    cache = GraphCache(backend, max_graphs=4)
    log: list = []
    entry = cache.get(key(), build_counter(log))
    again = cache.get(key(), build_counter(log))
    assert entry is again
    assert backend.captured == 1
    assert cache.stats.hits == 1 and cache.stats.captures == 1
    entry.replay()
    entry.replay()
    assert entry.replays == 2
    assert torch.equal(entry.buffers, torch.full((4,), 2.0))


@pytest.mark.parametrize(
    "other",
    [
        key(batch=2),
        key(height=16),
        key(width=4),
        key(guidance=True),
        key(steps=4),
        key(sampler="ddim"),
        GraphKey(kind="step", batch=1, height=8, width=8, dtype=torch.float16),
        GraphKey(kind="loop", batch=1, height=8, width=8, dtype=torch.bfloat16),
        key(extra=(4, (2, 77, 768))),
    ],
    ids=["batch", "height", "width", "guidance", "steps", "sampler", "kind", "dtype", "extra"],
)
def test_each_key_field_selects_a_new_graph(other):
    backend = CountingBackend()
    cache = GraphCache(backend, max_graphs=4)
    cache.get(key(), build_counter([]))
    cache.get(other, build_counter([]))
    assert backend.captured == 2
    assert len(cache) == 2


def test_lru_bound_evicts_least_recently_used():
    backend = CountingBackend(pool_bytes=1000)
    cache = GraphCache(backend, max_graphs=2)
    a, b, c = key(batch=1), key(batch=2), key(batch=3)
    cache.get(a, build_counter([]))
    cache.get(b, build_counter([]))
    cache.get(a, build_counter([]))  # a is now the most recent
    cache.get(c, build_counter([]))  # evicts b
    assert a in cache and c in cache and b not in cache
    assert len(cache) == 2 and cache.stats.evictions == 1
    # Memory = each live graph's pool plus its static buffer (4 float32).
    assert cache.memory_bytes() == 2 * (1000 + 16)
    cache.get(b, build_counter([]))  # recapture after eviction
    assert backend.captured == 4 and a not in cache


def test_failed_capture_is_recorded_and_raised():
    class Failing(CountingBackend):
        def capture(self, body, prepare):
            raise RuntimeError("operation not permitted when stream is capturing")

    cache = GraphCache(Failing(), max_graphs=2)
    with pytest.raises(RuntimeError, match="capturing"):
        cache.get(key(), build_counter([]))
    assert "capturing" in cache.failed(key())
    assert len(cache) == 0 and cache.stats.failures == 1


def test_max_graphs_must_be_positive():
    with pytest.raises(ValueError, match="max_graphs"):
        GraphCache(CountingBackend(), max_graphs=0)


def test_report_and_describe():
    cache = GraphCache(CountingBackend(pool_bytes=2**20), max_graphs=2)
    cache.get(key(batch=2, guidance=True, steps=4, sampler="ddim"), build_counter([]))
    (row,) = cache.report()
    assert row["graph"] == "loop/b2/8x8/float16/cfg/4step/ddim"
    assert row["memory_mib"] == 1.0
    # The VAE's graphs, decoder and encoder, have no guidance or steps to show.
    for kind in ("vae", "vae-encode"):
        vae_key = GraphKey(kind=kind, batch=1, height=8, width=8, dtype=torch.float16)
        assert vae_key.describe() == f"{kind}/b1/8x8/float16"


def test_tensor_bytes_walks_containers():
    assert tensor_bytes({"a": torch.zeros(3), "b": [torch.zeros(2, dtype=torch.float16)]}) == 16


def test_tensor_bytes_counts_each_storage_once_and_asks_objects_for_their_tensors():
    """Views and aliases (a prepared condition holds the condition's own buffers) count once;
    an object with ``tensors()`` (the context projections) is counted by them."""

    class Holder:
        def __init__(self, *tensors):
            self.held = tensors

        def tensors(self):
            return self.held

    storage = torch.zeros(4, 8)
    projected = torch.zeros(10)
    buffers = {"cond": storage, "view": storage[1:].t(), "prepared": Holder(storage, projected)}
    assert tensor_bytes(buffers) == 4 * 8 * 4 + 10 * 4


class PhasedBackend(CountingBackend):
    """A backend that times its captures' phases, as CudaGraphBackend does."""

    def capture(self, body, prepare):
        self.last_phases = {
            "compile_ahead_s": 1.23456,
            "warmup_runs_s": 3.0 + self.captured,
            "graph_capture_s": 0.1,
        }
        return super().capture(body, prepare)


def test_each_entry_keeps_its_own_capture_phases_for_the_report():
    from fastdiff.runtime.optimize import describe_phases

    cache = GraphCache(PhasedBackend(), max_graphs=2)
    cache.get(key(batch=1), build_counter([]))
    cache.get(key(batch=2), build_counter([]))
    first, second = cache.report()
    assert first["compile_ahead_s"] == 1.235 and first["warmup_runs_s"] == 3.0
    assert second["warmup_runs_s"] == 4.0  # not the later capture's phases
    assert first["capture_s"] >= 0  # the whole capture's time stays under its own name
    assert describe_phases(first) == (
        f" (build {first['build_s']} s, compile-ahead 1.235 s, warm-up runs 3.0 s, capture 0.1 s)"
    )
    # A backend that does not time its phases (EagerGraphBackend, CountingBackend): no phases.
    plain = GraphCache(CountingBackend())
    plain.get(key(), build_counter([]))
    (row,) = plain.report()
    assert describe_phases(row) == "" and "warmup_runs_s" not in row
