"""Speed and memory of quantized execution on a CUDA GPU against FP32 and bf16, each model in one run (issue 16).

Per model and batch: milliseconds per denoiser call (median of CUDA-event-timed calls after a warm-up) for FP32
(PyTorch's defaults: TF32 off for matmuls, on for cuDNN convolutions), bf16 (weights and inputs cast), the
fake-quant W8A8 model and the int8 backend at W8A8 and W4A8: linear layers (and per-token 1x1 convolutions) on
``torch._int_mm`` (cuBLASLt int8 GEMMs), convolutions on the fake path (no int8 convolution is wired on CUDA;
``format_summary`` says so per layer). Also: weight memory on the GPU, peak GPU memory a call allocates above the
loaded model, the int8 output's SQNR against the fake-quant output, and single GEMMs of the models' shapes
(fp32, bf16, int8) to show what the kernel itself gives. Models: the full-size ``google/ddpm-cifar10-32`` and SD 1.5
UNet configs (random weights; SD at 64x64 latents, 512 px images) and a DiT-XL/2-sized transformer.

Usage: python benchmarks/cuda_speed.py [--configs ../shared/configs] [--models cifar10 sd15 dit-xl]
       [--out benchmarks/results/speed_cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from dit_scale import DIT_XL_2
from tacdiff.backends import backend_counts, use_backend
from tacdiff.io.atomic import write_text_atomically
from tacdiff.metrics.paired import sqnr_db
from tacdiff.models.kinds import example_inputs
from tacdiff.speed import model_for_speed, quantized_for_timing, weight_bytes

CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "configs"
FOLDERS = {"cifar10": "ddpm-cifar10-32/unet", "sd15": "sd-1.5-unet"}
BATCHES = {"cifar10": (1, 8, 64), "sd15": (1, 8), "dit-xl": (1, 8, 64)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GEMMS = ((4096, 320, 320), (32768, 320, 1280), (8192, 1152, 4608), (64, 1280, 1280))


def build(name: str, configs: Path) -> nn.Module:
    """The fp32 model ``name`` with seeded random weights."""
    if name == "dit-xl":
        torch.manual_seed(0)
        return DiTTransformer2DModel(**DIT_XL_2).eval()
    return model_for_speed(configs / FOLDERS[name])


def ms_per_call(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median milliseconds of ``call`` (CUDA events; wall time where CUDA is absent, for a smoke run) after two
    warm-ups, and the peak MiB it allocated on the GPU above what was allocated before it."""
    cuda = torch.cuda.is_available()
    call(), call()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            call()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times), ((torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else 0.0)


@torch.no_grad()
def time_model(name: str, fp: nn.Module, batches: tuple[int, ...], repeats: int) -> list[dict]:
    """Every variant of ``fp`` (on the GPU) at every batch size."""
    # label: (model, dtype, int8 placement, the label whose output its SQNR is measured against)
    variants: dict[str, tuple[nn.Module, torch.dtype, str, str | None]] = {
        "fp32": (fp, torch.float32, "", None), "bf16": (copy.deepcopy(fp).to(torch.bfloat16), torch.bfloat16, "", None)}
    for w_bits in (8, 4):
        fake = quantized_for_timing(fp, w_bits, 8)
        twin = copy.deepcopy(fake)
        placement = backend_counts(use_backend(twin, "int8"))
        variants[f"fake W{w_bits}A8"] = (fake, torch.float32, "", "fp32")
        variants[f"int8 W{w_bits}A8"] = (twin, torch.float32, placement, f"fake W{w_bits}A8")
    untimed = {"fake W4A8"}  # run only as the int8 W4A8 model's reference
    rows, fp32_ms = [], {}
    for batch in batches:
        x, t, cond = example_inputs(fp, batch)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(x.shape, generator=generator)
        outputs = {}
        for label, (model, dtype, placement, reference) in variants.items():
            inputs = x.to(DEVICE, dtype), t.to(DEVICE)
            kwargs = {k: (v.to(dtype) if v.is_floating_point() else v).to(DEVICE) for k, v in cond.items()}
            outputs[label] = model(inputs[0], timestep=inputs[1], **kwargs).sample.float()
            if label in untimed:
                continue
            ms, peak = ms_per_call(lambda: model(inputs[0], timestep=inputs[1], **kwargs), repeats)
            fp32_ms.setdefault(batch, ms)
            rows.append({"model": name, "variant": label, "batch": batch, "ms": ms,
                         "speedup": fp32_ms[batch] / ms, "weight_mib": weight_bytes(model) / 2**20,
                         "peak_call_mib": peak, "placement": placement})
            if reference is not None:
                key = "sqnr_vs_fp32_db" if reference == "fp32" else "sqnr_vs_fake_db"
                rows[-1][key] = sqnr_db(outputs[reference], outputs[label])
            print(json.dumps(rows[-1]), flush=True)
    return rows


def gemm_rows(repeats: int) -> list[dict]:
    """One (M, K) x (K, N) product of each shape in fp32, bf16 and int8 (``torch._int_mm``, int32 out)."""
    rows = []
    for m, k, n in GEMMS:
        a, b = torch.randn(m, k, device=DEVICE), torch.randn(k, n, device=DEVICE)
        a16, b16 = a.bfloat16(), b.bfloat16()
        a8 = torch.randint(-128, 128, (m, k), device=DEVICE, dtype=torch.int8)
        b8 = torch.randint(-128, 128, (n, k), device=DEVICE, dtype=torch.int8).t()  # column-major, as cuBLASLt wants
        fp32 = ms_per_call(lambda: a @ b, repeats)[0]
        row = {"gemm": f"{m}x{k}x{n}", "fp32_ms": fp32, "bf16_x": fp32 / ms_per_call(lambda: a16 @ b16, repeats)[0],
               "int8_x": fp32 / ms_per_call(lambda: torch._int_mm(a8, b8), repeats)[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(calls: list[dict], gemms: list[dict], repeats: int) -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke run)"
    title = (f"`benchmarks/cuda_speed.py` on {gpu}, torch {torch.__version__}; median ms per call over "
             f"{repeats} CUDA-event-timed calls after 2 warm-ups; speed-up against FP32 at the same batch.")
    lines = [title, "", "| model | variant | batch | ms/call | x fp32 | weights MiB | peak call MiB | "
             "SQNR dB | int8 placement |", "|---|---|---|---|---|---|---|---|---|"]
    for r in calls:
        sqnr = r.get("sqnr_vs_fake_db", r.get("sqnr_vs_fp32_db"))
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['ms']:.2f} | {r['speedup']:.2f} | "
                     f"{r['weight_mib']:.0f} | {r['peak_call_mib']:.0f} | {'' if sqnr is None else f'{sqnr:.1f}'} | "
                     f"{r['placement']} |")
    lines += ["", "SQNR: int8 rows against the fake-quant model, fake rows against FP32.", "",
              "| GEMM M x K x N | fp32 ms | bf16 x fp32 | int8 x fp32 |", "|---|---|---|---|"]
    lines += [f"| {g['gemm']} | {g['fp32_ms']:.3f} | {g['bf16_x']:.2f} | {g['int8_x']:.2f} |" for g in gemms]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, default=CONFIGS)
    parser.add_argument("--models", nargs="+", default=list(BATCHES), choices=list(BATCHES))
    parser.add_argument("--batches", type=int, nargs="+", help="Instead of each model's default batch sizes.")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, help="Write OUT.md and OUT.json.")
    args = parser.parse_args()
    if DEVICE == "cpu":
        print("no CUDA device: a smoke run on the CPU (benchmarks/speed.py is the CPU benchmark)")
    gemms = gemm_rows(args.repeats)
    calls = []
    for name in args.models:
        fp = build(name, args.configs).to(DEVICE)
        calls += time_model(name, fp, tuple(args.batches or BATCHES[name]), args.repeats)
        del fp
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    text = markdown(calls, gemms, args.repeats)
    print(text)
    if args.out:
        write_text_atomically(args.out.with_suffix(".md"), text + "\n")
        report = json.dumps({"calls": calls, "gemms": gemms}, indent=1)
        write_text_atomically(args.out.with_suffix(".json"), report + "\n")


if __name__ == "__main__":
    main()
