"""Activation-range calibration: observe every activation quantizer's inputs over the calibration set.

Ranges are chosen per timestep group from the observed values (Q-Diffusion's
time-uniform calibration when there is one group). Observation runs with the weights
already quantized and every activation quantizer passing values through.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from tacdiff.quant import primitives as P
from tacdiff.quant.config import QuantConfig
from tacdiff.quant.layers import ActQuantizer, RangeObserver

if TYPE_CHECKING:  # quant/ sits below sampling/: the calibration set is only named here
    from tacdiff.sampling.calibration import CalibrationSet


def activation_quantizers(model: nn.Module) -> list[ActQuantizer]:
    """Every :class:`ActQuantizer` in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


@contextmanager
def activations_unquantized(model: nn.Module) -> Iterator[None]:
    """Disable every activation quantizer (weight-only passes) and restore them afterwards."""
    quantizers = activation_quantizers(model)
    saved = [(q.enabled, q.observer) for q in quantizers]
    for q in quantizers:
        q.enabled, q.observer = False, None
    try:
        yield
    finally:
        for q, (enabled, observer) in zip(quantizers, saved):
            q.enabled, q.observer = enabled, observer


def model_batches(model: nn.Module, calibration: CalibrationSet, batch_size: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """``calibration``'s batches on ``model``'s device and in its dtype."""
    param = next(model.parameters())
    return calibration.batches(batch_size, param.device, param.dtype)


@torch.no_grad()
def run_calibration(model: nn.Module, calibration: CalibrationSet, *, batch_size: int, desc: str,
                    progress: bool = True) -> None:
    """One forward pass of ``model`` over every calibration input (for the hooks that observe it)."""
    batches = list(model_batches(model, calibration, batch_size))
    for x, t, cond in tqdm(batches, desc=desc, disable=not progress, leave=False):
        model(x, timestep=t, **cond)


@torch.no_grad()
def calibrate_activations(model: nn.Module, calibration: CalibrationSet, config: QuantConfig, *,
                          batch_size: int = 64, progress: bool = True) -> None:
    """Choose and set the range of every activation quantizer of a quantized ``model``."""
    quantizers = activation_quantizers(model)
    groups = quantizers[0].router.groups if quantizers else 1
    for i, q in enumerate(quantizers):
        q.enabled = False
        q.observer = RangeObserver(groups, len(q.scale[0]), seed=config.seed + i)
    try:
        run_calibration(model, calibration, batch_size=batch_size, desc="calibrating activations", progress=progress)
        for q in tqdm(quantizers, desc="choosing ranges", disable=not progress, leave=False):
            ranges = _ranges(q.observer, groups, len(q.scale[0]), q, config)
            if ranges is None:
                warnings.warn(f"activation quantizer {q.name!r} saw no calibration data and stays in "
                              "full precision; its module is not used in the forward pass", stacklevel=2)
                continue
            q.set_ranges(ranges[0].to(q.scale.device), ranges[1].to(q.scale.device))
    finally:
        for q in quantizers:
            q.observer = None


def _ranges(observer: RangeObserver, groups: int, segments: int, q: ActQuantizer,
            config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(groups, segments)`` ranges; a group that saw no data borrows its nearest calibrated group's."""
    lo = torch.full((groups, segments), float("nan"))
    hi = torch.full((groups, segments), float("nan"))
    for g in range(groups):
        for s in range(segments):
            values = observer.samples(g, s)
            if values is not None:
                lo[g, s], hi[g, s] = P.choose_range(values, config.act_range, q.bits, q.symmetric,
                                                    percentile=config.act_percentile)
    seen = [g for g in range(groups) if not torch.isnan(lo[g]).any()]
    if not seen:
        return None
    for g in range(groups):
        nearest = min(seen, key=lambda s: abs(s - g))
        lo[g], hi[g] = lo[nearest], hi[nearest]
    return lo, hi
