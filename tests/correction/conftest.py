"""Fixtures for the correction tests: a tiny real UNet2DModel, its W4A8 copy and DDIM tables (read-only)."""

from __future__ import annotations

import copy

import pytest
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import nn

import tacdiff
from tacdiff.correction import CorrectionTables, calibrate_tac

from correction_support import SAMPLES, STEPS
from tiny_models import tiny_model


@pytest.fixture(scope="session")
def fp_unet() -> UNet2DModel:
    return tiny_model("unet")


@pytest.fixture(scope="session")
def w4a8_unet(fp_unet: UNet2DModel) -> nn.Module:
    calibration = tacdiff.collect_calibration_set(fp_unet, DDPMScheduler(), num_samples=8, num_inference_steps=10,
                                                  kept_steps=5, progress=False)
    return tacdiff.quantize(copy.deepcopy(fp_unet), tacdiff.QuantConfig(weight_bits=4, act_bits=8), calibration,
                            progress=False)


@pytest.fixture(scope="session")
def ddim_tables(fp_unet: UNet2DModel, w4a8_unet: nn.Module) -> CorrectionTables:
    """TAC with element-wise IBC on the sampler state (the defaults)."""
    return calibrate_tac(fp_unet, w4a8_unet, DDIMScheduler(), num_inference_steps=STEPS, num_samples=SAMPLES,
                         batch_size=SAMPLES, seed=0, progress=False)


@pytest.fixture(scope="session")
def ddim_input_tables(fp_unet: UNet2DModel, w4a8_unet: nn.Module) -> CorrectionTables:
    """TAC with per-channel IBC on the network input only (a pure UNet wrapper, usable inside diffusers pipelines)."""
    return calibrate_tac(fp_unet, w4a8_unet, DDIMScheduler(), num_inference_steps=STEPS, num_samples=SAMPLES,
                         batch_size=SAMPLES, seed=0, ibc="channel", ibc_target="input", progress=False)
