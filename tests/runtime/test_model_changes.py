"""A model swapped or cast on an optimized pipeline: the graphs captured before read the old
model's weights (a real CUDA graph their freed memory), so the next call must capture anew,
never replay them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastdiff.runtime as runtime
from tests.runtime.conftest import tiny_pipeline, with_folds
from tests.runtime.fake_graph import RecordingGraphBackend


def text_to_image(seed: int = 5) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(1, 7, 32, generator=generator),
        negative_prompt_embeds=torch.randn(1, 7, 32, generator=generator),
        sampler="ddim",
        num_inference_steps=3,
        height=16,
        width=16,
        output_type="tensor",
        progress=False,
        seed=seed,
    )


def other_vae():
    from model_configs import model_config

    from fastdiff.models import AutoencoderKL

    torch.manual_seed(99)
    return AutoencoderKL(model_config("tiny_vae")).eval()


def test_a_replaced_vae_decodes_with_its_own_weights():
    pipe = with_folds(tiny_pipeline())
    rt = runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    first = pipe(**text_to_image())
    new = other_vae()
    reference = with_folds(tiny_pipeline())
    reference.vae = other_vae()
    want = reference(**text_to_image())
    assert (want - first).abs().max() > 1e-2  # the two VAEs decode differently
    pipe.vae = new
    got = pipe(**text_to_image())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sorted(key.kind for key in rt.cache.entries).count("vae") == 2


def test_a_vae_cast_after_optimize_decodes_in_its_new_dtype():
    pipe = with_folds(tiny_pipeline())
    runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    pipe(**text_to_image())
    pipe.vae.to(torch.float64)
    reference = with_folds(tiny_pipeline())
    reference.vae.to(torch.float64)
    want = reference(**text_to_image())
    got = pipe(**text_to_image())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_a_replaced_unet_denoises_with_its_own_weights(fold):
    """Folded, the condition prepared ahead names the packed projections it came from, which
    told the two U-Nets apart by chance; unfolded nothing did."""
    pipe = tiny_pipeline()
    options = dict(backend=RecordingGraphBackend(), fold_biases=fold, verbose=False)
    runtime.optimize(pipe, **options)
    pipe(**text_to_image())
    new = tiny_pipeline()
    with torch.no_grad():
        for p in new.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # prepared as optimize() prepares a U-Net (fused projections, packed context weights), so
    # nothing but its weights tells it from the one the graphs were captured with
    runtime.optimize(new, **{**options, "backend": RecordingGraphBackend()})
    want = new(**text_to_image())
    pipe.unet = new.unet
    got = pipe(**text_to_image())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_weights_loaded_in_place_replay_the_graphs_captured():
    """The addresses in the keys do not cost a capture where the memory stays: a state dict
    loaded into the VAE is read by the graph already captured (tests/pipeline/test_lora.py has
    the U-Net's case)."""
    pipe = with_folds(tiny_pipeline())
    rt = runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    pipe(**text_to_image())
    reference = with_folds(tiny_pipeline())
    reference.vae = other_vae()
    pipe.vae.load_state_dict(reference.vae.state_dict())
    got = pipe(**text_to_image())
    torch.testing.assert_close(got, reference(**text_to_image()), rtol=1e-5, atol=1e-5)
    assert rt.cache.stats.captures == 2 and rt.cache.stats.hits == 2


def test_weights_written_through_data_are_used_after_optimizing_again():
    """``.data`` writes move no version counter, so the upsamplers' summed weights (derived from
    the convolutions') stayed the old ones even after optimize() again: a wrong image. Optimizing
    again derives them anew, as its docstring says to do."""
    pipe = tiny_pipeline()
    options = dict(upsample_fold="transposed", fold_biases=False, verbose=False)
    runtime.optimize(pipe, backend=RecordingGraphBackend(), **options)
    pipe(**text_to_image())
    other = tiny_pipeline()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in other.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    want = other(**text_to_image())
    weights = other.unet.state_dict()
    for name, p in pipe.unet.state_dict(keep_vars=True).items():
        p.data.copy_(weights[name])
    runtime.optimize(pipe, backend=RecordingGraphBackend(), **options)
    torch.testing.assert_close(pipe(**text_to_image()), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output_type", ["pil", "np"])
def test_a_diverged_optimized_generation_is_refused_not_returned_as_black(output_type):
    """The eager loop stops at a step whose model output is NaN; the optimized runtime checks
    no step (each check a host sync), so NaN latents decoded to NaN pixels and PIL output became
    a black image without an error. The images copied to the host are checked there."""
    pipe = with_folds(tiny_pipeline())
    runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    kwargs = {**text_to_image(), "output_type": output_type}
    kwargs["prompt_embeds"] = torch.full_like(kwargs["prompt_embeds"], float("nan"))
    with pytest.raises(RuntimeError, match="the generated images contain NaN or inf"):
        pipe(**kwargs)
    good = pipe(**{**text_to_image(), "output_type": output_type})  # the runtime goes on
    assert len(good) == 1 and np.isfinite(np.asarray(good[0], dtype=np.float32)).all()
