"""Artifacts on disk: quantized models as safetensors with metadata, written atomically."""

from tacdiff.io.artifact import load_quantized, read_metadata, save_quantized, state_dict_sha256

__all__ = ["load_quantized", "read_metadata", "save_quantized", "state_dict_sha256"]
