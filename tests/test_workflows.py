"""``tacdiff demo`` end to end on the bundled model (few steps): the table and the sample grid."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from tacdiff.cli import app
from tacdiff.workflows import run_demo


def test_demo_quantizes_corrects_and_draws(tmp_path: Path) -> None:
    rows = run_demo(tmp_path / "demo", samples=2, steps=4, calib_samples=4, progress=False)
    assert [r["bits"] for r in rows] == ["w8a8", "w4a8", "w4a8+tac"]
    w8a8, w4a8, tac = rows
    assert w8a8["eps_sqnr_db"] > w4a8["eps_sqnr_db"] + 6 and tac["eps_sqnr_db"] is None
    assert w8a8["x0_psnr_db"] > w4a8["x0_psnr_db"]
    assert all(r["x0_mse"] > 0 and r["seconds"] > 0 for r in rows)
    assert tac["x0_mse"] != w4a8["x0_mse"], "the correction changes the W4A8 samples"
    assert (tmp_path / "demo" / "samples.png").stat().st_size > 0


def test_demo_cli_prints_the_table(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--samples", "2", "--steps", "3",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("| w")]
    assert [line.split(" | ")[0] for line in lines] == ["| w8a8", "| w4a8", "| w4a8+tac"]
    assert lines[-1].split(" | ")[2] == "-"
    assert (tmp_path / "d" / "samples.png").is_file()
