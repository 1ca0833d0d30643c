"""The procedural "shapes" dataset: 32×32 RGB images of one coloured shape on a plain background.

Every image is a pure function of a seed, so the dataset needs no download and any run can be
reproduced exactly. Shapes are drawn from signed distances (negative inside), and the pixel
coverage ``clamp(0.5 - distance, 0, 1)`` gives one pixel of anti-aliasing for free, fully
vectorised over the batch.

Class label = ``shape_index * len(COLORS) + color_index``; images are float32 in [-1, 1].
"""

from __future__ import annotations

import torch

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.10, 0.72, 0.18),
    "blue": (0.15, 0.30, 0.95),
}
BACKGROUND = (0.93, 0.93, 0.90)
IMAGE_SIZE = 32
NUM_CLASSES = len(SHAPES) * len(COLORS)
CLASS_NAMES = tuple(f"{color} {shape}" for shape in SHAPES for color in COLORS)

# Half-size range in pixels: small enough to move around, large enough to stay recognisable
# after the VAE's 4x downsampling.
MIN_HALF_SIZE = 6.0
MAX_HALF_SIZE = 12.0


def class_label(shape: str, color: str) -> int:
    """The class index of a shape/colour pair, e.g. ``class_label("circle", "red") == 0``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; allowed values: {', '.join(SHAPES)}")
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; allowed values: {', '.join(COLORS)}")
    return SHAPES.index(shape) * len(COLORS) + list(COLORS).index(color)


def _box_distance(dx: torch.Tensor, dy: torch.Tensor, half_x, half_y) -> torch.Tensor:
    # Chebyshev-style box distance: exact inside and on the edges, which is all the 1-pixel
    # anti-aliasing band needs.
    return torch.maximum(dx.abs() - half_x, dy.abs() - half_y)


def shape_distance(shape_index: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, half):
    """Signed distance (pixels, negative inside) of every pixel to each image's shape.

    ``shape_index`` and ``half`` are [N, 1, 1]; ``dx``/``dy`` are pixel offsets from the shape
    centre, [N, H, W]. All four shapes are evaluated and the right one is picked per image, which
    keeps the code branch-free (the images are tiny, so the extra work is negligible).
    """
    circle = torch.sqrt(dx * dx + dy * dy) - half
    # Squares and crosses are scaled so their areas are close to the circle's.
    square = _box_distance(dx, dy, 0.85 * half, 0.85 * half)
    arm = 0.36 * half
    cross = torch.minimum(_box_distance(dx, dy, half, arm), _box_distance(dx, dy, arm, half))
    # Upward triangle: apex at (0, -half), base at y = +0.8 half; intersection of 3 half-planes.
    top, base = -1.05 * half, 0.8 * half
    slope = 0.62  # half-width grows by this much per pixel going down
    # Distance to a side line |dx| = slope * (dy - top), normalised by the line's length factor.
    side = (dx.abs() - slope * (dy - top)) / (1.0 + slope * slope) ** 0.5
    triangle = torch.maximum(torch.maximum(side, dy - base), top - dy)
    stacked = torch.stack((circle, square, triangle, cross))  # [4, N, H, W]
    index = shape_index.view(1, -1, 1, 1).expand(1, *circle.shape)
    return stacked.gather(0, index).squeeze(0)


def make_shapes(
    num_images: int, seed: int, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``num_images`` images: returns (images [N, 3, 32, 32] in [-1, 1], labels [N]).

    Labels are drawn uniformly unless given. The same (num_images, seed, labels) always gives the
    same tensors, on every machine (CPU generator, float32 arithmetic).
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    generator = torch.Generator().manual_seed(int(seed))
    drawn_labels = torch.randint(0, NUM_CLASSES, (num_images,), generator=generator)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() != num_images:
            raise ValueError(f"labels has {labels.numel()} entries, expected {num_images}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(f"labels must lie in [0, {NUM_CLASSES - 1}]")
    else:
        labels = drawn_labels
    uniform = torch.rand((num_images, 3), generator=generator)
    half = MIN_HALF_SIZE + (MAX_HALF_SIZE - MIN_HALF_SIZE) * uniform[:, 0]
    # Keep the whole shape inside the frame (with a 1-pixel margin).
    margin = half + 1.0
    span = IMAGE_SIZE - 2.0 * margin
    center_x = margin + span * uniform[:, 1]
    center_y = margin + span * uniform[:, 2]

    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    dx = coords.view(1, 1, -1) - center_x.view(-1, 1, 1)
    dy = coords.view(1, -1, 1) - center_y.view(-1, 1, 1)
    shape_index = labels // len(COLORS)
    distance = shape_distance(shape_index, dx, dy, half.view(-1, 1, 1))
    coverage = (0.5 - distance).clamp(0.0, 1.0).unsqueeze(1)  # [N, 1, H, W]

    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)  # [colors, 3]
    color = palette[labels % len(COLORS)].view(-1, 3, 1, 1)
    background = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1)
    image = background + coverage * (color - background)
    return image * 2.0 - 1.0, labels


def balanced_labels(per_class: int) -> torch.Tensor:
    """``per_class`` copies of every class label in class order: [0]*k + [1]*k + ..."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    return torch.arange(NUM_CLASSES).repeat_interleave(per_class)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [N, H, W, 3] for PIL."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous()
