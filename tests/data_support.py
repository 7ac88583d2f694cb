"""A small real Fashion-MNIST subset written as IDX files, for training tests (skipped without the dataset)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
import torch

from tacdiff.data.fashion_mnist import DEFAULT_DATA_DIR, load_fashion_mnist


def fashion_subset(root: Path, count: int, splits: tuple[str, ...] = ("train",)) -> Path:
    """The first ``count`` images and labels of each split, as ``<split>-images/labels-idx?-ubyte.gz`` in ``root``."""
    if not (DEFAULT_DATA_DIR / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"Fashion-MNIST missing at {DEFAULT_DATA_DIR} on CI")
        pytest.skip("dataset-fashion-mnist not installed")
    for split in splits:
        images, labels = load_fashion_mnist(split)
        prefix = "train" if split == "train" else "t10k"
        for name, magic, array in ((f"{prefix}-images-idx3-ubyte.gz", 2051, images[:count]),
                                   (f"{prefix}-labels-idx1-ubyte.gz", 2049, labels[:count].to(torch.uint8))):
            header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
            with gzip.open(root / name, "wb", compresslevel=1) as f:
                f.write(header + array.numpy().tobytes())
    return root
