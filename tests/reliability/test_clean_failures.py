"""Fault catalogue 5: every command fails with one ``error: ...`` line and exit status 2, before any long
work where the problem can be seen up front, and leaves nothing behind."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

import tacdiff
from fault_support import EVAL_FAST, QUIET_CALIBRATION, World, assert_one_error, cli, snapshot
from fs_support import tmpfs
from tacdiff.correction import CorrectionTables
from tiny_models import calibration_of, tiny_model


def command_line(command: str, world: World, tmp_path: Path) -> list[str | Path]:
    """A valid, fast invocation of ``command`` writing into ``tmp_path``."""
    root = world.root
    return {
        "quantize": ["quantize", root / "fp", "--out", tmp_path / "out", *QUIET_CALIBRATION],
        "eval": ["eval", root / "w4a8", *EVAL_FAST],
        "calibrate": ["calibrate", root / "w4a8", "--fp-model", root / "fp", "--out", tmp_path / "t.safetensors",
                      "--steps", "2", "--samples", "2", "--quiet"],
        "bench": ["bench", "--samples", "2", "--calib-samples", "2", "--steps", "2", "--bits", "w8a8", "--quiet"],
        "train": ["train", tmp_path / "run", "--steps", "1", "--batch-size", "2", "--quiet"],
        "demo": ["demo", "--out", tmp_path / "demo", "--samples", "1", "--steps", "2", "--quiet"],
    }[command]


WITH_DEVICE = ["quantize", "eval", "calibrate", "bench", "train"]


@pytest.mark.parametrize("device, fragment", [("meta", "'meta' holds no data"), ("mps", "no MPS support"),
                                              ("cuda:7", "support"), ("tpu", "is not a torch device")])
@pytest.mark.parametrize("command", WITH_DEVICE)
def test_a_device_this_machine_lacks(world: World, tmp_path: Path, command: str, device: str, fragment: str) -> None:
    code, output = cli(*command_line(command, world, tmp_path), "--device", device)
    assert_one_error(code, output, "--device", fragment)
    assert list(tmp_path.iterdir()) == []


ZERO_COUNTS = [("quantize", "--calib-samples"), ("quantize", "--calib-steps"), ("eval", "--steps"),
               ("eval", "--samples"), ("eval", "--batch-size"), ("calibrate", "--steps"), ("calibrate", "--samples"),
               ("bench", "--samples"), ("bench", "--calib-samples"), ("train", "--steps"), ("train", "--batch-size"),
               ("demo", "--samples"), ("demo", "--steps")]


@pytest.mark.parametrize("command, option", ZERO_COUNTS)
def test_a_zero_count_in_every_command(world: World, tmp_path: Path, command: str, option: str) -> None:
    code, output = cli(*command_line(command, world, tmp_path), option, "0")
    assert_one_error(code, output, f"'{option}': must be at least 1, got 0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_json_pointing_at_a_folder(world: World, tmp_path: Path, command: str) -> None:
    (tmp_path / "results").mkdir()
    before = snapshot(tmp_path)
    code, output = cli(*command_line(command, world, tmp_path), "--json", tmp_path / "results")
    assert_one_error(code, output, "results is a folder, but the JSON file is a file")
    assert snapshot(tmp_path) == before


def test_json_pointing_into_the_model_folder(world: World, tmp_path: Path) -> None:
    artifact = world.copy("w4a8", tmp_path)
    before = snapshot(tmp_path)
    code, output = cli("eval", artifact, *EVAL_FAST, "--json", artifact / "config.json")
    assert_one_error(code, output, "is part of the input", "never replaces anything inside its inputs")
    assert snapshot(tmp_path) == before


def test_tables_that_are_a_folder(world: World) -> None:
    code, output = cli("eval", world.root / "w4a8", "--tables", world.root / "w8a8", *EVAL_FAST)
    assert_one_error(code, output, "is a folder, not a tacdiff correction tables file")


@pytest.mark.parametrize("command", ["quantize", "calibrate", "train", "demo"])
def test_a_read_only_output_location(world: World, tmp_path: Path, command: str) -> None:
    with tmpfs(tmp_path, "ro,size=64k"):
        code, output = cli(*command_line(command, world, tmp_path))
        assert_one_error(code, output, "cannot write in", "Read-only file system")


def test_a_full_output_location_is_seen_before_quantizing(world: World, tmp_path: Path) -> None:
    with tmpfs(tmp_path, "size=64k"):
        code, output = cli(*command_line("quantize", world, tmp_path))
        assert_one_error(code, output, "not enough free space", "MiB are free")
        assert list(tmp_path.iterdir()) == []


def test_a_mistyped_scheduler_path_is_an_error_not_a_fallback(world: World, tmp_path: Path) -> None:
    code, output = cli(*command_line("quantize", world, tmp_path), "--scheduler", tmp_path / "shceduler")
    assert_one_error(code, output, "no scheduler_config.json in", "shceduler")


@pytest.mark.parametrize("text, fragment", [("[1, 2]", "holds a JSON list"), ("{oops", "is not valid JSON"),
                                            ('{"_class_name": "UNet2DModel", "block_out_channels": 7}',
                                             "diffusers cannot load")])
def test_bad_json_in_a_model_config(world: World, tmp_path: Path, text: str, fragment: str) -> None:
    model = world.copy("fp", tmp_path)
    (model / "config.json").write_text(text)
    before = snapshot(tmp_path)
    code, output = cli("quantize", model, "--out", tmp_path / "out", *QUIET_CALIBRATION)
    assert_one_error(code, output, fragment, "config.json" if "JSON" in fragment else str(model))
    assert snapshot(tmp_path) == before


def test_bad_json_in_a_scheduler_config(world: World, tmp_path: Path) -> None:
    (tmp_path / "sched").mkdir()
    (tmp_path / "sched" / "scheduler_config.json").write_text('"DDIMScheduler"')
    code, output = cli(*command_line("quantize", world, tmp_path), "--scheduler", tmp_path / "sched")
    assert_one_error(code, output, "scheduler_config.json holds a JSON str")


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_model("unet")
    with torch.no_grad():
        model.mid_block.resnets[0].conv1.weight[0, 0, 0, 0] = float("nan")
    folder = tmp_path_factory.mktemp("nan") / "fp"
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("rounding", ["rtn", "gptq", "adaround"])
def test_nan_weights_under_every_rounding_method(nan_model: Path, tmp_path: Path, rounding: str) -> None:
    code, output = cli("quantize", nan_model, "--out", tmp_path / "out", "--weight-rounding", rounding,
                       *QUIET_CALIBRATION)
    assert_one_error(code, output, "mid_block.resnets.0.conv1.weight holds NaN or inf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rounding", ["rtn", "gptq", "adaround"])
def test_nan_calibration_inputs_under_every_rounding_method(unet: UNet2DModel, rounding: str) -> None:
    calibration = calibration_of(unet, seed=0, num_samples=2)
    calibration.x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration input x holds NaN or inf"):
        tacdiff.quantize(copy.deepcopy(unet), tacdiff.QuantConfig(weight_rounding=rounding), calibration,
                         progress=False)


def test_nan_in_a_paired_evaluation_is_an_error_not_a_nan_metric(world: World, nan_model: Path,
                                                                 tmp_path: Path) -> None:
    code, output = cli("eval", nan_model, "--fp-model", world.root / "fp", *EVAL_FAST, "--json", tmp_path / "r.json")
    assert_one_error(code, output, "produced NaN or inf in 2 of 2 samples", "no metric was computed")
    assert list(tmp_path.iterdir()) == []


def test_absurd_tables_are_an_error_when_applied(world: World, tmp_path: Path) -> None:
    tables = CorrectionTables.load(world.root / "tac.safetensors")
    tables.out_scale.fill_(3e38)
    path = tables.save(tmp_path / "absurd.safetensors")
    code, output = cli("eval", world.root / "w4a8", "--tables", path, *EVAL_FAST)
    assert_one_error(code, output, "turned a finite noise estimate into NaN or inf", "Recalibrate")


@pytest.mark.parametrize("how", ["--debug", "TACDIFF_DEBUG=1"])
def test_debug_shows_the_traceback(tmp_path: Path, how: str) -> None:
    from typer.testing import CliRunner

    from tacdiff.cli import app

    args = ["eval", str(tmp_path / "missing")]
    result = CliRunner().invoke(app, ["--debug", *args] if how == "--debug" else args,
                                env={"TACDIFF_DEBUG": "1"} if how != "--debug" else None)
    assert isinstance(result.exception, FileNotFoundError)
    assert "error: " not in result.output


def test_nan_in_the_fp_reference_of_a_paired_evaluation(world: World, nan_model: Path) -> None:
    code, output = cli("eval", world.root / "fp", "--fp-model", nan_model, *EVAL_FAST)
    assert_one_error(code, output, "produced NaN or inf in 2 of 2 samples")


@pytest.mark.parametrize("args, fragment", [(["train", "RUN", "--lr", "inf"], "lr must be finite and > 0, got inf"),
                                            (["calibrate", "--gamma", "inf"], "gamma must be finite"),
                                            (["calibrate", "--tau", "nan"], "tau must be finite")])
def test_infinite_hyper_parameters_are_refused_before_work(world: World, tmp_path: Path, args: list[str],
                                                           fragment: str) -> None:
    command, *options = args
    base = command_line(command, world, tmp_path)
    code, output = cli(*base, *[str(tmp_path / "run") if o == "RUN" else o for o in options if o != "RUN"])
    assert_one_error(code, output, fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["false", "0", "no", ""])
def test_debug_words_that_mean_no_keep_the_one_line_error(tmp_path: Path, value: str) -> None:
    code, output = cli("eval", tmp_path / "missing", env={"TACDIFF_DEBUG": value})
    assert_one_error(code, output, "model folder not found")


@pytest.mark.parametrize("command, options, fragment", [
    ("bench", ["--steps", "5000"], "steps must be <= 1000"),
    ("bench", ["--plot", "p.xyz"], "--plot p.xyz: name a .png, .pdf, .svg, .jpg file"),
    ("quantize", ["--calib-steps", "2", "--calib-kept-steps", "5"], "--calib-kept-steps 5 is more than the 2 steps"),
])
def test_inconsistent_options_are_refused_before_work(world: World, tmp_path: Path, command: str,
                                                      options: list[str], fragment: str) -> None:
    code, output = cli(*command_line(command, world, tmp_path), *options, cwd=tmp_path)
    assert_one_error(code, output, fragment)
    assert list(tmp_path.iterdir()) == []


def test_a_bfloat16_artifact_pairs_with_its_float32_model(world: World, tmp_path: Path) -> None:
    from tacdiff.io import load_quantized, save_quantized

    save_quantized(load_quantized(world.root / "w8a8").to(torch.bfloat16), tmp_path / "bf16")
    code, output = cli("eval", tmp_path / "bf16", "--fp-model", world.root / "fp", *EVAL_FAST)
    assert code == 0, output
    assert "x0_psnr" in output


def test_python_load_on_a_missing_device_is_a_clear_error(world: World) -> None:
    from tacdiff.io import load_quantized

    with pytest.raises(ValueError, match="no CUDA support; use --device cpu"):
        load_quantized(world.root / "w4a8", device="cuda")


@pytest.mark.parametrize("delay", [0.1, 0.3, 1.5])
def test_ctrl_c_while_the_command_line_starts_is_one_line(tmp_path: Path, delay: float) -> None:
    """An interrupt during the first seconds (typer, pydantic, torch and diffusers still importing) ends with the
    same one line as any other interrupt, not a traceback and not a silent status (typer's own for an interrupt
    while it parses the options)."""
    # a runner started in the background (`cmd &` in a script) passes SIGINT on ignored; a terminal does not
    process = subprocess.Popen([sys.executable, "-m", "tacdiff", "eval", "reference", "--samples", "2", "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    # CPython 3.11 marks an interrupt raised inside exec()'d source (dataclasses builds methods that way while
    # torch imports) as unhandled and ends the process by SIGINT after our exit(130); a shell sees 130 either way
    assert process.returncode in (130, -signal.SIGINT) and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "error: interrupted; nothing was written"


def test_an_interrupt_a_library_swallowed_still_ends_the_command_line(monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A command that ran on after a library swallowed the Ctrl-C (its outputs were refused by the atomic
    writers) still ends with the interrupt's line and status, not success."""
    from tacdiff.__main__ import main
    from tacdiff.interrupts import INTERRUPTED

    monkeypatch.setattr(sys, "argv", ["tacdiff", "--help"])
    INTERRUPTED.set()
    try:
        with pytest.raises(SystemExit) as end:
            main()
    finally:
        INTERRUPTED.clear()
    assert end.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["error: interrupted; nothing was written"]
