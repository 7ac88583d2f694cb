"""Prompt accuracy: how often the bundled Fashion-MNIST classifier assigns an image to the class its prompt
named, the text-to-image analogue of a CLIP score for this domain."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tacdiff.data.fashion_mnist import to_canvas
from tacdiff.metrics.fid import IMAGE_SHAPE, FeatureExtractor, load_feature_extractor


def to_classifier_shape(images: Tensor) -> Tensor:
    """``(N, 1, H, W)`` images in [-1, 1] centre-cropped (or padded with background) to 28x28."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W) grayscale, got {tuple(images.shape)}")
    return to_canvas(images, IMAGE_SHAPE[-1])


@torch.no_grad()
def prompt_accuracy(images: Tensor, labels: Sequence[int] | Tensor, *, extractor: FeatureExtractor | None = None,
                    batch_size: int = 500) -> dict[str, float | list[float | None]]:
    """The fraction of ``images`` (``(N, 1, H, W)`` in [-1, 1]) that the classifier assigns to ``labels[i]``,
    the class image ``i``'s prompt named: ``overall`` and ``per_class`` (None for classes never prompted)."""
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"need one label per image: {images.shape[0]} images, labels of shape {tuple(labels.shape)}")
    classifier = (extractor or load_feature_extractor()).classifier
    device = next(classifier.parameters()).device
    predicted = torch.cat([classifier(to_classifier_shape(batch).float().to(device)).argmax(1).cpu()
                           for batch in images.split(batch_size)])
    correct = (predicted == labels).float()
    classes = classifier.head.out_features
    per_class = [float(correct[labels == c].mean()) if bool((labels == c).any()) else None for c in range(classes)]
    return {"overall": float(correct.mean()), "per_class": per_class}
