"""``tacdiff.models.loading``: schedulers built for what tacdiff feeds them."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DDPMScheduler

from tacdiff.models.loading import build_scheduler


def test_ddpm_with_a_learned_variance_samples_the_noise_estimate_with_a_fixed_one(caplog) -> None:
    """tacdiff hands schedulers the noise half of a learned-variance model's output, which DDPM's learned_range
    variance cannot step (it reads the other half)."""
    config = dict(DDPMScheduler(variance_type="learned_range").config)
    with caplog.at_level(logging.WARNING):
        scheduler = build_scheduler("ddpm", config)
    assert scheduler.config.variance_type == "fixed_small" and "learned_range" in caplog.text
    scheduler.set_timesteps(4)
    sample = torch.randn(2, 3, 8, 8)
    step = scheduler.step(torch.randn_like(sample), scheduler.timesteps[1], sample,
                          generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(step.prev_sample).all())


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_fixed_variances_are_kept(variance_type: str, caplog) -> None:
    config = dict(DDPMScheduler(variance_type=variance_type).config)
    with caplog.at_level(logging.WARNING):
        assert build_scheduler("ddpm", config).config.variance_type == variance_type
    assert caplog.text == ""
