"""Reference-model training: tiny real runs, bit-exact resume, safe checkpoints, argument checks, CLI."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tacdiff.models.train as train_mod
from tacdiff.cli import app
from tacdiff.models.train import train
from data_support import fashion_subset

TINY_CONFIG: dict[str, Any] = {
    "sample_size": 28, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1, "attention_head_dim": 8, "norm_num_groups": 4,
}
TINY_SETTINGS: dict[str, Any] = {"batch_size": 8, "lr": 1e-3, "seed": 0, "ema_decay": 0.9, "warmup_steps": 2,
                                  "model_config": TINY_CONFIG}
N_IMAGES = 256
CHECKPOINT_FILES = ["ema.safetensors", "generator.safetensors", "model.safetensors", "optimizer.safetensors",
                    "state.json"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 256 real training images and labels, written as IDX files."""
    return fashion_subset(tmp_path_factory.mktemp("fmnist"), N_IMAGES)


def tiny_train(out_dir: Path, data_dir: Path, **overrides: Any) -> Path:
    kwargs = dict(steps=6, checkpoint_every=2, device="cpu", data_dir=data_dir, progress=False, **TINY_SETTINGS)
    return train(out_dir, **{**kwargs, **overrides})


def checkpointed_state(run: Path) -> train_mod.TrainState:
    """One real step with ``tiny_train``'s settings on blank images (no dataset), checkpointed in ``run``."""
    settings = train_mod.TrainSettings(**TINY_SETTINGS)
    state = train_mod.init_state(settings, torch.device("cpu"))
    scheduler = DDPMScheduler(**train_mod.SCHEDULER_CONFIG)
    train_mod._train_step(state, torch.zeros(16, 1, 28, 28), scheduler, settings)
    state.step, state.smoothed_loss, state.wall_time_s = 1, 0.25, 1.5
    train_mod._save_checkpoint(run / "checkpoint", state, settings)
    return state


