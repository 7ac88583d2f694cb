"""Channel balancing before quantization: SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models", ICML 2023).

A few input channels of a transformer's linear layers carry values far larger than the rest (in diffusion
transformers, those the adaLN modulation scales up), so one activation range per tensor or token wastes most
of its levels on them. Dividing channel ``j`` by ``s_j`` and multiplying the weight's column ``j`` by it keeps
the product and moves the outliers into the weights, which are quantized per output channel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from tacdiff.quant.calibrate import activations_unquantized, run_batches, split_batches
from tacdiff.quant.layers import QuantLinear

if TYPE_CHECKING:  # quant/ sits below sampling/: the calibration set is only named here
    from tacdiff.sampling.calibration import CalibrationSet

SMALLEST = 1e-5  # floor of both maxima: a channel never seen active keeps a finite scale


def smoothing_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` per input channel ``j`` of a linear layer's ``weight``
    ``(out, in)``, from the absolute maxima ``act_absmax`` ``(in,)`` of its inputs."""
    weight_absmax = weight.detach().float().abs().amax(0).clamp(min=SMALLEST)
    return act_absmax.float().clamp(min=SMALLEST).pow(alpha) / weight_absmax.pow(1 - alpha)


def balanced_layers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    """The quantized linear layers of ``model`` that carry a ``smooth`` divisor."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, QuantLinear) and getattr(m, "smooth", None) is not None]


@torch.no_grad()
def balance_channels(model: nn.Module, calibration: CalibrationSet, alpha: float, *, batch_size: int = 64,
                     progress: bool = True) -> None:
    """Set the divisor of every balanced layer of a just-installed quantized ``model`` (float weights, not yet
    rounded) from the absolute maxima of its inputs over ``calibration`` in full precision."""
    layers = balanced_layers(model)
    absmax: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        seen = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        absmax[name] = seen if name not in absmax else torch.maximum(absmax[name], seen)

    handles = [layer.register_forward_pre_hook(lambda mod, args, name=name: record(name, args[0]))
               for name, layer in layers]
    batches, mine = split_batches(model, calibration, batch_size)  # under torchrun, a share each
    try:
        with activations_unquantized(model):
            run_batches(model, mine.take(batches), desc="balancing channels", progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    for name, layer in layers:
        if name in absmax:  # a layer the calibration inputs never reach keeps unit divisors
            seen = mine.maximum(absmax[name]).to(layer.weight.device)
            layer.set_smoothing(smoothing_scales(seen, layer.weight, alpha))
