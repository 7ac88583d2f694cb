"""What each sample of a run is conditioned on, by sample index, and classifier-free guidance.

A :class:`Conditioning` gives the model keywords of any range of samples (``rows(start, count)``),
so prompts are embedded once each and streamed batch by batch, and wraps denoisers in
:class:`~tacdiff.models.kinds.ClassifierFreeGuidance` when it guides. Its ``record`` (guidance
scale, negative prompt, prompt-set hash) goes into correction tables and sample records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import Tensor

from tacdiff.data.prompts import prompt_of, prompt_set_sha256
from tacdiff.models.kinds import ClassifierFreeGuidance, Cond, Denoiser, map_cond
from tacdiff.sampling.batching import Rows


DEFAULT_GUIDANCE_SCALE = 7.5  # Stable Diffusion's default


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


def tensor_conditioning(cond: Cond, record: dict[str, Any] | None = None) -> Conditioning:
    """Conditioning by tensors with a leading dimension of one row per sample (no guidance)."""
    return Conditioning(lambda start, count: map_cond(cond, lambda v: v[start:start + count]),
                        record=dict(record or {}))


def prompt_conditioning(encode: Callable[[Sequence[str]], Tensor], prompts: Sequence[str], *,
                        guidance_scale: float = DEFAULT_GUIDANCE_SCALE, negative_prompt: str = "") -> Conditioning:
    """Conditioning on text embeddings ``encode(prompts) -> (N, L, D)`` (e.g. a
    :class:`~tacdiff.models.pipelines.PromptEncoder`), guided away from ``negative_prompt``."""
    if not prompts:
        raise ValueError("the prompt set is empty; pass at least one prompt")
    if not (guidance_scale >= 0 and guidance_scale < float("inf")):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
    prompts = list(prompts)

    def rows(start: int, count: int) -> Cond:
        return {"encoder_hidden_states": encode([prompt_of(prompts, i) for i in range(start, start + count)])}

    record = {"prompted": True, "guidance_scale": float(guidance_scale), "negative_prompt": negative_prompt,
              "prompt_set_sha256": prompt_set_sha256(prompts), "num_prompts": len(prompts)}
    return Conditioning(rows, float(guidance_scale), {"encoder_hidden_states": encode([negative_prompt])}, prompts,
                        record)
