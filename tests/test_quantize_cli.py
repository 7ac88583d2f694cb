"""``tacdiff quantize`` on a folder written by ``save_pretrained``: the artifact, its reload, bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from typer.testing import CliRunner

import tacdiff
from tacdiff import workflows
from tacdiff.cli import app
from tacdiff.io import load_quantized, read_metadata
from tacdiff.models.loading import load_scheduler
from tacdiff.quant import quant_state
from tacdiff.quant.layers import ActQuantizer
from tacdiff.workflows import CalibrationSettings, calibrate_inputs
from tiny_models import tiny_model

CALIBRATION = ("--calib-samples", "4", "--calib-steps", "4", "--calib-kept-steps", "4")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "unet"
    tiny_model("unet").save_pretrained(folder)
    return folder


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("rounding, symmetric", [("rtn", False), ("gptq", False), ("rtn", True)])
def test_quantize_writes_an_artifact_equal_to_quantizing_in_python(model_dir: Path, tmp_path: Path,
                                                                   rounding: str, symmetric: bool) -> None:
    out = tmp_path / "w4a8"
    calibration = CALIBRATION[:4] if symmetric else CALIBRATION  # kept steps default to all 4 of short trajectories
    code, output = invoke("quantize", str(model_dir), "--w-bits", "4", "--a-bits", "8", "--out", str(out),
                          "--weight-rounding", rounding, *(["--weight-symmetric"] if symmetric else []),
                          *calibration, "--quiet")
    assert code == 0, output
    assert "W4A8: output SQNR" in output and str(out) in output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "quantized.safetensors"]
    assert float(read_metadata(out)["held_out_sqnr_db"]) > 8.0

    fp = tiny_model("unet")
    calibration = calibrate_inputs(fp, load_scheduler(None, model_dir), CalibrationSettings(4, 4, 4, 0), progress=False)
    config = tacdiff.QuantConfig(weight_bits=4, act_bits=8, weight_rounding=rounding, weight_symmetric=symmetric)
    expected = tacdiff.quantize(copy.deepcopy(fp), config, calibration, progress=False)
    loaded = load_quantized(out)
    assert quant_state(loaded).config == config
    x, t, _ = next(calibration.batches(8))
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, expected(x, t).sample)


@pytest.mark.parametrize("block", [None, 16])
def test_dynamic_activation_ranges_survive_the_artifact(model_dir: Path, tmp_path: Path, block: int | None) -> None:
    out = tmp_path / "dynamic"
    blocks = () if block is None else ("--act-block-size", str(block))
    code, output = invoke("quantize", str(model_dir), "--act-range", "dynamic", *blocks, "--out", str(out),
                          *CALIBRATION, "--quiet")
    assert code == 0, output
    loaded = load_quantized(out)
    assert quant_state(loaded).config.act_range == "dynamic"
    assert quant_state(loaded).config.act_block_size == block
    quantizers = [m for m in loaded.modules() if isinstance(m, ActQuantizer)]
    assert quantizers and all(q.dynamic and q.enabled for q in quantizers)
    assert {q.block_size for q in quantizers if q.token_dim is not None} == {block}


@pytest.mark.parametrize("args, message", [
    (("--w-bits", "9"), "'--w-bits': a bit width must be an integer in 2..8, got 9"),
    (("--a-bits", "1"), "'--a-bits': a bit width must be an integer in 2..8, got 1"),
    (("--first-last-bits", "16"), "'--first-last-bits': a bit width"),
    (("--act-range", "entropy"), "--act-range must be one of minmax, percentile, mse, dynamic; got 'entropy'"),
    (("--act-range", "dynamic", "--timestep-groups", "4"), "--timestep-groups > 1 picks calibrated ranges by "
                                                           "timestep, and --act-range dynamic has none"),
    (("--act-block-size", "32"), "--act-block-size takes ranges at run time and needs --act-range dynamic (got "
                                 "--act-range mse)"),
    (("--smooth-alpha", "2"), "--smooth-alpha must be a number in [0, 1]"),
    (("--exclude", "up_block.*"), "exclude pattern 'up_block.*' matches no module"),
    (("--device", "nonsense"), "not a torch device"),
    pytest.param(("--device", "cuda"), "no CUDA",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_options_fail_with_one_message_and_write_nothing(model_dir: Path, tmp_path: Path,
                                                             args: tuple[str, ...], message: str) -> None:
    out = tmp_path / "never"
    code, output = invoke("quantize", str(model_dir), "--out", str(out), *args, *CALIBRATION, "--quiet")
    assert code == 2 and message in output, output
    assert not out.exists()


def test_a_folder_without_a_unet_fails_clearly(tmp_path: Path) -> None:
    code, output = invoke("quantize", str(tmp_path), "--out", str(tmp_path / "out"), "--quiet")
    assert code == 2 and "no diffusers model config.json" in output and "save_pretrained" in output, output


def test_a_config_without_weights_fails_clearly(tmp_path: Path) -> None:
    tiny_model("conv_unet").save_config(tmp_path / "config-only")
    code, output = invoke("quantize", str(tmp_path / "config-only"), "--out", str(tmp_path / "out"), "--quiet")
    assert code == 2 and "holds a config but no weights" in output and "pickled" not in output, output


def test_a_missing_folder_fails_as_it_does_for_the_other_commands(tmp_path: Path) -> None:
    code, output = invoke("quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--quiet")
    assert code == 2 and "model folder not found" in output and "'dit-reference'" in output, output


@pytest.mark.parametrize("taken", ["exists", "file_parent"])
def test_an_unusable_out_fails_before_any_work(model_dir: Path, tmp_path: Path, taken: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(workflows, "load_any_model", never)
    (tmp_path / "taken").mkdir()
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "taken" if taken == "exists" else tmp_path / "a_file" / "out"
    code, output = invoke("quantize", str(model_dir), "--out", str(out), *CALIBRATION, "--quiet")
    assert code == 2 and ("already exists" if taken == "exists" else "is a file") in output, output


def test_timestep_groups_split_the_schedulers_own_training_range(model_dir: Path, tmp_path: Path) -> None:
    DDPMScheduler(num_train_timesteps=4000).save_pretrained(tmp_path / "scheduler")
    out = tmp_path / "grouped"
    code, output = invoke("quantize", str(model_dir), "--scheduler", str(tmp_path / "scheduler"),
                          "--timestep-groups", "4", "--out", str(out), *CALIBRATION, "--quiet")
    assert code == 0, output
    router = quant_state(load_quantized(out)).router
    assert router.num_train_timesteps == 4000 and router.group_of(2500) == 2


def test_an_sdxl_style_unet_quantizes_from_the_command_line(tmp_path: Path) -> None:
    """``addition_embed_type="text_time"``: stand-in ``added_cond_kwargs`` flow through calibration."""
    tiny_model("sdxl_unet").save_pretrained(tmp_path / "sdxl")
    code, output = invoke("quantize", str(tmp_path / "sdxl"), "--out", str(tmp_path / "q"), *CALIBRATION, "--quiet")
    assert code == 0, output
    assert float(read_metadata(tmp_path / "q")["held_out_sqnr_db"]) > 20.0


def test_the_bundled_model_quantizes_by_name(tmp_path: Path) -> None:
    """``tacdiff quantize reference``, as ``eval`` and ``sample`` take it; the artifact pairs with ``--fp-model
    reference``."""
    code, output = invoke("quantize", "reference", "--out", str(tmp_path / "q"), "--calib-samples", "2",
                          "--calib-steps", "2", "--calib-kept-steps", "2", "--quiet")
    assert code == 0, output
    assert read_metadata(tmp_path / "q")["scheduler_class"] == "DDPMScheduler"
    code, output = invoke("calibrate", str(tmp_path / "q"), "--fp-model", "reference", "--out",
                          str(tmp_path / "t.safetensors"), "--samples", "2", "--steps", "2", "--quiet")
    assert code == 0, output
