"""Whole-UNet A/B of the CPU int8 linear kernel: oneDNN's ``qlinear_pointwise`` against ``torch._int_mm`` (issue 16).

Quantizes a full-size config (random weights, min-max ranges), converts it to the int8 backend, gives every
linear layer with a static range both kernels and times whole denoiser calls with one and then the other,
alternating rounds in one process so that a busy machine slows both alike. Prints seconds per call per round,
the ratio of the fastest calls, and the SQNR between the two variants' outputs (both compute the same integer
sums; only their float epilogues round differently, which a quantized network amplifies).

Usage: python benchmarks/linear_kernels.py [--models cifar10 sd15] [--bits w8a8] [--batch 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from speed import MODELS
from tacdiff.backends import use_backend
from tacdiff.backends.int8 import Int8Linear
from tacdiff.backends.int_mm import Int8Matmul
from tacdiff.backends.onednn import OneDNNLinear
from tacdiff.devices import machine_line
from tacdiff.metrics.paired import sqnr_db
from tacdiff.models.kinds import example_inputs
from tacdiff.quant.layers import QuantLinear
from tacdiff.speed import model_for_speed, quantized_for_timing

FULL_SIZE = ("cifar10", "sd15")


def both_kernels(fake: nn.Module) -> dict[str, tuple[OneDNNLinear, Int8Matmul]]:
    """Both kernels for every linear layer of ``fake`` with a static activation range, by module name."""
    return {name: (OneDNNLinear(m.weight_codes, m.weight_zero_point[:, 0], m.weight_scale[:, 0], m.bias),
                   Int8Matmul(m.weight_codes.t(), m.weight_zero_point[:, 0], m.weight_scale[:, 0], m.bias))
            for name, m in fake.named_modules()
            if isinstance(m, QuantLinear) and m.act_quant is not None and not m.act_quant.dynamic}


def select(model: nn.Module, kernels: dict[str, tuple[OneDNNLinear, Int8Matmul]], kind: str) -> None:
    """Run every linear layer in ``kernels`` on ``kind`` (``"onednn"`` or ``"int_mm"``)."""
    for name, (onednn, matmul) in kernels.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, Int8Linear)
        layer.onednn = onednn if kind == "onednn" else None
        layer.matmuls = nn.ModuleList([] if kind == "onednn" else [matmul])
        layer._qparams = {}  # the cached epilogues belong to the other kernel


def compare(name: str, setting: str, batch: int, rounds: int) -> str:
    fp = model_for_speed(MODELS[name][0])
    if name == "sd15":
        fp.register_to_config(sample_size=32)
    model = quantized_for_timing(fp, setting)
    del fp
    kernels = both_kernels(model)
    use_backend(model, "int8")
    x, t, cond = example_inputs(model, batch)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(x.shape, generator=generator)
    cond = {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v for k, v in cond.items()}

    @torch.no_grad()
    def call() -> torch.Tensor:
        return model(x, timestep=t, **cond).sample

    seconds: dict[str, list[float]] = {"int_mm": [], "onednn": []}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(rounds):
        for kind in seconds:
            select(model, kernels, kind)
            outputs[kind] = call()  # warm-up
            start = time.perf_counter()
            call()
            seconds[kind].append(time.perf_counter() - start)
    sqnr = sqnr_db(outputs["int_mm"], outputs["onednn"])
    ratio = min(seconds["int_mm"]) / min(seconds["onednn"])
    per_round = "; ".join(f"{kind}: " + ", ".join(f"{s:.3f}" for s in values) for kind, values in seconds.items())
    return (f"| {name} | {setting} | {batch} | {len(kernels)} | {per_round} | {ratio:.2f} | {sqnr:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(FULL_SIZE), choices=FULL_SIZE)
    parser.add_argument("--bits", default="w8a8")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"Machine: {machine_line()}.\n")
    print("| model | bits | batch | linear layers | s/call per round (alternating) | int_mm / onednn (fastest) | SQNR dB |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        print(compare(name, args.bits, args.batch, args.rounds), flush=True)


if __name__ == "__main__":
    main()
