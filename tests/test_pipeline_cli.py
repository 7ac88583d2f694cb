"""Pipeline folders through the command line: quantize -> calibrate -> sample / eval for Stable Diffusion with
prompts and guidance and for LDM with a VQModel; the guidance and prompt checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tacdiff.cli import app
from tacdiff.correction import CorrectionTables
from tacdiff.io.artifact import is_artifact_folder, load_quantized, read_metadata, save_quantized
from tacdiff.metrics.paired import sqnr_db
from tacdiff.models.loading import load_any_model
from tacdiff.models.pipelines import PromptEncoder
from tacdiff.quant import QuantConfig
from tacdiff.quant.apply import quantize_weights_only
from tacdiff.quant.layers import QuantConv2d, QuantLinear

CALIBRATION = ("--calib-samples", "2", "--calib-steps", "3", "--calib-kept-steps", "3", "--quiet")
SD_PROMPTS = ("--guidance-scale", "5")
FAST = ("--steps", "3", "--batch-size", "2", "--quiet")


def invoke(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def runs(pipeline_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per pipeline (``sd``, ``ldm``): ``<name>-w4a8`` artifact, ``<name>-tac.safetensors`` tables; ``prompts.txt``."""
    root = tmp_path_factory.mktemp("pipeline-runs")
    (root / "prompts.txt").write_text("a red shoe\na black cat\n", encoding="utf-8")
    for name, extra in (("sd", ("--prompts-file", root / "prompts.txt", *SD_PROMPTS)), ("ldm", ())):
        artifact, tables = root / f"{name}-w4a8", root / f"{name}-tac.safetensors"
        for args in (("quantize", pipeline_dir(name), "--out", artifact, "--w-bits", "4", *CALIBRATION, *extra),
                     ("calibrate", artifact, "--fp-model", pipeline_dir(name), "--out", tables, "--steps", "3",
                      "--samples", "4", "--quiet", *extra)):
            code, output = invoke(*args)
            assert code == 0, output
    return root


def test_artifacts_and_tables_record_the_pipeline_and_its_conditioning(runs: Path,
                                                                       pipeline_dir: Callable[[str], Path]) -> None:
    assert read_metadata(runs / "sd-w4a8")["pipeline_folder"] == str(pipeline_dir("sd").resolve())
    record = CorrectionTables.load(runs / "sd-tac.safetensors").metadata["conditioning"]
    assert record["prompted"] and record["guidance_scale"] == 5.0 and record["num_prompts"] == 2
    assert CorrectionTables.load(runs / "ldm-tac.safetensors").metadata["conditioning"] == {}


def test_sample_writes_prompted_corrected_images_that_reproduce(runs: Path, tmp_path: Path) -> None:
    args = ("sample", runs / "sd-w4a8", "--tables", runs / "sd-tac.safetensors", "--num-samples", "3",
            "--prompt", "a red shoe", "--prompt", "a hat", "--negative-prompt", "blurry", *SD_PROMPTS, *FAST)
    for out in (tmp_path / "one", tmp_path / "two"):
        code, output = invoke(*args, "--out", out)
        assert code == 0, output
    record = json.loads((tmp_path / "one" / "samples.json").read_text())
    assert [image["prompt"] for image in record["images"]] == ["a red shoe", "a hat", "a red shoe"]
    assert record["conditioning"]["negative_prompt"] == "blurry"
    image = Image.open(tmp_path / "one" / "000000.png")
    assert image.size == (16, 16) and image.mode == "RGB", "decoded by the VAE, not the 4-channel latents"
    one, two = ({p.name: p.read_bytes() for p in (tmp_path / d).iterdir()} for d in ("one", "two"))
    assert one == two


def test_sample_an_ldm_artifact_with_tables(runs: Path, tmp_path: Path) -> None:
    code, output = invoke("sample", runs / "ldm-w4a8", "--tables", runs / "ldm-tac.safetensors", "--num-samples",
                          "2", *FAST, "--out", tmp_path / "ldm")
    assert code == 0, output
    assert Image.open(tmp_path / "ldm" / "000001.png").size == (16, 16)


def test_per_branch_tables_from_the_command_line(runs: Path, pipeline_dir: Callable[[str], Path],
                                                 tmp_path: Path) -> None:
    base = ("calibrate", runs / "sd-w4a8", "--fp-model", pipeline_dir("sd"), "--steps", "3", "--samples", "4",
            "--quiet", *SD_PROMPTS, "--guidance-fit", "branch")
    code, output = invoke(*base, "--out", tmp_path / "branch.safetensors")
    assert code == 0, output
    assert CorrectionTables.load(tmp_path / "branch.safetensors").out_scale.shape == (3, 2, 4)
    code, output = invoke("sample", runs / "sd-w4a8", "--tables", tmp_path / "branch.safetensors", "--num-samples",
                          "2", *SD_PROMPTS, *FAST, "--out", tmp_path / "s")
    assert code == 0, output
    code, output = invoke(*base, "--method", "ptqd", "--out", tmp_path / "ptqd.safetensors")
    assert code == 2 and "applies to tac, ner and ibc" in output


