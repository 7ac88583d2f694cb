"""Real data: Fashion-MNIST (IDX files) and prompt sets (:mod:`tacdiff.data.prompts`)."""

from tacdiff.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, to_model_space, to_uint8

__all__ = ["FASHION_MNIST_CLASSES", "load_fashion_mnist", "to_model_space", "to_uint8"]
