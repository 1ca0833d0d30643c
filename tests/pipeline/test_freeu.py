"""FreeU through the pipeline against diffusers' ``enable_freeu``, and through the runtime's
graphs (the setting is part of their key)."""

from __future__ import annotations

import pytest
import torch

from fastdiff.pipeline import Pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

FREEU = dict(s1=0.9, s2=0.2, b1=1.2, b2=1.4)


def test_freeu_pipeline_equals_diffusers(sd_folder):
    pipe = Pipeline.from_pretrained(sd_folder)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red cat", height=16, width=16, num_inference_steps=3)
    kwargs |= dict(latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    plain = pipe(**kwargs, output_type="tensor", progress=False)
    pipe.enable_freeu(**FREEU)
    reference.enable_freeu(**FREEU)
    theirs = reference(**kwargs, output_type="pt").images
    ours = pipe(**kwargs, output_type="tensor", progress=False)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (ours - plain).abs().max() > 1e-3


def test_freeu_switched_after_optimize_captures_its_own_graphs(sd_folder):
    import fastdiff.runtime as runtime
    from tests.runtime.fake_graph import RecordingGraphBackend

    pipe = Pipeline.from_pretrained(sd_folder)
    pipe.unet.fold_conv_biases(True)  # as optimize() leaves it, so eager does the same sums
    kwargs = dict(prompt="a cat", height=16, width=16, num_inference_steps=3, seed=1)
    kwargs |= dict(output_type="tensor", progress=False)
    plain = pipe(**kwargs)
    pipe.enable_freeu(**FREEU)
    with_freeu = pipe(**kwargs)
    pipe.disable_freeu()
    rt = runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    torch.testing.assert_close(pipe(**kwargs), plain, atol=1e-5, rtol=0)
    pipe.enable_freeu(**FREEU)
    torch.testing.assert_close(pipe(**kwargs), with_freeu, atol=1e-5, rtol=0)
    pipe.disable_freeu()
    torch.testing.assert_close(pipe(**kwargs), plain, atol=1e-5, rtol=0)
    loops = [key for key in rt.cache.entries if key.kind == "loop"]
    assert len(loops) == 2  # one per FreeU setting; the third call replayed the first
