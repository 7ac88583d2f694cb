"""Results as strict JSON files, written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tacdiff.io.atomic import write_text_atomically


def _json_safe(value: Any) -> Any:
    """Non-finite floats become the strings "inf", "-inf" or "nan" (strict JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as strict JSON to ``path`` atomically (a temporary sibling, then a rename)."""
    return write_text_atomically(path, json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")
