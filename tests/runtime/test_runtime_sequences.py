"""Sequences of calls on one optimized pipeline against the eager pipeline: what one call leaves
behind (static buffers, cached plans, remembered failures) must not change the next one's result,
and what the eager loop refuses the runtime refuses too."""

from __future__ import annotations

import pytest
import torch

import fastdiff.runtime as runtime
from fastdiff.pipeline.conditioning import Conditioning
from tests.runtime.conftest import tiny_pipeline
from tests.runtime.fake_graph import RecordingGraphBackend


def guided_conditioning(batch: int) -> Conditioning:
    def part():
        return {"encoder_hidden_states": torch.randn(batch, 7, 32)}

    return Conditioning(part(), part())


@pytest.mark.parametrize("share", [True, False], ids=["shared", "repeated"])
def test_a_guided_condition_of_another_batch_than_the_latents_is_refused(pipe, share):
    """One prompt's [uncond; cond] with two latents: the eager loop refuses it. With the latents
    passed once for both halves (share_guided_input) the runtime's U-Net read the two rows as
    one context per latent, and the step took that output as unguided: latent 0 denoised by
    the negative prompt alone, latent 1 by the prompt at scale 1, without an error. Refused
    before anything is captured, so the shape is not marked as a failed capture either."""
    conditioning, x_T = guided_conditioning(1), torch.randn(2, 4, 8, 8)
    kwargs = dict(guidance_scale=5.0, steps=2, progress=False)
    message = "the condition has batch size 1 but x_t has batch size 2"
    with pytest.raises(ValueError, match=message):
        pipe.denoise(conditioning, x_T, **kwargs)
    rt = runtime.optimize(
        pipe, backend=runtime.EagerGraphBackend(), share_guided_input=share, verbose=False
    )
    with pytest.raises(ValueError, match=message):
        pipe.denoise(conditioning, x_T, **kwargs)
    assert rt.cache.stats.captures == 0 and not rt.denoiser.eager_fallbacks


