"""Which torch devices this machine can compute on, checked before any work."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from tacdiff.host_memory import freed_memory_kept


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` if this machine can compute on it; ``ValueError`` naming the fix."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{device!r} is not a torch device; use e.g. cpu, cuda or cuda:1") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "meta":
        raise ValueError("device 'meta' holds no data, so nothing can be sampled or calibrated on it; use cpu or cuda")
    backend = torch.backends.mps if parsed.type == "mps" else getattr(torch, parsed.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        raise ValueError(f"device {str(device)!r}: this torch build or machine has no {parsed.type.upper()} "
                         "support; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         "use cuda:0 or another index below that")
    return parsed


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else what ``platform`` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """Where timings were taken, for a report's header, e.g. ``"AMD EPYC 9B14 (x86_64; AVX512, VNNI), 2 CPUs, 2
    threads, torch 2.13.0+cpu, freed memory kept"`` (the last part where
    :func:`~tacdiff.host_memory.keep_freed_memory` is in effect)."""
    kept = ", freed memory kept" if freed_memory_kept() else ""
    return (f"{cpu_name()} ({platform.machine()}; {cpu_features()}), {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}{kept}")


def cpu_features() -> str:
    """The vector instructions PyTorch uses here and the int8 units it found, e.g. ``"AVX512, VNNI"``, and a cap on
    oneDNN's instructions (``ONEDNN_MAX_CPU_ISA``) where one is set: what decides the int8 backend's kernels."""
    units = [name for name, found in (("VNNI", torch.cpu._is_vnni_supported()),
                                      ("AMX", torch.cpu._is_amx_tile_supported())) if found]
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return ", ".join([torch.backends.cpu.get_cpu_capability(), *units, *([f"oneDNN capped at {cap}"] if cap else [])])
