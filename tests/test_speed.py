"""Speed report: every variant timed at every batch size, memory and artifact sizes measured (not asserted
against wall-clock limits: speed targets live in benchmarks/speed.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tacdiff.cli import app
from tacdiff.speed import (SpeedRow, float_parameters, format_speed_markdown, measure_speed, model_for_speed,
                           quantized_for_timing, relative_to_fp32)
from tiny_models import tiny_model


def test_every_variant_is_timed_and_int8_weights_are_small() -> None:
    report = measure_speed("tiny", tiny_model("unet"), bits=("w4a8",), batches=(1, 2), repeats=1, progress=False)
    calls = report["calls"]
    assert [(r["variant"], r["batch"]) for r in calls] == [(v, b) for b in (1, 2) for v in ("fp32", "bf16", "fake",
                                                                                              "int8")]
    assert all(r["seconds"] > 0 and r["speedup"] > 0 for r in calls)
    int8 = next(r for r in calls if r["variant"] == "int8")
    assert int8["weight_ratio"] < 0.35 and int8["placement"].startswith("int8: ")
    (artifact,) = report["artifacts"]
    assert artifact["bits"] == "w4a8" and 0 < artifact["ratio"] < 1 and artifact["target_ratio"] == 4 / 32 + 0.03
    assert artifact["met"] == (artifact["ratio"] <= artifact["target_ratio"])


def test_an_artifact_above_its_size_target_is_flagged_with_its_float_parameters() -> None:
    """The DiT keeps its class-embedding tables float by default; the report says so and names the fix."""
    dit = tiny_model("dit")
    kept = float_parameters(quantized_for_timing(dit, "w8a8"))
    tables = sum(m.weight.numel() for m in dit.modules() if isinstance(m, torch.nn.Embedding))
    assert kept["Embedding"] == pytest.approx(tables / sum(p.numel() for p in dit.parameters()))
    assert float_parameters(quantized_for_timing(dit, "w8a8", quantize_embeddings=True)).get("Embedding") is None
    row = {"model": "dit", "bits": "w8a8", "fp32_mib": 1.0, "artifact_mib": 0.5, "ratio": 0.5, "target_ratio": 0.28,
           "met": False, "float_parameters": kept, "fp32_load_seconds": 0.0, "int8_load_seconds": 0.0}
    text = format_speed_markdown({"calls": [], "artifacts": [row, {**row, "model": "small", "ratio": 0.2,
                                                                   "met": True}]})
    assert "| 0.500 | 0.280 | no |" in text and "| 0.200 | 0.280 | yes |" in text
    assert f"dit w8a8 is above the size target: {sum(kept.values()):.0%} of its parameters stay float (" in text
    assert f"Embedding {kept['Embedding']:.0%}" in text
    assert "--quantize-embeddings" in text and "small w8a8 is above" not in text


def test_nested_conditioning_is_timed() -> None:
    """SDXL's UNet takes ``added_cond_kwargs`` (pooled text embeddings and time ids) as a nested dict."""
    report = measure_speed("sdxl", tiny_model("sdxl_unet"), bits=("w8a8",), batches=(1,), repeats=1, progress=False)
    assert [r["variant"] for r in report["calls"]] == ["fp32", "bf16", "fake", "int8"]


def test_a_model_that_fails_in_bf16_is_timed_without_bf16_rows(caplog) -> None:
    """diffusers' UNet2DModel feeds a timestep class embedding fp32 inputs even in bf16."""
    model = tiny_model("conv_unet", class_embed_type="timestep")
    with caplog.at_level(logging.WARNING, logger="tacdiff.speed"):
        report = measure_speed("noise-level", model, bits=("w8a8",), batches=(1,), repeats=1, progress=False)
    variants = [r["variant"] for r in report["calls"]]
    assert variants in (["fp32", "bf16", "fake", "int8"], ["fp32", "fake", "int8"])
    assert ("bf16" in variants) != any("does not run in bf16" in r.getMessage() for r in caplog.records)


def test_speed_ups_are_against_the_faster_fp32_timing_and_a_busy_machine_warns(caplog) -> None:
    def row(variant: str, batch: int, seconds: float) -> SpeedRow:
        return SpeedRow("m", variant, "fp" if variant == "fp32" else "w8a8", batch, seconds, 0.0, 1.0, 1.0, 0.0, "")

    rows = [row("fp32", 1, 2.0), row("fp32", 8, 1.0), row("int8", 1, 0.5), row("int8", 8, 0.5), row("fp32", 1, 1.0),
            row("fp32", 8, 1.1)]
    with caplog.at_level(logging.WARNING, logger="tacdiff.speed"):
        result = {(r.variant, r.batch): (r.seconds, r.speedup) for r in relative_to_fp32(rows)}
    assert result == {("fp32", 1): (1.0, 1.0), ("fp32", 8): (1.0, 1.0), ("int8", 1): (0.5, 2.0),
                      ("int8", 8): (0.5, 2.0)}
    assert [r.getMessage().split(" took")[0] for r in caplog.records] == ["m: FP32 at batch 1"]


def test_a_config_only_folder_builds_random_weights(tmp_path: Path) -> None:
    model = tiny_model("unet")
    model.save_config(tmp_path)
    assert type(model_for_speed(tmp_path)) is type(model)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(ValueError, match="VQModel"):
        model_for_speed(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"sample_size": 8}))
    with pytest.raises(ValueError, match="names no _class_name; tacdiff times UNet2DModel"):
        model_for_speed(tmp_path)


def test_bench_speed_command_writes_json(tmp_path: Path) -> None:
    tiny_model("conv_unet").save_pretrained(tmp_path / "fp")
    result = CliRunner().invoke(app, ["bench-speed", "--model", str(tmp_path / "fp"), "--batch", "1", "--bits",
                                      "w8a8", "--repeats", "1", "--json", str(tmp_path / "speed.json"), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "speed.json").read_text())
    assert len(report["calls"]) == 4 and len(report["artifacts"]) == 1
    assert f"{torch.get_num_threads()} threads, torch {torch.__version__}" in report["machine"]
    assert "| int8 | w8a8 | 1 |" in result.output
    fastest = max(report["calls"], key=lambda r: r["speedup"])
    assert f"Fastest: {fastest['model']} batch 1 {fastest['variant']}" in result.output