def img2img_call(seed: int) -> dict:
    """An img2img call's arguments, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(1, 7, 32, generator=generator),
        negative_prompt_embeds=torch.randn(1, 7, 32, generator=generator),
        image=torch.rand(1, 3, 16, 16, generator=generator),
        strength=0.7,
        sampler="euler_ancestral",
        num_inference_steps=4,
        output_type="tensor",
        progress=False,
        seed=seed,
    )


def test_generations_inside_and_outside_inference_mode_share_the_graphs(pipe):
    """A first generation under torch.inference_mode() built the graphs' static buffers (the
    latents, the condition, the projections prepared ahead, the VAE graphs' inputs and outputs)
    as inference tensors: the next generation outside it failed ("Inplace update to inference
    tensor outside InferenceMode"), where the eager pipeline runs. The graphs are built of
    normal tensors, whichever mode the call that captures them runs in."""
    wanted = [pipe(**img2img_call(seed)) for seed in (1, 2)]
    rt = runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    with torch.inference_mode():
        torch.testing.assert_close(pipe(**img2img_call(1)), wanted[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pipe(**img2img_call(2)), wanted[1], rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(pipe(**img2img_call(1)), wanted[0], rtol=1e-5, atol=1e-5)
    kinds = sorted(key.kind for key in rt.cache.entries)
    assert kinds == ["loop", "vae", "vae-encode"] and rt.cache.stats.captures == 3


def test_autocast_is_part_of_the_graph_keys():
    """torch.autocast decides on the host which ops run in bfloat16: a graph captured under it
    replays those casts. The keys had no autocast, so a generation after one under autocast
    replayed its bfloat16 graphs (and one under autocast after a plain one the float32 graphs).
    Each mode gets its graphs (the loop's and the decoder's) and replays them. Without the
    folds, so that no context projected ahead (whose dtype the key has) tells the modes apart."""
    pipe = tiny_pipeline()
    kwargs = {**img2img_call(3), "sampler": "ddim", "num_inference_steps": 3}
    del kwargs["image"], kwargs["strength"]
    want = pipe(**kwargs)
    rt = runtime.optimize(pipe, backend=RecordingGraphBackend(), fold_biases=False, verbose=False)
    results = []
    for autocast in (True, False, True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results.append(pipe(**kwargs))
    cast, plain, cast_again, plain_again = results
    for got in (plain, plain_again):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (cast - want).abs().max() > 1e-3  # it ran in bfloat16
    torch.testing.assert_close(cast_again, cast, rtol=0, atol=0)
    assert sorted(key.kind for key in rt.cache.entries) == ["loop", "loop", "vae", "vae"]
    assert rt.cache.stats.captures == 4 and rt.cache.stats.hits == 4


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(compile_mode="bogus"), "Unrecognized mode=bogus"),
        (dict(compile_mode="default", compile_backend="bogus"), "Invalid backend: 'bogus'"),
    ],
    ids=["mode", "backend"],
)
def test_a_bad_compile_option_fails_before_optimize_changes_the_pipeline(pipe, options, message):
    """torch.compile's mode and backend were first checked when the U-Net's blocks were
    compiled, after the weights were cast and fused and the previous runtime dropped: a typo
    left the pipeline half converted and without its graphs. Now refused up front, with the
    pipeline and its runtime as they were."""
    rt = runtime.optimize(pipe, backend=runtime.EagerGraphBackend(), fuse_qkv=False, verbose=False)
    optimized_denoise = pipe.denoise
    with pytest.raises(Exception, match=message):
        runtime.optimize(pipe, backend=runtime.EagerGraphBackend(), verbose=False, **options)
    assert pipe.runtime is rt and pipe.denoise == optimized_denoise
    assert not any(module.fused for module in pipe.unet.attention_modules())
    assert pipe.unet.down_blocks[0]._compiled_call_impl is None


def test_a_starting_state_the_eager_loop_refuses_is_refused(pipe):
    """The eager loop refuses integer latents and a start with NaN or inf (given latents, or
    init latents diffused to an img2img start): the runtime returned int64 latents, or NaNs."""
    conditioning = guided_conditioning(1)
    nan = torch.randn(1, 4, 8, 8)
    nan[0, 1, 2, 3] = float("nan")
    inf = torch.randn(1, 4, 8, 8)
    inf[0, 2, 3, 4] = float("inf")
    cases = [
        (torch.randint(-2, 3, (1, 4, 8, 8)), {}, "x_T must be a floating-point tensor"),
        (nan, {}, "contains NaN or inf"),
        (torch.randn(1, 4, 8, 8), dict(init_latents=inf, start_step=1), "contains NaN or inf"),
    ]
    kwargs = dict(guidance_scale=5.0, steps=3, progress=False)
    for x_T, extra, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe.denoise(conditioning, x_T, **kwargs, **extra)
    runtime.optimize(pipe, backend=runtime.EagerGraphBackend(), verbose=False)
    for x_T, extra, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe.denoise(conditioning, x_T, **kwargs, **extra)


def test_a_pipeline_call_skips_the_host_synchronising_start_check(pipe, monkeypatch):
    """The runtime's finiteness check of the start syncs with the host; ``pipe(...)`` draws its
    start itself or checks the given latents, so it tells the runtime so, and a NaN check runs
    only on what the call was given."""
    runtime.optimize(pipe, backend=runtime.EagerGraphBackend(), verbose=False)
    checked = []
    isfinite = torch.isfinite

    def counting_isfinite(tensor):
        if tensor.shape == (1, 4, 8, 8):  # the latents' (the plan's host-side table aside)
            checked.append(tuple(tensor.shape))
        return isfinite(tensor)

    monkeypatch.setattr(torch, "isfinite", counting_isfinite)
    embeds = dict(prompt_embeds=torch.randn(1, 7, 32), negative_prompt_embeds=torch.randn(1, 7, 32))
    pipe(**embeds, num_inference_steps=2, output_type="tensor", progress=False)
    assert checked == []  # text-to-image from its own noise: nothing to check
    with pytest.raises(ValueError, match="latents contain NaN or inf"):
        pipe(**embeds, latents=torch.full((1, 4, 8, 8), torch.nan), progress=False)
    assert len(checked) == 1  # the given latents, once
