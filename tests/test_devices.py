"""Devices checked before any work, and the machine line that heads every timing report."""

from __future__ import annotations

import pytest
import torch

from tacdiff import devices
from tacdiff.devices import check_device, machine_line


def test_the_machine_line_names_the_cpu_instructions_and_an_isa_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    line = machine_line()
    assert torch.backends.cpu.get_cpu_capability() in line and f"{torch.get_num_threads()} threads" in line
    assert "capped" not in line
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert "oneDNN capped at AVX2" in machine_line()


def test_the_machine_line_says_when_freed_memory_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "freed_memory_kept", lambda: False)
    assert "freed memory kept" not in machine_line()
    monkeypatch.setattr(devices, "freed_memory_kept", lambda: True)
    assert machine_line().endswith(", freed memory kept")


@pytest.mark.parametrize("device, message", [("gpu", "is not a torch device"), ("meta", "holds no data"),
                                             ("mps", "use --device cpu")])
def test_a_device_this_machine_cannot_compute_on_is_refused(device: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_device(device)
    assert check_device("cpu") == torch.device("cpu")
