"""Conveniences shared by the U-Net and the VAE: dtype/device, fused projections, config."""

from __future__ import annotations

import torch
from torch import nn

from fastdiff.models.attention import Attention
from fastdiff.models.upsample_fold import AUTO, check_mode


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
        """Fuse the projections of every attention module (those with a hooked, patched or
        wrapped projection stay unfused); returns how many modules were fused."""
        count = 0
        for module in self.modules():
            if isinstance(module, Attention) and not module.fused and module.fuse_projections():
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

    def fold_upsampling(self, mode: str | None = "transposed") -> int:
        """Run every ``Upsample2D``'s doubling and 3x3 convolution as one convolution over the
        small map (``mode`` "transposed" or "phases"; "auto": per call, whichever the backend
        table measured fastest at its shape, the two steps where nothing was; None switches
        back; see ``fastdiff.models.upsample_fold``). The weights' values are untouched: the
        summed ones are derived beside them (a fixed mode's now, in the weights' final dtype
        and layout; under "auto" at the first call that picks a mode, which in a captured
        runtime is a warm-up run ahead of the capture). Returns how many upsamplers there are."""
        from fastdiff.models.resnet import Upsample2D

        check_mode(mode)
        upsamplers = [module for module in self.modules() if isinstance(module, Upsample2D)]
        for module in upsamplers:
            module.set_fold(mode)
            for folded in module.folds.values():  # switched on again: derived anew (``.data``)
                folded.forget()
            weight = getattr(module.conv, "weight", None)  # none: a wrapped conv, two steps
            if mode is not None and mode != AUTO and isinstance(weight, torch.Tensor):
                module.folded_for(mode).get(weight)
        # Kept for refresh_folded_weights, which runs before every graph replay.
        self.folded_upsamplers = upsamplers if mode is not None else []
        return len(upsamplers)

    def refresh_folded_weights(self, force: bool = False) -> int:
        """Derive the upsamplers' folded weights again, in place, where their source weights
        changed since (a LoRA fused into them, say): a captured graph reads the folded ones and
        runs no Python to notice. ``force``: all of them, changed or not; needed after writing
        through ``weight.data``, which no version counter sees. Returns how many were derived
        again."""
        count = 0
        for module in getattr(self, "folded_upsamplers", ()):
            weight = getattr(module.conv, "weight", None)
            if not isinstance(weight, torch.Tensor):
                continue  # a wrapped convolution: its calls run the two steps
            for folded in module.folds.values():
                if folded.tensor is None:
                    continue  # derived at its next call, before any capture reads it
                if force:
                    folded.forget()
                key = folded.source_key(weight)
                if key is not None and key != folded.key:  # untracked: the call runs two steps
                    folded.get(weight)
                    count += 1
        return count

    def folded_weight_bytes(self) -> int:
        """Memory held by the upsamplers' folded weights (beside the checkpoint's)."""
        return sum(
            folded.nbytes()
            for module in getattr(self, "folded_upsamplers", ())
            for folded in module.folds.values()
        )

    def attention_modules(self) -> list[Attention]:
        return [module for module in self.modules() if isinstance(module, Attention)]

    def save_pretrained(self, folder, dtype: torch.dtype | None = None, variant: str | None = None):
        """Write a diffusers component folder (see ``fastdiff.models.save_pretrained``)."""
        from fastdiff.models.loading import save_pretrained

        return save_pretrained(self, folder, dtype=dtype, variant=variant)
