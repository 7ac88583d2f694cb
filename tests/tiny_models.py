"""Tiny real diffusers UNets (seeded), calibration sets and SQNR helpers shared by the tests.

Imported by ``tests/conftest.py`` (the fixtures) and by test modules; a module name of its
own, since ``from conftest import ...`` would be ambiguous beside ``tests/correction/conftest.py``.
"""

from __future__ import annotations

import copy

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from torch import nn

import tacdiff

# 8 DDIM steps over 1000 training steps visit t = 875, 750, ..., 0: two timesteps in every
# quarter of [0, 1000), so four timestep groups all get calibration data.
NUM_SAMPLES, NUM_STEPS = 8, 8
COND_SAMPLES = 4  # the conditional model is the slow one to quantize (its range search dominates)
TEXT_TOKENS, TEXT_DIM = 7, 32


def tiny_unet() -> UNet2DModel:
    """A seeded two-level UNet2DModel with attention in the second level (0.7M parameters)."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()


def tiny_cond_unet(layers_per_block: int = 2) -> UNet2DConditionModel:
    """A seeded text-conditioned UNet2DConditionModel with cross-attention transformer blocks (4x16x16 latents,
    32-wide text embeddings)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=layers_per_block, sample_size=16,
                                in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32).eval()


def text_embeddings(count: int, seed: int) -> dict[str, torch.Tensor]:
    """Random stand-ins for text-encoder outputs, ``(count, TEXT_TOKENS, TEXT_DIM)``."""
    generator = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(count, TEXT_TOKENS, TEXT_DIM, generator=generator)}


def calibration_of(model: nn.Module, seed: int, **kwargs: object) -> tacdiff.CalibrationSet:
    """``NUM_SAMPLES`` DDIM trajectories of ``NUM_STEPS`` steps, every step kept."""
    settings = dict(num_samples=NUM_SAMPLES, num_inference_steps=NUM_STEPS, kept_steps=NUM_STEPS, seed=seed,
                    progress=False)
    return tacdiff.collect_calibration_set(model, DDPMScheduler(), **{**settings, **kwargs})


def quantized_copy(model: nn.Module, calibration: tacdiff.CalibrationSet | None, **config: object) -> nn.Module:
    """A quantized deep copy of ``model``; the original stays full precision."""
    return tacdiff.quantize(copy.deepcopy(model), tacdiff.QuantConfig(**config), calibration, progress=False)


@torch.no_grad()
def outputs(model: nn.Module, data: tacdiff.CalibrationSet) -> torch.Tensor:
    """The model's outputs over ``data`` in the set's own order (one forward per timestep)."""
    out = torch.empty_like(data.x)
    for t in torch.unique(data.timesteps):
        index = torch.nonzero(data.timesteps == t).flatten()
        cond = {k: v[index] for k, v in data.cond.items()}
        out[index] = model(data.x[index], data.timesteps[index], **cond).sample
    return out


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - approx|^2)`` in dB."""
    noise = (reference - approximation).double().pow(2).sum()
    return (10 * torch.log10(reference.double().pow(2).sum() / noise)).item()
