"""Review findings on ``Pipeline.__call__``'s call semantics, each compared with diffusers or with
the refusal a sibling argument already gets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdiff.pipeline import Pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pipe(sd_folder):
    return Pipeline.from_pretrained(sd_folder)


@pytest.mark.parametrize("eta", ["0.5", True], ids=["string", "bool"])
def test_an_eta_that_is_not_a_number_is_refused(pipe, eta):
    """guidance_scale="7.5" and guidance_rescale="0.5" are refused, naming the argument; eta went
    through float() in the plan, so eta="0.5" sampled DDIM at 0.5 and eta=True at 1.0 without a
    word."""
    with pytest.raises(ValueError, match="eta must be a number in"):
        pipe("a cat", eta=eta, sampler="ddim", num_inference_steps=2, progress=False)


def test_numpy_integer_sizes_are_accepted(pipe):
    """height / width computed with numpy (np.int64) were refused ("height must be a positive
    int, got np.int64(16)"), where num_inference_steps and seed take numpy integers and diffusers
    takes them all."""
    common = dict(prompt="a cat", num_inference_steps=2, seed=0, output_type="latent")
    ours = pipe(**common, height=np.int64(16), width=np.int64(24), progress=False)
    torch.testing.assert_close(ours, pipe(**common, height=16, width=24, progress=False))


def test_a_numpy_integer_num_images_is_accepted(sd_folder):
    """num_images=np.int64(2) was refused ("num_images must be a positive int") where height,
    width, num_inference_steps and seed take numpy integers."""
    pipe = Pipeline.from_pretrained(sd_folder)
    kwargs = dict(height=16, width=16, num_inference_steps=1, progress=False, seed=1)
    got = pipe("a cat", num_images=np.int64(2), output_type="latent", **kwargs)
    torch.testing.assert_close(got, pipe("a cat", num_images=2, output_type="latent", **kwargs))
