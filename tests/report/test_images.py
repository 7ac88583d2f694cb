"""PNG images: the [-1, 1] -> uint8 mapping, the grid layout and byte-identical files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tacdiff.report.images import save_png, tile, to_uint8


def test_to_uint8_maps_the_range_ends_and_rounds() -> None:
    images = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0, -3.0]).view(1, 1, 2, 3)
    # 63.75 rounds to 64; 127.5 to 128 (half to even)
    assert to_uint8(images)[0, ..., 0].tolist() == [[0, 64, 128], [255, 255, 0]]
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)


def test_to_uint8_refuses_latents() -> None:
    with pytest.raises(ValueError, match=r"\(N, 1 or 3, H, W\), got \(1, 4, 8, 8\)"):
        to_uint8(torch.zeros(1, 4, 8, 8))


def test_tile_lays_images_out_row_by_row_with_white_gaps() -> None:
    pixels = np.stack([np.full((2, 3, 1), value, np.uint8) for value in (10, 20, 30)])
    grid = tile(pixels, columns=2, gap=1)
    assert grid.shape == (5, 7, 1)
    assert grid[0, 0, 0] == 10 and grid[0, 4, 0] == 20 and grid[3, 0, 0] == 30
    assert grid[2, :, 0].tolist() == [255] * 7 and grid[3, 4, 0] == 255  # gap row, empty last cell


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_png_round_trip_is_exact_and_byte_identical(tmp_path: Path, channels: int, mode: str) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, channels), dtype=np.uint8)
    first, second = save_png(pixels, tmp_path / "a.png"), save_png(pixels.copy(), tmp_path / "b.png")
    with Image.open(first) as image:
        assert image.mode == mode
        assert np.array_equal(np.asarray(image).reshape(5, 7, channels), pixels)
    assert first.read_bytes() == second.read_bytes()
