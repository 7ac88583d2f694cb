"""Load diffusers UNets and schedulers from ``save_pretrained`` folders (a UNet folder or a pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import DDPMScheduler, SchedulerMixin, UNet2DConditionModel, UNet2DModel

UNET_CLASSES = {cls.__name__: cls for cls in (UNet2DModel, UNet2DConditionModel)}


def find_unet_dir(path: str | Path) -> Path:
    """The folder holding the UNet's ``config.json``: ``path`` itself or ``path/unet``."""
    path = Path(path)
    for candidate in (path, path / "unet"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"no diffusers UNet config.json in {path} or {path / 'unet'}; pass a folder "
                            "written by UNet2DModel.save_pretrained or a pipeline's save_pretrained")


def load_unet(path: str | Path, device: str | torch.device = "cpu") -> UNet2DModel | UNet2DConditionModel:
    """Load a ``UNet2DModel`` or ``UNet2DConditionModel`` in eval mode."""
    folder = find_unet_dir(path)
    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    cls = UNET_CLASSES.get(name)
    if cls is None:
        raise ValueError(f"{folder} holds a {name!r}; tacdiff supports {', '.join(UNET_CLASSES)}")
    return cls.from_pretrained(folder, low_cpu_mem_usage=False).to(device).eval()


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
