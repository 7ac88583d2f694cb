"""What each sample of a run is conditioned on, by sample index, and classifier-free guidance.

A :class:`Conditioning` gives the model keywords of any range of samples (``rows(start, count)``),
so prompts are embedded once each and streamed batch by batch, and wraps denoisers in
:class:`~tacdiff.models.kinds.ClassifierFreeGuidance` when it guides. Its ``record`` (guidance
scale, negative prompt, prompt-set hash) goes into correction tables and sample records.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from tacdiff.data.prompts import default_prompts, prompt_of, prompt_set_sha256
from tacdiff.models.kinds import ClassifierFreeGuidance, Cond, Denoiser, kind_of, map_cond, random_text_embeddings
from tacdiff.models.loading import LoadedModel
from tacdiff.models.pipelines import DEFAULT_GUIDANCE_SCALE, PromptEncoder
from tacdiff.sampling.batching import Rows, derive_seed




def _no_rows(start: int, count: int) -> Cond:
    return {}


@dataclass
class Conditioning:
    """Per-sample model keywords and, with ``guidance_scale > 1`` (as in diffusers), classifier-free
    guidance towards them and away from ``uncond`` (e.g. the negative prompt's embedding).

    ``prompts`` (when prompted) are used in turn: sample ``i`` gets ``prompts[i % len(prompts)]``.
    """

    rows: Rows = _no_rows
    guidance_scale: float | None = None
    uncond: Cond = field(default_factory=dict)
    prompts: Sequence[str] | None = None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale > 1

    def guide(self, denoiser: Denoiser) -> Denoiser:
        """``denoiser`` with classifier-free guidance when this conditioning guides, else as it is."""
        return ClassifierFreeGuidance(denoiser, self.guidance_scale, self.uncond) if self.guided else denoiser

    def prompt(self, index: int) -> str | None:
        """The prompt of sample ``index`` (``None`` when not prompted)."""
        return None if self.prompts is None else prompt_of(self.prompts, index)


UNCONDITIONAL = Conditioning()


def num_classes(model: torch.nn.Module) -> int:
    """How many classes a class-conditional model (DiT, a UNet with ``num_class_embeds``) knows; 0 for others."""
    if "class_labels" not in kind_of(model).cond_keys:
        return 0
    config = model.config
    return int(getattr(config, "num_class_embeds", None) or getattr(config, "num_embeds_ada_norm", None) or 0)


def named_classes(loaded: LoadedModel) -> dict[int, str]:
    """``{class id: name}`` of a class-conditional pipeline with named classes (a ``DiTPipeline``'s ``id2label``,
    whose entries list comma-separated aliases: the first one), else empty."""
    id2label = getattr(getattr(loaded.pipeline, "config", None), "id2label", None) or {}
    return {int(key): value.split(",")[0].strip() for key, value in sorted(id2label.items(), key=lambda kv: int(kv[0]))}


def class_conditioning(loaded: LoadedModel, options: PromptOptions) -> Conditioning:
    """Conditioning of a ``DiTPipeline`` on class names: ``options.classes`` (default: every named class) in turn,
    sample ``i`` getting ``classes[i % len(classes)]``, guided (scale 4 by default, as DiTPipeline) away from the
    model's null class. The class names serve as the samples' prompts (e.g. for prompt accuracy)."""
    if options.prompts or options.negative_prompt:
        raise ValueError("a class-conditional pipeline reads class names, not prompts; pass --class NAME instead of "
                         "--prompt / --prompts-file / --negative-prompt")
    named = named_classes(loaded)
    wanted = list(options.classes or named.values())
    ids = {name.lower(): int(index) for name, index in loaded.pipeline.labels.items()}
    unknown = [name for name in wanted if name.lower() not in ids]
    if unknown:
        raise ValueError(f"unknown class {unknown[0]!r}; this pipeline knows {', '.join(named.values())}")
    chosen = torch.tensor([ids[name.lower()] for name in wanted])
    scale = loaded.kind.guidance_scale if options.guidance_scale is None else options.guidance_scale
    null = torch.tensor([loaded.model.config.num_embeds_ada_norm])

    def rows(start: int, count: int) -> Cond:
        return {"class_labels": chosen[torch.arange(start, start + count) % len(chosen)]}

    record = {"prompted": True, "guidance_scale": float(scale), "classes": wanted,
              "prompt_set_sha256": prompt_set_sha256(wanted), "num_prompts": len(wanted)}
    return Conditioning(rows, float(scale), {"class_labels": null}, wanted, record)


def tensor_conditioning(cond: Cond, record: dict[str, Any] | None = None) -> Conditioning:
    """Conditioning by tensors with a leading dimension of one row per sample (no guidance)."""
    return Conditioning(lambda start, count: map_cond(cond, lambda v: v[start:start + count]),
                        record=dict(record or {}))


def prompt_conditioning(encode: Callable[[Sequence[str]], Cond], prompts: Sequence[str], *,
                        guidance_scale: float = DEFAULT_GUIDANCE_SCALE, negative_prompt: str = "") -> Conditioning:
    """Conditioning on the text keywords ``encode(prompts)`` (one row per prompt, e.g. ``encoder_hidden_states``
    ``(N, L, D)`` from a :class:`~tacdiff.models.pipelines.PromptEncoder`), guided away from ``negative_prompt``."""
    if not prompts:
        raise ValueError("the prompt set is empty; pass at least one prompt")
    if not (guidance_scale >= 0 and guidance_scale < float("inf")):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
    prompts = list(prompts)

    def rows(start: int, count: int) -> Cond:
        return encode([prompt_of(prompts, i) for i in range(start, start + count)])

    record = {"prompted": True, "guidance_scale": float(guidance_scale), "negative_prompt": negative_prompt,
              "prompt_set_sha256": prompt_set_sha256(prompts), "num_prompts": len(prompts)}
    return Conditioning(rows, float(guidance_scale), encode([negative_prompt]), prompts, record)


@dataclass(frozen=True)
class PromptOptions:
    """A run's prompt settings: ``prompts`` (``None``: the built-in default list), the negative prompt
    and the guidance scale (``None``: the pipeline's own default,
    :attr:`~tacdiff.models.pipelines.PipelineKind.guidance_scale`). Only conditional pipelines take them."""

    prompts: tuple[str, ...] | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    classes: tuple[str, ...] | None = None

    @property
    def given(self) -> bool:
        return any(value is not None for value in (self.prompts, self.negative_prompt, self.guidance_scale,
                                                   self.classes))


def conditioning_for(loaded: LoadedModel, options: PromptOptions = PromptOptions(), *, count: int = 0,
                     seed: int = 0, what: str = "the model") -> Conditioning:
    """How a run conditions ``loaded``'s samples.

    Text-to-image pipelines embed ``options.prompts`` (default: the pipeline folder's own, else
    :data:`~tacdiff.data.prompts.DEFAULT_PROMPTS`; :func:`~tacdiff.data.prompts.default_prompts`)
    with their own text encoder and guide with ``options.guidance_scale``. A bare text-conditioned
    UNet or transformer (no text encoder at hand) gets seeded random stand-in embeddings for ``count``
    samples, with a warning; a class-conditional model (DiT, a UNet with class embeddings) samples
    class ``i mod classes`` for sample ``i``. Prompt options for a model that reads no prompts raise ``ValueError``.
    """
    if named_classes(loaded):
        return class_conditioning(loaded, options)
    if options.classes:
        raise ValueError(f"{what} has no named classes (a DiTPipeline folder with id2label has); leave out --class")
    if loaded.reads_prompts:
        scale = loaded.kind.guidance_scale if options.guidance_scale is None else options.guidance_scale
        _warn_unknown_words(loaded.pipeline, [*(options.prompts or []), options.negative_prompt or ""])
        prompts = options.prompts or default_prompts(loaded.pipeline.name_or_path)
        return prompt_conditioning(PromptEncoder(loaded.pipeline), prompts,
                                   guidance_scale=scale, negative_prompt=options.negative_prompt or "")
    if options.given:
        raise ValueError(f"{what} reads no prompts (it is not a text-to-image pipeline folder with a text encoder); "
                         "leave out --prompt, --prompts-file, --negative-prompt and --guidance-scale")
    cond: dict[str, Any] = {}
    record: dict[str, Any] = {"prompted": False}
    classes = num_classes(loaded.model)
    if classes:
        cond["class_labels"] = torch.arange(count) % classes
        record["class_labels"] = f"sample index mod {classes}"
    stand_in = random_text_embeddings(loaded.model, count, derive_seed(seed, "text"))
    if stand_in:  # a model may read both, e.g. a UNet with class embeddings and cross-attention
        warnings.warn(f"{what} is a text-conditioned model without a text encoder: it runs on seeded random stand-in "
                      "text embeddings. Pass the pipeline folder (with text_encoder/ and tokenizer/) to use prompts",
                      stacklevel=2)
        cond.update(stand_in)
        record["stand_in"] = "random text embeddings"
    return tensor_conditioning(cond, record) if cond else UNCONDITIONAL


def unknown_words(tokenizer: Any, prompt: str) -> list[str]:
    """The words of ``prompt`` that ``tokenizer`` reads as its unknown token (none for byte-level BPE, such as CLIP's,
    and none without a tokenizer)."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None:
        return []
    return [word for word in prompt.split() if unknown in tokenizer(word, add_special_tokens=False).input_ids]


def _warn_unknown_words(pipeline: Any, prompts: Sequence[str]) -> None:
    """Warn once per prompt whose words the pipeline's (first) tokenizer does not know: they read as unknown tokens."""
    tokenizer = getattr(pipeline, "tokenizer", None)
    for prompt in dict.fromkeys(prompts):
        words = unknown_words(tokenizer, prompt)
        if words:
            warnings.warn(f"prompt {prompt!r}: {', '.join(map(repr, words))} not in the tokenizer's vocabulary "
                          "(read as an unknown token)", stacklevel=3)