def test_tables_at_another_guidance_scale_raise_unless_forced(runs: Path, tmp_path: Path) -> None:
    args = ("sample", runs / "sd-w4a8", "--tables", runs / "sd-tac.safetensors", "--num-samples", "1",
            "--guidance-scale", "2", *FAST)
    code, output = invoke(*args, "--out", tmp_path / "wrong")
    assert code == 2 and "guidance scale 5.0 (tables) vs 2.0" in output and not (tmp_path / "wrong").exists()
    code, output = invoke(*args, "--force-tables", "--out", tmp_path / "forced")
    assert code == 0 and "warning:" in output and (tmp_path / "forced" / "grid.png").is_file()


@pytest.mark.parametrize("content", [None, "\n  \n"])
def test_a_missing_or_empty_prompts_file_raises_before_any_work(runs: Path, tmp_path: Path,
                                                                content: str | None) -> None:
    prompts = tmp_path / "prompts.txt"
    if content is not None:
        prompts.write_text(content)
    code, output = invoke("sample", runs / "sd-w4a8", "--prompts-file", prompts, *FAST, "--out", tmp_path / "s")
    assert code == 2 and str(prompts) in output and not (tmp_path / "s").exists()


def test_eval_pairs_decoded_images_under_the_same_prompts(runs: Path, pipeline_dir: Callable[[str], Path],
                                                          tmp_path: Path) -> None:
    base = ("eval", runs / "sd-w4a8", "--fp-model", pipeline_dir("sd"), "--samples", "2", "--prompts-file",
            runs / "prompts.txt", *SD_PROMPTS, *FAST)
    results = {}
    for name, extra in (("ptq", ()), ("tac", ("--tables", runs / "sd-tac.safetensors"))):
        code, output = invoke(*base, *extra, "--json", tmp_path / f"{name}.json")
        assert code == 0, output
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert abs(results["ptq"]["x0_psnr"] - results["tac"]["x0_psnr"]) > 0.01, "the tables act on the images"
    assert 5 < results["ptq"]["x0_psnr"] < 80 and results["ptq"]["note"].startswith("FID skipped")
    bare = list(base)
    bare[bare.index("--fp-model") + 1] = pipeline_dir("sd") / "unet"  # the FP UNet alone: decoded by the artifact's VAE
    code, output = invoke(*bare, "--json", tmp_path / "bare.json")
    assert code == 0, output
    assert json.loads((tmp_path / "bare.json").read_text())["x0_psnr"] == results["ptq"]["x0_psnr"]


def test_eval_pairs_a_bare_unet_artifact_with_its_pipeline(pipeline_dir: Callable[[str], Path],
                                                           tmp_path: Path) -> None:
    """Quantized from the UNet folder alone, evaluated against the pipeline: both sides use the pipeline's
    prompts and decoder."""
    code, output = invoke("quantize", pipeline_dir("sd") / "unet", "--out", tmp_path / "bare", *CALIBRATION)
    assert code == 0, output
    code, output = invoke("eval", tmp_path / "bare", "--fp-model", pipeline_dir("sd"), "--samples", "2",
                          "--prompt", "a red shoe", *SD_PROMPTS, *FAST, "--json", tmp_path / "bare.json")
    assert code == 0, output
    result = json.loads((tmp_path / "bare.json").read_text())
    assert 5 < result["x0_psnr"] < 80 and result["conditioning"]["prompted"]


def test_eval_reports_prompt_accuracy_for_fashion_prompts_on_grayscale_images(
        pipeline_dir: Callable[[str], Path], tmp_path: Path) -> None:
    base = ("eval", pipeline_dir("fashion_sd"), "--samples", "4", *SD_PROMPTS, *FAST)
    code, output = invoke(*base, "--prompt", "a sneaker", "--prompt", "a winter coat", "--json", tmp_path / "a.json")
    assert code == 0 and "prompt_accuracy" in output, output
    result = json.loads((tmp_path / "a.json").read_text())
    per_class = result["prompt_accuracy_per_class"]
    assert 0 <= result["prompt_accuracy"] <= 1 and per_class[7] is not None and per_class[4] is not None
    assert [value for label, value in enumerate(per_class) if label not in (4, 7)] == [None] * 8
    code, output = invoke(*base, "--prompt", "a cat", "--json", tmp_path / "b.json")
    assert code == 0 and json.loads((tmp_path / "b.json").read_text())["prompt_accuracy"] is None


def test_an_artifact_whose_pipeline_moved_says_so(runs: Path, tmp_path: Path) -> None:
    moved = {**read_metadata(runs / "ldm-w4a8"), "pipeline_folder": str(tmp_path / "gone")}
    artifact = save_quantized(load_quantized(runs / "ldm-w4a8"), tmp_path / "artifact", metadata=moved)
    code, output = invoke("sample", artifact, "--num-samples", "1", *FAST, "--out", tmp_path / "s")
    assert code == 2 and "no longer holds a pipeline" in output and str(tmp_path / "gone") in output


