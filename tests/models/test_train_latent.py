"""Latent text-to-image training: tiny real runs of both stages, bit-exact resume, the exported pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from data_support import fashion_subset
from tacdiff.data.prompts import fashion_prompts
from tacdiff.models.loading import load_any_model
from tacdiff.models.train_latent import IMAGE_SIZE, TEXT_TOKENS, train_latent
from tacdiff.sampling.conditioning import conditioning_for

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "autoencoder": dict(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=IMAGE_SIZE),
    "unet": dict(sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, block_out_channels=[16, 32],
                 layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=16, attention_head_dim=4,
                 norm_num_groups=8),
    "text_encoder": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fashion_subset(tmp_path_factory.mktemp("fmnist"), 64, ("train", "test"))


def tiny_run(out: Path, data: Path, unet_steps: int) -> Path:
    return train_latent(out, autoencoder_steps=3, unet_steps=unet_steps, batch_size=4, checkpoint_every=2,
                        data_dir=data, configs=TINY_CONFIGS, warmup_steps=1, progress=False)


@pytest.fixture(scope="module")
def straight(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("straight"), data, unet_steps=4)


def test_the_exported_pipeline_is_a_stable_diffusion_folder(straight: Path) -> None:
    record = json.loads((straight / "training.json").read_text())
    assert record["unet_steps"] == 4 and record["scaling_factor"] > 0 and 0 < record["reconstruction_psnr_db"] < 60
    pipe = StableDiffusionPipeline.from_pretrained(straight / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a sneaker", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 1) and pipe.tokenizer.model_max_length == TEXT_TOKENS
    assert pipe.safety_checker is None and pipe.vae.config.scaling_factor == record["scaling_factor"]
    loaded = load_any_model(straight / "pipeline")
    assert loaded.reads_prompts and loaded.image_shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    # runs on the folder default to its class-balanced captions, not everyday scenes it has no words for
    assert list(conditioning_for(loaded, count=3).prompts) == fashion_prompts()


def test_more_steps_resume_both_stages_bit_exactly(straight: Path, data: Path, tmp_path: Path) -> None:
    tiny_run(tmp_path / "run", data, unet_steps=2)
    resumed = tiny_run(tmp_path / "run", data, unet_steps=4)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        expected, got = (load_file(run / "pipeline" / part) for run in (straight, resumed))
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), part
