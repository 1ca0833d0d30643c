"""The runtime under a graph-faithful CPU stand-in (tests/runtime/fake_graph.py): replays run only
the recorded aten calls, so host-side decisions are frozen at capture as on a GPU."""

from __future__ import annotations

import pytest
import torch

import fastdiff.runtime as runtime
from fastdiff.ops import use_backend
from fastdiff.pipeline.conditioning import Conditioning
from fastdiff.runtime.denoise import GraphedDenoiser
from fastdiff.runtime.graphs import GraphCache
from fastdiff.sampling import KnownRegion
from tests.runtime.fake_graph import RecordingGraphBackend
from tests.runtime.test_denoise import ToyUNet, make_call


def conditioning(guided: bool) -> Conditioning:
    def part():
        return {"encoder_hidden_states": torch.randn(1, 7, 32)}

    return Conditioning(part(), part() if guided else None)


CASES = [("ddim", 4, 0.0, 6.0), ("dpmpp_2m", 4, 0.0, 6.0), ("euler", 10, 0.0, 6.0),
         ("ddim", 3, 0.5, 6.0), ("ddpm", 10, 0.0, 1.0), ("euler_ancestral", 5, 0.0, 6.0),
         ("dpmpp_2m_karras", 10, 0.0, 6.0),
         ("euler_karras", 3, 0.0, 6.0), ("lcm", 4, 0.0, 1.0)]  # fmt: skip
# (euler_karras calls the U-Net at fractional timesteps: the graphs' timestep buffer holds them.)


def test_replayed_graphs_equal_the_eager_loop_for_new_inputs(pipe):
    wanted = []
    for index, (sampler, steps, eta, guidance) in enumerate(CASES):
        torch.manual_seed(index)
        cond, x_T = conditioning(guidance > 1), torch.randn(1, 4, 8, 8)
        kwargs = dict(guidance_scale=guidance, sampler=sampler, steps=steps, eta=eta)
        with torch.no_grad():
            want = pipe.denoise(
                cond, x_T, generator=torch.Generator().manual_seed(5), progress=False, **kwargs
            )
        wanted.append((cond, x_T, kwargs, want))
    rt = runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    for _ in range(2):  # the second round only replays
        for cond, x_T, kwargs, want in wanted:
            got = pipe.denoise(cond, x_T, generator=torch.Generator().manual_seed(5), **kwargs)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Step graphs hold no sampler: dpmpp_2m_karras (10 steps, guided) replays euler's step graph.
    assert rt.cache.stats.captures == 8 and rt.cache.stats.hits == 10


@pytest.mark.parametrize("other", ["eager", "triton"])
def test_ops_backend_is_part_of_the_graph_key(other):
    denoiser = GraphedDenoiser(ToyUNet(), GraphCache(RecordingGraphBackend()), torch.float32)
    call = make_call(4)
    with use_backend("auto"):
        captured = denoiser.key_for(call)
    with use_backend(other):
        assert denoiser.key_for(call) != captured


@pytest.mark.parametrize(
    "sampler, steps, start_step, eta",
    [
        ("ddim", 6, 2, 0.0),
        ("dpmpp_2m", 6, 3, 0.0),
        ("euler", 14, 4, 0.0),
        ("ddpm", 10, 5, 0.0),
        ("euler_ancestral", 12, 3, 0.0),
        ("dpmpp_2m_karras", 6, 2, 0.0),
        ("tcd", 6, 2, 0.3),  # gamma: step noise
    ],  # fmt: skip
)
def test_img2img_runs_the_remaining_rows_in_graphs(pipe, sampler, steps, start_step, eta):
    """img2img starts part-way down the plan: the runtime replays the remaining rows (loop graph
    for short remainders, step graph for long ones) and equals the eager loop."""
    kwargs = dict(guidance_scale=5.0, sampler=sampler, steps=steps, eta=eta)
    kwargs.update(init_latents=torch.randn(1, 4, 8, 8), start_step=start_step)
    rt = graphs_equal_the_eager_loop(pipe, kwargs)
    (entry,) = rt.cache.entries.values()
    assert entry.key.kind == ("loop" if steps - start_step <= 8 else "step")


@pytest.mark.parametrize(
    "sampler, steps, start_step, end_step",
    [
        ("ddim", 10, 0, 7),  # stopped early (denoising_end): a loop graph of 7 rows
        ("euler", 20, 0, 16),  # a step graph, stopped early
        ("dpmpp_2m", 10, 6, None),  # resumed from given latents (denoising_start), unnoised
        ("euler_ancestral", 20, 3, 17),  # both, with step noise
    ],
)
def test_stopped_and_resumed_runs_equal_the_eager_loop(pipe, sampler, steps, start_step, end_step):
    """The base-then-refiner hand-over through graphs: the rows before ``end_step`` only, and
    a start from latents taken as they are (``add_noise=False``), equal the eager loop."""
    init = torch.randn(1, 4, 8, 8) if start_step else None
    kwargs = dict(guidance_scale=5.0, sampler=sampler, steps=steps, init_latents=init)
    kwargs.update(start_step=start_step, end_step=end_step, add_noise=False)
    graphs_equal_the_eager_loop(pipe, kwargs)


@pytest.mark.parametrize(
    "sampler, steps, start_step",
    [("ddim", 6, 0), ("euler", 14, 4), ("euler_ancestral", 5, 1), ("dpmpp_2m", 12, 0)],
)
def test_a_known_region_is_blended_inside_the_graphs(pipe, sampler, steps, start_step):
    """Inpainting with a plain U-Net: the kept region's latents, mask, noise and per-step rows
    live in static buffers, and the blend after each step replays as the eager loop runs it
    (loop graphs and step graphs, from the start and part-way down the plan)."""
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 1:5] = 1.0
    known = KnownRegion(torch.randn(1, 4, 8, 8), mask, torch.randn(1, 4, 8, 8))
    kwargs = dict(guidance_scale=5.0, sampler=sampler, steps=steps, known=known)
    if start_step:
        kwargs.update(init_latents=torch.randn(1, 4, 8, 8), start_step=start_step)
    rt = graphs_equal_the_eager_loop(pipe, kwargs)
    (entry,) = rt.cache.entries.values()
    assert entry.buffers.known is not None
    # Without the region the same shape takes another graph (and is not blended).
    unblended = {key: value for key, value in kwargs.items() if key != "known"}
    cond, x_T = conditioning(True), torch.randn(1, 4, 8, 8)
    pipe.denoise(cond, x_T, generator=torch.Generator().manual_seed(3), **unblended)
    assert rt.cache.stats.captures == 2


def graphs_equal_the_eager_loop(pipe, kwargs: dict):
    """``pipe.denoise(**kwargs)`` on a guided condition, eagerly, then through one captured
    graph twice (capture, then a pure replay): equal. Returns the runtime."""
    cond, x_T = conditioning(True), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = pipe.denoise(
            cond, x_T, generator=torch.Generator().manual_seed(3), progress=False, **kwargs
        )
    rt = runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    for _ in range(2):
        got = pipe.denoise(cond, x_T, generator=torch.Generator().manual_seed(3), **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not rt.denoiser.eager_fallbacks and rt.cache.stats.captures == 1
    return rt
