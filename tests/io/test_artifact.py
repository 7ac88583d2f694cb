"""Quantized-model artifacts: bit-exact reload, bit-packed size, clear errors, atomic writes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import tacdiff.io.artifact as artifact
from tacdiff.io import load_quantized, read_metadata, save_quantized
from tacdiff.quant import quant_state
from tacdiff.quant.layers import ActQuantizer, QuantConv2d, QuantLinear
from tiny_models import outputs, quantized_copy, tiny_model

CASES = {"unet": ("w8a8_grouped", "held_out"), "cond_unet": ("cond_w8a8_grouped", "cond_held_out"),
         "unet_dynamic": ("w8a8_dynamic", "held_out"), "cond_unet_blocked": ("cond_w8a8_blocked", "cond_held_out")}


@pytest.mark.parametrize("which", list(CASES))
def test_save_then_load_reproduces_outputs_bit_for_bit(which: str, request: pytest.FixtureRequest,
                                                       tmp_path: Path) -> None:
    model, data = (request.getfixturevalue(n) for n in CASES[which])
    path = save_quantized(model, tmp_path / "artifact", metadata={"note": "test"})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "quantized.safetensors"]
    loaded = load_quantized(path)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(outputs(loaded, data), outputs(model, data))
    state, again = model.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
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


def rewrite_metadata(file: Path, **changes: str) -> None:
    with artifact.safe_open(file, framework="pt") as handle:
        meta = handle.metadata()
    save_file(load_file(file), file, metadata={**meta, **changes})


@pytest.mark.parametrize("version", ["2", "0", ""])
def test_wrong_format_version_raises(w8a8: nn.Module, tmp_path: Path, version: str) -> None:
    path = save_quantized(w8a8, tmp_path / "artifact")
    rewrite_metadata(path / artifact.WEIGHTS_NAME, format_version=version)
    with pytest.raises(ValueError, match=f"format version '{version}'"):
        load_quantized(path)


def test_codes_that_do_not_match_their_shapes_raise(w8a8: nn.Module, tmp_path: Path) -> None:
    path = save_quantized(w8a8, tmp_path / "artifact")
    file = path / artifact.WEIGHTS_NAME
    shapes = json.loads(read_metadata(path)["code_shapes"])
    shapes["conv_out"] = [shapes["conv_out"][0] + 1, *shapes["conv_out"][1:]]
    rewrite_metadata(file, code_shapes=json.dumps(shapes))
    with pytest.raises(ValueError, match="corrupt"):
        load_quantized(path)


def test_an_existing_output_folder_is_kept_unless_overwrite(w8a8: nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_quantized(w8a8, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    save_quantized(w8a8, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "quantized.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def failing_save_file(*args: object, **kwargs: object) -> None:
    raise OSError("disk full")


def test_a_failed_save_leaves_nothing_behind(w8a8: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    monkeypatch.setattr(artifact, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(w8a8, tmp_path / "nested" / "artifact")
    assert list((tmp_path / "nested").iterdir()) == [], "no output folder and no temporary folder"


def test_a_failed_overwrite_keeps_the_previous_artifact(w8a8: nn.Module, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_quantized(w8a8, tmp_path / "artifact")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    monkeypatch.setattr(artifact, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(w8a8, path, overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_saving_a_float_model_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(tiny_model("unet"), tmp_path / "artifact")
    assert not (tmp_path / "artifact").exists()
