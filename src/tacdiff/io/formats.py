"""What kind of tacdiff file a path holds, read from its safetensors metadata without loading tensors."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import safe_open


def safetensors_format(path: str | Path) -> str | None:
    """The ``format`` entry of a safetensors file's metadata; None for a file that is not one or has none."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError):
        return None
