"""Diffusers pipeline folders: which pipeline classes tacdiff supports, loading their full-precision
components around a (possibly quantized) denoiser, prompt embeddings and latent decoding.

Only the denoiser is quantized and corrected, as in TAC (Yao et al., ECCV 2024); the text encoder
and the autoencoder stay as the pipeline folder has them. Components are loaded by diffusers
itself (``from_pretrained`` with ``use_safetensors=True``, so no pickled weights are read).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError
from torch import Tensor, nn

T = TypeVar("T")


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


with quiet_loading():  # importing the pipelines imports transformers, which logs notes about torchvision
    from diffusers import DDIMPipeline, DDPMPipeline, LDMPipeline, StableDiffusionPipeline

PIPELINE_INDEX = "model_index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


@dataclass(frozen=True)
class PipelineKind:
    """A supported pipeline class: the component that decodes latents (``None`` for pixel-space
    pipelines), whether it reads prompts (tokenizer and text encoder) and the optional components
    tacdiff does not load (it decodes latents itself: no safety checker, no image prompts)."""

    cls: type[DiffusionPipeline]
    decoder: str | None
    text: bool
    skipped: tuple[str, ...] = ()


PIPELINE_KINDS: dict[str, PipelineKind] = {kind.cls.__name__: kind for kind in (
    PipelineKind(StableDiffusionPipeline, "vae", True, ("safety_checker", "feature_extractor", "image_encoder")),
    PipelineKind(LDMPipeline, "vqvae", False),  # a VQModel, or an AutoencoderKL (unconditional latent diffusion)
    PipelineKind(DDPMPipeline, None, False),
    PipelineKind(DDIMPipeline, None, False),
)}


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


def read_index(folder: str | Path) -> dict[str, Any] | None:
    """A pipeline folder's ``model_index.json`` as a dict; ``None`` when ``folder`` is not a pipeline folder."""
    file = Path(folder) / PIPELINE_INDEX
    return read_config(file) if file.is_file() else None


def pipeline_kind(folder: str | Path) -> PipelineKind | None:
    """The kind of the pipeline saved in ``folder`` (``None`` for a model folder); ``ValueError`` naming the
    supported classes for any other pipeline."""
    index = read_index(folder)
    if index is None:
        return None
    name = index.get("_class_name")
    kind = PIPELINE_KINDS.get(str(name))
    if kind is None:
        raise ValueError(f"{Path(folder) / PIPELINE_INDEX} names pipeline class {name!r}; tacdiff supports "
                         f"{', '.join(PIPELINE_KINDS)}")
    return kind


def _check_component_weights(folder: Path, index: dict[str, Any], skipped: tuple[str, ...]) -> None:
    """``ValueError`` when a component to load has weights but none as safetensors (pickles are never read)."""
    for name, entry in index.items():
        part = folder / name
        if (name.startswith("_") or name in skipped or not isinstance(entry, list) or entry[0] is None
                or not part.is_dir()):
            continue
        weights = sorted(p.name for p in part.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        if weights and not any(w.endswith(".safetensors") for w in weights):
            raise ValueError(f"{part} has no safetensors weights (only {weights}); tacdiff never loads pickled "
                             "weights. Re-save the pipeline with save_pretrained(..., safe_serialization=True) from "
                             "a trusted environment")


def diffusers_load(folder: Path, build: Callable[[], T]) -> T:
    """``build()``, with any error diffusers or transformers raise on a bad folder turned into one
    ``ValueError`` naming it."""
    try:
        return build()
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError, OSError,
            SafetensorError) as error:
        raise ValueError(f"diffusers cannot load {folder} ({type(error).__name__}: {' '.join(str(error).split())}); "
                         "restore it from save_pretrained's output") from None


def load_components(folder: str | Path, unet: nn.Module, device: str | torch.device = "cpu") -> DiffusionPipeline:
    """The pipeline saved in ``folder`` with ``unet`` in place of its own (which is not loaded).

    Stable Diffusion's safety checker, feature extractor and image encoder are not loaded
    (:attr:`PipelineKind.skipped`): tacdiff decodes latents itself. ``ValueError`` for an unsupported pipeline class, pickled-only weights or a
    folder diffusers cannot load.
    """
    folder = Path(folder)
    kind = pipeline_kind(folder)
    if kind is None:
        raise ValueError(f"{folder} has no {PIPELINE_INDEX}; pass a folder written by a pipeline's save_pretrained")
    index = read_index(folder) or {}
    _check_component_weights(folder, index, kind.skipped)
    extra: dict[str, Any] = {"unet": unet, **dict.fromkeys(kind.skipped)}
    if "safety_checker" in kind.skipped:
        extra["requires_safety_checker"] = False
    with quiet_loading():
        pipe = diffusers_load(folder, lambda: kind.cls.from_pretrained(folder, use_safetensors=True, **extra))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def component(pipe: DiffusionPipeline, kind: PipelineKind, name: str) -> nn.Module:
    """The part of a pipeline that an artifact's component ``name`` quantizes: ``text_encoder`` (the text
    encoder) or ``vae_decoder`` (the autoencoder's decoder, which turns latents into images)."""
    if name == "text_encoder" and kind.text:
        return pipe.text_encoder
    if name == "vae_decoder" and kind.decoder is not None:
        return getattr(pipe, kind.decoder).decoder
    raise ValueError(f"a {kind.cls.__name__} has no {name.replace('_', ' ')} to quantize")


class PromptEncoder:
    """Text embeddings ``(N, L, D)`` of prompts through a pipeline's own ``encode_prompt``, computed
    once per distinct prompt and cached on the CPU."""

    def __init__(self, pipe: DiffusionPipeline) -> None:
        if not hasattr(pipe, "encode_prompt"):
            raise ValueError(f"{type(pipe).__name__} reads no prompts")
        self.pipe = pipe
        self._cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Tensor:
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._cache:
                embeds, _ = self.pipe.encode_prompt(prompt, self.pipe.device, 1, False)
                self._cache[prompt] = embeds.cpu()
        return torch.cat([self._cache[prompt] for prompt in prompts])


@torch.no_grad()
def decode_latents(pipe: DiffusionPipeline, kind: PipelineKind, latents: Tensor) -> Tensor:
    """Final latents as images in [-1, 1] (not clamped): the pipeline's decoder on ``latents / scaling_factor``,
    as the pipeline's own ``__call__`` does; pixel-space pipelines return ``latents`` unchanged."""
    if kind.decoder is None:
        return latents
    decoder = getattr(pipe, kind.decoder)
    scaled = latents.to(decoder.device, decoder.dtype) / decoder.config.scaling_factor
    return decoder.decode(scaled, return_dict=False)[0].to(latents.dtype)
