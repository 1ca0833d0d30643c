"""Score a class-conditional pipeline with the shipped classifier: the fraction of generated
samples that the classifier assigns to the class they were conditioned on."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from fastdiff.training.classifier import ShapeClassifier, load_classifier, predict
from fastdiff.training.shapes import NUM_CLASSES, balanced_labels


def default_model_path() -> Path:
    """The pipeline folder shipped inside the package (``fastdiff/assets/default_model``)."""
    return Path(str(resources.files("fastdiff").joinpath("assets", "default_model")))


def load_pipeline_classifier(folder: str | Path) -> ShapeClassifier:
    """The classifier that ships beside a pipeline, in ``<folder>/classifier``."""
    return load_classifier(Path(folder) / "classifier")


def generate(
    pipe,
    labels: torch.Tensor,
    guidance_scale: float,
    steps: int = 20,
    seed: int = 0,
    sampler: str = "ddim",
) -> torch.Tensor:
    """One sample per label, images [N, 3, 32, 32] in [-1, 1] (float32, CPU).

    The initial noise depends only on ``seed`` and the batch size, so two calls that differ only
    in ``guidance_scale`` start from the same noise: a paired comparison.
    """
    images = pipe(
        class_labels=[int(label) for label in labels],
        guidance_scale=guidance_scale,
        num_inference_steps=steps,
        sampler=sampler,
        seed=seed,
        output_type="tensor",
        progress=False,
    )
    return images.float().cpu() * 2.0 - 1.0


def guidance_accuracy(
    pipe,
    classifier: ShapeClassifier,
    per_class: int,
    guidance_scales: tuple[float, ...] = (1.0, 3.0),
    steps: int = 20,
    seed: int = 0,
) -> dict[float, float]:
    """Classifier accuracy of ``per_class`` samples of every class at each guidance scale."""
    labels = balanced_labels(per_class)
    if pipe.num_classes != NUM_CLASSES:
        raise ValueError(f"the pipeline has {pipe.num_classes} classes, expected {NUM_CLASSES}")
    scores = {}
    for scale in guidance_scales:
        images = generate(pipe, labels, scale, steps=steps, seed=seed)
        scores[scale] = (predict(classifier, images) == labels).float().mean().item()
    return scores
