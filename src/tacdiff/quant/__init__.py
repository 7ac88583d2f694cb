"""Post-training quantization engine: pure math, quantized layers, the model walker, calibration."""

from tacdiff.quant.apply import format_summary, plan_layers, quant_state, quantization_summary, quantize
from tacdiff.quant.config import QuantConfig

__all__ = ["QuantConfig", "format_summary", "plan_layers", "quant_state", "quantization_summary", "quantize"]
