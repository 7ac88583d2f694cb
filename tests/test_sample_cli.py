"""``tacdiff sample``: PNG files, grid and record, seeds that reproduce, corrected artifacts, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tacdiff.cli import app
from tacdiff.io import save_quantized
from tacdiff.models import loading
from tiny_models import tiny_model

FAST = ("--steps", "3", "--batch-size", "4", "--quiet")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    tiny_model("unet").save_pretrained(root / "fp")
    tiny_model("cond_unet", layers_per_block=1).save_pretrained(root / "cond")
    calibration = ("--calib-samples", "2", "--calib-steps", "2", "--calib-kept-steps", "2", "--quiet")
    for args in (("quantize", root / "fp", "--out", root / "w4a8", "--w-bits", "4", *calibration),
                 ("calibrate", root / "w4a8", "--fp-model", root / "fp", "--out", root / "tac.safetensors",
                  "--steps", "3", "--samples", "4", "--quiet")):
        code, output = invoke(*args)
        assert code == 0, output
    return root


def invoke(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_sample_writes_pngs_grid_and_record(folders: Path, tmp_path: Path) -> None:
    code, output = invoke("sample", folders / "fp", "--out", tmp_path / "s", "--num-samples", "5", *FAST)
    assert code == 0, output
    assert sorted(files(tmp_path / "s")) == [f"{i:06d}.png" for i in range(5)] + ["grid.png", "samples.json"]
    record = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert record["format"] == "tacdiff-samples" and record["steps"] == 3 and record["seed"] == 0
    assert [entry["index"] for entry in record["images"]] == list(range(5))
    assert len({entry["noise_seed"] for entry in record["images"]}) == 5


def test_same_seed_same_bytes_other_seed_other_images(folders: Path, tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        code, output = invoke("sample", folders / "fp", "--out", tmp_path / name, "--num-samples", "4",
                              "--seed", seed, *FAST)
        assert code == 0, output
        runs[name] = {k: v for k, v in files(tmp_path / name).items() if k.endswith(".png")}
    assert runs["a"] == runs["b"]
    assert all(runs["a"][k] != runs["c"][k] for k in runs["a"])


def test_more_samples_keep_the_first_ones(folders: Path, tmp_path: Path) -> None:
    """Image i's noise depends on (seed, i) alone, so at the same batch size the first images are the same bits (a
    batch of another size may round differently: oneDNN's AVX2 convolutions do)."""
    for name, count in (("few", "2"), ("many", "4")):
        code, output = invoke("sample", folders / "fp", "--out", tmp_path / name, "--num-samples", count, "--steps",
                              "3", "--batch-size", "2", "--quiet")
        assert code == 0, output
    assert all(files(tmp_path / "few")[f] == files(tmp_path / "many")[f] for f in ("000000.png", "000001.png"))


def test_corrected_artifact_samples_differ_from_uncorrected(folders: Path, tmp_path: Path) -> None:
    code, output = invoke("sample", folders / "w4a8", "--out", tmp_path / "q", "--num-samples", "4", *FAST)
    assert code == 0, output
    code, output = invoke("sample", folders / "w4a8", "--tables", folders / "tac.safetensors", "--out",
                          tmp_path / "tac", "--num-samples", "4", *FAST)
    assert code == 0, output
    assert json.loads((tmp_path / "tac" / "samples.json").read_text())["tables"] == str(folders / "tac.safetensors")
    assert files(tmp_path / "q")["000000.png"] != files(tmp_path / "tac")["000000.png"]


