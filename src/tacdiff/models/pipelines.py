"""Diffusers pipeline folders: which pipeline classes tacdiff supports, loading their components around
a (possibly quantized) denoiser, prompt embeddings and latent decoding.

By default only the denoiser is quantized and corrected, as in TAC (Yao et al., ECCV 2024); the
text encoder and the autoencoder are loaded as the pipeline folder has them, unless an artifact
also holds weight-only quantized ones (:mod:`tacdiff.io.artifact`). Components are loaded by their
own diffusers or transformers classes from safetensors only (no pickled weights are read).
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers import DiffusionPipeline
from torch import Tensor, nn

from tacdiff.models.kinds import Cond, cat_cond, map_cond, text_width
from tacdiff.models.folders import check_safetensors, diffusers_load, quiet_loading, read_config, weights_variant

with quiet_loading():  # importing the pipelines imports transformers, which logs notes about torchvision
    from diffusers import (DDIMPipeline, DDPMPipeline, DiTPipeline, LDMPipeline, PixArtAlphaPipeline,
                           PixArtSigmaPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline)

PIPELINE_INDEX = "model_index.json"
DEFAULT_GUIDANCE_SCALE = 7.5  # Stable Diffusion's default


PromptEmbedder = Callable[[DiffusionPipeline, str], Cond]
"""How a text-to-image pipeline turns one prompt into its denoiser's text keywords (one row each)."""


def _stable_diffusion_prompt(pipe: DiffusionPipeline, prompt: str) -> Cond:
    embeds, _ = pipe.encode_prompt(prompt, pipe.device, 1, False)
    return {"encoder_hidden_states": embeds}


def _sd3_prompt(pipe: DiffusionPipeline, prompt: str) -> Cond:
    """Both CLIP encoders' token embeddings beside T5's (zeros when the folder has no ``text_encoder_3``) and
    the CLIP encoders' pooled projections, as ``StableDiffusion3Pipeline`` passes them to its MMDiT."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device=pipe.device, do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _pixart_prompt(pipe: DiffusionPipeline, prompt: str) -> Cond:
    """T5 embeddings with their attention mask (padding masked out) and, for transformers trained with
    resolution conditioning, the image size and aspect ratio tacdiff samples at, as ``PixArt*Pipeline`` does."""
    embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=pipe.device)
    cond: Cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
    if pipe.transformer.use_additional_conditions:  # the config may leave it to the model (sample size 128)
        side = float(pipe.transformer.config.sample_size * pipe.vae_scale_factor)
        cond["added_cond_kwargs"] = {"resolution": embeds.new_tensor([[side, side]]),
                                     "aspect_ratio": embeds.new_tensor([[1.0]])}
    return cond


@dataclass(frozen=True)
class PipelineKind:
    """A supported pipeline class: the component that decodes latents (``None`` for pixel-space
    pipelines), how it embeds a prompt (``None`` when it reads none), the optional components tacdiff
    does not load (it decodes latents itself: no safety checker, no image prompts), the denoiser
    component (``unet``, or ``transformer``) and the pipeline's own default guidance scale."""

    cls: type[DiffusionPipeline]
    decoder: str | None
    embed_prompt: PromptEmbedder | None = None
    skipped: tuple[str, ...] = ()
    denoiser: str = "unet"
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE

    @property
    def text(self) -> bool:
        """Whether the pipeline reads prompts (it has tokenizers and text encoders)."""
        return self.embed_prompt is not None


