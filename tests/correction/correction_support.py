"""Shared constants and the paired-error helper of the correction tests (tiny models: tests/tiny_models.py)."""

from __future__ import annotations

from diffusers import SchedulerMixin
from torch import nn

from tacdiff.correction import CorrectedDenoiser, CorrectionTables
from tacdiff.metrics.paired import PairedErrors, paired_errors
from tacdiff.models.kinds import ModelDenoiser

SHAPE, STEPS = (3, 16, 16), 6
SAMPLES = 64  # calibration trajectories: element-wise IBC (768 means per step) overfits 8 or 32 on fresh seeds


def errors_against_fp(fp: nn.Module, model: nn.Module, scheduler: SchedulerMixin, *, sample_shape: tuple[int, ...],
                      steps: int, seed: int, num_samples: int, tables: CorrectionTables | None = None) -> PairedErrors:
    """Paired errors of ``model`` (corrected by ``tables``, if given) against ``fp`` in one batch."""
    estimate = ModelDenoiser(model) if tables is None else CorrectedDenoiser(ModelDenoiser(model), tables)
    return paired_errors(ModelDenoiser(fp), estimate, scheduler, num_samples=num_samples, sample_shape=sample_shape,
                         num_inference_steps=steps, seed=seed, batch_size=num_samples, progress=False)
