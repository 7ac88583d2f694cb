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

import tacdiff
from tacdiff.backends.codes import exact_int8_cpu
from tacdiff.backends.int8 import (Int8AttentionValues, adds_weight_zero_point, is_converted, to_int8,
                                   unsupported_reason, values_kernel_reason)
from tacdiff.devices import cpu_name
from tacdiff.host_memory import freed_memory_kept, keep_freed_memory
from tacdiff.io.atomic import write_text_atomically
from tacdiff.models.kinds import example_inputs
from tacdiff.quant.apply import quant_state
from tacdiff.quant.attention import VALUES_KERNEL
from tacdiff.quant.layers import QuantEmbedding, QuantWeightMixin

BACKENDS = ("fake", "int8", "auto")
KERNELS = "onednn-conv-linear+int-mm-3"  # bump when the int8 kernels change, so cached timings are measured again
LOG = logging.getLogger(__name__)
ATTENTION_INT8 = "int8: probabilities @ values (q @ k^T in float, its operands' quantization simulated)"


def use_backend(model: nn.Module, backend: str = "fake", *, probe_batch: int = 8,
                cache: Path | None = None) -> dict[str, str]:
    """Run the quantized layers of ``model`` (from :func:`tacdiff.quantize` or a loaded artifact) on
    ``backend``, in place; returns where each planned module runs (``"int8"`` or ``"fake: why"``),
    which :func:`tacdiff.quant.apply.format_summary` then shows (``"fake"`` changes nothing: ``{}``).

    ``int8`` converts every layer it can run exactly (see
    :func:`tacdiff.backends.int8.unsupported_reason`); ``auto`` only those measured faster at
    ``probe_batch`` samples (timings cached in ``cache``, default ``$XDG_CACHE_HOME/tacdiff``), and quantized
    embedding tables always, untimed (their codes-only lookups save memory).
    Converted layers keep integer weights only: such a model cannot be converted again, copied or
    saved (do that with the fake-quant model) and stays on its device. On the CPU this also keeps the process's
    freed memory for reuse (:func:`tacdiff.host_memory.keep_freed_memory`): the integer layers' extra temporaries
    would otherwise be page-faulted in afresh on every call.
    """
    check_backend(backend)
    state = quant_state(model)
    if is_converted(model):
        raise ValueError("this model already runs on the int8 backend; load or quantize it again to choose "
                         "another backend")
    if backend == "fake":
        return {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantWeightMixin)}
    device = next(model.parameters()).device
    if device.type == "cpu" and not freed_memory_kept() and keep_freed_memory():
        LOG.info("freed memory is kept for reuse from now on in this process (tacdiff.host_memory)")
    reasons = {name: unsupported_reason(layer, device) for name, layer in layers.items()}
    candidates = {name: layer for name, layer in layers.items()  # lookups are not timed: their codes always save memory
                  if reasons[name] is None and not isinstance(layer, QuantEmbedding)}
    speedups: dict[str, float] = {}
    if backend == "auto" and candidates:
        speedups, failure = _probe(model, candidates, probe_batch, cache)
        for name in candidates:
            if failure is not None:
                reasons[name] = f"auto could not probe ({failure})"
            elif name not in speedups:
                reasons[name] = "the probe's forward pass did not reach it"
            elif speedups[name] < 1.0:
                reasons[name] = f"int8 measured {speedups[name]:.2f}x its speed"
    twins = {name: to_int8(layer) for name, layer in layers.items() if reasons[name] is None}  # all built, then swapped
    for name, twin in twins.items():
        model.set_submodule(name, twin)
    with_zero_points = sum(adds_weight_zero_point(twin) for twin in twins.values())
    if with_zero_points:
        LOG.info("%d int8 %s their weight zero points back at run time (asymmetric 8-bit weights); quantize with "
                 "--weight-symmetric (QuantConfig(weight_symmetric=True)) for faster int8", with_zero_points,
                 "layer adds" if with_zero_points == 1 else "layers add")
    execution = {e.name: _attach_values_kernel(model.get_submodule(e.name), backend, device)
                 for e in state.plan if e.kind == "attention" and e.act_bits}
    for name in layers:
        if reasons[name] is not None:
            execution[name] = f"fake: {reasons[name]}"
        elif isinstance(layers[name], QuantEmbedding):
            execution[name] = "int8 (codes, rows dequantized per lookup)"
        else:
            execution[name] = "int8" if backend == "int8" else f"int8 ({speedups[name]:.2f}x faster)"
    state.execution = execution
    LOG.info("backend %s: %s", backend, backend_counts(execution))
    if backend == "int8" and layers and not twins:
        reasons_seen = sorted({reason for reason in reasons.values() if reason is not None})
        LOG.warning("backend int8 runs no layer on integer kernels, so the model runs as fake-quant: %s",
                    "; ".join(reasons_seen[:3]))
    return execution


