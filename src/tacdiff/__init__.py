"""tacdiff: post-training quantization of diffusers models with timestep-aware correction.

Implements the method of "Timestep-Aware Correction for Quantized Diffusion Models"
(Yao et al., ECCV 2024) on top of a Q-Diffusion-style PTQ engine (Li et al., ICCV 2023).
"""

from tacdiff.quant import QuantConfig, format_summary, quantize
from tacdiff.sampling import CalibrationSet, collect_calibration_set
from tacdiff.correction.pipeline import load_pipeline

__version__ = "0.1.0"
__all__ = ["CalibrationSet", "QuantConfig", "collect_calibration_set", "format_summary", "load_pipeline", "quantize"]
