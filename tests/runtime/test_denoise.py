"""The static-buffer denoising loop (whole-loop and step graphs) against a plain loop of the
PLAN_INTERFACE formulas, run on CPU through the eager graph backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastdiff.runtime.denoise import DenoiseCall, GraphedDenoiser, step_graph_rows
from fastdiff.runtime.graphs import EagerGraphBackend, GraphCache
from tests.runtime.fake_graph import RecordingGraphBackend, RunsAlso


class ToyUNet(nn.Module):
    """A nonlinear stand-in with the U-Net call signature (timestep and context both matter)."""

    def __init__(self, channels=4, context_dim=8, text_time=False):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.context_proj = nn.Linear(context_dim, channels)
        self.text_time = nn.Linear(6, channels) if text_time else None
        self.calls = 0

    def forward(self, sample, timestep, cond):
        self.calls += 1
        assert timestep.shape == (sample.shape[0],)
        t = (timestep.float() / 1000.0)[:, None, None, None]
        ctx = self.context_proj(cond["encoder_hidden_states"].mean(1))[:, :, None, None]
        out = torch.tanh(self.conv(sample)) * (1 + t) + ctx
        if self.text_time is not None:
            out = out + self.text_time(cond["time_ids"])[:, :, None, None]
        return out.to(sample.dtype)


def random_plan(steps: int, noise: bool, depth: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random coefficients reading ``depth`` rows of x0 history (1: the previous row's only;
    2: UniPC's and 3M's; 4: PNDM's)."""
    coefficients = torch.rand(steps, 10, dtype=torch.float64) * 0.5 + 0.5
    if not noise:
        coefficients[:, 6] = 0
    coefficients[:, 6 + depth :] = 0  # columns 7..9: two, three and four rows back
    timesteps = torch.randint(0, 1000, (steps,))
    return coefficients, timesteps


def reference_loop(unet, call: DenoiseCall) -> torch.Tensor:
    """Straight from the SamplingPlan formulas (fastdiff/sampling/plan.py), with Python-float
    coefficients."""
    x = call.x_T.double() * call.init_noise_scale
    history = [torch.zeros_like(x) for _ in range(4)]  # x0 one to four rows back
    for i in range(call.steps):
        c = call.coefficients[i].tolist()
        x_in = c[0] * x
        batch = x.shape[0]
        model_in = x_in.float()
        if call.guidance_scale is not None:
            model_in = torch.cat([model_in, model_in])
        t = torch.full((model_in.shape[0],), int(call.timesteps[i]))
        out = unet(model_in, t, call.cond).double()
        if call.guidance_scale is not None:
            out = out[:batch] + call.guidance_scale * (out[batch:] - out[:batch])
        x0 = c[1] * x_in + c[2] * out
        x_next = c[3] * x + c[4] * x0 + c[5] * history[0]
        x_next = x_next + c[7] * history[1] + c[8] * history[2] + c[9] * history[3]
        if call.noise is not None:
            x_next = x_next + c[6] * call.noise[i].double()
        x, history = x_next, [x0, *history[:3]]
    return x.float()


def make_call(steps, guidance=7.5, noise=False, batch=1, size=8, text_time=False, depth=1):
    coefficients, timesteps = random_plan(steps, noise, depth)
    rows = 2 * batch if guidance is not None else batch
    return DenoiseCall(
        x_T=torch.randn(batch, 4, size, size),
        timesteps=timesteps,
        coefficients=coefficients,
        init_noise_scale=1.3,
        cond={"encoder_hidden_states": torch.randn(rows, 5, 8)}
        | ({"time_ids": torch.randn(rows, 6)} if text_time else {}),
        guidance_scale=guidance,
        noise=torch.randn(steps, batch, 4, size, size) if noise else None,
    )