def test_bench_runs_a_text_to_image_pipeline_with_guidance(pipeline_dir: Callable[[str], Path],
                                                           tmp_path: Path) -> None:
    code, output = invoke("bench", "--model", pipeline_dir("sd"), "--bits", "w4a8", "--steps", "2", "--samples",
                          "2", "--calib-samples", "2", "--batch-size", "2", "--method", "fp", "--method", "tac",
                          "--prompt", "a red shoe", *SD_PROMPTS, "--quiet", "--json", tmp_path / "rows.json")
    assert code == 0, output
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [(r["bits"], r["method"]) for r in rows] == [("fp", "fp"), ("w4a8", "tac")]
    assert rows[0]["fid"] is None and 5 < rows[1]["x0_psnr"] < 80, "no FID off 28x28; paired on decoded images"


def test_text_encoder_and_decoder_quantize_weight_only_beside_the_unet(pipeline_dir: Callable[[str], Path],
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "sd-all"
    code, output = invoke("quantize", pipeline_dir("sd"), "--out", out, "--w-bits", "4", *CALIBRATION,
                          "--prompt", "a red shoe", "--quantize-text-encoder", "--quantize-vae-decoder")
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "quantized.safetensors",
                                                     "text_encoder.safetensors", "vae_decoder.safetensors"]
    assert is_artifact_folder(out)
    quantized, fp = load_any_model(out), load_any_model(pipeline_dir("sd"))
    layers = [m for m in quantized.pipeline.text_encoder.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.w_bits in (4, 8) for m in layers) and any(m.w_bits == 4 for m in layers)
    assert any(isinstance(m, QuantConv2d) for m in quantized.pipeline.vae.decoder.modules())
    assert not any(isinstance(m, QuantConv2d) for m in quantized.pipeline.vae.encoder.modules())
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = sqnr_db(fp.decode(latents), quantized.decode(latents))
        text = sqnr_db(*(PromptEncoder(m.pipeline)(["a red shoe"])["encoder_hidden_states"] for m in (fp, quantized)))
    assert 5 < error < 60 and 5 < text < 60, "4-bit weights: close to the FP components, not equal"
    code, output = invoke("quantize", pipeline_dir("ldm"), "--out", tmp_path / "ldm", "--quantize-text-encoder",
                          *CALIBRATION)
    assert code == 2 and "has no text encoder" in output and not (tmp_path / "ldm").exists()


def test_a_component_file_for_another_component_is_refused(runs: Path, tmp_path: Path) -> None:
    artifact = save_quantized(load_quantized(runs / "sd-w4a8"), tmp_path / "artifact",
                              metadata=read_metadata(runs / "sd-w4a8"))
    encoder = load_any_model(runs / "sd-w4a8").pipeline.text_encoder
    save_quantized(load_quantized(runs / "sd-w4a8"), tmp_path / "other", metadata=read_metadata(runs / "sd-w4a8"),
                   components={"text_encoder": quantize_weights_only(encoder, QuantConfig(weight_bits=8,
                                                                                           act_bits=None))})
    (tmp_path / "other" / "text_encoder.safetensors").rename(artifact / "vae_decoder.safetensors")
    code, output = invoke("sample", artifact, "--num-samples", "1", *FAST, "--out", tmp_path / "s")
    assert code == 2 and "vae_decoder.safetensors was not written with" in output
    with_parts = tmp_path / "with-parts"
    save_quantized(load_quantized(runs / "sd-w4a8"), with_parts, metadata=read_metadata(runs / "sd-w4a8"),
                   components={"text_encoder": encoder})
    (with_parts / "text_encoder.safetensors").unlink()
    code, output = invoke("sample", with_parts, "--num-samples", "1", *FAST, "--out", tmp_path / "s")
    assert code == 2 and "text_encoder.safetensors is missing" in output, "no silent fall back to full precision"


def test_an_artifact_refuses_a_pipeline_folder_changed_since(pipeline_dir: Callable[[str], Path],
                                                              tmp_path: Path) -> None:
    folder = shutil.copytree(pipeline_dir("ldm"), tmp_path / "ldm")
    code, output = invoke("quantize", folder, "--out", tmp_path / "q", "--w-bits", "8", *CALIBRATION)
    assert code == 0, output
    vae = folder / "vqvae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(vae)
    tensors["decoder.conv_out.bias"] += 1
    save_file(tensors, vae)
    code, output = invoke("sample", tmp_path / "q", "--num-samples", "1", *FAST, "--out", tmp_path / "s")
    assert code == 2 and "changed since" in output and not (tmp_path / "s").exists()


def test_reports_never_replace_the_prompts_file(pipeline_dir: Callable[[str], Path], tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    code, output = invoke("bench", "--model", pipeline_dir("sd"), "--bits", "w8a8", "--steps", "2", "--samples", "2",
                          "--calib-samples", "2", "--method", "fp", "--prompts-file", prompts, "--markdown", prompts)
    assert code == 2 and prompts.read_text() == "a cat\n"
