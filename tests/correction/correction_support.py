"""Shared constants and the tiny real UNet of the correction tests."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

SHAPE, STEPS, SAMPLES = (3, 16, 16), 6, 8


def make_tiny_unet() -> UNet2DModel:
    """A seeded two-level UNet2DModel with attention, 3x16x16 samples."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
