"""Fault catalogue 4: artifacts are checked on load (checksum, config, metadata, kind of folder), through
every command that reads one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
from safetensors.torch import load_file, safe_open, save_file

from fault_support import EVAL_FAST, World, assert_one_error, cli, snapshot
from tacdiff.io.artifact import CHECKSUM_KEY, content_sha256

WEIGHTS = "quantized.safetensors"


def flip_a_tensor_byte(artifact: Path) -> None:
    data = bytearray((artifact / WEIGHTS).read_bytes())
    data[-10] ^= 0xFF  # the last bytes are tensor data, not the JSON header
    (artifact / WEIGHTS).write_bytes(bytes(data))


def set_metadata(**changes: str) -> Callable[[Path], None]:
    """Change metadata as a consistent writer would (checksum recomputed), so the checks behind it are reached."""
    def change(artifact: Path) -> None:
        with safe_open(artifact / WEIGHTS, framework="pt") as handle:
            meta = {**handle.metadata(), **changes}
        tensors = load_file(artifact / WEIGHTS)
        save_file(tensors, artifact / WEIGHTS, metadata={**meta, CHECKSUM_KEY: content_sha256(tensors, meta)})
    return change


def edit_metadata_by_hand(artifact: Path) -> None:
    with safe_open(artifact / WEIGHTS, framework="pt") as handle:
        meta = handle.metadata()
    config = json.loads(meta["scheduler_config"])
    meta["scheduler_config"] = json.dumps({**config, "beta_end": 0.03})
    save_file(load_file(artifact / WEIGHTS), artifact / WEIGHTS, metadata=meta)


def set_config(text: str | None = None, **changes: object) -> Callable[[Path], None]:
    def change(artifact: Path) -> None:
        config = artifact / "config.json"
        config.write_text(text if text is not None else json.dumps({**json.loads(config.read_text()), **changes}))
    return change


DAMAGE = {
    "a flipped byte in the tensors": (flip_a_tensor_byte, "do not match the checksum"),
    "metadata edited by hand": (edit_metadata_by_hand, "do not match the checksum"),
    "config.json that is not JSON": (set_config("{not json"), "config.json is corrupt: it is not a JSON object"),
    "config.json that is a list": (set_config("[1, 2]"), "config.json"),
    "the model class changed by hand": (set_config(_class_name="UNet2DConditionModel"), "UNet2DConditionModel"),
    "a missing config.json": (lambda artifact: (artifact / "config.json").unlink(), "config.json"),
    "an unknown compute dtype": (set_metadata(compute_dtype="float99"), "'compute_dtype' is 'float99'"),
    "a name that is not a dtype": (set_metadata(compute_dtype="Tensor"), "'compute_dtype' is 'Tensor'"),
    "a broken layer plan": (set_metadata(plan="[{"), "plan"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
@pytest.mark.parametrize("command", ["eval", "calibrate"])
def test_a_damaged_artifact_gives_one_clear_error(world: World, tmp_path: Path, case: str, command: str) -> None:
    artifact = world.copy("w4a8", tmp_path)
    damage, fragment = DAMAGE[case]
    damage(artifact)
    before = snapshot(tmp_path)
    if command == "eval":
        code, output = cli("eval", artifact, *EVAL_FAST)
    else:
        code, output = cli("calibrate", artifact, "--fp-model", world.root / "fp", "--out", tmp_path / "t.safetensors",
                           "--steps", "2", "--samples", "2", "--quiet")
    assert_one_error(code, output, fragment, str(artifact))
    assert snapshot(tmp_path) == before


def test_a_full_precision_folder_where_an_artifact_is_expected(world: World, tmp_path: Path) -> None:
    fp = world.copy("fp", tmp_path)
    code, output = cli("calibrate", fp, "--fp-model", fp, "--out", tmp_path / "t.safetensors", "--quiet")
    assert_one_error(code, output, "is a full-precision diffusers model folder, not a tacdiff quantized artifact",
                     "tacdiff quantize")
    assert not (tmp_path / "t.safetensors").exists()


def test_a_foreign_file_where_tables_are_expected(world: World) -> None:
    code, output = cli("eval", world.root / "w4a8", "--tables", world.root / "w4a8" / WEIGHTS, *EVAL_FAST)
    assert_one_error(code, output, "is not a tacdiff correction table")


def test_a_scheduler_config_that_is_not_an_object(world: World, tmp_path: Path) -> None:
    artifact = world.copy("w4a8", tmp_path)
    set_metadata(scheduler_config="[1, 2]")(artifact)
    code, output = cli("eval", artifact, *EVAL_FAST)
    assert_one_error(code, output, "'scheduler_config' is not a JSON object", str(artifact))


@pytest.mark.parametrize("command", ["eval", "calibrate"])
def test_a_tables_file_where_an_artifact_folder_is_expected(world: World, command: str) -> None:
    tables = world.root / "tac.safetensors"
    extra = ["--fp-model", str(world.root / "fp"), "--out", str(world.root / "x.safetensors")] \
        if command == "calibrate" else []
    code, output = cli(command, tables, *extra, "--steps", "2", "--samples", "2", "--quiet")
    assert_one_error(code, output, "is a file, not a quantized artifact folder" if command == "calibrate"
                     else "model folder not found")


def test_an_artifact_where_the_fp_model_is_expected(world: World, tmp_path: Path) -> None:
    code, output = cli("quantize", world.root / "w4a8", "--out", tmp_path / "q", "--calib-samples", "2", "--quiet")
    assert_one_error(code, output, "is a tacdiff quantized artifact, not a full-precision model")
    assert list(tmp_path.iterdir()) == []


def test_an_artifact_paired_with_another_fp_model(world: World, tmp_path: Path) -> None:
    from tiny_models import tiny_model

    other = tiny_model("unet")
    other.conv_in.bias.data.add_(0.1)
    other.save_pretrained(tmp_path / "other")
    code, output = cli("eval", world.root / "w4a8", "--fp-model", tmp_path / "other", *EVAL_FAST)
    assert_one_error(code, output, "made from another model", "pass the model it was quantized from")
