"""Tiny real diffusers models, each kind declared once (diffusers' tester-config style), calibration sets and
SQNR helpers shared by the tests.

Imported by ``tests/conftest.py`` (the fixtures) and by test modules; a module name of its
own, since ``from conftest import ...`` would be ambiguous beside ``tests/correction/conftest.py``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers import (DDPMScheduler, DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel,
                       UNet2DConditionModel, UNet2DModel)
from diffusers.models.attention_processor import Attention
from torch import nn

import tacdiff
from tacdiff.quant.attention import MATMUL_OPERANDS, quant_processor
from tacdiff.quant.layers import ActQuantizer, TimestepRouter

# 8 DDIM steps over 1000 training steps visit t = 875, 750, ..., 0: two timesteps in every
# quarter of [0, 1000), so four timestep groups all get calibration data.
NUM_SAMPLES, NUM_STEPS = 8, 8
COND_SAMPLES = 4  # the conditional model is the slow one to quantize (its range search dominates)
TEXT_TOKENS, TEXT_DIM, POOLED_DIM, TIME_IDS_DIM = 7, 32, 32, 8

_CONV_UNET = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                  norm_num_groups=8)
_COND_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
                  attention_head_dim=8, norm_num_groups=32)

TINY_MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    # two levels, attention in the second (0.7M parameters), 3x16x16
    "unet": (UNet2DModel, dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                               layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                               up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)),
    # convolutions only, 3x8x8
    "conv_unet": (UNet2DModel, _CONV_UNET),
    # learned variance: noise and variance channels, 6 outputs for 3x8x8 inputs
    "variance_unet": (UNet2DModel, {**_CONV_UNET, "out_channels": 6}),
    # class-conditional (10 classes), 3x8x8
    "class_unet": (UNet2DModel, {**_CONV_UNET, "block_out_channels": (32, 32), "num_class_embeds": 10}),
    # text-conditioned, cross-attention transformer blocks, 4x16x16 latents, 32-wide embeddings
    "cond_unet": (UNet2DConditionModel, _COND_UNET),
    # SDXL-style: text embeddings plus added_cond_kwargs (pooled text embeddings and time ids)
    "sdxl_unet": (UNet2DConditionModel, {**_COND_UNET, "layers_per_block": 1, "addition_embed_type": "text_time",
                                         "addition_time_embed_dim": TIME_IDS_DIM,
                                         "projection_class_embeddings_input_dim": POOLED_DIM + 6 * TIME_IDS_DIM}),
    # SimpleCrossAttn blocks: attention with added key/value projections of the text (its own processor)
    "added_kv_unet": (UNet2DConditionModel, {**_COND_UNET, "block_out_channels": (32, 32), "layers_per_block": 1,
                                             "sample_size": 8, "norm_num_groups": 8,
                                             "down_block_types": ("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
                                             "up_block_types": ("UpBlock2D", "SimpleCrossAttnUpBlock2D"),
                                             "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}),
    # class-conditional DiT (adaLN-Zero), 4x8x8 latents in 2x2 patches, learned variance (8 output channels)
    "dit": (DiTTransformer2DModel, dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)),
    # PixArt: adaLN-single, cross-attention to 32-wide caption embeddings, learned variance
    "pixart": (PixArtTransformer2DModel, dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                              num_attention_heads=3, caption_channels=TEXT_DIM, in_channels=4,
                                              cross_attention_dim=24, out_channels=8, attention_bias=True,
                                              activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                              norm_type="ada_norm_single", norm_elementwise_affine=False,
                                              norm_eps=1e-6, use_additional_conditions=False)),
    # SD3's MMDiT: joint attention over image and text tokens, pooled text projections, flow matching
    "sd3": (SD3Transformer2DModel, dict(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=TEXT_DIM,
                                        pooled_projection_dim=POOLED_DIM, out_channels=4)),
}


def tiny_model(name: str, **overrides: Any) -> nn.Module:
    """``TINY_MODELS[name]`` built from seed 0 in eval mode; ``overrides`` replace config entries."""
    cls, config = TINY_MODELS[name]
    torch.manual_seed(0)
    return cls(**{**config, **overrides}).eval()


def tiny_cond(name: str, count: int, seed: int) -> dict[str, Any]:
    """Seeded stand-in conditioning for ``count`` samples of ``TINY_MODELS[name]`` (empty when unconditional):
    text-encoder outputs ``(count, TEXT_TOKENS, TEXT_DIM)``, for SDXL ``added_cond_kwargs``, for SD3 pooled
    projections, for DiT class labels."""
    generator = torch.Generator().manual_seed(seed)
    if name == "dit":
        return {"class_labels": torch.randint(10, (count,), generator=generator)}
    if TINY_MODELS[name][0] not in (UNet2DConditionModel, PixArtTransformer2DModel, SD3Transformer2DModel):
        return {}
    cond: dict[str, Any] = {"encoder_hidden_states": torch.randn(count, TEXT_TOKENS, TEXT_DIM, generator=generator)}
    if name == "sd3":
        cond["pooled_projections"] = torch.randn(count, POOLED_DIM, generator=generator)
    if name == "sdxl_unet":
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(count, POOLED_DIM, generator=generator),
                                     "time_ids": torch.randn(count, 6, generator=generator)}
    return cond


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
        out[index] = model(data.x[index], data.timesteps[index], **data.cond_of(index)).sample
    return out


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - approx|^2)`` in dB."""
    noise = (reference - approximation).double().pow(2).sum()
    return (10 * torch.log10(reference.double().pow(2).sum() / noise)).item()


def with_quant_processors(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose attention modules run tacdiff's quantizing processors behind uncalibrated
    (pass-through) operand quantizers: what tacdiff's attention computes with every quantizer off."""
    model = copy.deepcopy(model)
    router = TimestepRouter()
    for attn in (m for m in model.modules() if isinstance(m, Attention)):
        processor = quant_processor(attn)
        for operand in MATMUL_OPERANDS:
            attn.add_module(operand, ActQuantizer(8, False, router))
        attn.set_processor(processor)
    return model


def attention_with_ranges(heads: int, head_dim: int, bits: int = 8, dynamic: bool = False) -> Attention:
    """A diffusers ``Attention`` whose operand quantizers have static ranges [-3, 3] (q, k), [-2.5, 3.5] (v: its
    zero point is not centred) and [0, 1] (probabilities), or per-sample dynamic ones."""
    attn = Attention(query_dim=heads * head_dim, heads=heads, dim_head=head_dim)
    router = TimestepRouter()
    ranges = {"q_quant": (-3.0, 3.0), "k_quant": (-3.0, 3.0), "v_quant": (-2.5, 3.5), "probs_quant": (0.0, 1.0)}
    for operand, (lo, hi) in ranges.items():
        quantizer = ActQuantizer(bits, False, router, dynamic=dynamic)
        quantizer.set_ranges(torch.tensor([[lo]]), torch.tensor([[hi]]))
        attn.add_module(operand, quantizer)
    return attn
