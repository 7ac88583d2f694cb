"""``tacdiff calibrate`` on a saved tiny quantized artifact: tables written, mismatches refused."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from torch import nn
from typer.testing import CliRunner

from tacdiff.cli import app, calibrate
from tacdiff.correction import CorrectionTables
from tacdiff.correction.calibrate import DEFAULT_GAMMA, DEFAULT_IBC, DEFAULT_IBC_TARGET, DEFAULT_LAM, DEFAULT_TAU
from tacdiff.io.artifact import save_quantized, state_dict_sha256

from tiny_models import tiny_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, fp_unet: UNet2DModel, w4a8_unet: nn.Module) -> Path:
    root = tmp_path_factory.mktemp("cli")
    fp_unet.save_pretrained(root / "fp")
    DDIMScheduler().save_pretrained(root / "fp" / "scheduler")
    save_quantized(w4a8_unet, root / "w4a8", metadata={"source_sha256": state_dict_sha256(fp_unet)})
    other = tiny_model("unet")
    with torch.no_grad():
        other.conv_in.weight.add_(0.01)
    other.save_pretrained(root / "other")
    return root


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("method", ["tac", "ptqd"])
def test_calibrate_writes_tables(folders: Path, method: str) -> None:
    out = folders / f"{method}.safetensors"
    plot = folders / f"{method}.png"
    code, output = invoke("calibrate", str(folders / "w4a8"), "--fp-model", str(folders / "fp"), "--out", str(out),
                          "--method", method, "--steps", "3", "--samples", "4", "--batch-size", "2", "--plot",
                          str(plot), "--quiet")
    assert code == 0, output
    tables = CorrectionTables.load(out)
    assert tables.method == method and tables.num_inference_steps == 3 and tables.scheduler_class == "DDIMScheduler"
    assert tables.metadata["weight_bits"] == 4 and str(out) in output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(plot) in output


def test_calibrate_fits_the_tables_on_the_backend_it_is_given(folders: Path) -> None:
    fitted = {}
    for backend in ("fake", "int8"):
        out = folders / f"on-{backend}.safetensors"
        code, output = invoke("calibrate", str(folders / "w4a8"), "--fp-model", str(folders / "fp"), "--out",
                              str(out), "--backend", backend, "--steps", "3", "--samples", "4", "--batch-size", "2",
                              "--quiet")
        assert code == 0, output
        fitted[backend] = CorrectionTables.load(out)
        assert fitted[backend].metadata["backend"] == backend
    fake, int8 = fitted["fake"], fitted["int8"]
    assert not torch.equal(fake.input_bias, int8.input_bias)  # the int8 trajectories differ in the last bits
    assert (fake.out_scale - int8.out_scale).abs().max() < 0.05 * fake.out_scale.abs().max()  # the same model


@pytest.mark.parametrize("change, message", [
    ({"--fp-model": "other"}, "quantized from"),
    ({"--method": "magic"}, "unknown method"),
    ({"--scheduler": "heun"}, "unknown scheduler"),
    ({"--steps": "0"}, "'--steps': must be at least 1"),
    ({"--out": "exists.safetensors"}, "already exists"),
    ({"--plot": "tables.txt"}, "name a .png"),
])
def test_calibrate_refuses_bad_input(folders: Path, change: dict[str, str], message: str) -> None:
    (folders / "exists.safetensors").touch(exist_ok=True)
    options = {"--fp-model": "fp", "--out": "new.safetensors", "--method": "tac", "--scheduler": "ddim",
               "--steps": "2", **change}
    paths = {"--fp-model", "--out", "--plot"}
    args = [arg for key, value in options.items()
            for arg in (key, str(folders / value) if key in paths else value)]
    code, output = invoke("calibrate", str(folders / "w4a8"), *args, "--samples", "2", "--quiet")
    assert code == 2 and message in output, output
    assert not (folders / "new.safetensors").exists()


def test_calibrate_defaults_are_the_library_defaults() -> None:
    # The CLI spells its defaults out (no torch import at start-up); they must not drift from the library's.
    options = {name: param.default.default for name, param in inspect.signature(calibrate).parameters.items()}
    assert (options["lam"], options["gamma"], options["tau"]) == (DEFAULT_LAM, DEFAULT_GAMMA, DEFAULT_TAU)
    assert (options["ibc"], options["ibc_target"]) == (DEFAULT_IBC, DEFAULT_IBC_TARGET)
