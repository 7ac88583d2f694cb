"""Prompt accuracy on real test images with known answers."""

from __future__ import annotations

import os

import pytest
import torch

from tacdiff.data.fashion_mnist import DEFAULT_DATA_DIR, load_fashion_mnist, to_model_space
from tacdiff.metrics.prompt_accuracy import prompt_accuracy, to_classifier_shape


@pytest.fixture(scope="module")
def test_images() -> tuple[torch.Tensor, torch.Tensor]:
    if not (DEFAULT_DATA_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"Fashion-MNIST missing at {DEFAULT_DATA_DIR} on CI")
        pytest.skip("dataset-fashion-mnist not installed")
    images, labels = load_fashion_mnist("test")
    return to_model_space(images[:1000]), labels[:1000].long()


def test_real_images_with_their_own_labels_score_high_and_shuffled_ones_low(test_images) -> None:
    images, labels = test_images
    right = prompt_accuracy(images, labels)
    wrong = prompt_accuracy(images, (labels + 1) % 10)
    assert right["overall"] > 0.85 and wrong["overall"] < 0.1
    assert all(value is not None and value > 0.5 for value in right["per_class"])


def test_padded_images_are_cropped_back_to_the_classifier_and_unprompted_classes_are_none(test_images) -> None:
    images, labels = test_images
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), value=-1.0)  # as the latent pipeline's 32x32 images
    assert torch.equal(to_classifier_shape(padded), images)
    only = labels == 7
    scores = prompt_accuracy(padded[only], labels[only])
    assert scores["per_class"][7] == scores["overall"] and scores["per_class"][0] is None


def test_one_label_per_image() -> None:
    with pytest.raises(ValueError, match="one label per image"):
        prompt_accuracy(torch.zeros(3, 1, 28, 28), [0, 1])
