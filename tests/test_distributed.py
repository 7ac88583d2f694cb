"""tacdiff.distributed: whole-batch shards, and the command line under ``torchrun`` (2 gloo processes) giving the
same outputs as one process: quantize, calibrate, eval and sample, with uneven shards; a failing rank writes nothing.

The multi-process runs go through ``python -m torch.distributed.run`` exactly as a user would start them; both
sides run one thread per process (results are reproducible for a fixed batch size and thread count).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tacdiff import distributed
from tacdiff.correction.ner import NERStats
from tacdiff.distributed import Shard, shard
from tacdiff.models.reference import REFERENCE_MODEL_DIR


@pytest.mark.parametrize(("samples", "batch", "world", "expected"), [
    (10, 2, 2, [range(0, 6), range(6, 10)]),  # 5 batches: 3 + 2
    (5, 2, 2, [range(0, 4), range(4, 5)]),  # the last batch is short
    (12, 4, 3, [range(0, 4), range(4, 8), range(8, 12)]),
    (3, 4, 2, [range(0, 3), range(0, 3)]),  # fewer batches than processes: every rank runs all
])
def test_shard_takes_whole_batches(monkeypatch: pytest.MonkeyPatch, samples: int, batch: int, world: int,
                                   expected: list[range]) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    found = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        part = shard(samples, batch)
        assert part.split == (expected[0] != expected[-1])
        found.append(part.samples)
    assert found == expected


def test_shard_outside_a_process_group_is_everything() -> None:
    assert shard(7, 3) == Shard(range(7), 3)
    with pytest.raises(ValueError, match="batch_size"):
        shard(7, 0)


def test_unsplit_merge_adds_batches_in_order() -> None:
    parts = [NERStats.empty(torch.zeros(2)).update(torch.randn(3, 2, 4), torch.randn(3, 2, 4)) for _ in range(3)]
    merged = Shard(range(9), 3).merge(parts)
    assert torch.equal(merged.s_qr, (parts[0] + parts[1] + parts[2]).s_qr)


# --- the command line under torchrun -----------------------------------------------------------------------------

STEPS = ["--steps", "5"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}


def _tacdiff(processes: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "tacdiff", *args]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@dataclass
class Run:
    """The outputs of one chain quantize -> calibrate -> eval -> sample in ``folder``."""

    folder: Path

    @property
    def artifact(self) -> Path:
        return self.folder / "q"

    @property
    def tables(self) -> Path:
        return self.folder / "tables.safetensors"


def _chain(processes: int, folder: Path) -> Run:
    """Everything at batch size 2 over 5 samples (3 batches: rank 0 takes two, rank 1 one)."""
    run = Run(folder)
    _tacdiff(processes, "quantize", str(REFERENCE_MODEL_DIR), "--out", str(run.artifact), "--w-bits", "4",
             "--calib-samples", "5", "--calib-steps", "5", "--calib-kept-steps", "3", "--batch-size", "2", "--quiet")
    _tacdiff(processes, "calibrate", str(run.artifact), "--fp-model", "reference", "--out", str(run.tables),
             "--samples", "5", "--batch-size", "2", *STEPS, "--quiet")
    _tacdiff(processes, "eval", str(run.artifact), "--fp-model", "reference", "--tables", str(run.tables),
             "--samples", "5", "--batch-size", "2", *STEPS, "--json", str(folder / "eval.json"), "--quiet")
    _tacdiff(processes, "sample", str(run.artifact), "--tables", str(run.tables), "--out", str(folder / "samples"),
             "--num-samples", "5", "--batch-size", "2", *STEPS, "--quiet")
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Run]:
    """The same chain in one process and in two."""
    return _chain(1, tmp_path_factory.mktemp("one")), _chain(2, tmp_path_factory.mktemp("two"))


def _tensors(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def test_quantize_in_two_processes_writes_the_same_artifact(runs: tuple[Run, Run]) -> None:
    one, two = (_tensors(run.artifact / "quantized.safetensors") for run in runs)
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key


def test_calibrate_in_two_processes_fits_the_same_tables(runs: tuple[Run, Run]) -> None:
    one, two = (_tensors(run.tables) for run in runs)
    assert one.keys() == two.keys()
    for key in one:  # per-batch sums added in batch order: bit-identical, not merely close
        assert torch.equal(one[key], two[key]), key


def test_eval_in_two_processes_scores_the_same(runs: tuple[Run, Run]) -> None:
    one, two = (json.loads((run.folder / "eval.json").read_text()) for run in runs)
    for key in ("fid", "kid", "fid_allconv", "x0_mse", "x0_psnr", "x0_ssim"):
        assert two[key] == pytest.approx(one[key], rel=1e-9), key
    for key in ("state_sq_err", "eps_sq_err"):
        assert two["per_step"][key] == pytest.approx(one["per_step"][key], rel=1e-9), key
    assert two["samples"] == one["samples"] == 5


def test_sample_in_two_processes_writes_the_same_images(runs: tuple[Run, Run]) -> None:
    one, two = (run.folder / "samples" for run in runs)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert len([n for n in names if n[0].isdigit()]) == 5
    for name in names:
        if name != "samples.json":
            assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_text_to_image_samples_in_two_processes_match_one(tmp_path: Path) -> None:
    """Prompts and classifier-free guidance: each rank reads its own samples' prompts."""
    args = ["sample", "latent-reference", "--num-samples", "3", "--batch-size", "1", *STEPS, "--guidance-scale", "1.5",
            "--prompt", "a sneaker", "--prompt", "a pair of trousers", "--quiet"]
    _tacdiff(1, *args, "--out", str(tmp_path / "one"))
    _tacdiff(2, *args, "--out", str(tmp_path / "two"))
    for index in range(3):
        name = f"{index:06d}.png"
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


FAILING_RANK = """
import sys
import tacdiff.sampling.batching as batching
from tacdiff import distributed
from tacdiff.cli import app

real = batching.sample_noise

def broken(*args, **kwargs):
    if distributed.rank() == 1:
        raise ValueError("rank 1 could not draw its noise")
    return real(*args, **kwargs)

batching.sample_noise = broken
app(sys.argv[1:], prog_name="tacdiff")
"""


def test_a_failing_rank_stops_the_job_and_nothing_is_written(tmp_path: Path) -> None:
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    out = tmp_path / "samples"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
               "sample", "reference", "--out", str(out), "--num-samples", "4", "--batch-size", "2", *STEPS, "--quiet"]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "error: rank 1 could not draw its noise" in done.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".samples")]