def test_overwrite_replaces_only_a_samples_folder(folders: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert invoke("sample", folders / "fp", "--out", out, "--num-samples", "3", *FAST)[0] == 0
    code, output = invoke("sample", folders / "fp", "--out", out, "--num-samples", "2", "--overwrite", *FAST)
    assert code == 0, output
    assert sorted(files(out)) == ["000000.png", "000001.png", "grid.png", "samples.json"]
    (out / "mine.txt").write_text("keep")
    code, output = invoke("sample", folders / "fp", "--out", out, "--overwrite", *FAST)
    assert code == 2 and "not a samples folder written by tacdiff" in output
    assert (out / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("model, message", [("cond", "makes 4-channel samples, not images"),
                                            ("missing", "model folder not found")])
def test_models_it_cannot_sample_give_one_error(folders: Path, tmp_path: Path, model: str, message: str) -> None:
    code, output = invoke("sample", folders / model, "--out", tmp_path / "s", *FAST)
    assert code == 2 and message in output, output
    assert not (tmp_path / "s").exists()


def test_int8_backend_samples_match_fake_quant_with_tables(folders: Path, tmp_path: Path) -> None:
    """int8 images differ from fake-quant ones about as much as fake-quant ones sampled one at a time do."""
    runs, runs_output = {}, {}
    for name, backend, batch in (("fake", "fake", "4"), ("fake1", "fake", "1"), ("int8", "int8", "4")):
        code, output = invoke("sample", folders / "w4a8", "--tables", folders / "tac.safetensors", "--out",
                              tmp_path / name, "--num-samples", "4", "--backend", backend, *FAST, "--batch-size", batch)
        assert code == 0, output
        runs_output[name] = output
        runs[name] = np.stack([np.asarray(Image.open(tmp_path / name / f"{i:06d}.png"), dtype=float) for i in range(4)])
    assert json.loads((tmp_path / "int8" / "samples.json").read_text())["backend"] == "int8"
    assert "[tacdiff.backends.select] backend int8: int8:" in runs_output["int8"]
    own_spread = np.abs(runs["fake"] - runs["fake1"]).mean()
    int8_spread = np.abs(runs["fake"] - runs["int8"]).mean()
    assert int8_spread <= 2 * own_spread + 0.5, (int8_spread, own_spread)


def test_backend_on_a_full_precision_model_is_refused(folders: Path, tmp_path: Path) -> None:
    code, output = invoke("sample", folders / "fp", "--out", tmp_path / "s", "--backend", "int8", *FAST)
    assert code != 0 and "full-precision model" in output and not (tmp_path / "s").exists()
    code, output = invoke("sample", folders / "w4a8", "--out", tmp_path / "s", "--backend", "int4", *FAST)
    assert code != 0 and "choose one of fake, int8, auto" in output


def test_an_existing_out_is_refused_before_the_model_stack_loads(tmp_path: Path) -> None:
    """Without --overwrite an existing OUT fails at once, before importing the workflows (diffusers, torch)."""
    (tmp_path / "taken").mkdir()
    script = ("import sys\nfrom typer.testing import CliRunner\nfrom tacdiff.cli import app\n"
              f"result = CliRunner().invoke(app, ['sample', 'reference', '--out', {str(tmp_path / 'taken')!r}])\n"
              "print(result.exit_code, 'tacdiff.workflows' in sys.modules, result.output)")
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert output.startswith("2 False error: ") and "already exists" in output, output


def test_progress_bars_update_rarely_when_stderr_is_a_file(tmp_path: Path) -> None:
    """tqdm reads TQDM_MININTERVAL when imported: the CLI sets it before importing tqdm, unless the user did."""
    (tmp_path / "taken").mkdir()
    script = ("import io\nfrom typer.testing import CliRunner\nfrom tacdiff.cli import app\n"
              f"CliRunner().invoke(app, ['sample', 'reference', '--out', {str(tmp_path / 'taken')!r}])\n"
              "from tqdm import tqdm\nprint(tqdm(total=1, file=io.StringIO()).mininterval)")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}
    for given, expected in ((None, "30.0"), ("2", "2.0")):
        extra = {} if given is None else {"TQDM_MININTERVAL": given}
        output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                env={**env, **extra}).stdout
        assert output.strip() == expected, output


def test_a_model_it_cannot_sample_is_refused_before_int8_conversion(cond_w8a8: torch.nn.Module, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal of a bare latent UNet needs the loaded model, but not its int8 layers (minutes at SD scale)."""
    artifact = save_quantized(cond_w8a8, tmp_path / "artifact")
    converted = []
    monkeypatch.setattr(loading, "use_backend", lambda *args: converted.append(args))
    code, output = invoke("sample", artifact, "--out", tmp_path / "s", "--backend", "int8", *FAST)
    assert code == 2 and "makes 4-channel samples, not images" in output, output
    assert converted == [] and not (tmp_path / "s").exists()


def test_auto_probes_at_the_sampling_batch_size(folders: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Which kernel wins depends on the batch size, so --backend auto times the layers at the one it samples with."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code, output = invoke("sample", folders / "w4a8", "--out", tmp_path / "s", "--backend", "auto", "--num-samples",
                          "3", *FAST, "--batch-size", "2")
    assert code == 0, output
    shapes = [key.split("|(")[1] for key in json.loads((tmp_path / "cache" / "tacdiff" / "backend-probe.json").read_text())]
    assert shapes and all(shape.startswith("2, ") for shape in shapes), shapes


def test_a_full_precision_model_that_makes_nan_is_not_told_to_add_bits(tmp_path: Path) -> None:
    model = tiny_model("unet")
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan")
    code, output = invoke("sample", tmp_path / "nan", "--out", tmp_path / "s", *FAST)
    assert code == 2 and "produced NaN or inf samples" in output and "full precision" in output, output
    assert "more bits" not in output and not (tmp_path / "s").exists()
