"""tacdiff.io.formats: save_safetensors gives the same tensors and metadata the same bytes in every process."""

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open

from tacdiff.io.formats import save_safetensors

WRITE = """
import sys, torch
from tacdiff.io.formats import save_safetensors
save_safetensors({"w": torch.arange(6.0), "b": torch.ones(2, dtype=torch.int8)}, sys.argv[1],
                 {key: f"value {key} é" for key in "qwertyuiopasdfgh"})
"""


def test_the_same_contents_are_the_same_bytes_across_processes(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path in paths:  # a new process each: safetensors' own metadata order changes with the hash seed
        subprocess.run([sys.executable, "-c", WRITE, str(path)], check=True, timeout=300)
    assert len({path.read_bytes() for path in paths}) == 1


def test_the_sorted_file_reads_back_unchanged(tmp_path: Path) -> None:
    tensors = {"z": torch.randn(3, 4), "a": torch.arange(5, dtype=torch.int64)}
    metadata = {"format": "x/1", "b": "2", "a": "{\"json\": [1, 2]}", "ü": "ß"}
    save_safetensors(tensors, tmp_path / "f.safetensors", metadata)
    loaded = load_file(tmp_path / "f.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(str(tmp_path / "f.safetensors"), framework="pt") as handle:
        assert handle.metadata() == metadata
