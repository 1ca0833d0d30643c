"""Bad input to the runtime and to ``fastdiff.parallel`` gets an error that names the problem,
never a wrong result: all on CPU, through the eager graph backend."""

from __future__ import annotations

import pytest
import torch

from fastdiff import parallel
from fastdiff.runtime import GraphedCall, GraphedDenoiser
from fastdiff.runtime.denoise import allocate_buffers, load_buffers
from fastdiff.runtime.graphs import EagerGraphBackend, GraphCache
from fastdiff.runtime.plan_step import apply_plan_step
from tests.runtime.test_denoise import ToyUNet, make_call


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda_is_refused():
    with pytest.raises(RuntimeError, match="device 'cuda' was requested but CUDA is not"):
        parallel.wants_cuda("cuda")


def test_optimize_refuses_a_negative_max_loop_steps_before_changing_the_pipeline(pipe):
    with pytest.raises(ValueError, match="max_loop_steps must be >= 0, got -1"):
        pipe.optimize(max_loop_steps=-1, verbose=False)
    assert getattr(pipe, "runtime", None) is None
    assert not any(module.fused for module in pipe.unet.attention_modules())  # QKV not fused


def test_unguided_step_refuses_a_guided_batch():
    """A [uncond; cond] output given to an unguided step would be read as guided at scale 1
    (the cond half alone): refused, the state untouched."""
    x = torch.randn(1, 4, 4, 4)
    before = x.clone()
    coefficients = torch.rand(3, 10)
    model_out = torch.randn(2, 4, 4, 4)
    step = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="model output batch 2 != state batch 1"):
        apply_plan_step(x, model_out, torch.zeros_like(x), coefficients, step, None, None)
    assert torch.equal(x, before)


def test_load_buffers_of_a_prepared_graph_needs_the_prepared_condition():
    call = make_call(3, guidance=None)
    buffers = allocate_buffers(call, rows=3, noise_rows=1, device="cpu")
    buffers.prepared = {"encoder_hidden_states": torch.zeros(1, 5, 8)}
    with pytest.raises(RuntimeError, match="read a prepared condition: pass it to load_buffers"):
        load_buffers(buffers, call, whole_loop=True)


def test_a_condition_prepared_or_not_gets_its_own_graph():
    """``prepare_cond`` may have nothing to do for one condition (``prepare`` gives None) and
    return new plain tensors for another of the same shapes: the graph key used to be the same
    for both, so the second call replayed the first one's graph and failed in load_buffers."""

    def contiguous_context(cond):  # a copy only where the layout needs one
        return {**cond, "encoder_hidden_states": cond["encoder_hidden_states"].contiguous()}

    unet = ToyUNet()
    cache = GraphCache(EagerGraphBackend())
    denoiser = GraphedDenoiser(unet, cache, torch.float32, prepare_cond=contiguous_context)
    plain = GraphedDenoiser(unet, GraphCache(EagerGraphBackend()), torch.float32)
    call = make_call(3, guidance=None)
    context = call.cond["encoder_hidden_states"]
    strided = context.transpose(1, 2).contiguous().transpose(1, 2)  # same values, new layout
    with torch.no_grad():
        want = plain(call)
        for cond in ({"encoder_hidden_states": strided}, {"encoder_hidden_states": context}):
            call.cond = cond
            torch.testing.assert_close(denoiser(call), want)
    assert len(cache) == 2 and not denoiser.eager_fallbacks


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        pytest.param((torch.ones(1, 4, 8, 8), 0.5), {}, TypeError, "got float", id="float-arg"),
        pytest.param(
            (torch.ones(1, 4, 8, 8),),
            {"skip": [torch.ones(1)]},
            TypeError,
            "got list",
            id="list-of-tensors",
        ),
        pytest.param((), {}, ValueError, "got no arguments", id="no-arguments"),
        pytest.param(
            (0.5,), {}, ValueError, r"at least one tensor argument .*got \['float'\]", id="float"
        ),
        pytest.param(
            ({"sample": torch.ones(1, 4, 8, 8)},),
            {},
            ValueError,
            r"besides any dicts of tensors\), got \['dict'\]",
            id="only-a-dict",
        ),
    ],
)
def test_graphed_call_takes_tensors(args, kwargs, error, message):
    calls = []

    def double(*args, **kwargs):
        calls.append(1)
        return args[0] * 2

    graphed = GraphedCall(double, GraphCache(EagerGraphBackend()), kind="vae")
    with pytest.raises(error, match=message):
        graphed(*args, **kwargs)
    assert not calls and not graphed.eager_fallbacks  # refused, not run eagerly instead