def _attach_values_kernel(attn: nn.Module, backend: str, device: torch.device) -> str:
    """Run ``attn``'s ``probabilities @ values`` on :class:`Int8AttentionValues` where it can (``int8`` only:
    ``auto`` times layers, not attention); returns where its matmuls run."""
    reason = "auto converts timed layers only" if backend == "auto" else values_kernel_reason(attn, device)
    if reason is not None:
        return f"fake: attention matmul operands ({reason})"
    setattr(attn, VALUES_KERNEL, Int8AttentionValues(attn))
    return ATTENTION_INT8


def backend_counts(execution: dict[str, str]) -> str:
    """A one-line tally of :func:`use_backend`'s result, e.g. ``"int8: 40 modules, fake: 3"``."""
    int8 = sum(v.startswith("int8") for v in execution.values())
    return f"int8: {int8} modules, fake: {len(execution) - int8}"


def check_backend(backend: str) -> None:
    """``ValueError`` naming the choices unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _probe(model: nn.Module, layers: dict[str, QuantWeightMixin], batch: int, cache: Path | None
           ) -> tuple[dict[str, float], str | None]:
    """Speed-up of int8 over fake per layer (fake time / int8 time), measured on one forward pass; and the
    reason when no forward pass could be made."""
    file = (cache or _cache_dir()) / "backend-probe.json"
    known = _read_cache(file)
    speedups: dict[str, float] = {}
    try:
        x, t, cond = example_inputs(model, batch)
    except ValueError as error:
        return speedups, str(error).split(";")[0]

    machine = _machine(x.device)

    def measure(name: str) -> Callable:
        def hook(layer: nn.Module, args: tuple) -> None:
            key = f"{machine}|{_layer_key(layer, args[0])}"
            if key not in known:
                twin = to_int8(layer)
                known[key] = _seconds(layer, args[0]) / _seconds(twin, args[0])
            speedups[name] = known[key]
        return hook

    handles = [layer.register_forward_pre_hook(measure(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            model(x, timestep=t, **cond)
    finally:
        for handle in handles:
            handle.remove()
    try:
        write_text_atomically(file, json.dumps(known, indent=1, sort_keys=True))
    except OSError as error:
        LOG.warning("could not cache the backend timings in %s (%s)", file, error)
    return speedups, None


def _seconds(layer: nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    """Best of ``repeats`` timed calls after one warm-up (``forward`` itself: the probe's hook is on ``layer``)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.no_grad():
        layer.forward(x)
        best = float("inf")
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            layer.forward(x)
            sync()
            best = min(best, time.perf_counter() - start)
    return best


def _machine(device: torch.device) -> str:
    """The part of a timing's cache key shared by all layers: versions, machine, CPU (and whether its int8 sums are
    exact: see :func:`~tacdiff.backends.codes.exact_int8_cpu`), threads (and GPU)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return "|".join(map(str, (tacdiff.__version__, KERNELS, torch.__version__, platform.machine(), cpu_name(),
                              exact_int8_cpu(), torch.get_num_threads(), gpu)))


def _layer_key(layer: nn.Module, x: torch.Tensor) -> str:
    """The part of a timing's cache key that is the layer's: its geometry and recipe, and its input."""
    act = layer.act_quant
    residual = bool(((layer.weight_codes.float() - layer.expand(layer.weight_zero_point)).abs() > 127).any())
    return "|".join(map(str, (type(layer).__name__, layer.extra_repr(), act.dynamic, act.token_dim,
                              layer.w_symmetric, residual, tuple(x.shape), x.dtype,
                              x.is_contiguous(memory_format=torch.channels_last))))


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tacdiff"


def _read_cache(file: Path) -> dict[str, float]:
    """The cached timings, or an empty table when the file is missing or unreadable (it is rewritten)."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}
