"""Load models and schedulers: diffusers ``save_pretrained`` folders (a UNet folder or a pipeline),
quantized artifacts and the bundled reference model; schedulers by name."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import diffusers
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, SchedulerMixin, SD3Transformer2DModel)
from torch import nn

from tacdiff.backends import check_backend, use_backend
from tacdiff.devices import check_device
from tacdiff.io.artifact import (WEIGHTS_NAME, component_files, load_component, load_quantized, read_metadata,
                                recorded_scheduler_config)
from tacdiff.models.kinds import MODEL_KINDS, SHIFT_MU, image_seq_len, sample_shape_of, unsupplied_inputs
from tacdiff.models.folders import check_safetensors, diffusers_load, quiet_loading, read_config, weights_variant
from tacdiff.models.pipelines import (PipelineKind, component, components_sha256, decode_latents, load_components,
                                     pipeline_kind, read_index)
from tacdiff.models.reference import BUNDLED_PIPELINES, bundled_folder, load_reference_model

LOG = logging.getLogger(__name__)
LEARNED_VARIANCES = ("learned", "learned_range")
"""DDPM variance types that read a predicted variance (the second half of the model's output channels)."""


def find_unet_dir(path: str | Path) -> Path:
    """The folder holding the denoiser's ``config.json``: ``path`` itself, ``path/unet`` or ``path/transformer``."""
    path = Path(path)
    for candidate in (path, path / "unet", path / "transformer"):
        if (candidate / "config.json").is_file():
            return candidate
    if not path.is_dir():
        raise FileNotFoundError(_not_found(path))
    raise FileNotFoundError(f"no diffusers model config.json in {path}, {path / 'unet'} or {path / 'transformer'}; "
                            "pass a folder written by a model's save_pretrained (e.g. UNet2DModel's) or a "
                            "pipeline's save_pretrained")


def _not_found(path: Path) -> str:
    bundled = ", ".join(f"'{name}'" for name in (REFERENCE, *BUNDLED_PIPELINES))
    return (f"model folder not found: {path}; pass a diffusers model or pipeline folder, a quantized artifact folder "
            f"(tacdiff quantize --out) or a bundled model ({bundled})")


def load_unet(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model of a registered kind (:data:`~tacdiff.models.kinds.MODEL_KINDS`) in eval mode."""
    folder = find_unet_dir(path)
    name = read_config(folder / "config.json").get("_class_name")
    kind = MODEL_KINDS.get(name)
    if kind is None:
        raise ValueError(f"{folder / 'config.json'} names model class {name!r}; tacdiff supports "
                         f"{', '.join(MODEL_KINDS)}")
    _check_weights_format(folder)
    with quiet_loading():
        model = diffusers_load(folder, lambda: kind.cls.from_pretrained(folder, low_cpu_mem_usage=False,
                                                                        use_safetensors=True,
                                                                        variant=weights_variant(folder)))
    return model.to(device).eval()


def _check_weights_format(folder: Path) -> None:
    """Raise ``ValueError`` unless ``folder`` holds full-precision weights as safetensors (pickles are never read)."""
    if (folder / WEIGHTS_NAME).is_file():
        raise ValueError(f"{folder} is a tacdiff quantized artifact, not a full-precision model; pass the FP "
                         "model folder it was quantized from")
    check_safetensors(folder, required=True)


def load_scheduler(path: str | Path | None, model_dir: str | Path | None = None,
                   model: nn.Module | None = None) -> SchedulerMixin:
    """A scheduler from ``path``, else from the model's pipeline folder, else :func:`default_scheduler` of ``model``.

    ``path`` may be a scheduler folder or a pipeline folder with ``scheduler/``.
    """
    if path is not None:  # a named scheduler must exist: no silent fallback to another one
        candidates = [Path(path), Path(path) / "scheduler"]
    elif model_dir is not None:
        unet_dir = find_unet_dir(model_dir)
        candidates = [unet_dir.parent / "scheduler", unet_dir / "scheduler"]
    else:
        candidates = []
    for folder in candidates:
        if (folder / "scheduler_config.json").is_file():
            return _scheduler_from(folder)
    if path is not None:
        raise FileNotFoundError(f"no scheduler_config.json in {path} or {Path(path) / 'scheduler'}; pass a scheduler "
                                "folder (or a pipeline folder with scheduler/), or leave --scheduler out")
    return default_scheduler(model)


def default_scheduler(model: nn.Module | None) -> SchedulerMixin:
    """The schedule of a model folder with no scheduler config beside it: flow matching for SD3's transformer
    (trained for it; diffusers' SD3 pipelines ship ``FlowMatchEulerDiscreteScheduler`` with shift 3.0), a 1000-step
    linear DDPM for every other model."""
    if isinstance(model, SD3Transformer2DModel):
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_SHIFT)
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


def _scheduler_from(folder: Path) -> SchedulerMixin:
    """The diffusers scheduler saved in ``folder``, with clear errors for a bad config."""
    name = read_config(folder / "scheduler_config.json").get("_class_name", "DDPMScheduler")
    cls = scheduler_class(name, str(folder))
    return diffusers_load(folder, lambda: cls.from_pretrained(folder))


def scheduler_class(name: object, where: str) -> type[SchedulerMixin]:
    """The diffusers scheduler class called ``name`` (named by ``where``); ``ValueError`` if diffusers has none."""
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"{where} names scheduler class {name!r}, which diffusers does not provide; use a diffusers "
                         "scheduler")
    return cls


SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler, "flow": FlowMatchEulerDiscreteScheduler,
}
FLOW_SCHEDULER = "flow"
SD3_SHIFT = 3.0
AUTO_SCHEDULER = "auto"
"""The default scheduler name: ``flow`` for a model whose scheduler config is a flow-matching one, else ``ddim``."""
REFERENCE = "reference"


def input_paths(*specs: str | Path | None) -> list[str | Path]:
    """The model, artifact and tables specs of a run that name files or folders (not None, not ``"reference"``; a
    bundled pipeline's name as its folder), which an output must never replace."""
    return [bundled_folder(spec) for spec in specs if spec is not None and str(spec) != REFERENCE]


@dataclass
class LoadedModel:
    """A model ready to sample, with the scheduler config it was trained (or quantized) with and, for
    pipeline folders, the pipeline's full-precision components around it (``pipeline.unet`` is ``model``)."""

    model: nn.Module
    scheduler_config: dict[str, Any] | None
    quantized: bool
    pipeline: DiffusionPipeline | None = None
    kind: PipelineKind | None = None

    @property
    def reads_prompts(self) -> bool:
        """Whether the model comes with a tokenizer and text encoder (a text-to-image pipeline)."""
        return self.kind is not None and self.kind.text

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the model makes: its samples, or what its autoencoder decodes them to."""
        channels, height, width = sample_shape_of(self.model)
        if self.kind is None or self.kind.decoder is None:
            return channels, height, width
        config = getattr(self.pipeline, self.kind.decoder).config
        factor = 2 ** (len(config.block_out_channels) - 1)  # diffusers' vae_scale_factor
        return config.out_channels, height * factor, width * factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final samples as images in [-1, 1]: decoded by the pipeline's autoencoder, if it has one."""
        return latents if self.kind is None else decode_latents(self.pipeline, self.kind, latents)


def load_any_model(spec: str | Path, device: str | torch.device = "cpu", backend: str = "fake",
                   sampled: bool = True, check: Callable[[LoadedModel], None] | None = None,
                   probe_batch: int = 8) -> LoadedModel:
    """Load ``"reference"``, ``"latent-reference"`` (the bundled text-to-image pipeline), a quantized artifact
    folder, or a diffusers model or pipeline folder, in eval mode.

    Pipeline folders (and artifacts quantized from one, which record where it lives) come with
    their components (:func:`~tacdiff.models.pipelines.load_components`): full precision, or
    quantized where the artifact holds them (``--quantize-text-encoder``, ``--quantize-vae-decoder``).
    ``backend`` runs a quantized artifact's denoiser on that execution backend
    (:func:`tacdiff.backends.use_backend`; ``"auto"`` times its layers at ``probe_batch`` samples, best the batch
    size the caller will run); full-precision models take ``"fake"`` only. A model that reads inputs
    tacdiff cannot make up (:func:`~tacdiff.models.kinds.unsupplied_inputs`) is refused unless ``sampled`` is False
    (for timing alone). ``check`` (raising on a model its caller cannot use) sees the loaded model before its
    layers are converted to ``backend``, so a refusal costs no conversion.
    """
    check_backend(backend)
    if backend != "fake" and str(spec) == REFERENCE:
        raise ValueError(f"backend {backend!r} runs quantized artifacts, but {spec!r} is the full-precision bundled "
                         "model; quantize it first (tacdiff quantize) or leave the backend at 'fake'")
    if str(spec) == REFERENCE:
        model, scheduler = load_reference_model(device)
        return LoadedModel(model, dict(scheduler.config), quantized=False)
    path = Path(bundled_folder(spec))
    if not path.is_dir():
        raise FileNotFoundError(_not_found(path))
    quantized = (path / WEIGHTS_NAME).is_file()
    if backend != "fake" and not quantized:
        raise ValueError(f"backend {backend!r} runs quantized artifacts, but {path} is a full-precision model; "
                         "quantize it first (tacdiff quantize) or leave the backend at 'fake'")
    if quantized:
        model, config, pipeline_dir = load_quantized(path, device), recorded_scheduler_config(path), \
            artifact_pipeline(path)
    else:  # an unsupported pipeline class raises before any weights load
        pipeline_dir = path if pipeline_kind(path) is not None else None
        model = load_unet(path, device)
        config = dict(load_scheduler(None, path, model).config)
    missing = unsupplied_inputs(model) if sampled else None
    if missing is not None:
        raise ValueError(f"{path} reads {missing}, which tacdiff cannot supply when it samples; quantize it from "
                         "Python with calibration inputs of your own (tacdiff.quantize)")
    loaded = LoadedModel(model, config, quantized)
    if pipeline_dir is not None:
        pipe, kind = load_components(pipeline_dir, model, device), pipeline_kind(pipeline_dir)
        for name, file in (component_files(path) if quantized else {}).items():
            load_component(component(pipe, kind, name), file)
        loaded = LoadedModel(model, config, quantized, pipe, kind)
    if check is not None:
        check(loaded)
    if backend != "fake":  # only quantized artifacts get here with another backend (above)
        use_backend(model, backend, probe_batch=probe_batch)
    return loaded


PIPELINE_KEY = "pipeline_folder"
"""Artifact metadata: the pipeline folder whose FP components (text encoder, autoencoder) go with the model."""
PIPELINE_SHA256_KEY = "pipeline_components_sha256"
"""Artifact metadata: :func:`~tacdiff.models.pipelines.components_sha256` of that folder when quantized."""


def artifact_pipeline(path: str | Path) -> Path | None:
    """The pipeline folder an artifact was quantized from (``None`` for a bare model folder); ``ValueError``
    when it has moved, since the artifact cannot sample without its text encoder and autoencoder."""
    meta = read_metadata(path)
    if not meta.get(PIPELINE_KEY):
        return None
    folder = Path(meta[PIPELINE_KEY])
    if read_index(folder) is None:
        raise ValueError(f"{path} was quantized from the pipeline folder {folder}, whose components (text encoder, "
                         "autoencoder, scheduler) it needs, but that folder no longer holds a pipeline; restore it "
                         "there or quantize again from its new place")
    recorded = meta.get(PIPELINE_SHA256_KEY)
    if recorded and components_sha256(folder) != recorded:
        raise ValueError(f"the pipeline folder {folder} changed since {path} was quantized from it (its text encoder, "
                         "tokenizer or autoencoder files differ); restore it, or quantize again from it")
    return folder


def is_flow_config(config: dict[str, Any]) -> bool:
    """Whether a scheduler config is a flow-matching one (a ``shift`` of sigmas and no beta schedule)."""
    return "shift" in config and "beta_start" not in config


def resolve_scheduler(name: str, config: dict[str, Any] | None) -> str:
    """``name``, with ``"auto"`` replaced by ``"flow"`` for a flow-matching scheduler ``config`` and ``"ddim"``
    for any other (or none)."""
    if name != AUTO_SCHEDULER:
        return name
    return FLOW_SCHEDULER if config is not None and is_flow_config(config) else "ddim"


def build_scheduler(name: str, config: dict[str, Any] | None, model: nn.Module | None = None) -> SchedulerMixin:
    """``SCHEDULERS[name].from_config(config)``; ``config=None`` means a 1000-step linear DDPM schedule.

    ``"flow"`` (flow-matching Euler over sigmas) and the noise-prediction schedulers do not mix: a model
    whose recorded scheduler is a flow-matching one samples with ``"flow"`` only, and the reverse;
    ``"auto"`` picks ``"flow"`` or ``"ddim"`` by the config. A flow scheduler that shifts its sigmas by image
    size (``use_dynamic_shifting``, FLUX and some SD3 folders) gets the shift ``mu`` for ``model``'s sample
    size, by diffusers' own ``calculate_shift`` with the scheduler's ``base_/max_image_seq_len`` and
    ``base_/max_shift``, as the SD3 and FLUX pipelines compute it.
    """
    name = resolve_scheduler(name, config)
    cls = SCHEDULERS.get(name)
    if cls is None:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if config is not None and is_flow_config(config) != (name == FLOW_SCHEDULER):
        hint = (f"it samples by flow matching (its scheduler config has sigmas, no betas); pass --scheduler "
                f"{FLOW_SCHEDULER}" if name != FLOW_SCHEDULER else
                "it predicts noise on a beta schedule; pick ddim, ddpm, dpm or euler")
        raise ValueError(f"scheduler {name!r} does not fit this model: {hint}")
    base = config if config is not None else dict(DDPMScheduler(num_train_timesteps=1000).config)
    if cls is DDPMScheduler and base.get("variance_type") in LEARNED_VARIANCES:
        LOG.warning("the scheduler config's variance_type %r reads a variance the model predicts, but tacdiff samples "
                    "with its noise estimate only: ddpm uses variance_type 'fixed_small' instead",
                    base["variance_type"])
        base = {**base, "variance_type": "fixed_small"}
    return fit_resolution_shift(cls.from_config(base), model)


def fit_resolution_shift(scheduler: SchedulerMixin, model: nn.Module | None) -> SchedulerMixin:
    """``scheduler``, with the shift ``mu`` for ``model``'s sample size fixed in it when it shifts its sigmas by
    image size (``use_dynamic_shifting``; :func:`tacdiff.models.kinds.set_timesteps` passes it on)."""
    if scheduler.config.get("use_dynamic_shifting"):
        if model is None:
            raise ValueError("this flow-matching scheduler shifts its sigmas by image size (use_dynamic_shifting); "
                             "build it with the model whose samples it schedules")
        setattr(scheduler, SHIFT_MU, resolution_shift(scheduler.config, image_seq_len(model)))
    return scheduler


def resolution_shift(config: dict[str, Any], tokens: int) -> float:
    """The dynamic shift ``mu`` of a flow-matching scheduler ``config`` for ``tokens`` image tokens (diffusers' own
    interpolation between ``base_shift`` at ``base_image_seq_len`` and ``max_shift`` at ``max_image_seq_len``)."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    return calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The :data:`SCHEDULERS` name of a scheduler that :func:`build_scheduler` made (for run records)."""
    return next(name for name, cls in SCHEDULERS.items() if type(scheduler) is cls)


def check_settings(scheduler: str, steps: int, samples: int, batch_size: int, device: str) -> None:
    """Raise ``ValueError`` naming the first bad setting (before anything is loaded)."""
    if scheduler not in SCHEDULERS and scheduler != AUTO_SCHEDULER:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose {AUTO_SCHEDULER} or one of {', '.join(SCHEDULERS)}")
    for name, value in (("steps", steps), ("samples", samples), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    check_device(device)
