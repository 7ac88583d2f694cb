"""Transformer model and pipeline folders (tiny real DiT, PixArt and SD3 MMDiT written by ``save_pretrained``;
DiTPipeline, PixArtAlphaPipeline and StableDiffusion3Pipeline folders) through the command line: quantize ->
calibrate -> sample / eval, with class labels and names (DiT), prompts (PixArt, SD3) and flow matching (SD3)."""

from __future__ import annotations

import json
from pathlib import Path

from typing import Callable

import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from typer.testing import CliRunner

from tacdiff.cli import app
from tacdiff.correction import CorrectionTables

from tiny_models import tiny_model

STEPS = ["--steps", "4"]
CALIBRATION = ["--calib-samples", "4", "--calib-steps", "4", "--calib-kept-steps", "4"]


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_a_dit_folder_quantizes_calibrates_and_samples_images(tmp_path: Path) -> None:
    """A class-conditional DiT (learned variance, 3-channel pixels so that `sample` writes PNGs): sample i is
    drawn for class i mod 10."""
    model = tmp_path / "dit"
    tiny_model("dit", in_channels=3, out_channels=6).save_pretrained(model)
    invoke("quantize", str(model), "--out", str(tmp_path / "q"), "--w-bits", "4", *CALIBRATION, "--quiet")
    invoke("calibrate", str(tmp_path / "q"), "--fp-model", str(model), "--out", str(tmp_path / "t.safetensors"),
           "--samples", "4", "--batch-size", "2", *STEPS, "--quiet")
    invoke("sample", str(tmp_path / "q"), "--tables", str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "s"),
           "--num-samples", "3", *STEPS, "--quiet")
    record = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert [entry["file"] for entry in record["images"]] == ["000000.png", "000001.png", "000002.png"]
    assert record["conditioning"]["class_labels"] == "sample index mod 10"


@pytest.mark.parametrize("flow", [dict(shift=3.0), dict(use_dynamic_shifting=True, base_image_seq_len=4,
                                                     max_image_seq_len=64)], ids=["fixed-shift", "dynamic-shift"])
def test_an_sd3_transformer_samples_by_flow_matching(tmp_path: Path, flow: dict[str, object]) -> None:
    """Fixed sigma shifts, and shifts by image size (FLUX-style schedulers) fixed for the model's sample size."""
    model, scheduler = tmp_path / "sd3", tmp_path / "scheduler"
    tiny_model("sd3").save_pretrained(model)
    FlowMatchEulerDiscreteScheduler(**flow).save_pretrained(scheduler)
    output = invoke("quantize", str(model), "--out", str(tmp_path / "q"), "--scheduler", str(scheduler), *CALIBRATION,
                    "--quiet")
    assert "stand-in text embeddings" in output
    tables = tmp_path / "t.safetensors"
    refused = CliRunner().invoke(app, ["calibrate", str(tmp_path / "q"), "--fp-model", str(model), "--out",
                                       str(tables), "--scheduler", "ddim", *STEPS, "--quiet"])
    assert refused.exit_code == 2 and "pass --scheduler flow" in refused.output
    invoke("calibrate", str(tmp_path / "q"), "--fp-model", str(model), "--out", str(tables),  # auto: flow
           "--samples", "4", "--batch-size", "2", *STEPS, "--quiet")
    assert CorrectionTables.load(tables).metadata["prediction"] == "flow"
    invoke("eval", str(tmp_path / "q"), "--fp-model", str(model), "--tables", str(tables), "--samples", "2", *STEPS,
           "--json", str(tmp_path / "eval.json"), "--quiet")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["x0_psnr"] > 0 and result["fid"] is None


@pytest.fixture(scope="module")
def dit_pipeline_dir(pipeline_dir: Callable[[str], Path]) -> Path:
    return pipeline_dir("dit")


def test_a_dit_pipeline_samples_named_classes_with_guidance(dit_pipeline_dir: Path, tmp_path: Path) -> None:
    invoke("sample", str(dit_pipeline_dir), "--class", "sneaker", "--class", "Bag", "--out", str(tmp_path / "s"),
           "--num-samples", "3", *STEPS, "--quiet")
    record = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert [entry["prompt"] for entry in record["images"]] == ["sneaker", "Bag", "sneaker"]
    assert record["conditioning"]["guidance_scale"] == 4.0
    refused = CliRunner().invoke(app, ["sample", str(dit_pipeline_dir), "--class", "giraffe", "--out",
                                       str(tmp_path / "no"), *STEPS])
    assert refused.exit_code == 2 and "unknown class 'giraffe'; this pipeline knows t-shirt, trousers" in refused.output
    assert not (tmp_path / "no").exists()


