"""Choosing how a quantized model executes: ``fake`` (simulated), ``int8`` (integer GEMMs) or ``auto``.

:func:`use_backend` is the one verb. ``auto`` runs one forward pass on example inputs and, for every
layer the int8 path can run, times both versions on that layer's real input; a layer runs int8 only
where that was faster on this machine. Timings are cached per machine, thread count, torch version,
layer geometry and input shape, so later loads skip the probe.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tacdiff.backends.int8 import to_int8, unsupported_reason
from tacdiff.io.atomic import write_text_atomically
from tacdiff.models.kinds import example_inputs
from tacdiff.quant.apply import quant_state
from tacdiff.quant.layers import QuantWeightMixin

BACKENDS = ("fake", "int8", "auto")
LOG = logging.getLogger(__name__)
ATTENTION_REASON = "fake: attention matmul operands (no integer batched-matmul kernel wired)"


def use_backend(model: nn.Module, backend: str = "fake", *, probe_batch: int = 8,
                cache: Path | None = None) -> dict[str, str]:
    """Run the quantized layers of ``model`` (from :func:`tacdiff.quantize` or a loaded artifact) on
    ``backend``, in place; returns where each planned module runs (``"int8"`` or ``"fake: why"``),
    which :func:`tacdiff.quant.apply.format_summary` then shows.

    ``int8`` converts every layer it can run exactly (see
    :func:`tacdiff.backends.int8.unsupported_reason`); ``auto`` only those measured faster at
    ``probe_batch`` samples (timings cached in ``cache``, default ``$XDG_CACHE_HOME/tacdiff``).
    Converted layers keep integer weights only: the model cannot be quantized further or saved.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    state = quant_state(model)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantWeightMixin)}
    device = next(model.parameters()).device
    reasons = {name: unsupported_reason(layer, device) for name, layer in layers.items()}
    execution = {e.name: ATTENTION_REASON for e in state.plan if e.kind == "attention" and e.act_bits}
    if backend == "fake":
        execution.update({name: "fake: chosen" for name in layers})
    else:
        speedups = _probe(model, {n: layers[n] for n in layers if reasons[n] is None}, probe_batch, cache) \
            if backend == "auto" else {}
        for name, layer in layers.items():
            reason = reasons[name]
            if reason is None and name in speedups and speedups[name] < 1.0:
                reason = f"int8 measured {speedups[name]:.2f}x its speed"
            if reason is not None:
                execution[name] = f"fake: {reason}"
                continue
            _replace(model, name, to_int8(layer))
            execution[name] = "int8" if name not in speedups else f"int8 ({speedups[name]:.2f}x faster)"
    state.execution = execution
    if backend != "fake":
        LOG.info("backend %s: %s", backend, backend_counts(execution))
    return execution


def backend_counts(execution: dict[str, str]) -> str:
    """A one-line tally of :func:`use_backend`'s result, e.g. ``"int8: 40 modules, fake: 3"``."""
    int8 = sum(v.startswith("int8") for v in execution.values())
    return f"int8: {int8} modules, fake: {len(execution) - int8}"


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _probe(model: nn.Module, layers: dict[str, QuantWeightMixin], batch: int, cache: Path | None
           ) -> dict[str, float]:
    """Speed-up of int8 over fake per layer (fake time / int8 time), measured on one forward pass."""
    file = (cache or _cache_dir()) / "backend-probe.json"
    known = _read_cache(file)
    speedups: dict[str, float] = {}

    def measure(name: str) -> Callable:
        def hook(layer: nn.Module, args: tuple) -> None:
            key = _key(layer, args[0])
            if key not in known:
                twin = to_int8(layer)
                known[key] = _seconds(layer, args[0]) / _seconds(twin, args[0])
            speedups[name] = known[key]
        return hook

    handles = [layer.register_forward_pre_hook(measure(name)) for name, layer in layers.items()]
    try:
        x, t, cond = example_inputs(model, batch)
        with torch.no_grad():
            model(x, t, **cond)
    finally:
        for handle in handles:
            handle.remove()
    write_text_atomically(file, json.dumps(known, indent=1, sort_keys=True))
    return speedups


def _seconds(layer: nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    """Best of ``repeats`` timed calls after one warm-up (``forward`` itself: the probe's hook is on ``layer``)."""
    with torch.no_grad():
        layer.forward(x)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            layer.forward(x)
            best = min(best, time.perf_counter() - start)
    return best


def _key(layer: nn.Module, x: torch.Tensor) -> str:
    act = layer.act_quant
    return "|".join(map(str, (torch.__version__, platform.machine(), _cpu_name(), torch.get_num_threads(),
                              layer.extra_repr(), act.dynamic, act.token_dim, tuple(x.shape), x.dtype)))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tacdiff"


def _read_cache(file: Path) -> dict[str, float]:
    """The cached timings, or an empty table when the file is missing or unreadable (it is rewritten)."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}
