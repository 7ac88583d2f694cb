"""Sampling: the shared trajectory loop and calibration-input collection."""

from tacdiff.sampling.calibration import CalibrationSet, collect_calibration_set
from tacdiff.sampling.loop import StepRecord, run_trajectories, sample, seeded_noise, unet_denoiser

__all__ = ["CalibrationSet", "StepRecord", "collect_calibration_set", "run_trajectories", "sample",
           "seeded_noise", "unet_denoiser"]
