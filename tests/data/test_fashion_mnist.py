"""Fashion-MNIST IDX loader: real files, corrupt copies, missing files."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tacdiff.data import FASHION_MNIST_CLASSES, load_fashion_mnist, to_model_space, to_uint8
from tacdiff.data.fashion_mnist import DEFAULT_DATA_DIR

NAMES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(scope="module")
def real_dir() -> Path:
    """The installed dataset; skipped locally when absent, a failure on CI."""
    if not (DEFAULT_DATA_DIR / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"Fashion-MNIST missing at {DEFAULT_DATA_DIR} on CI: "
                        "apt-get install dataset-fashion-mnist")
        pytest.skip("dataset-fashion-mnist not installed")
    return DEFAULT_DATA_DIR


def write_idx(path: Path, magic: int, shape: tuple[int, ...], payload: bytes) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


def write_split(root: Path, n_images: int = 5, n_labels: int = 5, *, image_magic: int = 2051,
                image_payload: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    size = n_images * 28 * 28 if image_payload is None else image_payload
    write_idx(root / NAMES[0], image_magic, (n_images, 28, 28), rng.integers(0, 256, size, np.uint8).tobytes())
    write_idx(root / NAMES[1], 2049, (n_labels,), rng.integers(0, 10, n_labels, np.uint8).tobytes())
    return root


@pytest.mark.parametrize(("split", "count"), [("train", 60000), ("test", 10000)])
def test_real_files(real_dir: Path, split: str, count: int) -> None:
    images, labels = load_fashion_mnist(split, real_dir)
    assert images.shape == (count, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (count,) and labels.dtype == torch.int64
    assert labels.min() == 0 and labels.max() == len(FASHION_MNIST_CLASSES) - 1
    assert torch.bincount(labels).tolist() == [count // 10] * 10
    assert 0 < images.float().mean() < 255


def test_synthetic_roundtrip(tmp_path: Path) -> None:
    images, labels = load_fashion_mnist("test", write_split(tmp_path))
    assert images.shape == (5, 28, 28) and labels.shape == (5,)
    x = to_model_space(images)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(to_uint8(x), images)


def test_wrong_magic(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"t10k-images.*magic number 2049, expected 2051"):
        load_fashion_mnist("test", write_split(tmp_path, image_magic=2049))


def test_truncated_payload(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"t10k-images.*payload size mismatch"):
        load_fashion_mnist("test", write_split(tmp_path, image_payload=4 * 28 * 28 + 10))


def test_count_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has 5 images but .* has 4 labels"):
        load_fashion_mnist("test", write_split(tmp_path, n_labels=4))


def test_truncated_gzip_of_real_file(real_dir: Path, tmp_path: Path) -> None:
    shutil.copy(real_dir / NAMES[0], tmp_path / NAMES[0])
    raw = (real_dir / NAMES[1]).read_bytes()
    (tmp_path / NAMES[1]).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="t10k-labels.*not a readable gzip"):
        load_fashion_mnist("test", tmp_path)


def test_missing_dir_hints_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*data_dir"):
        load_fashion_mnist("train", tmp_path / "nope")


def test_bad_split() -> None:
    with pytest.raises(ValueError, match="split must be"):
        load_fashion_mnist("val")  # type: ignore[arg-type]
