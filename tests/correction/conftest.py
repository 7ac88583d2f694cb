"""Fixtures for the correction tests: a tiny real UNet2DModel, its W4A8 copy and DDIM tables (read-only)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import nn

import tacdiff
from tacdiff.correction import CorrectionTables, calibrate_tac

SHAPE, STEPS, SAMPLES = (3, 16, 16), 6, 8


def make_tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()


@pytest.fixture(scope="session")
def fp_unet() -> UNet2DModel:
    return make_tiny_unet()


@pytest.fixture(scope="session")
def w4a8_unet(fp_unet: UNet2DModel) -> nn.Module:
    calibration = tacdiff.collect_calibration_set(fp_unet, DDPMScheduler(), num_samples=8, num_inference_steps=10,
                                                  kept_steps=5, progress=False)
    return tacdiff.quantize(copy.deepcopy(fp_unet), tacdiff.QuantConfig(weight_bits=4, act_bits=8), calibration,
                            progress=False)


@pytest.fixture(scope="session")
def ddim_tables(fp_unet: UNet2DModel, w4a8_unet: nn.Module) -> CorrectionTables:
    return calibrate_tac(fp_unet, w4a8_unet, DDIMScheduler(), num_inference_steps=STEPS, num_samples=SAMPLES,
                         batch_size=4, seed=0, progress=False)
