"""The bundled reference model: loads as a diffusers dir, fits the size budget, samples deterministically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

import tacdiff.models.reference as reference
from tacdiff.models.reference import REFERENCE_MODEL_DIR, load_reference_model


def ddim_sample(unet: UNet2DModel, scheduler: DDPMScheduler, n: int, steps: int, seed: int) -> torch.Tensor:
    """``n`` DDIM (eta=0) samples ``(n, 1, 28, 28)`` from a fixed seed, not clipped."""
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x).prev_sample
    return x


def test_asset_is_a_plain_diffusers_dir() -> None:
    unet = UNet2DModel.from_pretrained(REFERENCE_MODEL_DIR / "unet", low_cpu_mem_usage=False)
    config = unet.config
    assert (config.sample_size, config.in_channels, config.out_channels) == (28, 1, 1)
    assert "AttnDownBlock2D" in config.down_block_types and "AttnUpBlock2D" in config.up_block_types
    assert sum(p.numel() for p in unet.parameters()) <= 3_000_000
    assert (REFERENCE_MODEL_DIR / "unet/diffusion_pytorch_model.safetensors").stat().st_size <= 12 * 2**20
    scheduler = DDPMScheduler.from_pretrained(REFERENCE_MODEL_DIR / "scheduler")
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"
    record = json.loads((REFERENCE_MODEL_DIR / "training.json").read_text())
    assert record["steps"] >= 1000 and record["data"]["split"] == "train"


def test_ddim_sample_is_finite_and_deterministic() -> None:
    unet, scheduler = load_reference_model()
    first = ddim_sample(unet, scheduler, n=4, steps=10, seed=0)
    second = ddim_sample(unet, scheduler, n=4, steps=10, seed=0)
    assert first.shape == (4, 1, 28, 28) and first.isfinite().all()
    assert torch.equal(first, second)
    images = first.clamp(-1, 1)
    assert images.min() >= -1 and images.max() <= 1
    assert (images > 0).float().mean() > 0.05, "samples are blank: no garment pixels"


def test_missing_asset_raises_with_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reference, "REFERENCE_MODEL_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="reference model file missing.*tacdiff train"):
        load_reference_model()


def test_a_missing_bundled_pipeline_names_the_command_that_rebuilds_it(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    missing = (tmp_path / "gone", "tacdiff train-dit RUN")
    monkeypatch.setitem(reference.BUNDLED_PIPELINES, reference.DIT_REFERENCE, missing)
    with pytest.raises(FileNotFoundError, match="rebuild it with `tacdiff train-dit RUN`"):
        reference.bundled_folder(reference.DIT_REFERENCE)
    assert reference.bundled_folder(str(tmp_path)) == str(tmp_path)
