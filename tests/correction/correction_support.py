"""Shared constants and the tiny conditional UNet of the correction tests (the plain one is tiny_models.tiny_unet)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

SHAPE, STEPS, SAMPLES = (3, 16, 16), 6, 8


def make_tiny_cond_unet() -> UNet2DConditionModel:
    """A seeded text-conditioned UNet2DConditionModel (4x16x16 latents, 32-wide embeddings)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32).eval()
