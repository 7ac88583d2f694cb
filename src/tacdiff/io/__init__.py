"""Artifacts on disk: quantized models as safetensors with metadata, written atomically."""

from tacdiff._lazy import lazy_exports

_EXPORTS = {name: "tacdiff.io.artifact" for name in ("load_quantized", "read_metadata", "save_quantized",
                                                     "state_dict_sha256")}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
