"""Fault catalogue 2: no code runs from files: training checkpoints are safetensors + JSON, and no
module of tacdiff unpickles."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest

import tacdiff
from fault_support import assert_one_error, cli, snapshot


class _Hostile:
    """Unpickling this creates ``marker``: the proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("name", ["state.pt", "state.json", "model.safetensors", "optimizer.safetensors"])
def test_a_hostile_training_checkpoint_never_runs(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / name).write_bytes(pickle.dumps(_Hostile(marker)))
    before = snapshot(tmp_path)
    code, output = cli("train", tmp_path / "run", "--steps", "1", "--batch-size", "2", "--device", "cpu", "--quiet")
    assert_one_error(code, output, str(checkpoint))
    assert not marker.exists()
    assert snapshot(tmp_path) == before
    pickle.loads((checkpoint / name).read_bytes())  # the payload is live: loading it does create the marker
    assert marker.is_dir()


def test_no_source_file_unpickles() -> None:
    package = Path(tacdiff.__file__).parent
    unsafe = re.compile(r"import pickle|pickle\.load|torch\.load\((?![^)]*weights_only=True)|allow_pickle=True")
    offenders = [f"{path.relative_to(package)}:{number}" for path in package.rglob("*.py")
                 for number, line in enumerate(path.read_text().splitlines(), 1) if unsafe.search(line)]
    assert offenders == []


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_pickled_model_weights_are_refused_unopened(tmp_path: Path, command: str) -> None:
    from tiny_models import tiny_model

    marker = tmp_path / "pwned"
    model = tmp_path / "fp"
    tiny_model("unet").save_pretrained(model)
    (model / "diffusion_pytorch_model.safetensors").unlink()
    (model / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Hostile(marker)))
    before = snapshot(tmp_path)
    args = ["--out", tmp_path / "q", "--calib-samples", "2"] if command == "quantize" else ["--samples", "2"]
    code, output = cli(command, model, *args, "--quiet")
    assert_one_error(code, output, "has no safetensors weights (only ['diffusion_pytorch_model.bin'])",
                     "never loads pickled weights")
    assert not marker.exists()
    assert snapshot(tmp_path) == before
