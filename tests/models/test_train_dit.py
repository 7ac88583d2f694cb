"""DiT training: a tiny real run on the bundled latent reference's autoencoder, resume, the exported DiTPipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiTPipeline
from safetensors.torch import load_file

from data_support import fashion_subset
from tacdiff.models.train_dit import CHECKPOINT, NULL_CLASS, train_dit

TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1, sample_size=8,
            patch_size=2, num_embeds_ada_norm=NULL_CLASS)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fashion_subset(tmp_path_factory.mktemp("fmnist"), 64, ("train",))


def tiny_run(out: Path, data: Path, steps: int) -> Path:
    return train_dit(out, steps=steps, batch_size=4, checkpoint_every=2, data_dir=data, config=TINY, warmup_steps=1,
                     progress=False)


def test_the_exported_folder_is_a_dit_pipeline_that_samples_named_classes(data: Path, tmp_path: Path) -> None:
    run = tiny_run(tmp_path, data, steps=3)
    record = json.loads((run / "training.json").read_text())
    assert record["steps"] == 3 and record["parameters"] > 0
    pipe = DiTPipeline.from_pretrained(run / "pipeline")
    assert pipe.get_label_ids(["sneaker", "ankle boot", "pants"]) == [7, 9, 1]
    images = pipe(class_labels=[7, 9], num_inference_steps=2, guidance_scale=4.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 1) and bool((images >= 0).all() and (images <= 1).all())


def test_a_resumed_run_equals_a_straight_one(data: Path, tmp_path: Path) -> None:
    straight = tiny_run(tmp_path / "straight", data, steps=4)
    tiny_run(tmp_path / "resumed", data, steps=2)
    resumed = tiny_run(tmp_path / "resumed", data, steps=4)
    one, two = (load_file(str(run / CHECKPOINT / "ema.safetensors")) for run in (straight, resumed))
    assert all(torch.equal(one[key], two[key]) for key in one)
