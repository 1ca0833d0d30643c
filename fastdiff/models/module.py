"""Conveniences shared by the U-Net and the VAE: dtype/device, fused projections, config."""

from __future__ import annotations

import torch
from torch import nn

from fastdiff.models.attention import Attention


class ModelBase(nn.Module):
    """Base of the top-level models: ``config``, ``dtype``, ``device``, ``fuse_qkv_projections``."""

    config: object

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the first floating-point parameter (what the model computes in)."""
        for param in self.parameters():
            if param.is_floating_point():
                return param.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        for param in self.parameters():
            return param.device
        return torch.device("cpu")

    def fuse_qkv_projections(self) -> int:
        """Fuse the projections of every attention module; returns how many modules were fused."""
        count = 0
        for module in self.modules():
            if isinstance(module, Attention) and not module.fused:
                module.fuse_projections()
                count += 1
        return count

    def fold_conv_biases(self, enabled: bool = True) -> int:
        """Switch the blocks that can do additions inside other work (ResNet blocks: convolution
        biases and time embeddings; transformer blocks: residuals; transformer projections; see
        their ``fold_biases``) to doing so, or back. The weights' values are untouched, so the
        state dict stays the checkpoint's. Returns how many blocks have something to fold
        (whether a fold applies to a call also depends on its input's layout)."""
        blocks = [module for module in self.modules() if hasattr(type(module), "fold_biases")]
        for module in blocks:
            module.fold_biases = enabled
        return sum(module.has_bias_folds for module in blocks)

    def attention_modules(self) -> list[Attention]:
        return [module for module in self.modules() if isinstance(module, Attention)]

    def save_pretrained(self, folder, dtype: torch.dtype | None = None, variant: str | None = None):
        """Write a diffusers component folder (see ``fastdiff.models.save_pretrained``)."""
        from fastdiff.models.loading import save_pretrained

        return save_pretrained(self, folder, dtype=dtype, variant=variant)
