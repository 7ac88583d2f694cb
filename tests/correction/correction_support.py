"""Shared constants and the paired-error helper of the correction tests (tiny models: tests/tiny_models.py)."""

from __future__ import annotations

from diffusers import SchedulerMixin
from torch import nn

from tacdiff.correction import CorrectedUNet, state_correction
from tacdiff.metrics.paired import PairedErrors, paired_errors
from tacdiff.sampling import unet_denoiser

SHAPE, STEPS = (3, 16, 16), 6
SAMPLES = 64  # calibration trajectories: element-wise IBC (768 means per step) overfits 8 or 32 on fresh seeds


def errors_against_fp(fp: nn.Module, model: nn.Module, scheduler: SchedulerMixin, *, sample_shape: tuple[int, ...],
                      steps: int, seed: int, num_samples: int) -> PairedErrors:
    """Paired errors of ``model`` against ``fp`` in one batch; a :class:`CorrectedUNet` gets its state hook."""
    hook = state_correction([None, model]) if isinstance(model, CorrectedUNet) else None
    return paired_errors(unet_denoiser(fp), unet_denoiser(model), scheduler, num_samples=num_samples,
                         sample_shape=sample_shape, num_inference_steps=steps, seed=seed, batch_size=num_samples,
                         correct_states=hook, progress=False)
