"""Reading diffusers model folders written by ``save_pretrained``: configs, weight formats and variants,
and loading through diffusers or transformers with one clear error and without their log noise."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from safetensors import SafetensorError

T = TypeVar("T")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


def read_config(file: Path) -> dict[str, Any]:
    """A diffusers JSON config as a dict; ``ValueError`` naming the file when it is not a JSON object."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON ({error}); restore it from save_pretrained's output") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} holds a JSON {type(config).__name__}, not an object of config fields; "
                         "restore it from save_pretrained's output")
    return config


def check_safetensors(folder: Path, *, required: bool) -> None:
    """``ValueError`` when ``folder`` has weights but none as safetensors (pickles are never read), or, if
    ``required``, no safetensors weights at all."""
    weights = sorted(p.name for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if any(w.endswith(".safetensors") for w in weights) or not (weights or required):
        return
    if not weights:
        raise ValueError(f"{folder} holds a config but no weights; pass a folder written by save_pretrained (tacdiff "
                         "bench-speed alone times a config-only folder, with random weights)")
    raise ValueError(f"{folder} has no safetensors weights (only {weights}); tacdiff never "
                     "loads pickled weights. Re-save it with save_pretrained(..., safe_serialization=True) from a "
                     "trusted environment")


def weights_variant(folder: Path) -> str | None:
    """The variant (e.g. ``"fp16"``) of a model folder saved only with ``save_pretrained(variant=...)``;
    ``None`` when it has default (unnamed) safetensors weights, or several variants."""
    stems = [name.removesuffix(".safetensors").split(".") for name in os.listdir(folder)
             if name.endswith(".safetensors")]
    if not stems or any(len(stem) == 1 for stem in stems):
        return None
    variants = {re.sub(r"-\d+-of-\d+$", "", stem[-1]) for stem in stems}
    return variants.pop() if len(variants) == 1 else None


def diffusers_load(folder: Path, build: Callable[[], T]) -> T:
    """``build()``, with any error diffusers or transformers raise on a bad folder turned into one
    ``ValueError`` naming it."""
    try:
        return build()
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError, OSError,
            SafetensorError) as error:
        raise ValueError(f"diffusers cannot load {folder} ({type(error).__name__}: {' '.join(str(error).split())}); "
                         "restore it from save_pretrained's output") from None


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence diffusers' and transformers' progress bars, info and warning logs (deprecated config keys,
    missing ``accelerate``, component type notes) while components load; errors still raise."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
             for lib in (diffusers_logging, transformers_logging)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, level, bars in saved:
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()
