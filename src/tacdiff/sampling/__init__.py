"""Sampling: the shared trajectory loop, batching and seeding, and calibration-input collection."""

from tacdiff.sampling.batching import batched_trajectories, derive_seed, sample_noise, to_images
from tacdiff.sampling.calibration import CalibrationSet, collect_calibration_set
from tacdiff.sampling.loop import StepRecord, run_trajectories, sample

__all__ = ["CalibrationSet", "StepRecord", "batched_trajectories", "collect_calibration_set", "derive_seed",
           "run_trajectories", "sample", "sample_noise", "to_images"]
