"""Learned weight rounding with block reconstruction, the first stage of Q-Diffusion's PTQ.

AdaRound (Nagel et al., ICML 2020) learns, for every weight, whether to round its
quantization-grid position down or up; BRECQ (Li et al., ICLR 2021) learns those choices
jointly for all layers of a block so that the block's output, fed the quantized model's
own inputs, matches the full-precision block's output. Q-Diffusion (Li et al., ICCV 2023)
applies this to diffusion UNets with calibration inputs drawn across timesteps.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from tacdiff.quant.calibrate import activations_unquantized, model_batches
from tacdiff.quant.config import QuantConfig
from tacdiff.quant.layers import QuantConv2d, QuantLinear

if TYPE_CHECKING:  # quant/ sits below sampling/: the calibration set is only named here
    from tacdiff.sampling.calibration import CalibrationSet

UNIT_TYPES = (ResnetBlock2D, Attention, BasicTransformerBlock)
QUANT_LAYERS = (QuantConv2d, QuantLinear)
MAX_INPUTS = 256
ZETA, GAMMA = 1.1, -0.1
ROUND_WEIGHT = 0.01
WARMUP = 0.2
BETA_START, BETA_END = 20.0, 2.0


class _StopForward(Exception):
    """Raised from a hook once the unit of interest has run, to skip the rest of the model."""


@dataclass
class _Batched:
    """A tensor concatenated over calibration batches along dimension 0 (one row per input)."""

    data: torch.Tensor


@dataclass
class _UnitData:
    """What a unit is reconstructed from: its inputs in the quantized model and the FP targets."""

    args: Any
    kwargs: Any
    target: torch.Tensor

    def __len__(self) -> int:
        return self.target.shape[0]

    def select(self, index: torch.Tensor) -> tuple[Any, Any, torch.Tensor]:
        """``(args, kwargs, target)`` restricted to the inputs at ``index``."""
        return _select(self.args, index), _select(self.kwargs, index), self.target[index.to(self.target.device)]


def reconstruction_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks reconstructed jointly, in module registration order.

    Every ``ResnetBlock2D``, ``Attention`` and ``BasicTransformerBlock`` not nested in
    another one is a unit, and so is every quantized Conv2d/Linear outside all of them.
    Units without quantized layers are left out.
    """
    units: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer, _ in units):
            continue
        if isinstance(module, UNIT_TYPES + QUANT_LAYERS):
            units.append((name, module))
    return [(n, m) for n, m in units if quant_layers(m)]


def quant_layers(unit: nn.Module) -> list[tuple[str, QuantConv2d | QuantLinear]]:
    """The quantized layers of ``unit`` with names relative to it (``""`` for the unit itself)."""
    return [(n, m) for n, m in unit.named_modules() if isinstance(m, QUANT_LAYERS)]


def learn_rounding(model: nn.Module, fp_model: nn.Module, calibration: CalibrationSet, config: QuantConfig,
                   *, progress: bool = True, max_inputs: int = MAX_INPUTS) -> None:
    """Replace the round-to-nearest weight codes of a quantized ``model`` by learned ones, in place.

    Units (see :func:`reconstruction_units`) are reconstructed one after another in the
    order the forward pass runs them, each fed its inputs in ``model`` (earlier units
    already rounded) and fitted to the output of the same-named unit in ``fp_model``.

    Args:
        model: a UNet whose layers are already quantized with round-to-nearest (their
            stored scales and zero points are kept; only the codes change).
        fp_model: the untouched full-precision twin of ``model`` (same module names).
        calibration: model inputs; a random subset of ``max_inputs`` of them is used.
        config: ``adaround_iters``, ``adaround_lr``, ``adaround_batch_size`` and ``seed``.
        progress: show a progress bar over units with the current loss.
        max_inputs: calibration inputs kept in memory per unit.
    """
    data = calibration.subset(max_inputs, seed=config.seed)
    with activations_unquantized(model):
        units = _forward_order(model, reconstruction_units(model), data)
        bar = tqdm(units, desc="learning rounding", disable=not progress, leave=False)
        for i, (name, unit) in enumerate(bar):
            unit_data = _gather(model, fp_model, name, data, config.adaround_batch_size)
            layers = quant_layers(unit)
            fp_weights = [fp_model.get_submodule(_join(name, n)).weight.detach() for n, _ in layers]
            _reconstruct(unit, layers, fp_weights, unit_data, config, config.seed + i,
                         lambda loss, name=name: bar.set_postfix(unit=name, loss=f"{loss:.4g}"))
            del unit_data  # keep one unit's inputs and targets in memory at a time


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _forward_order(model: nn.Module, units: list[tuple[str, nn.Module]], data: CalibrationSet
                   ) -> list[tuple[str, nn.Module]]:
    """``units`` sorted by when one forward pass first calls them; units never called are dropped."""
    called: list[str] = []

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in called:
                called.append(name)
        return hook

    handles = [unit.register_forward_pre_hook(record(name)) for name, unit in units]
    try:
        _run(model, next(model_batches(model, data.subset(1), 1)))
    finally:
        for handle in handles:
            handle.remove()
    unused = [name for name, _ in units if name not in called]
    if unused:
        warnings.warn(f"{len(unused)} quantized units are not used in the forward pass and keep "
                      f"round-to-nearest weights: {', '.join(unused)}", stacklevel=3)
    by_name = dict(units)
    return [(name, by_name[name]) for name in called]


def _run(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]) -> None:
    """One forward pass of ``model`` on a calibration batch, ended early by :class:`_StopForward`."""
    x, t, cond = batch
    try:
        with torch.no_grad():
            model(x, timestep=t, **cond)
    except _StopForward:
        pass


