"""tacdiff.host_memory: with freed memory kept, repeated calls of a network stop page-faulting their activations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tacdiff import host_memory
from tacdiff.host_memory import OPT_OUT, _glibc, keep_freed_memory, rss_bytes

CALLS = """
import json, resource
import torch
from torch import nn
from tacdiff.host_memory import keep_freed_memory

torch.manual_seed(0)
torch.set_num_threads(1)
net = nn.Sequential(*[m for c in (32, 64, 128, 64, 32)
                      for m in (nn.LazyConv2d(c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU())]).eval()
x = torch.randn(8, 16, 32, 32)

def faults_per_call(calls=10):
    found = []
    for _ in range(calls):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with torch.no_grad():
            net(x)
        found.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    return found

default = faults_per_call()
kept = keep_freed_memory()
print(json.dumps({"default": default, "kept": kept, "after": faults_per_call()}))
"""


@pytest.mark.skipif(_glibc() is None, reason="glibc's allocator settings (Linux with glibc only)")
def test_kept_freed_memory_stops_repeated_calls_from_faulting_pages_in() -> None:
    """A conv / group norm / SiLU stack at batch 8 (activations of 0.5-4 MiB, as the bundled model's) in a fresh
    process: glibc's own policy keeps handing freed blocks back, so every call faults them in again; once the
    memory is kept, the calls after the first few (the heap settling) fault in almost nothing."""
    env = {key: value for key, value in os.environ.items() if key != OPT_OUT}
    found = json.loads(subprocess.run([sys.executable, "-c", CALLS], capture_output=True, text=True, check=True,
                                      env=env).stdout)
    assert found["kept"] is True
    assert sum(found["after"][-5:]) <= sum(found["default"][-5:]) / 10, found


def test_the_environment_opts_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_memory, "_kept", False)
    monkeypatch.setattr(host_memory, "_glibc", lambda: pytest.fail("the allocator was touched despite the opt-out"))
    monkeypatch.setenv(OPT_OUT, "0")
    assert keep_freed_memory() is False


def test_resident_memory_is_read() -> None:
    assert rss_bytes() > 2**20 or not Path("/proc/self/statm").exists()
