"""The cross-attentions' keys and values of the text context, projected once per generation:
a folded U-Net with fused projections packs them into one GEMM (fastdiff.models.packing), and
the eager pipeline loop and the runtime's graphs run that GEMM before the first step rather than
in every step (``Pipeline.prepare_condition``; in graphs, outside the capture, into static
buffers the replays read)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdiff.runtime as runtime
from fastdiff.models.packing import context_attentions
from fastdiff.pipeline.conditioning import Conditioning
from tests.models.test_packing import context_projection_calls
from tests.ops.helpers import CallCounter
from tests.runtime.conftest import tiny_pipeline, with_folds
from tests.runtime.fake_graph import RecordingGraphBackend

GEMMS = {torch.ops.aten.addmm.default, torch.ops.aten.mm.default, torch.ops.aten.bmm.default}


def conditioning(seed: int) -> Conditioning:
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(2, 1, 7, 32, generator=generator)
    return Conditioning(
        {"encoder_hidden_states": context[0]}, {"encoder_hidden_states": context[1]}
    )


def denoise(pipe, seed: int, steps: int) -> torch.Tensor:
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return pipe.denoise(
            conditioning(seed), noise, guidance_scale=5.0, steps=steps, progress=False
        )


def packed_gemms_in(graph, unet) -> int:
    """Matrix products of a recorded graph over the packed to_kv weights (their storage)."""
    storage = context_attentions(unet)[0].to_kv.weight.untyped_storage().data_ptr()
    count = 0
    for func, args, _, _ in graph.calls:
        tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
        if func in GEMMS and any(a.untyped_storage().data_ptr() == storage for a in tensors):
            count += 1
    return count


def test_the_eager_loop_projects_the_context_once_per_generation(monkeypatch):
    pipe = with_folds(tiny_pipeline())
    want = denoise(pipe, 1, steps=5)
    pipe.unet.fuse_qkv_projections()
    pipe.unet.fold_conv_biases()  # packs the fused to_kv weights
    linear_calls = CallCounter(monkeypatch, F, "linear")
    got = denoise(pipe, 1, steps=5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert context_projection_calls(pipe.unet, linear_calls) == (1, 0)  # not one per step


@pytest.mark.parametrize("steps", [4, 12], ids=["whole-loop-graph", "step-graph"])
def test_graphs_read_projections_made_once_per_generation(monkeypatch, steps):
    """The graph holds no context GEMM; each generation runs it once, eagerly, into the static
    buffers, so a replay with another prompt's context gives that prompt's result."""
    pipe = with_folds(tiny_pipeline())
    wanted = [denoise(pipe, seed, steps) for seed in (1, 2)]
    rt = runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    assert pipe.unet.packed_context_modules  # optimize() fused and packed
    torch.testing.assert_close(denoise(pipe, 1, steps), wanted[0], rtol=1e-5, atol=1e-5)
    (entry,) = rt.cache.entries.values()
    static = entry.buffers.cond["encoder_hidden_states"]
    assert entry.buffers.prepared["encoder_hidden_states"].states is static
    copies = []  # of a generation's context into the static one: once, with the condition
    copy = torch.Tensor.copy_

    def counting_copy(self, *args, **kwargs):
        copies.append(self.data_ptr() == static.data_ptr())
        return copy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", counting_copy)
    linear_calls = CallCounter(monkeypatch, F, "linear")
    torch.testing.assert_close(denoise(pipe, 2, steps), wanted[1], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(torch.Tensor, "copy_", copy)
    assert sum(copies) == 1
    assert rt.cache.stats.captures == 1 and rt.cache.stats.hits == 1
    assert context_projection_calls(pipe.unet, linear_calls) == (1, 0)
    assert entry.buffers.prepared is not None
    assert packed_gemms_in(entry.graph, pipe.unet) == 0


def test_packing_switched_off_after_capture_gets_a_graph_of_its_own():
    """Graphs are keyed by the prepared condition's structure: after the U-Net's folds are
    switched off (nothing packed, nothing projected ahead) a new graph is captured, which
    reads the context itself, rather than static projections nothing refreshes."""
    pipe = with_folds(tiny_pipeline())
    want = denoise(pipe, 3, steps=4)
    rt = runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    denoise(pipe, 1, steps=4)
    pipe.unet.fold_conv_biases(False)
    torch.testing.assert_close(denoise(pipe, 3, steps=4), want, rtol=1e-5, atol=1e-5)
    assert rt.cache.stats.captures == 2
    prepared = [entry.buffers.prepared is not None for entry in rt.cache.entries.values()]
    assert prepared == [True, False]
