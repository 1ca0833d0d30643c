"""A small CNN that names the shape and colour in a 32×32 image: the judge of generated samples.

Saved in its own tiny format: ``config.json`` (architecture + class names) and
``model.safetensors``. It is trained with additive-noise augmentation so that the slight grain of
generated samples does not count as a wrong class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fastdiff.files import atomic_write
from fastdiff.training.shapes import CLASS_NAMES, IMAGE_SIZE

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
NORM_GROUPS = 8  # GroupNorm groups of every conv stage: the width must be a multiple of it


class ShapeClassifier(nn.Module):
    """Three conv stages (32→16→8→4 pixels) then global average + max pooling and a linear head.

    Global pooling makes the prediction independent of where the shape sits in the frame.
    """

    def __init__(self, num_classes: int = len(CLASS_NAMES), width: int = 32) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.width = width
        channels = (3, width, 2 * width, 4 * width)
        layers: list[nn.Module] = []
        for index in range(3):
            layers += [
                nn.Conv2d(channels[index], channels[index + 1], 3, padding=1),
                nn.GroupNorm(NORM_GROUPS, channels[index + 1]),
                nn.SiLU(),
                nn.Conv2d(channels[index + 1], channels[index + 1], 3, padding=1),
                nn.SiLU(),
                nn.AvgPool2d(2),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * channels[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] for images [N, 3, 32, 32] in [-1, 1]."""
        if images.dim() != 4 or images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"ShapeClassifier expects images of shape [N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}], "
                f"got {tuple(images.shape)}"
            )
        features = self.features(images)
        pooled = torch.cat((features.mean(dim=(2, 3)), features.amax(dim=(2, 3))), dim=1)
        return self.head(pooled)


def classifier_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    noise_std: float,
) -> torch.Tensor:
    """Cross-entropy on images with Gaussian noise of a random strength in [0, noise_std]."""
    strength = (
        torch.rand((images.shape[0], 1, 1, 1), generator=generator, device=images.device)
        * noise_std
    )
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    return F.cross_entropy(model(images + strength * noise), labels)


@torch.no_grad()
def predict(model: ShapeClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class index per image."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        model(images[start : start + batch_size].to(device, torch.float32)).argmax(dim=1).cpu()
        for start in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(model: ShapeClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images classified as their label."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    return (predict(model, images) == labels.cpu()).float().mean().item()


def save_classifier(model: ShapeClassifier, folder: str | os.PathLike) -> None:
    """Write ``config.json`` + ``model.safetensors`` into ``folder`` (each file atomically)."""
    folder = Path(folder)
    config = {
        "architecture": "ShapeClassifier",
        "num_classes": model.num_classes,
        "width": model.width,
        "image_size": IMAGE_SIZE,
        "class_names": list(CLASS_NAMES),
    }
    weights = {
        key: value.detach().float().cpu().contiguous() for key, value in model.state_dict().items()
    }
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(weights, tmp))
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def load_classifier(
    folder: str | os.PathLike, device: str | torch.device = "cpu"
) -> ShapeClassifier:
    """Load a classifier written by ``save_classifier``."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.exists():
        raise FileNotFoundError(f"no classifier config at {config_path}")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("architecture") != "ShapeClassifier":
        raise ValueError(
            f"{config_path}: architecture must be 'ShapeClassifier', "
            f"got {config.get('architecture')!r}"
        )
    model = ShapeClassifier(num_classes=int(config["num_classes"]), width=int(config["width"]))
    state = load_file(str(folder / WEIGHTS_NAME))
    missing = sorted(set(model.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{folder}: classifier weights missing {missing}, unexpected {unexpected}")
    model.load_state_dict(state)
    return model.to(device).eval()
