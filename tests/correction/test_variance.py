"""PTQD's variance-schedule calibration on diffusers DDPM/DDIM: reduced noise, identity at zero residual."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, UNet2DModel
from torch import nn

from tacdiff.correction import CorrectedDenoiser, CorrectedUNet, CorrectionTables, calibrate_ptqd
from tacdiff.correction.variance import ptqd_variance_scheduler
from tacdiff.models.kinds import ModelDenoiser
from tacdiff.sampling import run_trajectories, sample_noise

from correction_support import SHAPE

STEPS = 4


@pytest.fixture(scope="module")
def ddpm_tables(fp_unet: UNet2DModel, w4a8_unet: nn.Module) -> CorrectionTables:
    return calibrate_ptqd(fp_unet, w4a8_unet, DDPMScheduler(), num_inference_steps=STEPS, num_samples=4,
                          batch_size=4, seed=0, progress=False)


def test_ddpm_variance_is_reduced_by_the_residual(ddpm_tables: CorrectionTables) -> None:
    assert (ddpm_tables.residual_var > 0).all()
    base = DDPMScheduler()
    base.set_timesteps(STEPS)
    calibrated = ptqd_variance_scheduler(DDPMScheduler(), ddpm_tables, STEPS)
    calibrated.set_timesteps(STEPS)
    for t, v in zip(base.timesteps[:-1], ddpm_tables.residual_var[:-1]):
        reduced, original = calibrated._get_variance(int(t)), base._get_variance(int(t))
        assert reduced < original
        prev = base.previous_timestep(int(t))
        abar_t, abar_prev = base.alphas_cumprod[int(t)], base.alphas_cumprod[prev]
        coeff = abar_prev.sqrt() * (1 - abar_t / abar_prev) / ((1 - abar_t).sqrt() * abar_t.sqrt())
        assert reduced.item() == pytest.approx(max(original.item() - coeff.item() ** 2 * v.item(), 1e-20), rel=1e-5)


@pytest.mark.parametrize("scheduler", [DDPMScheduler(), DDIMScheduler()], ids=lambda s: type(s).__name__)
def test_zero_residual_changes_nothing(fp_unet: UNet2DModel, w4a8_unet: nn.Module, ddpm_tables: CorrectionTables,
                                       scheduler: DDPMScheduler | DDIMScheduler) -> None:
    tables = dataclasses.replace(ddpm_tables, residual_var=torch.zeros_like(ddpm_tables.residual_var),
                                 scheduler_class=type(scheduler).__name__)
    noise, den = sample_noise(SHAPE, 0, 2, seed=3), CorrectedDenoiser(ModelDenoiser(w4a8_unet), tables)
    run = dict(num_inference_steps=STEPS, seed=3, progress=False)
    plain = run_trajectories([den], scheduler, noise, **run)[0]
    calibrated = run_trajectories([den], ptqd_variance_scheduler(scheduler, tables, STEPS), noise, **run)[0]
    assert torch.equal(plain, calibrated)


def test_ddim_pipeline_with_eta_samples_with_less_noise(w4a8_unet: nn.Module, ddpm_tables: CorrectionTables) -> None:
    tables = dataclasses.replace(ddpm_tables, scheduler_class="DDIMScheduler")
    scheduler = ptqd_variance_scheduler(DDIMScheduler(), tables, STEPS)
    pipe = DDIMPipeline(unet=CorrectedUNet(w4a8_unet, tables), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=STEPS, eta=1.0, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 3)
    scheduler.set_timesteps(STEPS)
    t, prev = int(scheduler.timesteps[0]), int(scheduler.timesteps[1])
    scheduler._ptqd_eta = 1.0
    assert scheduler._get_variance(t, prev) < DDIMScheduler()._get_variance(t, prev)


def test_unsupported_or_mismatched_schedulers_raise(ddpm_tables: CorrectionTables) -> None:
    with pytest.raises(ValueError, match="supports DDPMScheduler, DDIMScheduler"):
        ptqd_variance_scheduler(EulerDiscreteScheduler(), ddpm_tables, STEPS)
    with pytest.raises(ValueError, match="variance_type"):
        ptqd_variance_scheduler(DDPMScheduler(variance_type="learned"), ddpm_tables, STEPS)
    with pytest.raises(ValueError, match="correction tables are for"):
        ptqd_variance_scheduler(DDPMScheduler(), ddpm_tables, STEPS + 1)
