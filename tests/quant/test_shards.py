"""PTQ's calibration passes under ``torchrun``: each of 2 gloo processes runs its share of the batches, and the
quantized model is bit-identical to one process's (activation ranges through the replayed observers, GPTQ's
relayed Gram sums, SmoothQuant's maxima)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tacdiff.quant.layers import RangeObserver
from tacdiff.quant.shards import Call, ShardObserver

TESTS = Path(__file__).resolve().parents[1]

# Runs the cases in one process or under torchrun; rank 0 saves each quantized model, every rank counts its
# forward passes. Observers keep small samples here so that their stores are halved many times.
SCRIPT = """
import json, os, sys
from functools import partialmethod
import torch
sys.path.insert(0, {tests!r})
from safetensors.torch import save_file
import tacdiff
from tacdiff import distributed
from tacdiff.quant import gptq
from tacdiff.quant.layers import RangeObserver
from tiny_models import calibration_of, tiny_model

RangeObserver.__init__ = partialmethod(RangeObserver.__init__, per_call=64, cap=400)
grams, gram_matrices = {{}}, gptq._gram_matrices
gptq._gram_matrices = lambda *args, **kwargs: grams.update(found := gram_matrices(*args, **kwargs)) or found
CASES = {{
    "unet_gptq": ("unet", dict(weight_bits=4, act_bits=8, weight_rounding="gptq", timestep_groups=2)),
    "dit_smooth": ("dit", dict(weight_bits=8, act_bits=8, smooth_alpha=0.5, timestep_groups=3)),
}}
distributed.init_from_env()
out = sys.argv[1]
for case, (name, config) in CASES.items():
    model = tiny_model(name)
    cond = {{"class_labels": torch.arange(8) % 10}} if name == "dit" else None
    calibration = calibration_of(model, seed=1, cond=cond)
    calls = []
    grams.clear()
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    tacdiff.quantize(model, tacdiff.QuantConfig(**config), calibration, batch_size=6, progress=False)
    if distributed.is_main():
        save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, f"{{out}}/{{case}}.safetensors")
        save_file({{k: v.contiguous() for k, v in grams.items()}} or {{"none": torch.zeros(1)}},
                  f"{{out}}/{{case}}.grams.safetensors")
    with open(f"{{out}}/{{case}}.calls.{{distributed.rank()}}.json", "w") as f:
        json.dump(len(calls), f)
distributed.shutdown()
"""


def _run(processes: int, folder: Path) -> Path:
    folder.mkdir()
    script = folder / "quantize_cases.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               str(script), str(folder)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("shards")
    return _run(1, work / "one"), _run(2, work / "two")


@pytest.mark.parametrize("case", ["unet_gptq", "dit_smooth"])
def test_two_processes_quantize_exactly_as_one(folders: tuple[Path, Path], case: str) -> None:
    one, two = (load_file(str(folder / f"{case}.safetensors")) for folder in folders)
    assert one.keys() == two.keys()
    differ = [key for key in one if not torch.equal(one[key], two[key])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:5]}"
    assert any(key.endswith("act_quant.scale") for key in one), "activation ranges were calibrated"


def test_gptq_gram_matrices_are_the_one_process_sums_bit_for_bit(folders: tuple[Path, Path]) -> None:
    one, two = (load_file(str(folder / "unet_gptq.grams.safetensors")) for folder in folders)
    assert len(one) > 10 and one.keys() == two.keys()
    assert not [key for key in one if not torch.equal(one[key], two[key])]


@pytest.mark.parametrize("case", ["unet_gptq", "dit_smooth"])
def test_each_process_runs_only_its_share_of_the_calibration_passes(folders: tuple[Path, Path], case: str) -> None:
    one, two = folders
    alone = json.loads((one / f"{case}.calls.0.json").read_text())
    shares = [json.loads((two / f"{case}.calls.{rank}.json").read_text()) for rank in range(2)]
    # The FP trajectories and the PTQ passes split; the few probe passes (one per batch size) do not.
    assert max(shares) < 0.75 * alone, f"one process ran {alone} forward passes, each of two ran {shares}"


def test_a_call_the_probe_did_not_predict_is_a_clear_error() -> None:
    observer = ShardObserver([Call(group=0, segment=0, numel=10, owner=0)], RangeObserver(1, 1))
    observer.observe([torch.randn(10)], group=0, name="mid_block.act_quant")  # as predicted
    with pytest.raises(RuntimeError, match="'mid_block.act_quant'.*quantize in one process"):
        observer.observe([torch.randn(12)], group=0, name="mid_block.act_quant")
