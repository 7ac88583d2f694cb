"""Fashion-MNIST from its IDX files (Debian package ``dataset-fashion-mnist``), parsed by hand."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np
import torch

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049  # unsigned byte data, 3 dims / 1 dim
_IMAGE_SIDE = 28


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one gzipped IDX file of unsigned bytes; check magic, header and payload size."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file not found: {path}. Install it with "
            "`apt-get install dataset-fashion-mnist` or pass data_dir, a folder with the four *-ubyte.gz "
            "files.")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable gzip file ({err})") from err
    if len(raw) < 4:
        raise ValueError(f"{path}: file too short for an IDX header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: wrong IDX magic number {found}, expected {magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{path}: payload size mismatch: header {shape} needs {expected} bytes, "
                         f"file has {len(raw)} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(split: Literal["train", "test"] = "train",
                       data_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one Fashion-MNIST split.

    Args:
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).
        data_dir: folder with the four ``*-ubyte.gz`` files; defaults to
            ``/usr/share/datasets/fashion-mnist`` (Debian ``dataset-fashion-mnist``).

    Returns:
        ``images`` uint8 ``(N, 28, 28)`` in 0..255 and ``labels`` int64 ``(N,)`` in 0..9.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    image_path, label_path = (root / name for name in _FILES[split])
    images = _read_idx(image_path, _IMAGES_MAGIC)
    labels = _read_idx(label_path, _LABELS_MAGIC)
    if images.shape[1:] != (_IMAGE_SIDE, _IMAGE_SIDE):
        raise ValueError(f"{image_path}: images are {images.shape[1:]}, expected (28, 28)")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_path} has {images.shape[0]} images but {label_path} has "
                         f"{labels.shape[0]} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{label_path}: label {int(labels.max())} out of range 0..9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 images ``(N, 28, 28)`` in 0..255 to float32 ``(N, 1, 28, 28)`` in [-1, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_model_space expects uint8 images, got {images.dtype}")
    return images.unsqueeze(1).to(torch.float32).div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_model_space`: float ``(N, 1, H, W)`` in [-1, 1] (clipped) to uint8 ``(N, H, W)``."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"to_uint8 expects (N, 1, H, W), got {tuple(x.shape)}")
    return x.squeeze(1).clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)


def to_canvas(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, C, H, W)`` images in [-1, 1] centred on a ``size`` x ``size`` canvas: padded with background
    (-1) where smaller, centre-cropped where larger."""
    pad_h, pad_w = size - images.shape[-2], size - images.shape[-1]
    if pad_h >= 0 and pad_w >= 0:
        return torch.nn.functional.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2),
                                       value=-1.0)
    top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
    return images[..., top:top + size, left:left + size]
