"""Quantized-model artifacts: bit-exact reload, bit-packed size, clear errors, atomic writes."""

from __future__ import annotations

import copy
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

import tacdiff.io.artifact as artifact
from tacdiff.io import load_quantized, read_metadata, save_quantized
from tacdiff.quant import quant_state
from tacdiff.quant.layers import ActQuantizer, QuantConv2d, QuantLinear
from tiny_models import outputs, quantized_copy, tiny_model

CASES = {"unet": ("w8a8_grouped", "held_out"), "cond_unet": ("cond_w8a8_grouped", "cond_held_out"),
         "unet_dynamic": ("w8a8_dynamic", "held_out"), "cond_unet_blocked": ("cond_w8a8_blocked", "cond_held_out")}


def assert_same_state(loaded: nn.Module, model: nn.Module) -> None:
    state, again = model.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)


@pytest.mark.parametrize("which", list(CASES))
def test_save_then_load_reproduces_outputs_bit_for_bit(which: str, request: pytest.FixtureRequest,
                                                       tmp_path: Path) -> None:
    model, data = (request.getfixturevalue(n) for n in CASES[which])
    path = save_quantized(model, tmp_path / "artifact", metadata={"note": "test"})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "quantized.safetensors"]
    loaded = load_quantized(path)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(outputs(loaded, data), outputs(model, data))
    assert_same_state(loaded, model)
    assert quant_state(loaded).plan == quant_state(model).plan
    assert quant_state(loaded).config == quant_state(model).config
    assert quant_state(loaded).router.groups == (1 if "dynamic" in which or "blocked" in which else 4)
    assert any(p.split for p in quant_state(loaded).plan), "skip-concat splits are part of the artifact"
    flags = {m.name: (m.enabled, m.dynamic, m.token_dim, m.block_size)
             for m in model.modules() if isinstance(m, ActQuantizer)}
    assert flags == {m.name: (m.enabled, m.dynamic, m.token_dim, m.block_size)
                     for m in loaded.modules() if isinstance(m, ActQuantizer)}
    assert read_metadata(path)["note"] == "test"


def test_an_artifact_reloads_in_the_dtype_it_was_saved_in(unet: nn.Module, held_out, tmp_path: Path) -> None:
    model = quantized_copy(copy.deepcopy(unet).to(torch.bfloat16), None, weight_bits=8, act_bits=8,
                           act_range="dynamic")
    loaded = load_quantized(save_quantized(model, tmp_path / "artifact"))
    assert loaded.dtype == torch.bfloat16
    x, t = held_out.x[:4].bfloat16(), held_out.timesteps[:4]
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, model(x, t).sample)
    assert load_quantized(tmp_path / "artifact", dtype=torch.float32).dtype == torch.float32


def test_uncalibrated_quantizers_stay_pass_through_after_loading(w8a8: nn.Module, held_out,
                                                                tmp_path: Path) -> None:
    model = copy.deepcopy(w8a8)
    model.conv_out.act_quant.enabled = False  # as left by a quantizer that saw no calibration data
    model.mid_block.attentions[0].probs_quant.enabled = False
    loaded = load_quantized(save_quantized(model, tmp_path / "artifact"))
    assert not loaded.conv_out.act_quant.enabled and not loaded.mid_block.attentions[0].probs_quant.enabled
    assert sum(m.enabled for m in loaded.modules() if isinstance(m, ActQuantizer)) == sum(
        m.enabled for m in model.modules() if isinstance(m, ActQuantizer))
    assert torch.equal(outputs(loaded, held_out), outputs(model, held_out))


def test_loading_from_the_weights_file_path_works_too(w8a8_grouped: nn.Module, held_out, tmp_path: Path) -> None:
    path = save_quantized(w8a8_grouped, tmp_path / "artifact")
    loaded = load_quantized(path / artifact.WEIGHTS_NAME)
    x, t, _ = next(held_out.batches(4))
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, w8a8_grouped(x, t).sample)


