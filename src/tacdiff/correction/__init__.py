"""Timestep-aware correction of quantized diffusion models (TAC: Yao et al., ECCV 2024) and the PTQD baseline.

Per-timestep tables fitted on paired FP/quantized trajectories (:func:`calibrate_tac`,
:func:`calibrate_ptqd`), saved as safetensors (:class:`CorrectionTables`) and applied by a
denoiser wrapper (:class:`CorrectedDenoiser`, whose ``correct_state`` the sampling loop calls when
IBC shifts the sampler state) or, inside diffusers pipelines, a UNet wrapper (:class:`CorrectedUNet`);
:func:`load_pipeline` loads a quantized pipeline with its tables applied (state IBC included).
The closed-form solvers are pure functions.
PTQD's variance-schedule calibration for DDPM/DDIM(eta > 0) is :func:`ptqd_variance_scheduler`.
"""

from tacdiff.correction.calibrate import calibrate_ptqd, calibrate_tac
from tacdiff.correction.ibc import input_bias
from tacdiff.correction.ner import AbsMean, NERStats, mask_threshold, ner_scale, ner_stats
from tacdiff.correction.pipeline import load_pipeline
from tacdiff.correction.ptqd import PTQDStats, ptqd_fit
from tacdiff.correction.tables import CorrectionTables
from tacdiff.correction.variance import ptqd_variance_scheduler
from tacdiff.correction.wrapper import (CorrectedDenoiser, CorrectedUNet, correct_input, correct_output,
                                        load_correction, shift_state)

__all__ = ["AbsMean", "CorrectedDenoiser", "CorrectedUNet", "CorrectionTables", "NERStats", "PTQDStats",
           "calibrate_ptqd", "calibrate_tac", "correct_input", "correct_output", "input_bias", "load_correction",
           "load_pipeline", "mask_threshold", "ner_scale", "ner_stats", "ptqd_fit", "ptqd_variance_scheduler",
           "shift_state"]
