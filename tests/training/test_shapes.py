"""The procedural shapes dataset: deterministic, in range, and drawing what the label says."""

import pytest
import torch

from fastdiff.training.shapes import (
    BACKGROUND,
    CLASS_NAMES,
    COLORS,
    NUM_CLASSES,
    SHAPES,
    balanced_labels,
    class_label,
    make_shapes,
)


def test_same_seed_same_images_other_seed_other_images():
    images, labels = make_shapes(64, seed=3)
    again, again_labels = make_shapes(64, seed=3)
    other, _ = make_shapes(64, seed=4)
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    assert not torch.equal(images, other)


def test_shapes_range_and_labels():
    images, labels = make_shapes(200, seed=0)
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert labels.min() >= 0 and labels.max() < NUM_CLASSES
    assert len(set(labels.tolist())) == NUM_CLASSES  # 200 draws cover all 12 classes


def test_label_names_and_mapping():
    assert NUM_CLASSES == len(SHAPES) * len(COLORS) == len(CLASS_NAMES)
    assert class_label("circle", "red") == 0
    assert CLASS_NAMES[class_label("cross", "blue")] == "blue cross"
    with pytest.raises(ValueError, match="allowed values"):
        class_label("hexagon", "red")
    with pytest.raises(ValueError, match="allowed values"):
        class_label("circle", "purple")


def test_pixels_have_the_class_colour_and_shape_area():
    labels = balanced_labels(8)
    images, drawn = make_shapes(labels.numel(), seed=1, labels=labels)
    assert torch.equal(drawn, labels)
    pixels = (images + 1) / 2
    background = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
    inside = (pixels - background).abs().amax(dim=1) > 0.3  # fully covered pixels
    palette = torch.tensor(list(COLORS.values()))
    areas = {}
    for index in range(labels.numel()):
        mask = inside[index]
        assert mask.sum() > 20, "every image shows its shape"
        # The median ignores the anti-aliased rim: interior pixels are exactly the class colour.
        colour = pixels[index][:, mask].median(dim=1).values
        expected = palette[labels[index] % len(COLORS)]
        assert torch.allclose(colour, expected, atol=1e-5)
        shape = SHAPES[labels[index] // len(COLORS)]
        bounding = mask.nonzero()
        box = (bounding.max(0).values - bounding.min(0).values + 1).prod().item()
        areas.setdefault(shape, []).append(mask.sum().item() / box)
    fill = {shape: sum(values) / len(values) for shape, values in areas.items()}
    # Fraction of the bounding box covered: square ~1, circle ~pi/4, cross and triangle ~1/2.
    assert fill["square"] > 0.9
    assert 0.65 < fill["circle"] < 0.85
    assert fill["triangle"] < 0.6 and fill["cross"] < 0.65


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="labels has 3 entries"):
        make_shapes(4, seed=0, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\]"):
        make_shapes(2, seed=0, labels=torch.tensor([0, 12]))
    with pytest.raises(ValueError, match="num_images"):
        make_shapes(-1, seed=0)
