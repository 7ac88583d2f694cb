"""The bundled reference model: a 28x28 Fashion-MNIST DDPM (diffusers UNet2DModel + DDPMScheduler)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

# Built on one H100 in 341 s by: tacdiff train OUT --steps 6000 --batch-size 256 --seed 0 --device cuda
REFERENCE_MODEL_DIR: Path = Path(str(files("tacdiff") / "assets" / "reference-fmnist"))


def load_reference_model(device: str | torch.device = "cpu") -> tuple[UNet2DModel, DDPMScheduler]:
    """Load the bundled model in eval mode.

    Returns:
        ``unet`` mapping ``(N, 1, 28, 28)`` noisy images in [-1, 1] and timesteps ``(N,)``
        in 0..999 to predicted noise ``(N, 1, 28, 28)``, and its 1000-step linear-beta
        ``DDPMScheduler`` (swap in any diffusers scheduler with ``from_config``).
    """
    for sub in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        if not (REFERENCE_MODEL_DIR / sub).is_file():
            raise FileNotFoundError(
                f"reference model file missing: {REFERENCE_MODEL_DIR / sub}. Reinstall tacdiff "
                f"(the asset ships as package data) or rebuild it with `tacdiff train OUT_DIR` and "
                f"copy OUT_DIR/unet, OUT_DIR/scheduler into {REFERENCE_MODEL_DIR}")
    unet = UNet2DModel.from_pretrained(REFERENCE_MODEL_DIR / "unet", low_cpu_mem_usage=False).to(device).eval()
    return unet, DDPMScheduler.from_pretrained(REFERENCE_MODEL_DIR / "scheduler")


LATENT_REFERENCE = "latent-reference"
LATENT_REFERENCE_DIR: Path = Path(str(files("tacdiff") / "assets" / "latent-reference-fmnist"))
"""The bundled text-to-image latent pipeline (a ``StableDiffusionPipeline`` folder), made by
``tacdiff train-latent``."""


DIT_REFERENCE = "dit-reference"
DIT_REFERENCE_DIR: Path = Path(str(files("tacdiff") / "assets" / "dit-reference-fmnist"))
"""The bundled class-conditional DiT (a ``DiTPipeline`` folder), made by ``tacdiff train-dit``."""

BUNDLED_PIPELINES: dict[str, tuple[Path, str]] = {
    LATENT_REFERENCE: (LATENT_REFERENCE_DIR, "tacdiff train-latent RUN"),
    DIT_REFERENCE: (DIT_REFERENCE_DIR, "tacdiff train-dit RUN"),
}
"""Names of the bundled pipeline folders: ``name -> (folder, the command that rebuilds it)``."""


def bundled_folder(spec: str | Path) -> str | Path:
    """``spec`` with the name of a bundled pipeline (:data:`BUNDLED_PIPELINES`) replaced by its folder; other specs
    (folders, ``"reference"``) unchanged."""
    if str(spec) not in BUNDLED_PIPELINES:
        return spec
    folder, command = BUNDLED_PIPELINES[str(spec)]
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"bundled pipeline missing: {folder}. Reinstall tacdiff (it ships as package data) "
                                f"or rebuild it with `{command}` and copy RUN/pipeline there")
    return folder
