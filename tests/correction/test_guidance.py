"""Calibration with conditioning and classifier-free guidance: the tables fit the guided estimate."""

from __future__ import annotations

import copy

import torch
from diffusers import DDIMScheduler
from torch import nn

from tacdiff.correction import CorrectedDenoiser, calibrate_tac
from tacdiff.metrics.paired import paired_errors
from tacdiff.models.kinds import ClassifierFreeGuidance, ModelDenoiser

from tiny_models import tiny_cond, tiny_model

SCALE, SAMPLES, STEPS = 3.0, 4, 3


def guided(model: nn.Module) -> ClassifierFreeGuidance:
    """Classifier-free guidance with a zero unconditional embedding."""
    return ClassifierFreeGuidance(ModelDenoiser(model), SCALE)


def test_guided_calibration_is_replayed_by_the_wrapper() -> None:
    fp = tiny_model("cond_unet", layers_per_block=1)
    shifted = copy.deepcopy(fp)
    with torch.no_grad():
        for param in shifted.parameters():
            param.mul_(1.03)
    text = tiny_cond("cond_unet", SAMPLES, seed=0)
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
