"""fastdiff: latent diffusion end to end, with our own fused kernels on the hot paths.

Top-level names are imported lazily so that ``import fastdiff`` stays cheap and the layers below
(ops, sampling, models) never import the layers above them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "NoiseSchedule": "fastdiff.sampling",
    "diffusion_loss": "fastdiff.sampling",
    "sample": "fastdiff.sampling",
    "classifier_free_guidance": "fastdiff.sampling",
    "combine_guidance": "fastdiff.sampling",
    "Pipeline": "fastdiff.pipeline",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
