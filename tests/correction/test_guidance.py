"""Calibration with conditioning and classifier-free guidance: the tables fit the guided estimate."""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers import DDIMScheduler
from torch import Tensor, nn

from tacdiff.correction import CorrectedDenoiser, calibrate_tac
from tacdiff.metrics.paired import paired_errors
from tacdiff.sampling.loop import Denoiser

from tiny_models import tiny_cond_unet

SCALE, SAMPLES, STEPS = 3.0, 4, 3


def guided(model: nn.Module) -> Denoiser:
    """Classifier-free guidance with a zero unconditional embedding, both halves in one call."""

    def denoise(x: Tensor, t: Tensor, encoder_hidden_states: Tensor, **_: Any) -> Tensor:
        both = torch.cat([torch.zeros_like(encoder_hidden_states), encoder_hidden_states])
        uncond, cond = model(torch.cat([x, x]), t, encoder_hidden_states=both, return_dict=False)[0].chunk(2)
        return uncond + SCALE * (cond - uncond)

    return denoise


def test_guided_calibration_is_replayed_by_the_wrapper() -> None:
    fp = tiny_cond_unet(layers_per_block=1)
    shifted = copy.deepcopy(fp)
    with torch.no_grad():
        for param in shifted.parameters():
            param.mul_(1.03)
    text = {"encoder_hidden_states": torch.randn(SAMPLES, 7, 32, generator=torch.Generator().manual_seed(0))}
    run = dict(num_inference_steps=STEPS, num_samples=SAMPLES, seed=0, cond=text, progress=False, denoiser=guided)
    tables = calibrate_tac(fp, shifted, DDIMScheduler(), batch_size=SAMPLES, **run)
    chunked = calibrate_tac(fp, shifted, DDIMScheduler(), batch_size=3, **run)
    assert torch.allclose(chunked.out_scale, tables.out_scale, rtol=1e-4)
    assert (tables.out_scale != 1).all() and tables.input_bias[1:].abs().sum() > 0
    seen = paired_errors(guided(fp), CorrectedDenoiser(guided(shifted), tables), DDIMScheduler(), num_samples=SAMPLES,
                         sample_shape=(4, 16, 16), num_inference_steps=STEPS, seed=0, batch_size=SAMPLES, cond=text,
                         progress=False)
    assert seen.input_bias.abs().max() < 1e-6, "the replay removes mu_t from the latents, as calibration did"
    plain = paired_errors(guided(fp), guided(shifted), DDIMScheduler(), num_samples=SAMPLES,
                          sample_shape=(4, 16, 16), num_inference_steps=STEPS, seed=0, batch_size=SAMPLES,
                          cond=text, progress=False)
    assert seen.eps_sq_err.sum() < plain.eps_sq_err.sum()
