"""Shared fixtures: tiny real diffusers UNets (seeded), their calibration sets and quantized copies.

Session-scoped fixtures are shared by many tests and must be treated as read-only; a test
that changes a model first takes ``copy.deepcopy`` of it (``quantize`` works in place).
The builders and helpers live in ``tiny_models.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

import tacdiff
from tiny_models import COND_SAMPLES, calibration_of, quantized_copy, tiny_cond, tiny_model
from tiny_pipelines import save_tiny_pipeline


@pytest.fixture(scope="session")
def unet() -> UNet2DModel:
    return tiny_model("unet")


@pytest.fixture(scope="session")
def cond_unet() -> UNet2DConditionModel:
    return tiny_model("cond_unet")


@pytest.fixture(scope="session")
def calibration(unet: UNet2DModel) -> tacdiff.CalibrationSet:
    return calibration_of(unet, seed=0)


@pytest.fixture(scope="session")
def held_out(unet: UNet2DModel) -> tacdiff.CalibrationSet:
    """Inputs from other seeds than the calibration set (noise and trajectories never seen)."""
    return calibration_of(unet, seed=1000)


@pytest.fixture(scope="session")
def cond_calibration(cond_unet: UNet2DConditionModel) -> tacdiff.CalibrationSet:
    return calibration_of(cond_unet, seed=0, num_samples=COND_SAMPLES,
                          cond=tiny_cond("cond_unet", COND_SAMPLES, seed=0))


@pytest.fixture(scope="session")
def cond_held_out(cond_unet: UNet2DConditionModel) -> tacdiff.CalibrationSet:
    return calibration_of(cond_unet, seed=1000, num_samples=COND_SAMPLES,
                          cond=tiny_cond("cond_unet", COND_SAMPLES, seed=1000))


@pytest.fixture(scope="session")
def w8a8(unet: UNet2DModel, calibration: tacdiff.CalibrationSet) -> nn.Module:
    return quantized_copy(unet, calibration, weight_bits=8, act_bits=8)


@pytest.fixture(scope="session")
def w4a8(unet: UNet2DModel, calibration: tacdiff.CalibrationSet) -> nn.Module:
    return quantized_copy(unet, calibration, weight_bits=4, act_bits=8)


@pytest.fixture(scope="session")
def w8a8_grouped(unet: UNet2DModel, calibration: tacdiff.CalibrationSet) -> nn.Module:
    """W8A8 with four timestep groups (and the default skip-concat splits)."""
    return quantized_copy(unet, calibration, weight_bits=8, act_bits=8, timestep_groups=4)


@pytest.fixture(scope="session")
def cond_w8a8(cond_unet: UNet2DConditionModel, cond_calibration: tacdiff.CalibrationSet) -> nn.Module:
    return quantized_copy(cond_unet, cond_calibration, weight_bits=8, act_bits=8)


@pytest.fixture(scope="session")
def cond_w8a8_grouped(cond_unet: UNet2DConditionModel, cond_calibration: tacdiff.CalibrationSet) -> nn.Module:
    return quantized_copy(cond_unet, cond_calibration, weight_bits=8, act_bits=8, timestep_groups=4)


@pytest.fixture(scope="session")
def w8a8_dynamic(unet: UNet2DModel) -> nn.Module:
    """W8A8 with run-time activation ranges (per token or per sample): quantized without calibration data."""
    return quantized_copy(unet, None, weight_bits=8, act_bits=8, act_range="dynamic")


@pytest.fixture(scope="session")
def w8a8_dynamic_gptq(unet: UNet2DModel, calibration: tacdiff.CalibrationSet) -> nn.Module:
    """The most accurate fast W8A8 recipe: run-time activation ranges and GPTQ-rounded weights."""
    return quantized_copy(unet, calibration, weight_bits=8, act_bits=8, act_range="dynamic", weight_rounding="gptq")


@pytest.fixture(scope="session")
def cond_w8a8_dynamic_gptq(cond_unet: UNet2DConditionModel, cond_calibration: tacdiff.CalibrationSet) -> nn.Module:
    return quantized_copy(cond_unet, cond_calibration, weight_bits=8, act_bits=8, act_range="dynamic",
                          weight_rounding="gptq")


@pytest.fixture(scope="session")
def w8a8_blocked(unet: UNet2DModel) -> nn.Module:
    """W8A8 with block-scaled run-time ranges: one per token and block of 32 channels in every layer input."""
    return quantized_copy(unet, None, weight_bits=8, act_bits=8, act_range="dynamic", act_block_size=32)


@pytest.fixture(scope="session")
def cond_w8a8_blocked(cond_unet: UNet2DConditionModel) -> nn.Module:
    return quantized_copy(cond_unet, None, weight_bits=8, act_bits=8, act_range="dynamic", act_block_size=32)


@pytest.fixture(scope="session")
def cond_w8a8_dynamic(cond_unet: UNet2DConditionModel) -> nn.Module:
    return quantized_copy(cond_unet, None, weight_bits=8, act_bits=8, act_range="dynamic")


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``pipeline_dir(name)``: the folder of ``TINY_PIPELINES[name]``, saved once per session (read-only)."""
    root, made = tmp_path_factory.mktemp("pipelines"), {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = save_tiny_pipeline(name, root / name)
        return made[name]

    return get
