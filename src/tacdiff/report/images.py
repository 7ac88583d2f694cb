"""Images on disk: model outputs in [-1, 1] as 8-bit PNG files (byte-identical for identical pixels)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_CHANNELS = (1, 3)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` images in [-1, 1] (C = 1 or 3) as ``(N, H, W, C)`` uint8, rounded to nearest."""
    if images.ndim != 4 or images.shape[1] not in IMAGE_CHANNELS:
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    scaled = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def tile(pixels: np.ndarray, columns: int = 8, gap: int = 2) -> np.ndarray:
    """``(N, H, W, C)`` uint8 images laid out row by row, ``columns`` wide, on a white background."""
    count, height, width, channels = pixels.shape
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    canvas = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, channels), 255, np.uint8)
    for index, image in enumerate(pixels):
        top, left = (index // columns) * (height + gap), (index % columns) * (width + gap)
        canvas[top:top + height, left:left + width] = image
    return canvas


def save_png(pixels: np.ndarray, path: str | Path) -> Path:
    """Write one ``(H, W, C)`` uint8 image as PNG (no timestamps or other varying metadata)."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    image.save(path, format="PNG")
    return Path(path)
