"""Check that quantization follows the model's device and dtype, and time fake-quant against FP there.

Usage: python benchmarks/device_check.py --device cuda [--dtype float32|bfloat16|float16]
Prints, for the bundled reference model and each recipe (W8A8, W4A8, dynamic and block-scaled ranges,
GPTQ rounding): output SQNR, quantization time, whether a saved and reloaded artifact reproduces
outputs bit for bit on that device, the forward time against FP, and the same model on the int8 backend
(which layers run integer there, its output SQNR against the fake-quant output, its forward time).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

import tacdiff
from tacdiff.backends import backend_counts, use_backend
from tacdiff.io import load_quantized, save_quantized
from tacdiff.metrics.paired import sqnr_db
from tacdiff.models.reference import load_reference_model
from tacdiff.workflows import output_sqnr_db


RECIPES = {
    "W8A8": tacdiff.QuantConfig(weight_bits=8, act_bits=8),
    "W4A8": tacdiff.QuantConfig(weight_bits=4, act_bits=8),
    "W8A8 dynamic": tacdiff.QuantConfig(weight_bits=8, act_bits=8, act_range="dynamic"),
    "W8A8 block32": tacdiff.QuantConfig(weight_bits=8, act_bits=8, act_range="dynamic", act_block_size=32),
    "W4A8 GPTQ": tacdiff.QuantConfig(weight_bits=4, act_bits=8, weight_rounding="gptq"),
    "W4A8 dynamic GPTQ": tacdiff.QuantConfig(weight_bits=4, act_bits=8, act_range="dynamic", weight_rounding="gptq"),
}


def forward_seconds(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, repeats: int = 10) -> float:
    """Median wall time of one forward pass (synchronised on CUDA)."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 2):
            if x.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x, t)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times[2:])[len(times[2:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {args.device} ({name}), dtype {args.dtype}, torch {torch.__version__}")
    fp, scheduler = load_reference_model(args.device)
    fp = fp.to(dtype)
    calib = tacdiff.collect_calibration_set(fp, scheduler, num_samples=32, num_inference_steps=20,
                                            kept_steps=10, progress=False)
    held_out = tacdiff.collect_calibration_set(fp, scheduler, num_samples=16, num_inference_steps=20,
                                               kept_steps=5, seed=1, progress=False)
    x = torch.randn(args.batch, 1, 28, 28, device=args.device, dtype=dtype)
    t = torch.full((args.batch,), 500, device=args.device)
    fp_time = forward_seconds(fp, x, t)
    print("| setting | SQNR dB | quantize s | weights on | weight dtype | reload bit-exact | forward vs FP | "
          "int8 backend | int8 vs fake SQNR dB | int8 forward vs FP |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, config in RECIPES.items():
        start = time.perf_counter()
        model = tacdiff.quantize(copy.deepcopy(fp), config, calib, progress=False)
        seconds = time.perf_counter() - start
        sqnr = output_sqnr_db(fp, model, held_out)
        with tempfile.TemporaryDirectory() as folder:
            save_quantized(model, f"{folder}/q")
            reloaded = load_quantized(f"{folder}/q", args.device, dtype)
            with torch.no_grad():
                exact = torch.equal(model(x, t).sample, reloaded(x, t).sample)
        weight = next(model.parameters())
        ratio = forward_seconds(model, x, t) / fp_time
        twin = copy.deepcopy(model)
        placement = backend_counts(use_backend(twin, "int8"))
        with torch.no_grad():
            agreement = sqnr_db(model(x, t).sample, twin(x, t).sample)
        int8_ratio = forward_seconds(twin, x, t) / fp_time
        print(f"| {label} | {sqnr:.2f} | {seconds:.1f} | {weight.device} | {weight.dtype} | {exact} | {ratio:.2f}x | "
              f"{placement} | {agreement:.1f} | {int8_ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
