"""``tacdiff bench`` end to end on a tiny run of the bundled model (CPU, a few seconds)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import tacdiff.bench as bench_module
from tacdiff.backends.codes import exact_int8_cpu
from tacdiff.backends.int8 import is_converted
from tacdiff.bench import METHODS, ROW_KEYS, run_bench
from tacdiff.correction.calibrate import fit_tables
from tacdiff.cli import app
from tacdiff.quant.apply import quantize


def test_bench_cli_writes_rows_table_and_plot(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--json", str(out), "--markdown", str(tmp_path / "bench.md"), "--plot",
            str(tmp_path / "bench.png"), "--grid", str(tmp_path / "grid.png"), "--samples", "8", "--calib-samples",
            "8", "--bits", "w4a8", "--steps", "5",
            "--batch-size", "8", "--seed", "0", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows, settings = report["rows"], report["settings"]
    assert [r["method"] for r in rows] == list(METHODS)
    assert settings["bits"] == ["w4a8"] and settings["samples"] == 8 and settings["recipe"]["weight_rounding"] == "rtn"
    assert settings["tac_options"]["lam"] == 0.5 and settings["tac_options"]["ibc"] == "element"
    for row in rows:
        assert tuple(row) == ROW_KEYS
        assert row["steps"] == 5
        assert row["bits"] == ("fp" if row["method"] == "fp" else "w4a8")
    by_method = {r["method"]: r for r in rows}
    assert by_method["fp"]["x0_mse"] == 0 and by_method["fp"]["x0_psnr"] == "inf"
    assert by_method["ptq"]["x0_mse"] > 0 and by_method["ptq"]["x0_ssim"] < by_method["fp"]["x0_ssim"] == pytest.approx(1)
    assert all(r["sample_seconds"] > 0 for r in rows)
    assert all(r["calib_seconds"] > 0 for r in rows if r["method"] != "fp")
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG" and f"wrote {tmp_path / 'grid.png'}" in result.output
    assert all(r["prompt_accuracy"] is None and r["fid_allconv"] is not None for r in rows)  # unconditional model
    assert "| w4a8 | 5 | tac |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.md").read_text().startswith("Settings: model=reference, bits=['w4a8'], steps=[5]")
    assert "| fp | 5 | fp |" in result.output


def test_a_grid_must_be_a_png_before_any_work(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--grid", str(tmp_path / "grid.jpg"), "--samples", "8", "--quiet"])
    assert result.exit_code == 2 and "--grid" in result.output and ".png" in result.output


def test_bad_bits_is_a_clear_error():
    result = CliRunner().invoke(app, ["bench", "--bits", "w9a8", "--samples", "8", "--quiet"])
    assert result.exit_code == 2
    assert "w4a8" in result.output and "'w9a8'" in result.output


def test_gptq_rounding_lowers_the_ptq_error():
    settings = dict(bits=("w4a8",), steps=(5,), methods=("fp", "ptq"), samples=8, calib_samples=8, batch_size=8,
                    progress=False)
    rtn, gptq = (next(r for r in run_bench(weight_rounding=rounding, **settings) if r["method"] == "ptq")
                 for rounding in ("rtn", "gptq"))
    assert gptq["x0_mse"] < rtn["x0_mse"]


def test_tables_are_fitted_on_the_backend_the_rows_run_on(monkeypatch):
    fitted_on = []

    def recording(method, fp, quant, *args, **kwargs):
        fitted_on.append(is_converted(quant))
        return fit_tables(method, fp, quant, *args, **kwargs)

    monkeypatch.setattr(bench_module, "fit_tables", recording)
    rows = run_bench(bits=("w8a8",), steps=(3,), methods=("fp", "ptq", "tac"), samples=4, calib_samples=4,
                     batch_size=4, backend="int8", progress=False)
    assert [r["method"] for r in rows] == ["fp", "ptq", "tac"]
    assert fitted_on == [exact_int8_cpu()]


def test_a_sym_setting_quantizes_with_symmetric_weights(monkeypatch):
    recipes = []

    def recording(model, config, *args, **kwargs):
        recipes.append((config.weight_bits, config.act_bits, config.weight_symmetric))
        return quantize(model, config, *args, **kwargs)

    monkeypatch.setattr(bench_module, "quantize", recording)
    rows = run_bench(bits=("W8A8-sym", "w4a8"), steps=(3,), methods=("fp", "ptq"), samples=4, calib_samples=4,
                     batch_size=4, progress=False)
    assert recipes == [(8, 8, True), (4, 8, False)]
    assert [r["bits"] for r in rows] == ["fp", "w8a8-sym", "w4a8"]


def test_bad_weight_rounding_is_a_clear_error():
    result = CliRunner().invoke(app, ["bench", "--weight-rounding", "nearest", "--samples", "8", "--quiet"])
    assert result.exit_code == 2
    assert "--weight-rounding must be one of rtn, gptq, adaround" in result.output, result.output


def test_tac_options_reach_the_corrected_rows_only():
    settings = dict(bits=("w4a8",), steps=(5,), methods=("fp", "ptq", "ptqd", "ibc"), samples=8, calib_samples=8,
                    batch_size=8, progress=False)
    default, channel = ({r["method"]: r["x0_mse"] for r in run_bench(tac_options=options, **settings)}
                        for options in (None, {"ibc": "channel"}))
    assert default["ibc"] != channel["ibc"]
    assert (default["ptq"], default["ptqd"]) == (channel["ptq"], channel["ptqd"])


def test_a_bad_tac_option_is_refused_before_work(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--ibc", "pixel", "--json", str(tmp_path / "b.json"), "--quiet"])
    assert result.exit_code == 2 and "pixel" in result.output and "element" in result.output
    assert list(tmp_path.iterdir()) == []
