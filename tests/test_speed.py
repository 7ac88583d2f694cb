"""Speed report: every variant timed at every batch size, memory and artifact sizes measured (not asserted
against wall-clock limits: speed targets live in benchmarks/speed.py)."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tacdiff.cli import app
from tacdiff import speed
from tacdiff.speed import (SpeedRow, artifact_row, fastest_summary, format_speed_markdown, measure_speed,
                           model_for_speed, quantized_for_timing, relative_to_fp32, seconds_per_call)
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


def test_an_artifact_above_its_size_target_is_flagged_with_what_its_file_holds(tmp_path: Path) -> None:
    """The DiT keeps its class-embedding tables float by default; the report says so and names the fix."""
    dit = tiny_model("dit")
    rows = {embeddings: artifact_row("dit", dit, quantized_for_timing(dit, "w8a8", embeddings), tmp_path)
            for embeddings in (False, True)}
    for row in rows.values():
        parts = row["breakdown"]
        total = parts["codes"] + parts["quantization parameters"] + sum(parts["float tensors"].values()) + parts["header"]
        assert total == pytest.approx(row["ratio"]) and min(parts["codes"], parts["header"]) > 0
    tables = sum(m.weight.numel() * 4 for m in dit.modules() if isinstance(m, torch.nn.Embedding))
    fp_bytes = rows[False]["fp32_mib"] * 2**20
    assert rows[False]["breakdown"]["float tensors"]["Embedding"] == pytest.approx(tables / fp_bytes)
    assert "Embedding" not in rows[True]["breakdown"]["float tensors"]
    over = {**rows[False], "ratio": 0.5, "met": False}
    text = format_speed_markdown({"calls": [], "artifacts": [over, {**over, "model": "small", "ratio": 0.2,
                                                                    "met": True}]})
    assert "| 0.500 | 0.280 | no |" in text and "| 0.200 | 0.280 | yes |" in text
    assert "dit w8a8 is above the size target (0.500 > 0.280). Of the FP32 file, codes take" in text
    assert "Embedding" in text and "--quantize-embeddings" in text and "small w8a8 is above" not in text

def test_activation_memory_is_measured_after_the_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first call allocates once (thread pools, kernel caches); counting it inflated whichever variant ran first."""
    model, calls, at_entry = tiny_model("conv_unet"), [], []
    model.register_forward_pre_hook(lambda *args: calls.append(1))

    @contextmanager
    def window():
        at_entry.append(len(calls))
        yield [0.0]

    monkeypatch.setattr(speed, "peak_rss_above_start", window)
    seconds_per_call(model, 1, repeats=2, min_seconds=0.0)
    assert at_entry == [1] and len(calls) == 3


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
    calls = [asdict(r) for r in relative_to_fp32(rows)]
    assert "Fastest: m batch 1 int8 w8a8 (2.00x FP32, busy: FP32 timings 2.00x apart); m batch 8 int8 w8a8 (2.00x " \
           "FP32)" in fastest_summary(calls)


def test_an_int8_row_that_converted_no_layer_is_marked_and_never_fastest() -> None:
    """On a CPU without VNNI or AMX a W8A8 model stays fake on the int8 backend: its row must not read as int8."""
    def row(variant: str, bits: str, seconds: float, placement: str = "") -> dict:
        return asdict(SpeedRow("m", variant, bits, 8, seconds, 1.0 / seconds, 1.0, 1.0, 0.0, placement))

    calls = [row("fp32", "fp", 1.0), row("int8", "w8a8", 0.5, "int8: 0 modules, fake: 55"),
             row("int8", "w4a8", 0.8, "int8: 52 modules, fake: 3")]
    text = format_speed_markdown({"calls": calls, "artifacts": []})
    assert "| m | int8 (no layer converted) | w8a8 | 8 |" in text and "| m | int8 | w4a8 | 8 |" in text
    assert "Fastest: m batch 8 int8 w4a8 (1.25x FP32)" in text
    assert "int8 placement: m w8a8: int8: 0 modules, fake: 55; m w4a8: int8: 52 modules, fake: 3" in text
    assert "A row marked (no layer converted) timed the fake-quant model" in text


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
                                      "w4a8", "--repeats", "1", "--json", str(tmp_path / "speed.json"), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "speed.json").read_text())
    assert len(report["calls"]) == 4 and len(report["artifacts"]) == 1
    assert f"{torch.get_num_threads()} threads, torch {torch.__version__}" in report["machine"]
    assert "| int8 | w4a8 | 1 |" in result.output and "int8 placement: " in result.output
    fastest = max(report["calls"], key=lambda r: r["speedup"])
    assert f"Fastest: {fastest['model']} batch 1 {fastest['variant']}" in result.output


def test_bench_speed_quantizes_embedding_tables_on_request(tmp_path: Path) -> None:
    tiny_model("dit").save_pretrained(tmp_path / "dit")
    result = CliRunner().invoke(app, ["bench-speed", "--model", str(tmp_path / "dit"), "--batch", "1", "--bits", "w8a8",
                                      "--repeats", "1", "--quantize-embeddings", "--json", str(tmp_path / "s.json"),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    (artifact,) = json.loads((tmp_path / "s.json").read_text())["artifacts"]
    assert "Embedding" not in artifact["breakdown"]["float tensors"]


def test_bench_speed_refuses_a_bad_model_before_timing_any(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def timed(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was timed before every --model was checked")

    monkeypatch.setattr(speed, "measure_speed", timed)
    tiny_model("conv_unet").save_pretrained(tmp_path / "fp")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    for bad, message in ((tmp_path / "vae", "describes a 'AutoencoderKL'"), (tmp_path / "missing", "not found")):
        result = CliRunner().invoke(app, ["bench-speed", "--model", str(tmp_path / "fp"), "--model", str(bad),
                                          "--batch", "1", "--json", str(tmp_path / "s.json"), "--quiet"])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "s.json").exists()