_IMAGE_PROMPTS = ("feature_extractor", "image_encoder")
PIPELINE_KINDS: dict[str, PipelineKind] = {kind.cls.__name__: kind for kind in (
    PipelineKind(StableDiffusionPipeline, "vae", _stable_diffusion_prompt, ("safety_checker", *_IMAGE_PROMPTS)),
    PipelineKind(LDMPipeline, "vqvae"),  # a VQModel, or an AutoencoderKL (unconditional latent diffusion)
    PipelineKind(DDPMPipeline, None),
    PipelineKind(DDIMPipeline, None),
    PipelineKind(DiTPipeline, "vae", denoiser="transformer", guidance_scale=4.0),  # class-conditional; id2label
    PipelineKind(StableDiffusion3Pipeline, "vae", _sd3_prompt, _IMAGE_PROMPTS, "transformer", 7.0),  # flow matching
    PipelineKind(PixArtAlphaPipeline, "vae", _pixart_prompt, denoiser="transformer", guidance_scale=4.5),
    PipelineKind(PixArtSigmaPipeline, "vae", _pixart_prompt, denoiser="transformer", guidance_scale=4.5),
)}


SD_SCHEDULER_CONFIG: dict[str, Any] = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           clip_sample=False, set_alpha_to_one=False, steps_offset=1)
"""Stable Diffusion 1.5's noise schedule and DDIM settings."""


def stable_diffusion(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any) -> DiffusionPipeline:
    """A ``StableDiffusionPipeline`` of these parts with SD 1.5's DDIM schedule and no safety checker."""
    from diffusers import DDIMScheduler

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


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


def component_names(index: dict[str, Any], kind: PipelineKind) -> list[str]:
    """The components of a pipeline index that tacdiff loads (listed with a class, not skipped)."""
    return [name for name, entry in index.items() if not name.startswith("_") and name not in kind.skipped
            and isinstance(entry, list) and len(entry) == 2 and entry[0] is not None]


def components_sha256(folder: str | Path) -> str:
    """SHA-256 over every file of the components loaded around the UNet (text encoder, tokenizer,
    autoencoder; not ``unet/``, whose weights an artifact replaces, nor ``scheduler/``, whose config it records)."""
    folder = Path(folder)
    kind = pipeline_kind(folder)
    if kind is None:
        raise ValueError(f"{folder} has no {PIPELINE_INDEX}")
    digest = hashlib.sha256()
    names = [name for name in component_names(read_index(folder) or {}, kind)
             if name not in (kind.denoiser, "scheduler")]
    for name in sorted(names):
        for file in sorted(p for p in (folder / name).rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(folder).as_posix()}\n".encode())
            with file.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def _check_component_folders(folder: Path, names: list[str]) -> None:
    """``ValueError`` when a listed component has no folder, or has weights but none as safetensors (pickles
    are never read)."""
    for name in names:
        part = folder / name
        if not part.is_dir() or not any(part.iterdir()):
            raise ValueError(f"{folder / PIPELINE_INDEX} lists the component {name!r} but {part} is missing or "
                             "empty; restore it from save_pretrained's output")
        check_safetensors(part, required=False)


