"""optimize() on CPU: the reference path is kept, and the static-buffer loop that CUDA graphs
capture (run here without capture) gives the eager pipeline's results."""

from __future__ import annotations

import sys

import pytest
import torch

import fastdiff.runtime as runtime
from fastdiff.pipeline.conditioning import Conditioning
from fastdiff.sampling import make_plan, run_plan
from tests.runtime.fake_graph import RecordingGraphBackend, RunsAlso


def text_conditioning(batch=1, tokens=7, width=32, guided=True, text_time=False):
    def part():
        cond = {"encoder_hidden_states": torch.randn(batch, tokens, width)}
        if text_time:
            cond["text_embeds"] = torch.randn(batch, 32)
            cond["time_ids"] = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(batch, 1)
        return cond

    return Conditioning(part(), part() if guided else None)


def eager_latents(pipe, conditioning, x_T, sampler, steps, eta=0.0, guidance=7.5, seed=3):
    plan = make_plan(pipe.schedule, sampler, steps, eta)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return run_plan(pipe.build_model_fn(conditioning, guidance), x_T, plan, generator=generator)


def test_without_cuda_optimize_keeps_the_eager_path(pipe, capsys):
    eager_denoise = pipe.denoise
    result = runtime.optimize(pipe)
    assert not result.attached and result.report is pipe.optimize_report
    assert pipe.denoise == eager_denoise  # not replaced
    assert pipe.unet.dtype == torch.float32
    report = pipe.optimize_report
    assert "CUDA graphs" in report.skipped and "no CUDA" in report.skipped["CUDA graphs"]
    assert any("fused QKV" in item for item in report.applied)
    assert "skipped: CUDA graphs (no CUDA" in capsys.readouterr().out
    assert all(module.fused for module in pipe.unet.attention_modules())


