"""Calibration with conditioning and classifier-free guidance: the tables fit the guided estimate."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from tacdiff.correction import CorrectedDenoiser, calibrate_tac
from tacdiff.metrics.paired import paired_errors
from tacdiff.models.kinds import ClassifierFreeGuidance, ModelDenoiser
from tacdiff.sampling.conditioning import Conditioning, tensor_conditioning

from tiny_models import tiny_cond, tiny_model

SCALE, SAMPLES, STEPS = 3.0, 4, 3


def guided(model: nn.Module) -> ClassifierFreeGuidance:
    """Classifier-free guidance with a zero unconditional embedding."""
    return ClassifierFreeGuidance(ModelDenoiser(model), SCALE)


def fp_and_shifted() -> tuple[nn.Module, nn.Module]:
    """The tiny text-conditioned UNet and a copy with every weight 3% larger (a stand-in quantized model)."""
    fp = tiny_model("cond_unet", layers_per_block=1)
    shifted = copy.deepcopy(fp)
    with torch.no_grad():
        for param in shifted.parameters():
            param.mul_(1.03)
    return fp, shifted


def test_guided_calibration_is_replayed_by_the_wrapper() -> None:
    fp, shifted = fp_and_shifted()
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


def test_per_branch_fit_is_replayed_inside_guidance() -> None:
    """``guidance_fit="branch"``: one K_t per guidance branch, applied to each half of the guided batch;
    sampling with the tables retraces the calibration trajectories (no bias left at any step)."""
    fp, shifted = fp_and_shifted()
    text = tiny_cond("cond_unet", SAMPLES, seed=0)
    conditioning = Conditioning(tensor_conditioning(text).rows, SCALE)  # zero unconditional embedding, as guided()
    tables = calibrate_tac(fp, shifted, DDIMScheduler(), num_inference_steps=STEPS, num_samples=SAMPLES,
                           batch_size=SAMPLES, seed=0, cond=conditioning, progress=False, guidance_fit="branch")
    assert tables.per_branch and tables.out_scale.shape == (STEPS, 2, 4)
    assert (tables.out_scale[:, 0] - tables.out_scale[:, 1]).abs().max() > 1e-3, "the branches get their own K_t"
    assert tables.metadata["hyperparameters"]["guidance_fit"] == "branch"
    corrected = ClassifierFreeGuidance(CorrectedDenoiser(ModelDenoiser(shifted), tables), SCALE)
    seen = paired_errors(guided(fp), corrected, DDIMScheduler(), num_samples=SAMPLES, sample_shape=(4, 16, 16),
                         num_inference_steps=STEPS, seed=0, batch_size=SAMPLES, cond=text, progress=False)
    assert seen.input_bias.abs().max() < 1e-6
    with pytest.raises(ValueError, match="one output correction per guidance branch"):
        CorrectedDenoiser(guided(shifted), tables)  # would correct the guided estimate: not what the tables hold
    unguided = CorrectedDenoiser(ModelDenoiser(shifted), tables)  # no guidance around it: an odd batch has no halves
    t = torch.tensor(float(tables.timesteps[0]))
    with pytest.raises(ValueError, match="one output correction per guidance branch"):
        unguided(torch.randn(3, 4, 16, 16), t, encoder_hidden_states=text["encoder_hidden_states"][:3])


def test_per_branch_fit_needs_guidance() -> None:
    fp = tiny_model("cond_unet", layers_per_block=1)
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        calibrate_tac(fp, fp, DDIMScheduler(), num_inference_steps=2, num_samples=2,
                      cond=tiny_cond("cond_unet", 2, seed=0), progress=False, guidance_fit="branch")
