"""Activation-range calibration: observe every activation quantizer's inputs over the calibration set.

Ranges are chosen per timestep group from the observed values (Q-Diffusion's
time-uniform calibration when there is one group). Observation runs with the weights
already quantized and every activation quantizer passing values through.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from tacdiff.distributed import Shard, shard
from tacdiff.quant import primitives as P
from tacdiff.quant.config import QuantConfig
from tacdiff.quant.layers import ActQuantizer, RangeObserver
from tacdiff.quant.shards import merge_observers, split_observers

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


Batch = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def model_batches(model: nn.Module, calibration: CalibrationSet, batch_size: int) -> Iterator[Batch]:
    """``calibration``'s batches on ``model``'s device and in its dtype."""
    param = next(model.parameters())
    return calibration.batches(batch_size, param.device, param.dtype)


def split_batches(model: nn.Module, calibration: CalibrationSet, batch_size: int) -> tuple[list[Batch], Shard]:
    """``calibration``'s batches and this process's share of them: under ``torchrun`` a contiguous block of
    whole batches (:func:`tacdiff.distributed.shard`), otherwise all of them."""
    batches = list(model_batches(model, calibration, batch_size))
    return batches, shard(len(batches), 1)


@torch.no_grad()
def run_batches(model: nn.Module, batches: Sequence[Batch], *, desc: str, progress: bool = True) -> None:
    """One forward pass of ``model`` over ``batches`` (for the hooks that observe it)."""
    for x, t, cond in tqdm(batches, desc=desc, disable=not progress, leave=False):
        model(x, timestep=t, **cond)


def run_calibration(model: nn.Module, calibration: CalibrationSet, *, batch_size: int, desc: str,
                    progress: bool = True) -> None:
    """One forward pass of ``model`` over every calibration input (for the hooks that observe it)."""
    run_batches(model, list(model_batches(model, calibration, batch_size)), desc=desc, progress=progress)


@torch.no_grad()
def calibrate_activations(model: nn.Module, calibration: CalibrationSet, config: QuantConfig, *,
                          batch_size: int = 64, progress: bool = True) -> None:
    """Choose and set the range of every activation quantizer of a quantized ``model``.

    Under ``torchrun`` every process observes its share of the batches and the observers are merged into
    exactly what one process observes (:mod:`tacdiff.quant.shards`)."""
    quantizers = activation_quantizers(model)
    groups = quantizers[0].router.groups if quantizers else 1
    batches, mine = split_batches(model, calibration, batch_size)
    for q in quantizers:
        q.enabled = False
    try:
        observers = [RangeObserver(groups, len(q.scale[0]), seed=config.seed + i) for i, q in enumerate(quantizers)]
        if mine.split:
            observers = split_observers(model, quantizers, batches, mine, observers)
        for q, observer in zip(quantizers, observers):
            q.observer = observer
        run_batches(model, mine.take(batches), desc="calibrating activations", progress=progress)
        if mine.split:
            observers = merge_observers(observers, mine)
    finally:
        for q in quantizers:
            q.observer = None
    unused = []
    for q, observer in tqdm(list(zip(quantizers, observers)), desc="choosing ranges", disable=not progress,
                            leave=False):
        ranges = _ranges(observer, groups, len(q.scale[0]), q, config)
        if ranges is None:
            unused.append(q.name)
            continue
        q.set_ranges(ranges[0].to(q.scale.device), ranges[1].to(q.scale.device))
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        listed = ", ".join(repr(name) for name in unused[:3]) + more
        warnings.warn(f"{len(unused)} activation {'quantizer' if len(unused) == 1 else 'quantizers'} saw no "
                      f"calibration data and stay in full precision (their modules are not used in the forward "
                      f"pass): {listed}", stacklevel=2)


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
