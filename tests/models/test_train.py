"""Reference-model training: tiny real runs, bit-exact resume, argument checks, CLI."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file
from typer.testing import CliRunner

import tacdiff.models.train as train_mod
from tacdiff.cli import app
from tacdiff.data.fashion_mnist import DEFAULT_DATA_DIR, load_fashion_mnist
from tacdiff.models.train import train

TINY_CONFIG: dict[str, Any] = {
    "sample_size": 28, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1, "attention_head_dim": 8, "norm_num_groups": 4,
}
N_IMAGES = 256


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 256 real training images and labels, written as IDX files."""
    if not (DEFAULT_DATA_DIR / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"Fashion-MNIST missing at {DEFAULT_DATA_DIR} on CI")
        pytest.skip("dataset-fashion-mnist not installed")
    images, labels = load_fashion_mnist("train")
    root = tmp_path_factory.mktemp("fmnist")
    for name, magic, array in (("train-images-idx3-ubyte.gz", 2051, images[:N_IMAGES]),
                               ("train-labels-idx1-ubyte.gz", 2049, labels[:N_IMAGES].to(torch.uint8))):
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
        with gzip.open(root / name, "wb", compresslevel=1) as f:
            f.write(header + array.numpy().tobytes())
    return root


def tiny_train(out_dir: Path, data_dir: Path, **overrides: Any) -> Path:
    kwargs = dict(steps=6, batch_size=8, lr=1e-3, seed=0, ema_decay=0.9, checkpoint_every=2,
                  device="cpu", data_dir=data_dir, model_config=TINY_CONFIG, warmup_steps=2, progress=False)
    return train(out_dir, **{**kwargs, **overrides})


def test_tiny_run_writes_loadable_diffusers_dir(tmp_path: Path, small_data: Path) -> None:
    out = tiny_train(tmp_path / "run", small_data, steps=4)
    unet = UNet2DModel.from_pretrained(out / "unet", low_cpu_mem_usage=False)
    scheduler = DDPMScheduler.from_pretrained(out / "scheduler")
    record = json.loads((out / "training.json").read_text())
    assert list(unet.config.block_out_channels) == TINY_CONFIG["block_out_channels"]
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.beta_schedule == "linear"
    assert record["steps"] == 4 and record["batch_size"] == 8 and record["data"]["images"] == N_IMAGES
    assert 0 < record["final_loss"] < 10 and record["wall_time_s"] >= 0
    eps = unet(torch.zeros(2, 1, 28, 28), torch.tensor([10, 900])).sample
    assert eps.shape == (2, 1, 28, 28) and eps.isfinite().all()


def test_resume_after_interruption_is_bit_exact(tmp_path: Path, small_data: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    reference = tiny_train(tmp_path / "straight", small_data)
    real_step, calls = train_mod._train_step, []

    def crashing_step(*args: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(train_mod, "_train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        tiny_train(tmp_path / "resumed", small_data)
    assert torch.load(tmp_path / "resumed/checkpoint/state.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(train_mod, "_train_step", real_step)
    resumed = tiny_train(tmp_path / "resumed", small_data)

    weights = "unet/diffusion_pytorch_model.safetensors"
    expected, got = load_file(reference / weights), load_file(resumed / weights)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    ckpt_a, ckpt_b = (torch.load(d / "checkpoint/state.pt", weights_only=False) for d in (reference, resumed))
    assert all(torch.equal(ckpt_a["model"][k], ckpt_b["model"][k]) for k in ckpt_a["model"])
    assert ckpt_a["smoothed_loss"] == ckpt_b["smoothed_loss"]


@pytest.mark.parametrize(("override", "message"), [
    ({"steps": 0}, "steps must be >= 1"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)"),
    ({"checkpoint_every": 0}, "checkpoint_every must be >= 1"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
])
def test_bad_arguments_raise(tmp_path: Path, override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_train(tmp_path / "run", tmp_path / "unused", **override)
    assert not (tmp_path / "run").exists()


def test_resume_refuses_other_settings_or_fewer_steps(tmp_path: Path, small_data: Path) -> None:
    tiny_train(tmp_path / "run", small_data, steps=2)
    with pytest.raises(ValueError, match="other settings"):
        tiny_train(tmp_path / "run", small_data, steps=4, lr=5e-4)
    with pytest.raises(ValueError, match="past steps=1"):
        tiny_train(tmp_path / "run", small_data, steps=1)


def test_cli_train(tmp_path: Path, small_data: Path) -> None:
    result = CliRunner().invoke(app, ["train", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
                                      "--device", "cpu", "--data-dir", str(small_data), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run/unet/config.json").is_file() and (tmp_path / "run/training.json").is_file()
