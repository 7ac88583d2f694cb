"""Where the W8A8 output error of the tests' tiny UNets comes from: an activation-noise budget.

    python benchmarks/act_noise_budget.py [--threads N]

For the tests' two tiny random-weight models (tests/tiny_models.py: a UNet2DModel and a
UNet2DConditionModel, with the tests' calibration and held-out sets), quantized W8A8 with
calibrated (``mse``), with ``dynamic`` activation ranges, and with block-scaled dynamic ranges
(``act_block_size=32``: one per token and block of 32 channels, 3x3 conv inputs included), it prints:

* the output SQNR against FP on held-out inputs with every quantizer on, with weights only,
  with the network input x_t quantized as well (off by default), with GPTQ-rounded weights, and
  with one family of activation quantizers (3x3 and 1x1 conv inputs, linear inputs, attention
  matmul operands) left in float at a time;
* each family's local SQNR, the quantizer's own output against its input on the same
  held-out forwards (median and worst), next to the ceiling of an MSE-clipped 8-bit
  quantizer on Gaussian data and on its SiLU (the typical conv input).

Local SQNRs at the ceiling together with a low output SQNR mean the error comes from the
number of quantizers on the signal path, not from badly chosen ranges.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from tacdiff.quant import primitives as P
from tacdiff.quant.calibrate import activation_quantizers
from tacdiff.quant.layers import ActQuantizer, QuantConv2d, QuantLinear

# The tests' own models and data, so the floors in tests/quant/test_apply.py can be traced here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import (COND_SAMPLES, NUM_SAMPLES, calibration_of, outputs, quantized_copy,  # noqa: E402
                         sqnr_db, text_embeddings, tiny_cond_unet, tiny_unet)

FAMILIES = ("3x3 conv input", "1x1 conv input", "linear input", "attention operand")


def family_of(model: nn.Module) -> dict[str, str]:
    """The family of every activation quantizer of a quantized ``model``, by quantizer name."""
    def family(layer: QuantConv2d | QuantLinear) -> str:
        if isinstance(layer, QuantLinear):
            return "linear input"
        return "x".join(map(str, layer.kernel_size)) + " conv input"

    owner = {m.act_quant.name: family(m)
             for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear)) and m.act_quant is not None}
    return {q.name: owner.get(q.name, "attention operand") for q in activation_quantizers(model)}


@torch.no_grad()
def local_sqnr(model: nn.Module, data) -> dict[str, float]:
    """Each quantizer's output against its input, summed over the forwards on ``data``."""
    energy: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def record(quantizer: ActQuantizer, args: tuple, out: torch.Tensor) -> None:
        energy[quantizer.name][0] += args[0].double().pow(2).sum().item()
        energy[quantizer.name][1] += (args[0] - out).double().pow(2).sum().item()

    handles = [q.register_forward_hook(record) for q in activation_quantizers(model)]
    try:
        outputs(model, data)
    finally:
        for handle in handles:
            handle.remove()
    return {name: 10 * torch.log10(torch.tensor(s / n)).item() for name, (s, n) in energy.items()}


@torch.no_grad()
def output_sqnr_without(model: nn.Module, reference: torch.Tensor, data, names: set[str]) -> float:
    """Output SQNR with the quantizers in ``names`` passing values through."""
    off = [q for q in activation_quantizers(model) if q.name in names and q.enabled]
    for q in off:
        q.enabled = False
    try:
        return sqnr_db(reference, outputs(model, data))
    finally:
        for q in off:
            q.enabled = True


def ceiling(values: torch.Tensor, bits: int = 8) -> float:
    """SQNR of MSE-clipped asymmetric ``bits``-bit per-tensor quantization of ``values``."""
    lo, hi = P.choose_range(values, "mse", bits)
    scale, zero_point = P.qparams_from_range(lo, hi, bits)
    return sqnr_db(values, P.fake_quantize(values, scale, zero_point, bits))


def budget(name: str, fp: nn.Module, calibration, held_out, act_range: str, block: int | None) -> None:
    config = dict(weight_bits=8, act_bits=8, act_range=act_range, act_block_size=block)
    model = quantized_copy(fp, calibration, **config)
    with_input = quantized_copy(fp, calibration, quantize_model_input=True, **config)
    gptq = quantized_copy(fp, calibration, weight_rounding="gptq", **config)
    reference = outputs(fp, held_out)
    families = family_of(model)
    local = local_sqnr(model, held_out)
    blocks = "" if block is None else f", act_block_size={block}"
    print(f"\n### {name}, W8A8, act_range={act_range}{blocks}: {len(families)} activation quantizers\n")
    print(f"output SQNR, every quantizer on: {sqnr_db(reference, outputs(model, held_out)):.2f} dB; "
          f"weights only: {output_sqnr_without(model, reference, held_out, set(families)):.2f} dB; "
          f"x_t quantized too (quantize_model_input=True): {sqnr_db(reference, outputs(with_input, held_out)):.2f} dB")
    print(f"\nwith GPTQ-rounded weights: {sqnr_db(reference, outputs(gptq, held_out)):.2f} dB; weights only: "
          f"{output_sqnr_without(gptq, reference, held_out, set(families)):.2f} dB\n")
    print("| family | quantizers | output SQNR with the family in float | local SQNR median | local SQNR worst |")
    print("|---|---:|---:|---:|---:|")
    for family in FAMILIES:
        names = {n for n, f in families.items() if f == family}
        if not names:
            continue
        values = [local[n] for n in names if n in local]
        print(f"| {family} | {len(names)} | {output_sqnr_without(model, reference, held_out, names):.2f} | "
              f"{statistics.median(values):.2f} | {min(values):.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("# W8A8 activation-noise budget of the tests' tiny random-weight UNets (dB)")
    gaussian = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))
    print(f"\nceiling: an MSE-clipped 8-bit asymmetric quantizer gives {ceiling(gaussian):.2f} dB on a million "
          f"standard normal values and {ceiling(nn.functional.silu(gaussian)):.2f} dB on their SiLU")
    unet, cond_unet = tiny_unet(), tiny_cond_unet()
    cases = [("UNet2DModel", unet, calibration_of(unet, seed=0), calibration_of(unet, seed=1000)),
             ("UNet2DConditionModel", cond_unet,
              calibration_of(cond_unet, seed=0, num_samples=COND_SAMPLES, cond=text_embeddings(COND_SAMPLES, 0)),
              calibration_of(cond_unet, seed=1000, num_samples=COND_SAMPLES,
                             cond=text_embeddings(COND_SAMPLES, 1000)))]
    print(f"\ncalibration: {NUM_SAMPLES} (UNet2DModel) / {COND_SAMPLES} (UNet2DConditionModel) DDIM trajectories, "
          "seed 0; held-out: as many from seed 1000")
    for name, fp, calibration, held_out in cases:
        for act_range, block in (("mse", None), ("dynamic", None), ("dynamic", 32)):
            budget(name, fp, calibration, held_out, act_range, block)


if __name__ == "__main__":
    main()