@pytest.mark.parametrize(
    "steps, guidance, noise, text_time, depth",
    [
        (4, 7.5, False, False, 1),  # whole-loop graph, CFG
        (4, None, False, False, 1),  # whole-loop graph, no guidance
        (3, 5.0, True, True, 1),  # whole loop, stochastic sampler, SDXL-style added cond
        (11, 7.5, False, False, 1),  # step graph replayed per step
        (10, 3.0, True, False, 1),  # step graph with per-step noise
        (5, 7.5, False, False, 2),  # whole loop reading the x0 of two steps back (UniPC)
        (12, 7.5, False, False, 4),  # the step graph reading four rows back (PNDM)
    ],
    ids=[
        "loop-cfg",
        "loop-nocfg",
        "loop-noise-texttime",
        "step-cfg",
        "step-noise",
        "loop-depth2",
        "step-depth4",
    ],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_graphed_loop_equals_reference(steps, guidance, noise, text_time, depth, channels_last):
    unet = ToyUNet(text_time=text_time)
    denoiser = GraphedDenoiser(
        unet,
        GraphCache(EagerGraphBackend()),
        torch.float32,
        channels_last=channels_last,
        max_loop_steps=8,
    )
    call = make_call(steps, guidance, noise, batch=2, text_time=text_time, depth=depth)
    with torch.no_grad():
        got = denoiser(call)
        want = reference_loop(unet, call)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    (entry,) = denoiser.cache.entries.values()
    assert entry.key.kind == ("loop" if steps <= 8 else "step")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert entry.buffers.x.is_contiguous(memory_format=layout)


def test_replays_with_new_inputs_reuse_the_graph_and_stay_correct():
    unet = ToyUNet()
    cache = GraphCache(EagerGraphBackend())
    denoiser = GraphedDenoiser(unet, cache, torch.float32, max_loop_steps=8)
    with torch.no_grad():
        for steps in (4, 4, 12, 20):  # same loop graph twice; one step graph for 12 and 20
            call = make_call(steps, guidance=float(steps))
            torch.testing.assert_close(
                denoiser(call), reference_loop(unet, call), rtol=1e-4, atol=1e-4
            )
    assert cache.stats.captures == 2 and cache.stats.hits == 2


def test_second_shape_captures_second_graph():
    cache = GraphCache(EagerGraphBackend())
    denoiser = GraphedDenoiser(ToyUNet(), cache, torch.float32)
    with torch.no_grad():
        denoiser(make_call(4, size=8))
        denoiser(make_call(4, size=16))
        denoiser(make_call(4, size=8))
    assert cache.stats.captures == 2 and cache.stats.hits == 1


def test_whole_loop_calls_model_once_per_step():
    unet = ToyUNet()
    denoiser = GraphedDenoiser(unet, GraphCache(EagerGraphBackend()), torch.float32)
    with torch.no_grad():
        denoiser(make_call(4))
    assert unet.calls == 4


@pytest.mark.parametrize("steps", [4, 11], ids=["loop", "step-graph"])
def test_the_compile_ahead_pass_runs_one_step_of_a_whole_loop(monkeypatch, steps):
    """Every step launches the same kernels, so a whole-loop body runs one step inside the
    compile-ahead pass (each step's forward there is main-thread time that competes with the
    compiler threads for the GIL) and all of them outside it; results are unchanged."""
    import fastdiff.runtime.denoise as denoise

    inside = []
    monkeypatch.setattr(denoise, "compiling_ahead", lambda: bool(inside))

    class AheadBackend(EagerGraphBackend):
        def capture(self, body, prepare):
            inside.append(True)  # the pass, as CudaGraphBackend runs it
            prepare()
            body()
            passes.append(unet.calls)
            inside.pop()
            return super().capture(body, prepare)

    unet, passes = ToyUNet(), []
    call = make_call(steps)
    with torch.no_grad():
        got = GraphedDenoiser(unet, GraphCache(AheadBackend()), torch.float32)(call)
        want = GraphedDenoiser(ToyUNet(), GraphCache(EagerGraphBackend()), torch.float32)
        want.unet_forward.load_state_dict(unet.state_dict())
        expected = want(call)
    assert passes == [1]  # one U-Net call in the pass, for 4 unrolled steps or a step graph
    assert unet.calls == 1 + steps
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_noise_rows_must_match_steps():
    denoiser = GraphedDenoiser(ToyUNet(), GraphCache(EagerGraphBackend()), torch.float32)
    call = make_call(4, noise=True)
    call.noise = call.noise[:3]
    with pytest.raises(ValueError, match="one row per step"):
        denoiser(call)


def test_plans_longer_than_the_step_graph_get_a_graph_of_their_own():
    """A 1001-step plan (a 2000-step schedule) outgrew the 1000-row step graph: its capture
    failed, the eager fallback raised the same error, and the shared step graph of its shape
    stayed marked as failed for every later call."""
    unet = ToyUNet()
    cache = GraphCache(EagerGraphBackend())
    denoiser = GraphedDenoiser(unet, cache, torch.float32, max_loop_steps=8)
    with torch.no_grad():
        for steps in (1001, 20, 1024):  # 1001 and 1024 share a 1024-row graph
            call = make_call(steps, guidance=2.0)
            call.coefficients = call.coefficients * 0.3  # bounded over a thousand steps
            got = denoiser(call)
            assert bool(torch.isfinite(got).all())
            torch.testing.assert_close(got, reference_loop(unet, call), rtol=1e-4, atol=1e-4)
    assert not denoiser.eager_fallbacks
    assert cache.stats.captures == 2 and cache.stats.hits == 1


def test_a_model_cast_later_gets_graphs_of_its_own_dtype():
    """The runtime reads the U-Net's dtype per call: cast after optimize(), the next call used
    buffers of the old dtype (a matmul dtype error); now it captures for the new one."""
    unet = ToyUNet()
    cache = GraphCache(EagerGraphBackend())
    denoiser = GraphedDenoiser(unet, cache, lambda: next(unet.parameters()).dtype)
    with torch.no_grad():
        denoiser(make_call(4))
        unet.to(torch.float64)
        call = make_call(4)
        call.cond = {key: value.double() for key, value in call.cond.items()}  # as the pipeline's
        got = denoiser(call)
        fresh = GraphedDenoiser(unet, GraphCache(EagerGraphBackend()), torch.float64)
        torch.testing.assert_close(got, fresh(call), rtol=0, atol=0)
    assert {key.dtype for key in cache.entries} == {torch.float32, torch.float64}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("result_dtype", [None, torch.float16], ids=["x_T-dtype", "fp16"])
def test_then_gets_a_tensor_like_the_result_the_caller_gets(channels_last, result_dtype):
    """``then`` (the VAE decode ahead) runs in a new graph's compile-ahead pass on a tensor with
    the layout of the result and the dtype the caller casts it to (``result_dtype``, else
    x_T's), so the decoder compiles the kernels, and keys the graph, of the real decode."""
    seen = []

    class AheadBackend(RunsAlso, EagerGraphBackend):
        pass

    denoiser = GraphedDenoiser(
        ToyUNet(), GraphCache(AheadBackend()), torch.float32, channels_last, then=seen.append
    )
    call = make_call(4)
    call.result_dtype = result_dtype
    with torch.no_grad():
        result = denoiser(call).to(result_dtype or call.x_T.dtype)
    (ahead,) = seen
    assert ahead.dtype == result.dtype and ahead.shape == result.shape
    assert ahead.stride() == result.stride()
    assert result.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_whole_loop_graphs_are_keyed_by_their_step_count():
    """A captured loop runs a fixed number of steps: a 3-step plan must capture its own graph,
    not replay the 6-step one of the same shape (checked with graph-faithful replays)."""
    unet = ToyUNet()
    cache = GraphCache(RecordingGraphBackend())
    denoiser = GraphedDenoiser(unet, cache, torch.float32, max_loop_steps=8)
    with torch.no_grad():
        for steps in (6, 3, 6):
            call = make_call(steps)
            want = reference_loop(unet, call)
            torch.testing.assert_close(denoiser(call), want, rtol=1e-4, atol=1e-4)
    assert cache.stats.captures == 2 and cache.stats.hits == 1


def test_condition_dtypes_are_part_of_the_graph_key():
    """A graph's static condition buffers have the dtype they were captured with: a call whose
    condition has another dtype captures its own graph rather than being converted silently."""
    cache = GraphCache(EagerGraphBackend())
    denoiser = GraphedDenoiser(ToyUNet(), cache, torch.float32, max_loop_steps=8)
    call = make_call(4)
    other = make_call(4)
    other.cond = {key: value.double() for key, value in other.cond.items()}
    assert denoiser.key_for(call) != denoiser.key_for(other)


@pytest.mark.parametrize(
    "steps, rows", [(1, 1000), (1000, 1000), (1001, 1024), (1024, 1024), (1025, 2048)]
)
def test_step_graph_rows(steps, rows):
    assert step_graph_rows(steps) == rows


@pytest.mark.parametrize("sampler, drawn_dtype", [("dpmpp_2m_sde", torch.float32),
                                                  ("euler_ancestral", torch.float16)])  # fmt: skip
def test_step_noise_is_drawn_as_the_eager_loop_draws_it(sampler, drawn_dtype):
    """fp16 latents: the SDE sampler's step noise is drawn in float32 (as diffusers' DPM-Solver
    draws it), Euler ancestral's in the latents' dtype; in step order from the generator, so a
    seed gives the eager loop's (and diffusers') noise on the graphed path too."""
    from fastdiff.pipeline.conditioning import Conditioning
    from fastdiff.runtime.denoise import build_call
    from fastdiff.sampling import NoiseSchedule, make_plan

    plan = make_plan(NoiseSchedule(), sampler, 4)
    noise = torch.randn(1, 4, 8, 8).half()
    conditioning = Conditioning({"encoder_hidden_states": torch.randn(1, 5, 8)}, None)
    call = build_call(plan, conditioning, noise, 1.0, torch.Generator().manual_seed(7))
    assert call.noise.dtype == drawn_dtype
    generator = torch.Generator().manual_seed(7)
    for row, std in zip(call.noise, plan.coefficients[:, 6].tolist(), strict=True):
        if std != 0.0:
            want = torch.randn(noise.shape, generator=generator, dtype=drawn_dtype)
            assert torch.equal(row, want)


class FailingBackend:
    """A graph backend whose captures always fail (as an op that cannot be captured would)."""

    def capture(self, body, prepare):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_shape_whose_capture_failed_runs_eagerly_on_buffers_built_once(monkeypatch):
    """The eager fallback equals the reference for new inputs, and keeps each shape's buffers
    (built once, as a graph's) instead of allocating them at every call."""
    import fastdiff.runtime.denoise as denoise

    unet = ToyUNet()
    denoiser = GraphedDenoiser(unet, GraphCache(FailingBackend()), torch.float32)
    builds = []
    build = denoiser.build
    monkeypatch.setattr(denoiser, "build", lambda *a, **k: builds.append(a[1]) or build(*a, **k))
    monkeypatch.setattr(denoise, "EAGER_ENTRIES", 2)
    with torch.no_grad():
        for steps in (4, 12, 4, 20, 12):  # a loop shape and a step shape, each again
            call = make_call(steps, guidance=float(steps))
            torch.testing.assert_close(
                denoiser(call), reference_loop(unet, call), rtol=1e-4, atol=1e-4
            )
    assert len(denoiser.eager_fallbacks) == 2
    # One failed capture and one eager build per shape (the step shape serves 12 and 20).
    assert len(builds) == 2 * 2 and len(set(builds)) == 2
    with torch.no_grad():
        denoiser(make_call(4, size=16))  # a third shape: the least recent one is dropped
    assert len(denoiser.cache.eager) == 2 and denoiser.cache.memory_bytes() > 0
    denoiser.cache.clear()  # as after moving or re-casting a model: built again
    assert not denoiser.cache.eager and denoiser.cache.memory_bytes() == 0


def test_a_plan_reading_two_steps_back_gets_a_graph_of_its_own():
    """A graph keeps the x0 of two steps back only when its plan reads it (UniPC): the same
    shape and step count with and without that column are two graphs, each correct."""
    unet = ToyUNet()
    cache = GraphCache(EagerGraphBackend())
    denoiser = GraphedDenoiser(unet, cache, torch.float32, max_loop_steps=8)
    with torch.no_grad():
        for steps in (5, 12):  # a whole-loop graph and a step graph
            for depth in (2, 1, 2):
                call = make_call(steps, depth=depth)
                torch.testing.assert_close(
                    denoiser(call), reference_loop(unet, call), rtol=1e-4, atol=1e-4
                )
    assert cache.stats.captures == 4 and cache.stats.hits == 2
    kept = sorted(
        (key.kind, entry.buffers.x0_older is not None) for key, entry in cache.entries.items()
    )
    assert kept == [("loop", False), ("loop", True), ("step", False), ("step", True)]