def test_fused_qkv_keeps_unet_output(pipe):
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 500])
    context = torch.randn(2, 7, 32)
    with torch.no_grad():
        before = pipe.unet(x, t, context)
        runtime.optimize(pipe, verbose=False)
        after = pipe.unet(x, t, context)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "sampler, steps, eta",
    [
        ("ddim", 4, 0.0),
        ("euler", 3, 0.0),
        ("dpmpp_2m", 9, 0.0),
        ("ddim", 4, 0.6),
        ("ddpm", 10, 0.0),
        ("euler_ancestral", 4, 0.0),
        ("dpmpp_2m_karras", 9, 0.0),
        ("dpmpp_2m_sde_karras", 5, 0.0),
        ("euler_karras", 3, 0.0),
        ("unipc", 5, 0.0),
        ("unipc_karras", 12, 0.0),
        ("dpmpp_3m_sde", 6, 0.0),
        ("heun", 3, 0.0),  # 5 model calls: a whole-loop graph
        ("heun_karras", 6, 0.0),  # 11: the step graph
        ("kdpm2", 3, 0.0),  # 5 calls, two at fractional midpoint timesteps: a whole-loop graph
        ("kdpm2_karras", 6, 0.0),  # 11: the step graph
        ("kdpm2_ancestral", 4, 0.0),  # 7 calls, noise at every second one: a whole-loop graph
        ("pndm", 10, 0.0),  # 11 calls, four outputs of history: the step graph
        ("lms", 6, 0.0),  # three derivatives of history: a whole-loop graph
    ],
    ids=[
        "ddim4-loop",
        "euler3-loop",
        "dpmpp9-step",
        "ddim-eta-loop",
        "ddpm10-step",
        "euler-ancestral4-loop",
        "dpmpp-karras9-step",
        "dpmpp-sde-karras5-loop",
        "euler-karras3-loop",
        "unipc5-loop",
        "unipc-karras12-step",
        "dpmpp-3m-sde6-loop",
        "heun3-loop",
        "heun-karras6-step",
        "kdpm2-3-loop",
        "kdpm2-karras6-step",
        "kdpm2-ancestral4-loop",
        "pndm10-step",
        "lms6-loop",
    ],
)
def test_static_buffer_loop_equals_eager_sampler(pipe, sampler, steps, eta):
    conditioning = text_conditioning()
    x_T = torch.randn(1, 4, 8, 8)
    want = eager_latents(pipe, conditioning, x_T, sampler, steps, eta)
    rt = runtime.optimize(pipe, backend=runtime.EagerGraphBackend(), verbose=False)
    got = pipe.denoise(
        conditioning,
        x_T,
        guidance_scale=7.5,
        sampler=sampler,
        steps=steps,
        eta=eta,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (entry,) = rt.cache.entries.values()
    assert entry.key.kind == (
        "loop" if len(make_plan(pipe.schedule, sampler, steps)) <= 8 else "step"
    )
    assert entry.key.guidance


def test_unguided_and_text_time_conditioning(sdxl_pipe):
    conditioning = text_conditioning(batch=2, guided=False, text_time=True)
    x_T = torch.randn(2, 4, 8, 8)
    want = eager_latents(sdxl_pipe, conditioning, x_T, "dpmpp_2m", 6, guidance=1.0)
    runtime.optimize(sdxl_pipe, backend=runtime.EagerGraphBackend(), verbose=False)
    got = sdxl_pipe.denoise(conditioning, x_T, guidance_scale=1.0, sampler="dpmpp_2m", steps=6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (key,) = sdxl_pipe.runtime.cache.entries
    assert not key.guidance and key.batch == 2


@pytest.mark.parametrize("steps", [3, 12])  # whole-loop graph, step graph
def test_guidance_rescale_runs_in_the_graphs(pipe, steps):
    """Lin et al. 2023's rescale needs per-sample stds: computed on the device in the graph body,
    before the fused step, and equal to the eager loop; phi is part of the graph key."""
    conditioning = text_conditioning()
    x_T = torch.randn(1, 4, 8, 8)
    kwargs = dict(guidance_scale=5.0, steps=steps, progress=False)
    with torch.no_grad():
        want = {phi: pipe.denoise(conditioning, x_T, guidance_rescale=phi, **kwargs)
                for phi in (0.7, 0.3)}  # fmt: skip
    rt = runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    for phi in (0.7, 0.3, 0.7):
        got = pipe.denoise(conditioning, x_T, guidance_rescale=phi, **kwargs)
        torch.testing.assert_close(got, want[phi], rtol=1e-5, atol=1e-5)
    assert rt.cache.stats.captures == 2 and not rt.denoiser.eager_fallbacks
    with pytest.raises(ValueError, match="guidance_rescale must lie in"):
        pipe.denoise(conditioning, x_T, guidance_rescale=1.5, **kwargs)


def test_decode_latents_through_graphed_call(pipe):
    latents = torch.randn(1, 4, 8, 8)
    want = pipe.decode_latents(latents)
    rt = runtime.optimize(pipe, backend=runtime.EagerGraphBackend(), verbose=False)
    got = pipe.decode_latents(latents)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    again = pipe.decode_latents(latents * 0.5)
    assert not torch.allclose(again, got)  # new input copied into the static buffer
    assert rt.cache.stats.captures == 1 and rt.cache.stats.hits == 1


def test_img2img_generation_through_encoder_loop_and_decoder_graphs(pipe):
    """A whole img2img call under the graph-faithful recording backend: the VAE encoder
    (posterior moments), the denoising rows from the start step and the decoder are graphs, and
    the images equal the eager pipeline's; the posterior sample stays outside the graphs."""
    init = torch.rand(1, 3, 16, 16)  # an image tensor in [0, 1]
    kwargs = dict(
        prompt_embeds=torch.randn(1, 7, 32),
        negative_prompt_embeds=torch.randn(1, 7, 32),
        image=init,
        strength=0.6,
        num_inference_steps=5,
        output_type="tensor",
        progress=False,
    )
    want = [pipe(seed=seed, **kwargs) for seed in (1, 2)]
    unipc = {**kwargs, "sampler": "unipc", "num_inference_steps": 8}  # restarted rows
    want_unipc = pipe(seed=1, **unipc)
    rt = runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    for _ in range(2):  # capture, then pure replays
        for seed, expected in zip((1, 2), want, strict=True):
            torch.testing.assert_close(pipe(seed=seed, **kwargs), expected, rtol=1e-5, atol=1e-5)
    kinds = sorted(entry.key.kind for entry in rt.cache.entries.values())
    assert kinds == ["loop", "vae", "vae-encode"] and rt.cache.stats.captures == 3
    assert not torch.allclose(want[0], want[1])
    torch.testing.assert_close(pipe(seed=1, **unipc), want_unipc, rtol=1e-5, atol=1e-5)


def test_fused_projections_keep_the_frozen_state_of_the_layers(pipe):
    """prepare_module freezes a model before fusing its QKV projections: the fused layers stay
    frozen (a trainable model's stay trainable)."""
    from fastdiff.models.attention import concat_linears

    layers = [torch.nn.Linear(4, 3), torch.nn.Linear(4, 5)]
    assert concat_linears(layers).weight.requires_grad
    for layer in layers:
        layer.requires_grad_(False)
    fused = concat_linears(layers)
    assert not fused.weight.requires_grad and not fused.bias.requires_grad
    runtime.prepare_module(pipe.unet, "unet", runtime.OptimizeReport("cpu"), None, False, True)
    assert not any(param.requires_grad for param in pipe.unet.parameters())
    assert pipe.unet.attention_modules()[0].fused


def test_bad_arguments_raise(pipe):
    with pytest.raises(ValueError, match="dtype"):
        runtime.optimize(pipe, dtype=torch.int8)
    with pytest.raises(ValueError, match="max_graphs"):
        runtime.optimize(pipe, backend=runtime.EagerGraphBackend(), max_graphs=0)


def three_step_call() -> dict:
    """A guided 3-step text-to-image call's arguments (random prompt embeddings)."""
    return dict(
        prompt_embeds=torch.randn(1, 7, 32),
        negative_prompt_embeds=torch.randn(1, 7, 32),
        num_inference_steps=3,
        output_type="tensor",
        progress=False,
    )


@pytest.mark.parametrize("fold_biases", [False, True], ids=["biases", "folded-biases"])
def test_pipeline_optimize_keeps_full_generation(pipe, fold_biases):
    kwargs = three_step_call()
    want = pipe(seed=5, **kwargs)
    rt = pipe.optimize(backend=runtime.EagerGraphBackend(), verbose=False, fold_biases=fold_biases)
    got = pipe(seed=5, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    kinds = sorted(key.kind for key in rt.cache.entries)
    assert kinds == ["loop", "vae"]  # whole 3-step loop + the decoder


class CompileAheadBackend(RunsAlso, RecordingGraphBackend):
    """RecordingGraphBackend with CudaGraphBackend's pass as GraphCache sees it."""


def test_a_new_denoising_graph_runs_the_decoder_in_its_compile_ahead_pass(pipe, monkeypatch):
    """So that the VAE decoder's kernels compile with the U-Net's: a new loop graph's pass runs
    the decoder on latents like the loop's result (the same VAE graph key: shape, dtype,
    layout), once per new shape and not where that decoder graph exists; the images stay
    the eager pipeline's. A backend without the pass gets no ``also`` at all, and
    FASTDIFF_DECODE_AHEAD=0 turns it off (a bad value fails in optimize())."""
    kwargs = three_step_call()
    want = pipe(seed=5, **kwargs)
    backend = CompileAheadBackend()
    rt = pipe.optimize(backend=backend, verbose=False)
    ahead = []
    decode = rt.eager_decode_latents  # the decoder graph's function, left as it was
    monkeypatch.setattr(rt, "eager_decode_latents", lambda x: ahead.append(x) or decode(x))
    torch.testing.assert_close(pipe(seed=5, **kwargs), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pipe(seed=5, **kwargs), want, rtol=1e-5, atol=1e-5)
    assert [key.kind for key in rt.cache.entries] == ["loop", "vae"]
    assert backend.passes == [True, False]  # the loop's capture, then the decoder's
    (vae_key,) = [key for key in rt.cache.entries if key.kind == "vae"]
    with rt.ops_backend():  # the ops backend the decoder's key names, as inside denoise()
        assert len(ahead) == 1 and rt.decoder.key_for((ahead[0],), {}) == vae_key
    pipe(seed=5, **{**kwargs, "num_inference_steps": 4})  # a new loop graph, same decoder
    assert backend.passes == [True, False, True] and len(ahead) == 1
    pipe(seed=5, **{**kwargs, "height": 96})  # a new shape: the decoder's kernels too
    assert len(ahead) == 2 and ahead[1].shape[-2:] == (96 // pipe.vae_scale_factor, 8)
    # A backend without the pass gets no ``also``: its captures take two arguments.
    plain = runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    pipe(seed=5, **kwargs)
    assert plain.cache.stats.captures == 2 and not plain.denoiser.eager_fallbacks
    monkeypatch.setenv("FASTDIFF_DECODE_AHEAD", "0")  # measured apart: the decoder at its decode
    assert pipe.optimize(backend=CompileAheadBackend(), verbose=False).denoiser.then is None
    monkeypatch.setenv("FASTDIFF_DECODE_AHEAD", "yes")
    with pytest.raises(ValueError, match="FASTDIFF_DECODE_AHEAD must be 0 or 1, got 'yes'"):
        pipe.optimize(backend=CompileAheadBackend(), verbose=False)


@pytest.mark.parametrize("fold_biases", [False, True], ids=["biases", "folded-biases"])
def test_compiled_blocks_keep_outputs(pipe, fold_biases):
    """torch.compile of the U-Net blocks (dynamo tracing through fastdiff's ops; the 'eager'
    compile backend keeps this fast on CPU) leaves the generation unchanged, also when the
    blocks are handed the folded time shifts."""
    conditioning = text_conditioning()
    x_T = torch.randn(1, 4, 8, 8)
    want = eager_latents(pipe, conditioning, x_T, "ddim", 2)
    torch._dynamo.reset()
    report_runtime = runtime.optimize(
        pipe,
        backend=runtime.EagerGraphBackend(),
        verbose=False,
        compile_mode="default",
        compile_backend="eager",
        fold_biases=fold_biases,
    )
    got = pipe.denoise(conditioning, x_T, guidance_scale=7.5, sampler="ddim", steps=2)
    # fp32 rounding only: dynamo's graph may order a reduction differently, and guidance 7.5
    # amplifies the difference (1.6e-5 seen on one CPU); the graphed-loop tests' tolerance
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert any("torch.compile" in item for item in report_runtime.report.applied)
    assert pipe.unet.down_blocks[0]._compiled_call_impl is not None
    torch._dynamo.reset()


def test_optimizing_twice_wraps_the_pipeline_stages_once(pipe):
    first = runtime.optimize(pipe, backend=runtime.EagerGraphBackend(), verbose=False)
    second = runtime.optimize(
        pipe, backend=runtime.EagerGraphBackend(), max_graphs=2, verbose=False
    )
    assert pipe.runtime is second and len(first.cache) == 0
    assert second.eager_denoise.__func__ is type(pipe).denoise
    assert second.eager_decode_latents.__func__ is type(pipe).decode_latents


def test_vae_settings_are_part_of_the_vae_graph_keys(pipe):
    """Tiling, slicing and the latent scaling are decided on the host when a VAE graph is
    captured: changing one captures a new graph (it used to replay the old one, untiled)."""
    latents = torch.randn(1, 4, 8, 8)
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    want_decode, want_moments = pipe.decode_latents(latents), pipe.encode_moments(pixels)
    pipe.vae.enable_tiling(tile_size=4, overlap=1)
    want_tiled = pipe.decode_latents(latents)
    want_tiled_moments = pipe.encode_moments(pixels)
    pipe.vae.disable_tiling()
    assert not torch.allclose(want_tiled, want_decode, atol=1e-3)
    rt = runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    torch.testing.assert_close(pipe.decode_latents(latents), want_decode, atol=1e-5, rtol=0)
    torch.testing.assert_close(pipe.encode_moments(pixels), want_moments, atol=1e-5, rtol=0)
    pipe.vae.enable_tiling(tile_size=4, overlap=1)
    torch.testing.assert_close(pipe.decode_latents(latents), want_tiled, atol=1e-5, rtol=0)
    torch.testing.assert_close(pipe.encode_moments(pixels), want_tiled_moments, atol=1e-5, rtol=0)
    pipe.vae.disable_tiling()
    pipe.vae.config.scaling_factor *= 2
    eager = rt.eager_decode_latents(latents)
    torch.testing.assert_close(pipe.decode_latents(latents), eager, atol=1e-5, rtol=0)
    assert rt.cache.stats.captures == 5


def test_a_bad_attention_table_fails_before_optimize_changes_the_pipeline(pipe, monkeypatch):
    """The table is read first (on GPU: FASTDIFF_ATTENTION_CONFIGS's file or the shipped one):
    its error reaches the caller with the pipeline as it was, not half converted; with the eager
    backend forced the table is never read."""
    optimize_module = sys.modules["fastdiff.runtime.optimize"]  # the package exports optimize()

    def bad_table(device):
        raise ValueError("attention configs broken.json: expected an object with an 'entries' list")

    monkeypatch.setattr(optimize_module, "attention_configs_summary", bad_table)
    eager_denoise, dtypes = pipe.denoise, {p.dtype for p in pipe.unet.parameters()}
    with pytest.raises(ValueError, match="broken.json"):
        runtime.optimize(pipe, verbose=False)
    assert pipe.denoise == eager_denoise and getattr(pipe, "runtime", None) is None
    assert not any(module.fused for module in pipe.unet.attention_modules())
    assert {p.dtype for p in pipe.unet.parameters()} == dtypes
    monkeypatch.setenv("FASTDIFF_BACKEND", "eager")
    runtime.optimize(pipe, verbose=False)  # the table is not read
    assert runtime.optimize(pipe, kernels=False, verbose=False) is pipe.runtime


@pytest.mark.parametrize("share", [True, False], ids=["shared", "repeated"])
def test_guided_steps_pass_the_latents_once_unless_told_not_to(pipe, share):
    """optimize(share_guided_input=True), the default: the static loop's guided steps give the
    U-Net the latents once with the [uncond; cond] contexts, so conv_in runs on one row per
    image, as the eager pipeline does; False repeats them, as before. Both equal the eager
    sampler; the repeated rows within float32 rounding (the CPU's convolutions round
    differently at another batch)."""
    conditioning = text_conditioning()
    x_T = torch.randn(1, 4, 8, 8)
    want = eager_latents(pipe, conditioning, x_T, "ddim", 3)
    rt = runtime.optimize(
        pipe, backend=runtime.EagerGraphBackend(), share_guided_input=share, verbose=False
    )
    assert any("once for the [uncond; cond] halves" in line for line in rt.report.applied) == share
    rows = []
    hook = pipe.unet.conv_in.register_forward_pre_hook(
        lambda m, args: rows.append(args[0].shape[0])
    )
    try:
        got = pipe.denoise(conditioning, x_T, guidance_scale=7.5, sampler="ddim", steps=3)
    finally:
        hook.remove()
    assert set(rows) == {1 if share else 2}
    tolerance = 1e-5 if share else 1e-4
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
