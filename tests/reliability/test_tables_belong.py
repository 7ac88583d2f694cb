"""Fault catalogue 3: correction tables refuse a model or sampler they were not fitted for, unless forced."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import pytest
import torch

from fault_support import EVAL_FAST, QUIET_CALIBRATION, World, assert_one_error, cli, snapshot
from tacdiff.correction import CorrectedDenoiser, CorrectedUNet, CorrectionTables
from tacdiff.io import load_quantized
from tacdiff.models.kinds import ModelDenoiser
from tiny_models import tiny_model


def retabled(world: World, root: Path, change: Callable[[CorrectionTables], CorrectionTables]) -> Path:
    """The W4A8 tables with ``change`` applied, saved in ``root``."""
    return change(CorrectionTables.load(world.root / "tac.safetensors")).save(root / "changed.safetensors")


def other_betas(tables: CorrectionTables) -> CorrectionTables:
    return dataclasses.replace(tables, scheduler_config={**tables.scheduler_config, "beta_end": 0.03})


def other_shape(tables: CorrectionTables) -> CorrectionTables:
    return dataclasses.replace(tables, metadata={**tables.metadata, "sample_shape": [3, 32, 32]})


def test_tables_for_other_bits_are_refused_naming_both(world: World, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    code, output = cli("eval", world.root / "w8a8", "--tables", world.root / "tac.safetensors", *EVAL_FAST)
    assert_one_error(code, output, "quantization W4A8 vs W8A8", "weight_bits 4 (tables) vs 8 (model)",
                     "--force-tables")
    assert snapshot(tmp_path) == before


def test_force_tables_applies_them_with_a_warning(world: World) -> None:
    code, output = cli("eval", world.root / "w8a8", "--tables", world.root / "tac.safetensors", "--force-tables",
                       *EVAL_FAST)
    assert code == 0, output
    assert "applied anyway" in output and "weight_bits 4 (tables) vs 8 (model)" in output


def test_tables_for_a_model_quantized_from_another_fp_model_are_refused(world: World, tmp_path: Path) -> None:
    other = tiny_model("unet")
    with torch.no_grad():
        other.conv_in.weight.mul_(1.01)
    other.save_pretrained(tmp_path / "other-fp")
    code, output = cli("quantize", tmp_path / "other-fp", "--out", tmp_path / "other-w4a8", "--w-bits", "4",
                       *QUIET_CALIBRATION)
    assert code == 0, output
    code, output = cli("eval", tmp_path / "other-w4a8", "--tables", world.root / "tac.safetensors", *EVAL_FAST)
    assert_one_error(code, output, "FP model sha256", "quantized from another FP model")


@pytest.mark.parametrize("change, fragment", [(other_betas, "noise schedule (betas)"),
                                              (other_shape, "sample shape (3, 32, 32) (tables) vs (3, 16, 16)")])
def test_tables_for_another_schedule_or_shape_are_refused(world: World, tmp_path: Path,
                                                           change: Callable, fragment: str) -> None:
    tables = retabled(world, tmp_path, change)
    code, output = cli("eval", world.root / "w4a8", "--tables", tables, *EVAL_FAST)
    assert_one_error(code, output, fragment)


def test_tables_for_another_step_count_are_refused_even_when_forced(world: World) -> None:
    code, output = cli("eval", world.root / "w4a8", "--tables", world.root / "tac.safetensors", "--force-tables",
                       "--steps", "3", "--samples", "2", "--quiet")
    assert_one_error(code, output, "correction tables are for DDIMScheduler, 2 steps")


def test_tables_for_another_model_and_schedule_name_the_model(world: World, tmp_path: Path) -> None:
    """Another model's tables also miss this sampler's schedule; the error names the model, which no schedule fixes."""
    tables = retabled(world, tmp_path, other_shape)
    code, output = cli("eval", world.root / "w4a8", "--tables", tables, "--steps", "3", "--samples", "2", "--quiet")
    assert_one_error(code, output, "sample shape (3, 32, 32) (tables) vs (3, 16, 16)")


@pytest.mark.parametrize("wrap", [lambda model, tables, **kw: CorrectedDenoiser(ModelDenoiser(model), tables, **kw),
                                  lambda model, tables, **kw: CorrectedUNet(model, tables, **kw)])
def test_python_wrappers_check_the_model_too(world: World, wrap: Callable) -> None:
    tables = CorrectionTables.load(world.root / "tac.safetensors")
    tables = dataclasses.replace(tables, input_bias=torch.zeros_like(tables.input_bias))  # fits CorrectedUNet too
    w8a8 = load_quantized(world.root / "w8a8")
    with pytest.raises(ValueError, match="weight_bits 4 \\(tables\\) vs 8 \\(model\\)"):
        wrap(w8a8, tables)
    with pytest.warns(UserWarning, match="applied anyway"):
        wrap(w8a8, tables, force=True)
    wrap(load_quantized(world.root / "w4a8"), tables)  # its own model: no error, no warning


def test_tables_without_provenance_warn_that_they_cannot_be_checked(world: World, tmp_path: Path) -> None:
    tables = retabled(world, tmp_path, lambda t: dataclasses.replace(t, metadata={}))
    code, output = cli("eval", world.root / "w4a8", "--tables", tables, *EVAL_FAST)
    assert code == 0, output
    assert "warning: these correction tables record no provenance" in output