def test_codes_are_bit_packed(unet: nn.Module, tmp_path: Path) -> None:
    sizes, packed = {}, {}
    for bits in (4, 8):
        model = quantized_copy(unet, None, weight_bits=bits, act_bits=None)
        path = save_quantized(model, tmp_path / f"w{bits}")
        sizes[bits] = (path / artifact.WEIGHTS_NAME).stat().st_size
        tensors = load_file(path / artifact.WEIGHTS_NAME)
        packed[bits] = sum(tensors[k].numel() for k in tensors if k.endswith("weight_codes"))
        assert not [k for k in tensors if k.endswith(".weight") and f"{k[:-7]}.weight_codes" in tensors]
    inner = sum(m.weight.numel() for n, m in model.named_modules()
                if isinstance(m, (QuantConv2d, QuantLinear)) and n not in ("conv_in", "conv_out"))
    assert packed[8] - packed[4] == pytest.approx(inner / 2, abs=64)
    assert sizes[4] < sizes[8]
    assert sizes[8] - sizes[4] == pytest.approx(inner / 2, rel=0.01)


def test_folder_without_an_artifact_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="quantized.safetensors"):
        load_quantized(tmp_path)


def test_foreign_safetensors_file_raises(tmp_path: Path) -> None:
    unet = tiny_model("unet")
    unet.save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").rename(tmp_path / artifact.WEIGHTS_NAME)
    with pytest.raises(ValueError, match="not a tacdiff quantized model"):
        load_quantized(tmp_path)


def test_a_file_that_is_not_safetensors_raises(tmp_path: Path) -> None:
    (tmp_path / artifact.WEIGHTS_NAME).write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_quantized(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 16])
def test_truncated_file_raises(w8a8: nn.Module, tmp_path: Path, keep: float) -> None:
    path = save_quantized(w8a8, tmp_path / "artifact")
    file = path / artifact.WEIGHTS_NAME
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_quantized(path)


def rewrite(file: Path, tensors: dict[str, torch.Tensor | None] | None = None, drop: tuple[str, ...] = (),
            **changes: str) -> None:
    """Rewrite an artifact's safetensors file: replace tensors (None removes one; the checksum follows them,
    as from a writer that made a consistent but wrong artifact), change or drop metadata keys."""
    with safe_open(file, framework="pt") as handle:
        meta = {k: v for k, v in {**handle.metadata(), **changes}.items() if k not in drop}
    data = {k: v for k, v in {**load_file(file), **(tensors or {})}.items() if v is not None}
    if artifact.CHECKSUM_KEY in meta:
        meta[artifact.CHECKSUM_KEY] = artifact.content_sha256(data, meta)
    save_file(data, file, metadata=meta)


@pytest.mark.parametrize("version", ["2", "0", ""])
def test_wrong_format_version_raises(w8a8: nn.Module, tmp_path: Path, version: str) -> None:
    path = save_quantized(w8a8, tmp_path / "artifact")
    rewrite(path / artifact.WEIGHTS_NAME, format_version=version)
    with pytest.raises(ValueError, match=f"format version '{version}'"):
        load_quantized(path)


def test_codes_that_do_not_match_their_shapes_raise(w8a8: nn.Module, tmp_path: Path) -> None:
    path = save_quantized(w8a8, tmp_path / "artifact")
    file = path / artifact.WEIGHTS_NAME
    shapes = json.loads(read_metadata(path)["code_shapes"])
    shapes["conv_out"] = [shapes["conv_out"][0] + 1, *shapes["conv_out"][1:]]
    rewrite(file, code_shapes=json.dumps(shapes))
    with pytest.raises(ValueError, match="corrupt"):
        load_quantized(path)