def _load_models(folder: Path, index: dict[str, Any], names: list[str]) -> dict[str, nn.Module]:
    """The model components (diffusers or transformers models) among ``names``, each loaded by its own
    class from safetensors; ``ValueError`` naming the folder when one lacks weights (the libraries would
    otherwise initialise them randomly and only log it)."""
    import diffusers
    import transformers

    models = {}
    for name in names:
        library, class_name = index[name]
        cls = getattr({"diffusers": diffusers, "transformers": transformers}.get(library), class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            continue  # a scheduler, a tokenizer: nothing to initialise randomly
        part = folder / name
        model, info = diffusers_load(part, lambda: cls.from_pretrained(part, use_safetensors=True,
                                                                       variant=weights_variant(part),
                                                                       output_loading_info=True))
        missing = [*info.get("missing_keys", []), *(str(k) for k in info.get("mismatched_keys", []))]
        if missing:
            raise ValueError(f"{part} lacks weights for {len(missing)} of the {class_name}'s tensors (e.g. "
                             f"{sorted(missing)[0]!r}), or holds them with other shapes; restore it from "
                             "save_pretrained's output")
        models[name] = model.eval()
    return models


def _check_fit(pipe: DiffusionPipeline, kind: PipelineKind, folder: Path) -> None:
    """``ValueError`` unless the denoiser, the autoencoder and the text encoders fit together."""
    denoiser = getattr(pipe, kind.denoiser)
    problems = []
    if kind.decoder is not None:
        latent = getattr(pipe, kind.decoder).config.latent_channels
        if latent != denoiser.config.in_channels:
            problems.append(f"the {kind.denoiser} takes {denoiser.config.in_channels}-channel latents but "
                            f"{kind.decoder}/ decodes {latent}")
    if kind.text:
        problems += _text_problems(pipe, kind, denoiser)
    if problems:
        raise ValueError(f"the components of {folder} do not fit together: " + "; ".join(problems)
                         + ". Restore the pipeline from save_pretrained's output")


def _text_problems(pipe: DiffusionPipeline, kind: PipelineKind, denoiser: nn.Module) -> list[str]:
    """What keeps the tokenizers and text encoders from feeding the denoiser: a tokenizer making more tokens
    than its encoder has positions, or embeddings of another width than the denoiser reads."""
    problems = []
    for suffix in ("", "_2", "_3"):
        tokenizer, encoder = getattr(pipe, f"tokenizer{suffix}", None), getattr(pipe, f"text_encoder{suffix}", None)
        positions = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
        if tokenizer is not None and positions is not None and tokenizer.model_max_length > positions:
            tokens = tokenizer.model_max_length
            problems.append(f"tokenizer{suffix}/ makes {tokens if tokens < 1e9 else 'unbounded'} tokens per prompt "
                            f"but text_encoder{suffix}/ takes at most {positions}")
    if problems:
        return problems
    try:  # through the pipeline's prompt cache: sampling's default negative prompt is this one
        width = PromptEncoder(pipe)([""])["encoder_hidden_states"].shape[-1]
    except (RuntimeError, ValueError, IndexError) as error:
        return [f"the text encoders fail on an empty prompt ({type(error).__name__}: {' '.join(str(error).split())})"]
    if width != text_width(denoiser):
        return [f"the {kind.denoiser} attends to {text_width(denoiser)}-wide text embeddings but the text encoders "
                f"make {width}-wide ones"]
    return []


def load_components(folder: str | Path, unet: nn.Module, device: str | torch.device = "cpu") -> DiffusionPipeline:
    """The pipeline saved in ``folder`` with ``unet`` in place of its own denoiser (which is not loaded).

    Stable Diffusion's safety checker, feature extractor and image encoder are not loaded
    (:attr:`PipelineKind.skipped`): tacdiff decodes latents itself. ``ValueError`` for an unsupported
    pipeline class, a missing component, pickled-only or incomplete weights, components that do not
    fit together, or a folder diffusers cannot load.
    """
    folder = Path(folder)
    kind = pipeline_kind(folder)
    if kind is None:
        raise ValueError(f"{folder} has no {PIPELINE_INDEX}; pass a folder written by a pipeline's save_pretrained")
    index = read_index(folder) or {}
    names = [name for name in component_names(index, kind) if name != kind.denoiser]
    _check_component_folders(folder, names)
    absent = [name for name, entry in index.items() if isinstance(entry, list) and entry == [None, None]]
    extra: dict[str, Any] = {kind.denoiser: unet, **dict.fromkeys([*kind.skipped, *absent])}  # e.g. SD3 without T5
    if "safety_checker" in kind.skipped:
        extra["requires_safety_checker"] = False
    with quiet_loading():  # also diffusers' note that float16 pipelines are slow on the CPU
        extra.update(_load_models(folder, index, names))
        pipe = diffusers_load(folder, lambda: kind.cls.from_pretrained(folder, use_safetensors=True, **extra))
        if "id2label" in index:  # DiTPipeline reads its class names from the index but does not keep them
            pipe.register_to_config(id2label=index["id2label"])
        _check_fit(pipe, kind, folder)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def text_encoders(pipe: DiffusionPipeline, kind: PipelineKind) -> list[str]:
    """The names of the text encoders ``pipe`` has (SD3: up to three; none for pipelines without prompts)."""
    return [name for name in TEXT_ENCODERS if kind.text and getattr(pipe, name, None) is not None]


def component(pipe: DiffusionPipeline, kind: PipelineKind, name: str) -> nn.Module:
    """The part of a pipeline that an artifact's component ``name`` quantizes: a text encoder (``text_encoder``,
    SD3's ``text_encoder_2``/``_3``) or ``vae_decoder`` (the autoencoder's decoder, which turns latents into
    images)."""
    if name in text_encoders(pipe, kind):
        return getattr(pipe, name)
    if name == "vae_decoder" and kind.decoder is not None:
        return getattr(pipe, kind.decoder).decoder
    option = f"--quantize-{name.replace('_', '-')}"
    raise ValueError(f"a {kind.cls.__name__} has no {name.replace('_', ' ')} to quantize; leave out {option}")


_PROMPT_CACHES: weakref.WeakKeyDictionary[DiffusionPipeline, OrderedDict[str, Cond]] = weakref.WeakKeyDictionary()


class PromptEncoder:
    """The denoiser's text keywords for prompts (``encoder_hidden_states``, and SD3's pooled projections or
    PixArt's attention mask: :attr:`PipelineKind.embed_prompt`, through the pipeline's own ``encode_prompt``),
    computed once per distinct prompt and kept on the CPU for the last ``cache_size`` distinct prompts (one cache
    per pipeline, shared by its encoders: the load-time fit check's empty prompt is sampling's negative prompt).

    A prompt longer than the tokenizer's limit is cut there, as diffusers does, with one warning.
    """

    def __init__(self, pipe: DiffusionPipeline, cache_size: int = 1024) -> None:
        kind = PIPELINE_KINDS.get(type(pipe).__name__)
        if kind is None or not kind.text:
            raise ValueError(f"{type(pipe).__name__} reads no prompts")
        self.pipe, self.embed, self.cache_size = pipe, kind.embed_prompt, cache_size
        self._cache: OrderedDict[str, Cond] = _PROMPT_CACHES.setdefault(pipe, OrderedDict())

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Cond:
        rows = []
        for prompt in prompts:
            if prompt not in self._cache:
                self._cache[prompt] = self._encode(prompt)
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(prompt)
            rows.append(self._cache[prompt])
        return cat_cond(rows)

    def _encode(self, prompt: str) -> Cond:
        with quiet_loading():  # transformers and diffusers log every cut prompt twice
            length, limit = len(self.pipe.tokenizer(prompt).input_ids), self.pipe.tokenizer.model_max_length
            cond = self.embed(self.pipe, prompt)
        if length > limit:
            warnings.warn(f"the prompt {prompt[:40]!r}{'...' if len(prompt) > 40 else ''} has {length} tokens; the "
                          f"text encoder reads the first {limit} (the rest is cut, as in diffusers)", stacklevel=3)
        return map_cond(cond, lambda tensor: tensor.cpu())


@torch.no_grad()
def decode_latents(pipe: DiffusionPipeline, kind: PipelineKind, latents: Tensor) -> Tensor:
    """Final latents as images in [-1, 1] (not clamped): the pipeline's decoder on ``latents / scaling_factor``
    (``+ shift_factor`` where the autoencoder has one),
    as the pipeline's own ``__call__`` does; pixel-space pipelines return ``latents`` unchanged."""
    if kind.decoder is None:
        return latents
    decoder = getattr(pipe, kind.decoder)
    shift = getattr(decoder.config, "shift_factor", None) or 0.0  # SD3's autoencoder centres its latents
    scaled = latents.to(decoder.device, decoder.dtype) / decoder.config.scaling_factor + shift
    return decoder.decode(scaled, return_dict=False)[0].to(latents.dtype)
