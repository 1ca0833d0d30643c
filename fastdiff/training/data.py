"""The fixed training and held-out sets every stage uses, rendered once from the data seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdiff.training.config import DataConfig
from fastdiff.training.shapes import make_shapes

# The held-out set comes from a seed the training set can never use.
HELD_OUT_SEED_OFFSET = 1_000_000_007


@dataclass
class ShapesData:
    images: torch.Tensor  # [N, 3, 32, 32] in [-1, 1]
    labels: torch.Tensor  # [N]
    held_out_images: torch.Tensor
    held_out_labels: torch.Tensor

    @classmethod
    def from_config(cls, config: DataConfig) -> ShapesData:
        images, labels = make_shapes(config.num_images, config.seed)
        held_images, held_labels = make_shapes(
            config.held_out_images, config.seed + HELD_OUT_SEED_OFFSET
        )
        return cls(images, labels, held_images, held_labels)

    def to(self, device: torch.device) -> ShapesData:
        return ShapesData(
            self.images.to(device),
            self.labels.to(device),
            self.held_out_images.to(device),
            self.held_out_labels.to(device),
        )
