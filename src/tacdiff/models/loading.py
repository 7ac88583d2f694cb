"""Load models and schedulers: diffusers ``save_pretrained`` folders (a UNet folder or a pipeline),
quantized artifacts and the bundled reference model; schedulers by name."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       SchedulerMixin)
from torch import nn

from tacdiff.io.artifact import WEIGHTS_NAME, load_quantized, read_metadata
from tacdiff.models.kinds import MODEL_KINDS
from tacdiff.models.reference import load_reference_model

def find_unet_dir(path: str | Path) -> Path:
    """The folder holding the UNet's ``config.json``: ``path`` itself or ``path/unet``."""
    path = Path(path)
    for candidate in (path, path / "unet"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"no diffusers UNet config.json in {path} or {path / 'unet'}; pass a folder "
                            "written by UNet2DModel.save_pretrained or a pipeline's save_pretrained")


def load_unet(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model of a registered kind (:data:`~tacdiff.models.kinds.MODEL_KINDS`) in eval mode."""
    folder = find_unet_dir(path)
    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    kind = MODEL_KINDS.get(name)
    if kind is None:
        raise ValueError(f"{folder} holds a {name!r}; tacdiff supports {', '.join(MODEL_KINDS)}")
    return kind.cls.from_pretrained(folder, low_cpu_mem_usage=False).to(device).eval()


def load_scheduler(path: str | Path | None, model_dir: str | Path | None = None) -> SchedulerMixin:
    """A scheduler from ``path``, else from the model's pipeline folder, else a 1000-step linear DDPM.

    ``path`` may be a scheduler folder or a pipeline folder with ``scheduler/``.
    """
    candidates = []
    if path is not None:
        candidates += [Path(path), Path(path) / "scheduler"]
    if model_dir is not None:
        unet_dir = find_unet_dir(model_dir)
        candidates += [unet_dir.parent / "scheduler", unet_dir / "scheduler"]
    for folder in candidates:
        if (folder / "scheduler_config.json").is_file():
            name = json.loads((folder / "scheduler_config.json").read_text()).get("_class_name", "DDPMScheduler")
            cls = getattr(diffusers, str(name), None)
            if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
                raise ValueError(f"{folder} names scheduler class {name!r}, which diffusers does not provide")
            return cls.from_pretrained(folder)
    if path is not None:
        raise FileNotFoundError(f"no scheduler_config.json in {path} or {Path(path) / 'scheduler'}")
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}
REFERENCE = "reference"


@dataclass
class LoadedModel:
    """A model ready to sample, with the scheduler config it was trained (or quantized) with."""

    model: nn.Module
    scheduler_config: dict[str, Any] | None
    quantized: bool


def load_any_model(spec: str | Path, device: str = "cpu") -> LoadedModel:
    """Load ``"reference"``, a quantized artifact folder or a diffusers UNet/pipeline folder, in eval mode."""
    if str(spec) == REFERENCE:
        model, scheduler = load_reference_model(device)
        return LoadedModel(model, dict(scheduler.config), quantized=False)
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}; pass a diffusers model folder, a quantized "
                                f"artifact folder (tacdiff quantize --out) or '{REFERENCE}'")
    if (path / WEIGHTS_NAME).is_file():
        config = read_metadata(path).get("scheduler_config")
        return LoadedModel(load_quantized(path, device), json.loads(config) if config else None, quantized=True)
    return LoadedModel(load_unet(path, device), dict(load_scheduler(None, path).config), quantized=False)


def build_scheduler(name: str, config: dict[str, Any] | None) -> SchedulerMixin:
    """``SCHEDULERS[name].from_config(config)``; ``config=None`` means a 1000-step linear DDPM schedule."""
    cls = SCHEDULERS.get(name)
    if cls is None:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    base = config if config is not None else dict(DDPMScheduler(num_train_timesteps=1000).config)
    return cls.from_config(base)


def check_settings(scheduler: str, steps: int, samples: int, batch_size: int, device: str) -> None:
    """Raise ``ValueError`` naming the first bad setting (before anything is loaded)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    for name, value in (("steps", steps), ("samples", samples), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise ValueError(f"bad device {device!r} ({error}); use e.g. cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
