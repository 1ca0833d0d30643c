"""Text- and class-conditional latent diffusion pipelines read from diffusers-format folders.

``Pipeline.from_pretrained(folder)(prompt=...)`` -> images. The modules: ``components`` (reading a
folder), ``text_encoding`` (CLIP prompts), ``conditioning`` (U-Net inputs), ``denoising`` (the
sampling loop, img2img start step), ``images`` (conversions, grids, atomic PNG writes),
``vae_scaling`` (VAE latents <-> diffusion latents), ``call_arguments`` (checks of the call's
plain arguments), ``pipeline`` (the ``Pipeline`` class). ``Pipeline`` is imported on first use so
that the light helpers (``images``) load without the models and samplers.
"""

from __future__ import annotations

__all__ = ["Pipeline"]


def __getattr__(name: str):
    if name == "Pipeline":
        from fastdiff.pipeline.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'fastdiff.pipeline' has no attribute {name!r}")
