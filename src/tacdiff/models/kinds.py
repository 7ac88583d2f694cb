"""The model-kind registry and the denoiser adapters: how tacdiff calls each diffusers model class.

As in k-diffusion's ``external.py``, a denoiser is any callable ``denoiser(x, t, **cond) -> eps``
that predicts the noise in the model input ``x`` at scheduler timestep ``t`` or, under a
flow-matching scheduler (sigmas, ``FlowMatchEulerDiscreteScheduler``), the flow velocity the
scheduler consumes (:func:`prediction_type` says which); samplers and corrections only ever see that
interface. Registered kinds: diffusers' UNets and the transformer denoisers DiT (class-conditional),
PixArt and SD3's MMDiT (text-conditioned). :class:`ModelDenoiser` adapts a registered model:
timestep by keyword, conditioning keywords checked against its kind, learned-variance output
channels split off, v-prediction converted to the noise estimate. Wrappers such as
:class:`ClassifierFreeGuidance` derive from :class:`DenoiserWrapper`, which passes the optional
``correct_state`` capability (see :class:`Denoiser`) on to the denoiser they wrap.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from diffusers import (DiTTransformer2DModel, PixArtTransformer2DModel, SchedulerMixin, SD3Transformer2DModel,
                       UNet2DConditionModel, UNet2DModel)
from torch import Tensor, nn

FLOW = "flow"
"""The parameterization of flow-matching schedulers: the model predicts the velocity ``d x / d sigma``."""
PREDICTION_TYPES = ("epsilon", "v_prediction", FLOW)
SDXL_TIME_IDS = 6  # original size, crop offset and target size, two numbers each
PIXART_VAE_FACTOR = 8  # PixArt's autoencoder (Stable Diffusion's) upsamples latents 8x


class Denoiser(Protocol):
    """Predicts the noise ``eps`` of shape ``x.shape`` from the model input ``x`` at timestep ``t`` (the flow
    velocity under a flow-matching scheduler).

    A denoiser may also have ``correct_state(x, t, step) -> x``: the sampling loop calls it at
    the start of step number ``step`` (timestep ``t``) with that trajectory's latents ``x`` and
    continues from what it returns (TAC's state IBC shifts the quantized latents this way).
    """

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor: ...


def correct_state(denoiser: Denoiser, x: Tensor, t: Tensor, step: int) -> Tensor:
    """``denoiser.correct_state(x, t, step)`` when the denoiser has that capability, else ``x``."""
    hook = getattr(denoiser, "correct_state", None)
    return x if hook is None else hook(x, t, step)


class DenoiserWrapper:
    """Base of denoisers that wrap another (``inner``): passes ``correct_state`` on to it."""

    def __init__(self, inner: Denoiser) -> None:
        self.inner = inner

    def correct_state(self, x: Tensor, t: Tensor, step: int) -> Tensor:
        return correct_state(self.inner, x, t, step)


@dataclass(frozen=True)
class ModelKind:
    """A supported model class and the conditioning keywords its forward takes besides ``sample, timestep``."""

    cls: type[nn.Module]
    cond_keys: frozenset[str]


MODEL_KINDS: dict[str, ModelKind] = {kind.cls.__name__: kind for kind in (
    ModelKind(UNet2DModel, frozenset({"class_labels"})),
    ModelKind(UNet2DConditionModel, frozenset({"encoder_hidden_states", "class_labels", "added_cond_kwargs"})),
    ModelKind(DiTTransformer2DModel, frozenset({"class_labels"})),
    ModelKind(PixArtTransformer2DModel, frozenset({"encoder_hidden_states", "added_cond_kwargs",
                                                   "encoder_attention_mask"})),
    ModelKind(SD3Transformer2DModel, frozenset({"encoder_hidden_states", "pooled_projections"})),
)}


def kind_of(model: nn.Module) -> ModelKind:
    """The registry entry of ``model``; ``TypeError`` naming the supported classes for any other model."""
    for kind in MODEL_KINDS.values():
        if isinstance(model, kind.cls):
            return kind
    raise TypeError(f"tacdiff supports {', '.join(MODEL_KINDS)}; got {type(model).__name__}. "
                    "Pass the pipeline's denoiser (pipe.unet or pipe.transformer), not the pipeline or another "
                    "model")


def sample_shape_of(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of the samples a diffusers UNet or transformer makes, read from its config."""
    config = getattr(model, "config", None)
    size = getattr(config, "sample_size", None)
    if config is None or size is None:
        raise ValueError("the model's config has no sample_size, so tacdiff cannot tell the size of the samples; "
                         "set \"sample_size\" in its config.json (the side of its input, e.g. 64 for SD 1.5's "
                         "latents), or from Python pass sample_shape=(C, H, W)")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (config.in_channels, height, width)


TEXT_ADDITIONS = (None, "text", "text_time")
"""The ``addition_embed_type`` values of UNets tacdiff can condition: none, text (DeepFloyd IF), SDXL's text and time
ids; the others take image embeddings (Kandinsky)."""


def unsupplied_inputs(model: nn.Module) -> str | None:
    """What ``model`` reads besides its noisy input that tacdiff cannot make up when it samples, or ``None``: image
    embeddings, an image concatenated to its input (upscalers, inpainting), class embeddings of anything but ids, a
    guidance-scale embedding (LCM), noise levels in place of timesteps (score-SDE models' Fourier embedding)."""
    config = model.config
    addition = getattr(config, "addition_embed_type", None)
    if addition not in TEXT_ADDITIONS:
        return f"image embeddings (addition_embed_type {addition!r}, as Kandinsky's UNets)"
    if getattr(config, "time_cond_proj_dim", None) is not None:
        return "a guidance-scale embedding beside the timestep (time_cond_proj_dim, as latent consistency models)"
    if getattr(config, "time_embedding_type", None) == "fourier":
        return ("noise levels in place of timesteps (a Fourier time embedding, as score-SDE models; tacdiff's "
                "schedulers give DDPM timesteps, and log(0) at the last step)")
    embed_type = getattr(config, "class_embed_type", None)
    if embed_type is not None:
        return f"class embeddings of type {embed_type!r} (tacdiff conditions on class ids only, num_class_embeds)"
    channels = config.in_channels
    predicted = getattr(config, "out_channels", None) or channels
    if predicted not in (channels, 2 * channels):
        return (f"an image beside its noisy input ({channels} input channels for {predicted} predicted ones, as "
                "upscaling and inpainting UNets)")
    return None


def example_inputs(model: nn.Module, batch: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Zero-valued inputs ``(x, t, cond)`` for one forward pass of a registered model at ``batch``
    (probes and benchmarks; conditioning shaped as :func:`random_text_embeddings` makes it, 8 tokens)."""
    kind_of(model)
    config, param = model.config, next(model.parameters())
    addition = getattr(config, "addition_embed_type", None)
    if addition not in TEXT_ADDITIONS:
        raise ValueError(f"no example inputs for a UNet with {addition!r} addition embeddings (image embeddings; "
                         "tacdiff makes text, SDXL's text_time and class-id conditioning)")
    x = torch.zeros(batch, *sample_shape_of(model), device=param.device, dtype=param.dtype)
    cond = map_cond(random_text_embeddings(model, batch, seed=0, length=8),
                    lambda v: torch.zeros(v.shape, device=param.device, dtype=param.dtype))
    labels = _example_class_labels(model, batch)
    if labels is not None:
        cond["class_labels"] = labels.to(param.device, param.dtype if labels.is_floating_point() else labels.dtype)
    return x, torch.full((batch,), 500, device=param.device), cond


def _example_class_labels(model: nn.Module, batch: int) -> Tensor | None:
    """Zero class labels of the form the model's class embedding takes: class ids (DiT, ``num_class_embeds``),
    a timestep per sample (``class_embed_type="timestep"``, e.g. a noise level), or vectors to project
    (``"projection"``, ``"simple_projection"``) or to add as they are (``"identity"``); ``None`` for none."""
    config = model.config
    embed_type = getattr(config, "class_embed_type", None)
    if isinstance(model, DiTTransformer2DModel) or (embed_type is None and getattr(config, "num_class_embeds", None)):
        return torch.zeros(batch, dtype=torch.long)
    if embed_type == "timestep":
        return torch.zeros(batch)
    if embed_type in ("projection", "simple_projection"):
        return torch.zeros(batch, config.projection_class_embeddings_input_dim)
    if embed_type == "identity":
        return torch.zeros(batch, model.time_embedding.linear_2.out_features)
    return None


def random_text_embeddings(model: nn.Module, count: int, seed: int, length: int = 77) -> dict[str, Any]:
    """Seeded Gaussian stand-ins for text embeddings when a text-conditioned model has no text encoder at hand
    (with SDXL's ``added_cond_kwargs``, pooled embeddings and time ids, for ``addition_embed_type="text_time"``;
    with SD3's pooled projections, with PixArt's resolution conditioning where its transformer takes it)."""
    if "encoder_hidden_states" not in kind_of(model).cond_keys:
        return {}
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    cond: dict[str, Any] = {"encoder_hidden_states": torch.randn(count, length, text_width(model), generator=generator)}
    if getattr(config, "pooled_projection_dim", None):
        cond["pooled_projections"] = torch.randn(count, config.pooled_projection_dim, generator=generator)
    if getattr(model, "use_additional_conditions", False):  # PixArt at 1024 px: square images, 8x the latents
        side = float(config.sample_size * PIXART_VAE_FACTOR)
        cond["added_cond_kwargs"] = {"resolution": torch.full((count, 2), side), "aspect_ratio": torch.ones(count, 1)}
    if getattr(config, "addition_embed_type", None) == "text_time":
        pooled = config.projection_class_embeddings_input_dim - SDXL_TIME_IDS * config.addition_time_embed_dim
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(count, pooled, generator=generator),
                                     "time_ids": torch.randn(count, SDXL_TIME_IDS, generator=generator)}
    return cond


def text_width(model: nn.Module) -> int | None:
    """The width of the text embeddings a text-conditioned model reads (PixArt's caption channels, SD3's joint
    attention width, a UNet's cross-attention width, or the width its ``text_proj`` projects from); ``None`` for
    other models."""
    config = model.config
    if getattr(config, "encoder_hid_dim_type", None) == "text_proj":
        return config.encoder_hid_dim
    width = next((getattr(config, key) for key in ("caption_channels", "joint_attention_dim", "cross_attention_dim")
                  if getattr(config, key, None)), None)
    return width[0] if isinstance(width, (list, tuple)) else width  # per-block widths all read the same states


def is_flow_matching(scheduler: SchedulerMixin) -> bool:
    """Whether ``scheduler`` integrates a flow-matching ODE over sigmas (diffusers' ``FlowMatch*`` schedulers)."""
    return type(scheduler).__name__.startswith("FlowMatch")


def prediction_type(scheduler: SchedulerMixin) -> str:
    """What the model predicts under ``scheduler``: its ``prediction_type`` (``epsilon`` when it has none), or
    :data:`FLOW` for flow-matching schedulers; ``ValueError`` for unsupported ones."""
    if is_flow_matching(scheduler):
        return FLOW
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {kind!r} is not supported; tacdiff supports {', '.join(PREDICTION_TYPES)}")
    return kind


def correction_space(scheduler: SchedulerMixin) -> str:
    """What denoisers return under ``scheduler``, and so what corrections act on: :data:`FLOW` (velocity) for
    flow-matching schedulers, else ``"epsilon"`` (:class:`ModelDenoiser` turns v-predictions into noise)."""
    return FLOW if prediction_type(scheduler) == FLOW else "epsilon"


SHIFT_MU = "tacdiff_mu"
"""The attribute :func:`tacdiff.models.loading.build_scheduler` fixes a resolution-dependent flow shift in."""


def image_seq_len(model: nn.Module) -> int:
    """How many tokens a transformer (patches of ``patch_size``, 1 for UNets) sees per sample: what flow-matching
    schedulers with ``use_dynamic_shifting`` shift their sigmas by."""
    _, height, width = sample_shape_of(model)
    patch = getattr(model.config, "patch_size", None) or 1
    return (height // patch) * (width // patch)


def set_timesteps(scheduler: SchedulerMixin, num_inference_steps: int,
                  device: torch.device | str | None = None) -> None:
    """``scheduler.set_timesteps``, passing the resolution shift ``mu`` where the scheduler needs one (fixed by
    :func:`tacdiff.models.loading.build_scheduler` for the model's sample size, as diffusers' SD3 and FLUX
    pipelines compute it for theirs)."""
    mu = getattr(scheduler, SHIFT_MU, None)
    scheduler.set_timesteps(num_inference_steps, device=device, **({} if mu is None else {"mu": mu}))


def denoiser_scheduler(scheduler: SchedulerMixin) -> SchedulerMixin:
    """A copy of ``scheduler`` that consumes what denoisers return: noise estimates (``prediction_type="epsilon"``)
    or, for flow-matching schedulers, the velocity as it is."""
    copied = copy.deepcopy(scheduler)
    if prediction_type(scheduler) == "v_prediction":
        copied.register_to_config(prediction_type="epsilon")
    return copied


def v_to_eps(v: Tensor, x: Tensor, t: Tensor | float, alphas_cumprod: Tensor) -> Tensor:
    """``eps = alpha_t v + sigma_t x_t`` for a v-prediction ``v`` on the model input ``x_t`` ``(N, C, H, W)``.

    ``alpha_t = sqrt(abar_t)`` and ``sigma_t = sqrt(1 - abar_t)`` from ``alphas_cumprod`` ``(T,)``;
    ``t`` is a scalar or ``(N,)``. Fractional timesteps (Euler) interpolate the noise level
    ``sqrt((1 - abar) / abar)`` linearly, as Euler's sigmas do.
    """
    levels = ((1 - alphas_cumprod.double()) / alphas_cumprod.double()).sqrt()
    where = torch.as_tensor(t).detach().double().cpu().reshape(-1)
    low = where.floor().long().clamp(0, len(levels) - 1)
    high = (low + 1).clamp(max=len(levels) - 1)
    level = torch.lerp(levels[low], levels[high], where - low)
    alpha = (1 + level * level).rsqrt()
    shape = (-1, *([1] * (x.ndim - 1)))
    alpha, sigma = (c.view(shape).to(x.device, x.dtype) for c in (alpha, level * alpha))
    return alpha * v + sigma * x


Cond = dict[str, Any]
"""``{keyword: Tensor (N, ...) | Cond}``."""


def map_cond(cond: Cond, fn: Callable[[Tensor], Any]) -> Cond:
    """``cond`` with ``fn`` applied to every tensor, nested dicts kept as dicts."""
    return {key: map_cond(value, fn) if isinstance(value, dict) else fn(value) for key, value in cond.items()}


def cat_cond(conds: Sequence[Cond]) -> Cond:
    """The conditioning of several row blocks as one: every tensor concatenated along its first dimension,
    nested dicts alike."""
    return {key: cat_cond([c[key] for c in conds]) if isinstance(value, dict) else torch.cat([c[key] for c in conds])
            for key, value in conds[0].items()}


def cond_leaves(cond: Cond, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Every tensor of ``cond`` with its dotted name (e.g. ``added_cond_kwargs.time_ids``)."""
    leaves = []
    for key, value in cond.items():
        name = f"{prefix}{key}"
        leaves += cond_leaves(value, f"{name}.") if isinstance(value, dict) else [(name, value)]
    return leaves


def _cast(cond: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Floating-point conditioning tensors (nested dicts too) in ``dtype``; integer ones as they are."""
    return map_cond(cond, lambda v: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v)


def estimate_channels(out_channels: int, in_channels: int) -> int:
    """The channels of a denoiser's estimate: all its output channels, or the first half where there are twice its
    input's (learned variance: the second half is the variance, which the correction leaves alone)."""
    return out_channels // 2 if out_channels == 2 * in_channels else out_channels


class ModelDenoiser:
    """A registered diffusers model as a denoiser ``(x, t, **cond) -> eps``.

    Args:
        model: a model whose class is in :data:`MODEL_KINDS` (e.g. a quantized UNet).
        scheduler: the sampler's scheduler; needed for models trained with v-prediction (its
            ``prediction_type`` and ``alphas_cumprod`` convert ``v`` to ``eps``). ``None`` means
            the model predicts ``eps``.
    Outputs with twice the input's channels (learned variance) keep the first half, the noise.
    """

    def __init__(self, model: nn.Module, scheduler: SchedulerMixin | None = None) -> None:
        self.model, self.kind = model, kind_of(model)
        v_prediction = scheduler is not None and prediction_type(scheduler) == "v_prediction"
        self.alphas_cumprod = scheduler.alphas_cumprod if v_prediction else None

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        unknown = sorted(set(cond) - self.kind.cond_keys)
        if unknown:
            raise ValueError(f"{self.kind.cls.__name__} takes no conditioning {unknown}; it takes "
                             f"{sorted(self.kind.cond_keys)}")
        dtype = getattr(self.model, "dtype", x.dtype)  # e.g. a bfloat16 model sampled from float32 noise
        t = torch.as_tensor(t, device=x.device)
        timestep = t.expand(x.shape[0]) if t.ndim == 0 else t  # transformers take one timestep per sample only
        out = self.model(x.to(dtype), timestep=timestep, **_cast(cond, dtype), return_dict=False)[0].to(x.dtype)
        out = out[:, :estimate_channels(out.shape[1], x.shape[1])]
        return out if self.alphas_cumprod is None else v_to_eps(out, x, t, self.alphas_cumprod)


class ClassifierFreeGuidance(DenoiserWrapper):
    """Classifier-free guidance ``eps_u + scale (eps_c - eps_u)``, both halves in one call of ``inner``.

    ``uncond`` maps conditioning keywords to their unconditional values (e.g. the empty prompt's
    embedding), with a leading dimension 1 or the batch size; nested dicts (SDXL's
    ``added_cond_kwargs``) alike. Keywords it lacks get zeros (a zero embedding).
    """

    def __init__(self, inner: Denoiser, scale: float, uncond: dict[str, Any] | None = None) -> None:
        super().__init__(inner)
        self.scale, self.uncond = scale, uncond or {}

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.combine(self.branches(x, t, **cond))

    def branches(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """Both estimates from one call of ``inner``: ``cat([eps_u, eps_c])`` of shape ``(2N, ...)``."""
        t = torch.as_tensor(t)
        both = torch.cat([x, x])
        return self.inner(both, t if t.ndim == 0 else torch.cat([t, t]), **guidance_batch(cond, self.uncond))

    def combine(self, branches: Tensor) -> Tensor:
        """The guided estimate ``eps_u + scale (eps_c - eps_u)`` of :meth:`branches`' output."""
        uncond, conditional = branches.chunk(2)
        return uncond + self.scale * (conditional - uncond)


def guidance_batch(cond: Cond, uncond: Cond) -> Cond:
    """``cat([uncond, cond])`` per keyword (the batch a guided model call sees), recursing into nested dicts;
    a missing ``uncond`` is zeros."""
    out = {}
    for key, value in cond.items():
        if isinstance(value, dict):
            out[key] = guidance_batch(value, uncond.get(key, {}))
            continue
        base = uncond.get(key)
        base = torch.zeros_like(value) if base is None else base.to(value.device, value.dtype).expand_as(value)
        out[key] = torch.cat([base, value])
    return out
