"""`tacdiff eval` and the evaluate() it wraps: reference model, FP folders, quantized artifacts, bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from typer.testing import CliRunner

import tacdiff
from tacdiff.cli import app
from tacdiff.correction import calibrate_tac
from tacdiff.evaluation import evaluate
from tacdiff.io import load_quantized, save_quantized
from tacdiff.report.json import write_json

from tiny_models import tiny_model

REQUIRED = {"fid", "kid", "x0_mse", "x0_psnr", "x0_ssim", "seconds", "model", "fp_model", "scheduler", "steps", "samples",
            "seed", "batch_size", "device"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny FP UNet2DModel folder and its W4 (RTN, weight-only) quantized artifact."""
    root = tmp_path_factory.mktemp("models")
    fp = tiny_model("conv_unet")
    fp.save_pretrained(root / "fp")
    quantized = tacdiff.quantize(copy.deepcopy(fp), tacdiff.QuantConfig(weight_bits=4, act_bits=None), progress=False)
    save_quantized(quantized, root / "w4")
    return root / "fp", root / "w4"


def invoke(*args: str) -> object:
    return CliRunner().invoke(app, ["eval", *args])


def test_cli_on_reference_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "eval.json"
    result = invoke("reference", "--fp-model", "reference", "--steps", "2", "--samples", "4", "--batch-size", "2",
                    "--scheduler", "ddpm", "--quiet", "--json", str(out))
    assert result.exit_code == 0, result.output
    assert "x0_psnr" in result.output and "fid" in result.output
    data = json.loads(out.read_text())
    assert REQUIRED <= data.keys()
    assert data["fid"] > 0 and data["kid"] is not None and data["seconds"] > 0
    assert data["x0_mse"] == 0 and data["x0_psnr"] == "inf"  # self-pair under a stochastic sampler
    assert (data["steps"], data["samples"], data["scheduler"]) == (2, 4, "ddpm")
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"], "no temporary file left behind"


def test_quantized_artifact_paired_with_fp_folder(folders: tuple[Path, Path]) -> None:
    fp, w4 = folders
    result = evaluate(w4, fp_model=fp, scheduler="dpm", steps=3, samples=3, batch_size=2, progress=False)
    assert result["quantized"] and result["x0_mse"] > 0 and 0 < result["x0_psnr"] < float("inf")
    assert 0 < result["x0_ssim"] < 1
    assert len(result["per_step"]["timesteps"]) == 3 and result["per_step"]["state_sq_err"][0] == 0
    assert result["fid"] is None and "FID skipped" in result["note"]
    alone = evaluate(w4, steps=2, samples=2, progress=False)
    assert alone["x0_mse"] is None and alone["x0_psnr"] is None and alone["x0_ssim"] is None
    assert alone["per_step"] is None


def test_correction_tables_are_applied_and_checked(folders: tuple[Path, Path], tmp_path: Path) -> None:
    fp_dir, w4_dir = folders
    fp, w4 = UNet2DModel.from_pretrained(fp_dir).eval(), load_quantized(w4_dir)
    scheduler = DDIMScheduler.from_config(DDPMScheduler().config)
    tables = calibrate_tac(fp, w4, scheduler, num_inference_steps=3, num_samples=4, batch_size=4, seed=5,
                           progress=False).save(tmp_path / "tac.safetensors")
    run = dict(fp_model=fp_dir, steps=3, samples=4, batch_size=4, seed=5, progress=False)  # the calibration seed
    plain, corrected = evaluate(w4_dir, **run), evaluate(w4_dir, tables=tables, **run)
    assert plain["correction"] is None and corrected["correction"] == "tac (IBC on the state)"
    assert corrected["per_step"]["state_sq_err"][0] == 0
    # On the calibration seed the state tables replay the fit: no mean latent gap is left at any step.
    assert torch.tensor(corrected["per_step"]["input_bias"]).abs().max() < 1e-5
    assert torch.tensor(plain["per_step"]["input_bias"]).abs().max() > 1e-3
    alone = evaluate(w4_dir, steps=3, samples=2, tables=tables, progress=False)  # unpaired: the hook still runs
    assert alone["x0_mse"] is None
    result = invoke(str(w4_dir), "--fp-model", str(fp_dir), "--steps", "4", "--tables", str(tables), "--quiet")
    assert result.exit_code == 2 and "correction tables are for DDIMScheduler, 3 steps" in result.output


def test_conditional_unet_samples_with_seeded_text_embeddings(tmp_path: Path) -> None:
    fp = tiny_model("cond_unet", layers_per_block=1)
    fp.save_pretrained(tmp_path / "fp")
    save_quantized(tacdiff.quantize(fp, tacdiff.QuantConfig(weight_bits=4, act_bits=None), progress=False),
                   tmp_path / "w4")
    run = dict(fp_model=tmp_path / "fp", steps=2, samples=2, progress=False)
    with pytest.warns(UserWarning, match="random stand-in text embeddings"):
        result = evaluate(tmp_path / "w4", **run)
    assert 0 < result["x0_mse"] < float("inf") and result["fid"] is None
    with pytest.warns(UserWarning):
        assert evaluate(tmp_path / "fp", **run)["x0_mse"] == 0, "FP paired with itself: the same embeddings"


@pytest.mark.parametrize("args, message", [
    (["reference", "--scheduler", "heun"], "unknown scheduler 'heun'"),
    (["reference", "--steps", "0"], "'--steps': must be at least 1"),
    (["reference", "--steps", "1001"], "steps must be <= num_train_timesteps=1000"),
    (["reference", "--samples", "0"], "'--samples': must be at least 1"),
    (["/no/such/model"], "model folder not found"),
    (["reference", "--fp-model", "/no/such/fp"], "model folder not found"),
])
def test_bad_input_exits_with_message(args: list[str], message: str) -> None:
    result = invoke(*args, "--quiet")
    assert result.exit_code == 2 and message in result.output, result.output


def test_mismatched_pair_is_refused(folders: tuple[Path, Path]) -> None:
    result = invoke(str(folders[1]), "--fp-model", "reference", "--quiet")
    assert result.exit_code == 2 and "pair a quantized model with the FP model it came from" in result.output


def test_write_json_is_strict_and_atomic(tmp_path: Path) -> None:
    path = write_json(tmp_path / "r.json", {"x0_psnr": float("inf"), "per_step": {"a": [float("nan")]}})
    assert json.loads(path.read_text()) == {"x0_psnr": "inf", "per_step": {"a": ["nan"]}}
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text())["x0_psnr"] == "inf", "a failed write leaves the old file intact"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