class Hostile:
    """Unpickling this creates the file ``marker``: a harmless stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


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


def test_training_a_finished_run_further_replaces_its_outputs(tmp_path: Path, small_data: Path) -> None:
    tiny_train(tmp_path / "run", small_data, steps=2)
    tiny_train(tmp_path / "run", small_data, steps=3)  # checkpoint, unet/ and scheduler/ are recognised
    assert json.loads((tmp_path / "run/training.json").read_text())["steps"] == 3
    assert json.loads((tmp_path / "run/checkpoint/state.json").read_text())["step"] == 3
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint", "scheduler", "training.json", "unet"]


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
    assert json.loads((tmp_path / "resumed/checkpoint/state.json").read_text())["step"] == 2
    monkeypatch.setattr(train_mod, "_train_step", real_step)
    resumed = tiny_train(tmp_path / "resumed", small_data)

    weights = "unet/diffusion_pytorch_model.safetensors"
    expected, got = load_file(reference / weights), load_file(resumed / weights)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert sorted(os.listdir(resumed / "checkpoint")) == CHECKPOINT_FILES
    for name in CHECKPOINT_FILES[:-1]:
        tensors_a, tensors_b = (load_file(d / "checkpoint" / name) for d in (reference, resumed))
        assert tensors_a.keys() == tensors_b.keys()
        assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a), name
    state_a, state_b = (json.loads((d / "checkpoint/state.json").read_text()) for d in (reference, resumed))
    assert state_a["format"] == "tacdiff-train-checkpoint" and state_a["step"] == state_b["step"] == 6
    assert state_a["smoothed_loss"] == state_b["smoothed_loss"]
    assert state_a["param_groups"] == state_b["param_groups"]


def test_checkpoint_round_trips_exactly(tmp_path: Path) -> None:
    saved = checkpointed_state(tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run/checkpoint")) == CHECKPOINT_FILES
    loaded = train_mod.resume_or_init(tmp_path / "run/checkpoint", train_mod.TrainSettings(**TINY_SETTINGS),
                                       torch.device("cpu"))
    for module in ("model", "ema"):
        a, b = getattr(saved, module).state_dict(), getattr(loaded, module).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = saved.optimizer.state_dict(), loaded.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]  # betas back as a tuple
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) == len(list(saved.model.parameters()))
    assert all(a["state"][i].keys() == b["state"][i].keys() and
               all(torch.equal(a["state"][i][n], b["state"][i][n]) for n in a["state"][i]) for i in a["state"])
    assert torch.equal(saved.generator.get_state(), loaded.generator.get_state())
    assert (loaded.step, loaded.smoothed_loss, loaded.wall_time_s) == (1, 0.25, 1.5)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = checkpointed_state(tmp_path / "run")
    state.step = 2

    def failing_save(tensors: dict[str, torch.Tensor], path: str) -> None:
        if path.endswith("optimizer.safetensors"):
            raise KeyboardInterrupt
        save_file(tensors, path)

    monkeypatch.setattr(train_mod, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        train_mod._save_checkpoint(tmp_path / "run/checkpoint", state, train_mod.TrainSettings(**TINY_SETTINGS))
    assert os.listdir(tmp_path / "run") == ["checkpoint"]
    assert sorted(os.listdir(tmp_path / "run/checkpoint")) == CHECKPOINT_FILES
    assert json.loads((tmp_path / "run/checkpoint/state.json").read_text())["step"] == 1


def test_old_pickle_checkpoint_is_refused_unopened(tmp_path: Path) -> None:
    legacy, marker = tmp_path / "run/checkpoint/state.pt", tmp_path / "marker"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(pickle.dumps(Hostile(marker)))
    with pytest.raises(ValueError, match=re.escape(str(legacy)) + ".*old torch.save format.*new run folder"):
        tiny_train(tmp_path / "run", tmp_path / "unused")
    assert not marker.exists()
    pickle.loads(legacy.read_bytes()).close()  # the payload does work when unpickled
    assert marker.exists()


def test_a_checkpoint_folder_tacdiff_did_not_write_is_refused(tmp_path: Path) -> None:
    notes = tmp_path / "run/checkpoint/notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    with pytest.raises(ValueError, match="is not a tacdiff training checkpoint .*choose another run folder"):
        tiny_train(tmp_path / "run", tmp_path / "unused")
    assert notes.read_text() == "mine"


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_hostile_pickle_as_checkpoint_file_is_refused_unopened(tmp_path: Path, name: str) -> None:
    checkpointed_state(tmp_path / "run")
    path, marker = tmp_path / "run/checkpoint" / name, tmp_path / "marker"
    path.write_bytes(pickle.dumps(Hostile(marker)))
    with pytest.raises(ValueError, match=re.escape(f"checkpoint file {path} is missing or unusable")):
        tiny_train(tmp_path / "run", tmp_path / "unused")
    assert not marker.exists()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_format(path: Path) -> None:
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "format"}))


def _drop_a_parameter_state(path: Path) -> None:
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("0.")}, str(path))


@pytest.mark.parametrize(("name", "damage", "message"), [
    ("optimizer.safetensors", _truncate, ""),
    ("optimizer.safetensors", _drop_a_parameter_state, "holds state for"),
    ("generator.safetensors", Path.unlink, "No such file"),
    ("state.json", lambda path: path.write_text("{not json"), ""),
    ("state.json", _drop_format, '"format": "tacdiff-train-checkpoint"'),
    ("state.json", lambda path: path.write_text(path.read_text().replace('"step": 1', '"step": "1"')), "step"),
    ("model.safetensors", lambda path: save_file({"weight": torch.zeros(2)}, str(path)), "Missing key"),
])
def test_damaged_checkpoint_gives_clear_error(tmp_path: Path, name: str, damage: Callable[[Path], Any],
                                              message: str) -> None:
    checkpointed_state(tmp_path / "run")
    path = tmp_path / "run/checkpoint" / name
    damage(path)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint file {path} is missing or unusable") + ".*"
                       + re.escape(message) + ".*" + re.escape(f"delete {path.parent}") + ".*new run folder"):
        tiny_train(tmp_path / "run", tmp_path / "unused")


@pytest.mark.parametrize(("override", "message"), [
    ({"steps": 0}, "steps must be >= 1"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"lr": 0.0}, "lr must be finite and > 0"),
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
    with pytest.raises(ValueError, match=r"other settings: lr 0\.001 \(checkpoint\) vs 0\.0005 \(now\); use"):
        tiny_train(tmp_path / "run", small_data, steps=4, lr=5e-4)
    with pytest.raises(ValueError, match="past steps=1"):
        tiny_train(tmp_path / "run", small_data, steps=1)


def test_cli_train(tmp_path: Path, small_data: Path) -> None:
    result = CliRunner().invoke(app, ["train", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
                                      "--device", "cpu", "--data-dir", str(small_data), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run/unet/config.json").is_file() and (tmp_path / "run/training.json").is_file()
