"""tacdiff: post-training quantization of diffusers models with timestep-aware correction.

Implements the method of "Timestep-Aware Correction for Quantized Diffusion Models"
(Yao et al., ECCV 2024) on top of a Q-Diffusion-style PTQ engine (Li et al., ICCV 2023).
"""

from tacdiff._lazy import lazy_exports

__version__ = "0.1.0"
_EXPORTS = {
    "CalibrationSet": "tacdiff.sampling",
    "QuantConfig": "tacdiff.quant",
    "collect_calibration_set": "tacdiff.sampling",
    "format_summary": "tacdiff.quant",
    "load_pipeline": "tacdiff.correction.pipeline",
    "quantize": "tacdiff.quant",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