def _gather(model: nn.Module, fp_model: nn.Module, name: str, data: CalibrationSet,
            batch_size: int) -> _UnitData:
    """The unit's inputs in ``model`` and its outputs in ``fp_model`` over ``data``, kept on the model's device."""
    inputs: list[tuple[Any, Any]] = []
    outputs: list[torch.Tensor] = []

    def grab_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append(_detach((args, kwargs)))
        raise _StopForward

    def grab_output(module: nn.Module, args: tuple, output: Any) -> None:
        outputs.append(_first_tensor(output).detach())
        raise _StopForward

    sizes = []
    for batch in model_batches(model, data, batch_size):
        sizes.append(batch[0].shape[0])
        with _hooked(model.get_submodule(name).register_forward_pre_hook(grab_inputs, with_kwargs=True)):
            _run(model, batch)
        with _hooked(fp_model.get_submodule(name).register_forward_hook(grab_output)):
            _run(fp_model, batch)
    args, kwargs = _concat(inputs, sizes)
    return _UnitData(args, kwargs, torch.cat(outputs))


@contextmanager
def _hooked(handle: torch.utils.hooks.RemovableHandle) -> Iterator[None]:
    try:
        yield
    finally:
        handle.remove()


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot reconstruct a unit whose output is a {type(output).__name__}; expected a tensor")


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def _concat(parts: list[Any], sizes: list[int]) -> Any:
    """Merge per-batch structures: tensors with one row per input are concatenated, anything else kept once."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if all(isinstance(p, torch.Tensor) and p.dim() > 0 and p.shape[0] == n for p, n in zip(parts, sizes)):
            return _Batched(torch.cat(parts))
        return first
    if isinstance(first, (tuple, list)):
        return type(first)(_concat(list(column), sizes) for column in zip(*parts))
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts], sizes) for k in first}
    return first


def _select(obj: Any, index: torch.Tensor) -> Any:
    if isinstance(obj, _Batched):
        return obj.data[index.to(obj.data.device)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_select(o, index) for o in obj)
    if isinstance(obj, dict):
        return {k: _select(v, index) for k, v in obj.items()}
    return obj


class _SoftRounding:
    """AdaRound's rectified-sigmoid rounding of one layer's weight on its round-to-nearest grid."""

    def __init__(self, layer: QuantConv2d | QuantLinear, fp_weight: torch.Tensor) -> None:
        self.scale = layer.expand(layer.weight_scale).float()
        self.zero_point = layer.expand(layer.weight_zero_point).float()
        self.qmax = 2 ** layer.w_bits - 1
        self.dtype = layer.weight.dtype
        grid = fp_weight.float() / self.scale
        self.floor = torch.floor(grid)
        self.v = nn.Parameter(_inverse_h(grid - self.floor))

    def h(self) -> torch.Tensor:
        """The rectified sigmoid ``clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def soft_weight(self) -> torch.Tensor:
        """``s * (clamp(floor(W/s) + h(V) + z, 0, 2^b - 1) - z)``, differentiable in ``V``."""
        codes = torch.clamp(self.floor + self.h() + self.zero_point, 0, self.qmax)
        return ((codes - self.zero_point) * self.scale).to(self.dtype)

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1|^beta)``: pushes every ``h(V)`` to 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def hard_codes(self) -> torch.Tensor:
        """Integer codes rounding up exactly where ``h(V) >= 0.5``."""
        with torch.no_grad():
            return torch.clamp(self.floor + (self.h() >= 0.5).float() + self.zero_point, 0, self.qmax)


def _inverse_h(frac: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) == frac`` for ``frac`` in ``[0, 1)``."""
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)


def _beta(step: int, iters: int) -> float | None:
    """The regulariser's exponent at ``step``: None during warm-up, then linear from 20 down to 2."""
    start = math.ceil(WARMUP * iters)
    if step < start:
        return None
    progress = (step - start) / max(iters - start, 1)
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - progress)


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dimension 1 and averaged over the rest (BRECQ's and Q-Diffusion's ``lp_loss``)."""
    return (output.float() - target.float()).pow(2).sum(1).mean()


@torch.enable_grad()  # callers may sample under no_grad (the benchmark does)
def _reconstruct(unit: nn.Module, layers: list[tuple[str, QuantConv2d | QuantLinear]],
                 fp_weights: list[torch.Tensor], data: _UnitData, config: QuantConfig, seed: int,
                 report: Callable[[float], None]) -> None:
    """Optimise the rounding of ``layers`` so ``unit`` reproduces ``data.target``, then store hard codes."""
    rounding = [_SoftRounding(layer, w) for (_, layer), w in zip(layers, fp_weights)]
    optimizer = torch.optim.Adam([r.v for r in rounding], lr=config.adaround_lr)
    generator = torch.Generator().manual_seed(seed)
    params = {n: p.detach() for n, p in unit.named_parameters()}
    batch = min(config.adaround_batch_size, len(data))
    for step in range(config.adaround_iters):
        args, kwargs, target = data.select(torch.randperm(len(data), generator=generator)[:batch])
        weights = {_join(n, "weight"): r.soft_weight() for (n, _), r in zip(layers, rounding)}
        output = _first_tensor(functional_call(unit, {**params, **weights}, args, kwargs))
        loss = reconstruction_loss(output, target)
        beta = _beta(step, config.adaround_iters)
        if beta is not None:
            loss = loss + ROUND_WEIGHT * sum(r.regularizer(beta) for r in rounding)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == config.adaround_iters - 1:
            report(loss.item())
    for (_, layer), r in zip(layers, rounding):
        layer.set_codes(r.hard_codes(), layer.weight_scale.clone(), layer.weight_zero_point.clone())