def test_a_quantized_dit_pipeline_is_corrected_and_scored(dit_pipeline_dir: Path, tmp_path: Path) -> None:
    invoke("quantize", str(dit_pipeline_dir), "--out", str(tmp_path / "q"), "--w-bits", "4", *CALIBRATION, "--quiet")
    invoke("calibrate", str(tmp_path / "q"), "--fp-model", str(dit_pipeline_dir), "--out",
           str(tmp_path / "t.safetensors"), "--samples", "4", "--batch-size", "2", *STEPS, "--quiet")
    invoke("eval", str(tmp_path / "q"), "--fp-model", str(dit_pipeline_dir), "--tables",
           str(tmp_path / "t.safetensors"), "--samples", "4", *STEPS, "--json", str(tmp_path / "eval.json"), "--quiet")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["fid"] is not None and result["prompt_accuracy"] is not None and result["x0_psnr"] > 0


@pytest.mark.parametrize("resolution", [False, True])
def test_a_bare_pixart_transformer_runs_on_stand_in_caption_embeddings(tmp_path: Path, resolution: bool) -> None:
    """Stand-in embeddings as wide as the caption projection reads (``caption_channels``), not the attention width,
    and resolution conditioning for transformers that take it (PixArt-alpha at 1024 px)."""
    model = tmp_path / "pixart"
    tiny_model("pixart", use_additional_conditions=resolution).save_pretrained(model)
    output = invoke("quantize", str(model), "--out", str(tmp_path / "q"), *CALIBRATION, "--quiet")
    assert "stand-in text embeddings" in output and (tmp_path / "q").is_dir()


@pytest.mark.parametrize("name, scheduler, prediction", [("sd3", "flow", "flow"), ("pixart", "ddim", "epsilon")])
def test_text_to_image_transformer_pipelines_quantize_calibrate_and_sample_prompts(
        pipeline_dir: Callable[[str], Path], tmp_path: Path, name: str, scheduler: str, prediction: str) -> None:
    """A StableDiffusion3Pipeline (flow matching chosen from its scheduler) and a PixArtAlphaPipeline folder, as
    users pass them: the default scheduler follows the model, prompts go through the pipelines' text encoders."""
    folder, quantized, tables = pipeline_dir(name), tmp_path / "q", tmp_path / "t.safetensors"
    invoke("quantize", str(folder), "--out", str(quantized), "--w-bits", "4", *CALIBRATION, "--quiet")
    invoke("calibrate", str(quantized), "--fp-model", str(folder), "--out", str(tables), "--samples", "4",
           "--batch-size", "2", "--prompt", "a sneaker", "--prompt", "a bag", *STEPS, "--quiet")
    assert CorrectionTables.load(tables).metadata["prediction"] == prediction
    invoke("sample", str(quantized), "--tables", str(tables), "--prompt", "a sneaker", "--prompt", "a bag", "--out",
           str(tmp_path / "s"), "--num-samples", "3", *STEPS, "--quiet")
    record = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert record["scheduler"] == scheduler
    assert record["conditioning"]["guidance_scale"] == (7.0 if name == "sd3" else 4.5)
    assert [entry["prompt"] for entry in record["images"]] == ["a sneaker", "a bag", "a sneaker"]
    assert all((tmp_path / "s" / entry["file"]).is_file() for entry in record["images"])


def test_bench_runs_a_flow_matching_pipeline_with_balanced_channels(pipeline_dir: Callable[[str], Path],
                                                                     tmp_path: Path) -> None:
    """The benchmark samples a flow model by flow matching, with PTQ's recipe options passed through (ranges
    per timestep group need the flow scheduler's 1000 training timesteps)."""
    output = invoke("bench", "--model", str(pipeline_dir("sd3")), "--bits", "w8a6", "--steps", "4", "--samples", "4",
                    "--calib-samples", "4", "--batch-size", "4", "--method", "fp", "--method", "ptq", "--method",
                    "tac", "--smooth-alpha", "0.5", "--timestep-groups", "2", "--json", str(tmp_path / "rows.json"))
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert "mse ranges, smooth 0.5, 2 timestep groups" in output
    assert [row["method"] for row in rows] == ["fp", "ptq", "tac"]
    assert all(row["x0_psnr"] > 10 for row in rows[1:])


def test_every_text_encoder_of_sd3_quantizes_weight_only(pipeline_dir: Callable[[str], Path], tmp_path: Path) -> None:
    from tacdiff.models.loading import load_any_model
    from tacdiff.quant.layers import QuantLinear

    out = tmp_path / "sd3-text"
    invoke("quantize", str(pipeline_dir("sd3")), "--out", str(out), "--w-bits", "4", *CALIBRATION,
           "--quantize-text-encoder", "--quiet")
    names = sorted(p.name for p in out.glob("text_encoder*.safetensors"))
    assert names == ["text_encoder.safetensors", "text_encoder_2.safetensors", "text_encoder_3.safetensors"]
    pipe = load_any_model(out).pipeline
    for encoder in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        assert any(isinstance(m, QuantLinear) and m.w_bits == 4 for m in encoder.modules())