def test_overwrite_replaces_only_an_earlier_artifact(w8a8: nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_quantized(w8a8, out)
    with pytest.raises(FileExistsError, match="not a quantized artifact written by tacdiff"):
        save_quantized(w8a8, out, overwrite=True)  # overwrite replaces only an earlier artifact
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    (out / "quantized.safetensors").write_bytes(b"not written by tacdiff")  # the name alone is not enough
    with pytest.raises(FileExistsError, match="not a quantized artifact written by tacdiff"):
        save_quantized(w8a8, out, overwrite=True)
    (out / "quantized.safetensors").unlink()
    out.rmdir()
    save_quantized(w8a8, out)
    data = bytearray((out / "quantized.safetensors").read_bytes())
    data[-10] ^= 0xFF  # damaged tensors, readable metadata: still tacdiff's artifact, so replaceable
    (out / "quantized.safetensors").write_bytes(bytes(data))
    save_quantized(w8a8, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "quantized.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
    load_quantized(out)  # verified against its checksum


def failing_save_file(*args: object, **kwargs: object) -> None:
    raise OSError("disk full")


def test_a_failed_save_leaves_nothing_behind(w8a8: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    monkeypatch.setattr(artifact, "save_safetensors", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(w8a8, tmp_path / "nested" / "artifact")
    assert list((tmp_path / "nested").iterdir()) == [], "no output folder and no temporary folder"


def test_a_failed_overwrite_keeps_the_previous_artifact(w8a8: nn.Module, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_quantized(w8a8, tmp_path / "artifact")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    monkeypatch.setattr(artifact, "save_safetensors", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(w8a8, path, overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_saving_a_float_model_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(tiny_model("unet"), tmp_path / "artifact")
    assert not (tmp_path / "artifact").exists()


# Validation on load: every bad input gets one clear error naming the artifact and the fix.


@pytest.fixture(scope="module")
def saved(w8a8: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A W8A8 artifact (static activation ranges) written once; tests change copies of it."""
    return save_quantized(w8a8, tmp_path_factory.mktemp("saved") / "artifact")


@pytest.fixture
def art(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "artifact"))


def load_fails(path: Path, error: type[Exception], fragment: str, **kwargs: object) -> str:
    """Assert that loading ``path`` raises ``error`` with a one-line message naming ``path`` and ``fragment``."""
    with pytest.raises(error, match=re.escape(fragment)) as info:
        load_quantized(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def flip_byte(file: Path, tensor: str) -> None:
    """Invert the first byte of ``tensor``'s data (not the header)."""
    data = bytearray(file.read_bytes())
    header_size = struct.unpack("<Q", data[:8])[0]
    start = 8 + header_size + json.loads(data[8:8 + header_size])[tensor]["data_offsets"][0]
    data[start] ^= 0xFF
    file.write_bytes(bytes(data))


def test_the_checksum_covers_the_stored_tensors(saved: Path) -> None:
    file = saved / artifact.WEIGHTS_NAME
    meta = read_metadata(saved)
    assert meta[artifact.CHECKSUM_KEY] == artifact.content_sha256(load_file(file), meta)


def test_a_flipped_byte_fails_the_checksum_unless_verify_is_off(art: Path, w8a8: nn.Module) -> None:
    flip_byte(art / artifact.WEIGHTS_NAME, "mid_block.resnets.0.conv1.weight_codes")  # 8-bit codes: any byte is valid
    load_fails(art, ValueError, "is corrupt: its tensors or metadata do not match the checksum recorded when it was "
                                "written; re-create it with tacdiff quantize")
    loaded = load_quantized(art, verify=False)
    assert not torch.equal(loaded.mid_block.resnets[0].conv1.weight, w8a8.mid_block.resnets[0].conv1.weight)


def test_metadata_edited_by_hand_fails_the_checksum(art: Path) -> None:
    file = art / artifact.WEIGHTS_NAME
    with safe_open(file, framework="pt") as handle:
        meta = handle.metadata()
    config = meta["quant_config"].replace('"act_range": "mse"', '"act_range": "minmax"')
    assert config != meta["quant_config"]
    save_file(load_file(file), file, metadata={**meta, "quant_config": config})
    load_fails(art, ValueError, "its tensors or metadata do not match the checksum")


def test_an_artifact_without_a_checksum_still_loads(art: Path, w8a8: nn.Module) -> None:
    rewrite(art / artifact.WEIGHTS_NAME, drop=(artifact.CHECKSUM_KEY,))
    assert_same_state(load_quantized(art), w8a8)


@pytest.mark.parametrize("key", artifact.REQUIRED_KEYS)
def test_missing_metadata_keys_raise_on_reading_the_metadata(art: Path, key: str) -> None:
    rewrite(art / artifact.WEIGHTS_NAME, drop=(key,))
    with pytest.raises(ValueError, match=f"is corrupt: its metadata lacks {key}"):
        read_metadata(art)


@pytest.mark.parametrize("tensor, value, fragment", [
    ("conv_out.weight_codes", lambda t: t.to(torch.int16), "'conv_out.weight_codes' should be torch.uint8"),
    ("conv_out.weight_codes", lambda t: t[:-1], "'conv_out.weight_codes' should be torch.uint8 of shape"),
    ("conv_out.weight_scale", lambda t: t.repeat(1, 2), "'conv_out.weight_scale' should be a floating-point tensor"),
    ("conv_out.weight_zero_point", lambda t: t.long(), "'conv_out.weight_zero_point' should be a floating-point"),
    ("conv_out.act_quant.scale", lambda t: t[:, :0], "'conv_out.act_quant.scale' should be"),
    ("conv_norm_out.bias", lambda t: torch.cat([t, t]), "'conv_norm_out.bias' should be a floating-point tensor"),
    ("conv_norm_out.bias", lambda t: None, "missing ['conv_norm_out.bias']"),
    ("conv_norm_out.extra", lambda t: torch.ones(2), "unexpected ['conv_norm_out.extra']"),
])
def test_tensors_that_do_not_fit_the_model_raise(art: Path, tensor: str, value, fragment: str) -> None:
    file = art / artifact.WEIGHTS_NAME
    rewrite(file, {tensor: value(load_file(file).get(tensor))})
    load_fails(art, ValueError, fragment)


@pytest.mark.parametrize("tensor, value, fragment", [
    ("conv_out.weight_scale", float("nan"), "holds NaN or inf"),
    ("conv_out.weight_zero_point", float("inf"), "holds NaN or inf"),
    ("conv_out.act_quant.zero_point", float("-inf"), "holds NaN or inf"),
    ("conv_out.act_quant.scale", float("nan"), "holds NaN or inf"),
    ("conv_out.act_quant.scale", 0.0, "holds values <= 0"),
    ("conv_in.weight_scale", -1.0, "holds values <= 0"),
    ("conv_norm_out.weight", float("inf"), "holds NaN or inf"),
])
def test_non_finite_or_non_positive_values_raise(art: Path, tensor: str, value: float, fragment: str) -> None:
    file = art / artifact.WEIGHTS_NAME
    original = load_file(file)[tensor]
    rewrite(file, {tensor: original.index_fill(0, torch.tensor([0]), value)})
    load_fails(art, ValueError, f"{tensor!r} {fragment}")


DROP = object()


def config_with(**changes: object):
    """An edit of ``config.json``: keys set to ``changes`` (``DROP`` removes one)."""
    return lambda config: json.dumps({k: v for k, v in {**config, **changes}.items() if v is not DROP})


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "config.json is corrupt: it is not a JSON object"),
    ("[1, 2]", "config.json is corrupt: it is not a JSON object"),
    (b"\xff\xfe{", "config.json is corrupt: it is not a JSON object"),
    (config_with(_class_name=DROP), "config.json is corrupt: it has no '_class_name'"),
    (config_with(_class_name="UNet2DConditionModel"), "names the model class 'UNet2DConditionModel' but"),
    (config_with(down_block_types=["NoSuchBlock2D", "AttnDownBlock2D"]), "cannot build a UNet2DModel"),
    (config_with(out_channels=4), "records 'conv_out' as [3, 32, 3, 3] but the model built from config.json has "
                                  "[4, 32, 3, 3]"),
])
def test_a_broken_config_raises(art: Path, content, fragment: str) -> None:
    file = art / "config.json"
    if callable(content):
        content = content(json.loads(file.read_text()))
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    load_fails(art, ValueError, fragment)


def test_a_missing_config_raises(art: Path) -> None:
    (art / "config.json").unlink()
    load_fails(art, FileNotFoundError, "no config.json in")


def plan_with(path: Path, **changes: object) -> str:
    """The artifact's plan with ``changes`` applied to the entry of ``conv_in``."""
    plan = json.loads(read_metadata(path)["plan"])
    return json.dumps([{**p, **changes} if p["name"] == "conv_in" else p for p in plan])


@pytest.mark.parametrize("key, value, fragment", [
    ("quant_config", "{broken", "metadata 'quant_config' is not a JSON object"),
    ("quant_config", "[]", "metadata 'quant_config' is not a JSON object"),
    ("quant_config", '{"bits": 8}', "metadata 'quant_config' is malformed (unknown QuantConfig fields"),
    ("quant_config", '{"weight_bits": 99}', "metadata 'quant_config' is malformed"),
    ("plan", "{broken", "metadata 'plan' is not a JSON array"),
    ("plan", "{}", "metadata 'plan' is not a JSON array"),
    ("plan", '[{"nmae": "conv_in"}]', "metadata 'plan' has a malformed entry"),
    ("plan", '[3]', "metadata 'plan' has a malformed entry"),
    ("plan", lambda p: plan_with(p, kind="pool"), "metadata 'plan' has a malformed entry"),
    ("plan", lambda p: plan_with(p, name=["conv_in"]), "metadata 'plan' has a malformed entry"),
    ("plan", lambda p: plan_with(p, name="conv_nope"), "plan names the module 'conv_nope', which the UNet2DModel"),
    ("plan", lambda p: plan_with(p, kind="linear"), "its plan quantizes 'conv_in' as 'linear' but it is a Conv2d"),
    ("plan", lambda p: plan_with(p, weight_bits=99), "its plan does not fit the model (weight_bits must be"),
    ("plan", lambda p: plan_with(p, split=3), "its plan splits the input of 'conv_in' at 3"),
    ("code_shapes", "{broken", "metadata 'code_shapes' is not a JSON object"),
    ("code_shapes", '{"conv_in": [1]}', "metadata 'code_shapes' records 'conv_in' as [1]"),
    ("code_shapes", '{}', "metadata 'code_shapes' records 'conv_in' as absent"),
    ("enabled_act_quantizers", "{broken", "metadata 'enabled_act_quantizers' is not a JSON array"),
    ("enabled_act_quantizers", "[1]", "metadata 'enabled_act_quantizers' is not a list of module names"),
    ("enabled_act_quantizers", '["nowhere.act_quant"]', "names ['nowhere.act_quant'], which the model lacks"),
    ("compute_dtype", "float99", "metadata 'compute_dtype' is 'float99', not one of float32"),
    ("compute_dtype", "Tensor", "metadata 'compute_dtype' is 'Tensor'"),
    ("model_class", "Linear", "its metadata names the unsupported model class 'Linear'"),
    ("model_class", "UNet2DConditionModel", "config.json names the model class 'UNet2DModel' but"),
    ("plan", lambda p: plan_with(p, kind=["conv"]), "metadata 'plan' has a malformed entry"),
])
def test_malformed_metadata_raises(art: Path, key: str, value, fragment: str) -> None:
    rewrite(art / artifact.WEIGHTS_NAME, **{key: value(art) if callable(value) else value})
    message = load_fails(art, ValueError, fragment)
    assert "tacdiff quantize" in message


@pytest.mark.parametrize("layout", ["unet", "pipeline"])
def test_a_full_precision_folder_is_named_as_such(tmp_path: Path, layout: str) -> None:
    tiny_model("unet").save_pretrained(tmp_path / "unet" if layout == "pipeline" else tmp_path)
    load_fails(tmp_path, ValueError, f"{tmp_path} is a full-precision diffusers model folder, not a tacdiff quantized "
                                     f"artifact; quantize it first with `tacdiff quantize {tmp_path} --out ...`")


def test_a_path_that_does_not_exist_raises(tmp_path: Path) -> None:
    load_fails(tmp_path / "nowhere", FileNotFoundError, "does not exist")
