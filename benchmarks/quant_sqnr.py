"""Output SQNR, quantization time and fake-quant forward cost of tacdiff PTQ across bit widths.

    python benchmarks/quant_sqnr.py [--device cpu|cuda] [--models tiny,fmnist,cifar10] [--rtn-settings W8A8,...]
                                    [--gptq-models tiny,fmnist] [--gptq-settings W8A8,W4A8,...]
                                    [--adaround-iters 200] [--adaround-models tiny] [--adaround-settings W4A8,W4]
                                    [--repeats 7] [--threads N] [--profile]

Models:
  tiny     the tests' two-level UNet2DModel (32/64 channels, attention in level 2, 16x16 inputs),
           random weights (seeded)
  fmnist   the bundled trained Fashion-MNIST reference model (2.8M parameters, 28x28)
  cifar10  the full-size google/ddpm-cifar10-32 architecture (35.7M parameters, 32x32) built with
           UNet2DModel.from_config from /work/shared/configs/ddpm-cifar10-32, random weights (seeded)

For every setting (W8A8, W6A8, W4A8, W3A8, weight-only W8 and W4 with calibrated MSE activation
ranges; W8A8 and W4A8 with dynamic activation ranges, and with block-scaled dynamic ranges,
one per token and block of 32 channels; W8A8 and W4A8 with symmetric weights, the recipe whose 8-bit
weights the int8 backend runs without a zero-point channel), or the ``--rtn-settings``, with
round-to-nearest, for the ``--gptq-settings`` of the ``--gptq-models`` with GPTQ rounding, and
for the ``--adaround-settings`` of the ``--adaround-models`` with learned rounding, it prints
one markdown table row: the output SQNR in dB against the FP model on held-out inputs (other
seeds than the calibration set), overall and at the noisiest / cleanest timestep, the
quantization wall time, and the fake-quant forward time relative to FP: the median of
``--repeats`` timed forwards of the same batch, FP and quantized interleaved in the same run.
``--profile`` adds torch.profiler tables of one FP and one W8A8 forward per model.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

import tacdiff
from tacdiff.devices import cpu_name
from tacdiff.models.reference import load_reference_model
from tacdiff.sampling import CalibrationSet, collect_calibration_set

CIFAR_DIR = Path("/work/shared/configs/ddpm-cifar10-32")
# (label, weight bits, activation bits, activation ranges, activation block size, symmetric weights)
SETTINGS = [("W8A8", 8, 8, "mse", None, False), ("W6A8", 6, 8, "mse", None, False), ("W4A8", 4, 8, "mse", None, False),
            ("W3A8", 3, 8, "mse", None, False), ("W8", 8, None, "mse", None, False), ("W4", 4, None, "mse", None, False),
            ("W8A8 dynamic", 8, 8, "dynamic", None, False), ("W4A8 dynamic", 4, 8, "dynamic", None, False),
            ("W8A8 block32", 8, 8, "dynamic", 32, False), ("W4A8 block32", 4, 8, "dynamic", 32, False),
            ("W8A8 symmetric", 8, 8, "mse", None, True), ("W4A8 symmetric", 4, 8, "mse", None, True)]


@dataclass
class Workload:
    """A model with its scheduler, calibration set, held-out set and timing batch."""

    name: str
    model: nn.Module
    calibration: CalibrationSet
    held_out: CalibrationSet
    timing_batch: tuple[torch.Tensor, torch.Tensor]
    description: str


def tiny_model() -> tuple[UNet2DModel, DDPMScheduler]:
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    return model.eval(), DDPMScheduler()


def cifar_model() -> tuple[UNet2DModel, DDPMScheduler]:
    torch.manual_seed(0)
    model = UNet2DModel.from_config(UNet2DModel.load_config(CIFAR_DIR / "unet"))
    return model.eval(), DDPMScheduler.from_config(DDPMScheduler.load_config(CIFAR_DIR / "scheduler"))


def workload(name: str, device: torch.device, args: argparse.Namespace) -> Workload:
    """Build the model and draw calibration and held-out inputs from its own DDIM trajectories."""
    build, (samples, steps, kept, held) = {
        "tiny": (tiny_model, (32, 20, 10, 16)),
        "fmnist": (load_reference_model, (32, 20, 10, 16)),
        "cifar10": (cifar_model, (args.cifar_samples, 20, args.cifar_kept, 8)),
    }[name]
    model, scheduler = build()
    model.to(device)
    common = dict(num_inference_steps=steps, kept_steps=kept, progress=False, batch_size=64)
    start = time.perf_counter()
    calibration = collect_calibration_set(model, scheduler, num_samples=samples, seed=0, **common)
    held_out = collect_calibration_set(model, scheduler, num_samples=held, seed=1000, **common)
    print(f"[{name}] calibration {len(calibration)} inputs ({samples} samples x {kept} of {steps} DDIM steps), "
          f"held-out {len(held_out)} inputs (seed 1000), drawn in {time.perf_counter() - start:.1f} s", flush=True)
    mid = torch.unique(held_out.timesteps)[len(torch.unique(held_out.timesteps)) // 2]
    rows = torch.nonzero(held_out.timesteps == mid).flatten()[: args.timing_batch]
    batch = (held_out.x[rows].to(device), held_out.timesteps[rows].to(device))
    params = sum(p.numel() for p in model.parameters())
    description = (f"{name}: {type(model).__name__}, {params / 1e6:.2f}M parameters, "
                   f"block_out_channels={tuple(model.config.block_out_channels)}, "
                   f"sample {model.config.in_channels}x{model.config.sample_size}x{model.config.sample_size}; "
                   f"calibration {samples} samples x {kept} kept of {steps} DDIM steps; held-out {held} samples; "
                   f"timing batch {len(rows)} at t={int(mid)}")
    return Workload(name, model, calibration, held_out, batch, description)


@torch.no_grad()
def outputs(model: nn.Module, data: CalibrationSet, device: torch.device) -> torch.Tensor:
    return torch.cat([model(x, t, **c).sample.cpu() for x, t, c in data.batches(64, device)])


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    noise = (reference - approximation).double().pow(2).sum()
    return (10 * torch.log10(reference.double().pow(2).sum() / noise)).item()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def relative_forward_time(fp: nn.Module, quantized: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                          repeats: int, device: torch.device) -> tuple[float, float, float]:
    """Median FP and quantized forward times (s) of the same batch, interleaved, and their ratio."""
    times: dict[str, list[float]] = {"fp": [], "q": []}
    for _ in range(2):  # warm-up
        fp(*batch)
        quantized(*batch)
    for _ in range(repeats):
        for key, model in (("fp", fp), ("q", quantized)):
            synchronize(device)
            start = time.perf_counter()
            model(*batch)
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    fp_time, q_time = statistics.median(times["fp"]), statistics.median(times["q"])
    return fp_time, q_time, q_time / fp_time


def machine(device: torch.device) -> str:
    text = (f"CPU {cpu_name()} ({torch.get_num_threads()} torch threads, {len(os.sched_getaffinity(0))} "
            f"cores available); torch {torch.__version__}; diffusers {diffusers.__version__}; "
            f"python {platform.python_version()}; device {device}")
    if device.type == "cuda":
        text += f" = {torch.cuda.get_device_name(device)}"
    return text


def profile_forward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> str:
    """A torch.profiler table (self time per operator) of one forward."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        model(*batch)
        with profile(activities=activities) as prof:
            model(*batch)
            synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=40)


def rounding_plan(model: str, args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """``(weight_rounding, setting labels)`` pairs to run on ``model``: RTN, then GPTQ and learned rounding."""
    plan = [("rtn", args.rtn_settings.split(","))]
    for method, models, settings in [("gptq", args.gptq_models, args.gptq_settings),
                                     ("adaround", args.adaround_models, args.adaround_settings)]:
        if model in models.split(","):
            plan.append((method, settings.split(",")))
    return plan


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# tacdiff quantization benchmark ({datetime.datetime.now().isoformat(timespec='seconds')})")
    print(f"machine: {machine(device)}")
    began = time.perf_counter()
    for name in args.models.split(","):
        work = workload(name, device, args)
        print(f"\n## {work.description}\n", flush=True)
        reference = outputs(work.model, work.held_out, device)
        times = sorted(torch.unique(work.held_out.timesteps).tolist())
        high, low = work.held_out.timesteps == times[-1], work.held_out.timesteps == times[0]
        print(f"| setting | rounding | SQNR dB | SQNR t={int(times[-1])} | SQNR t={int(times[0])} | "
              f"quantize s | FP fwd ms | quant fwd ms | fwd x FP |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        profiled = None
        for method, labels in rounding_plan(name, args):
            for label, w_bits, a_bits, act_range, block, symmetric in SETTINGS:
                if label not in labels:
                    continue
                config = tacdiff.QuantConfig(weight_bits=w_bits, act_bits=a_bits, act_range=act_range,
                                             act_block_size=block, weight_symmetric=symmetric, weight_rounding=method,
                                             adaround_iters=args.adaround_iters)
                model = copy.deepcopy(work.model)
                synchronize(device)
                start = time.perf_counter()
                tacdiff.quantize(model, config, work.calibration, batch_size=64, progress=False)
                synchronize(device)
                elapsed = time.perf_counter() - start
                approx = outputs(model, work.held_out, device)
                fp_t, q_t, ratio = relative_forward_time(work.model, model, work.timing_batch, args.repeats, device)
                method_name = {"rtn": "RTN", "gptq": "GPTQ"}.get(method, f"learned ({args.adaround_iters} it)")
                print(f"| {label} | {method_name} | {sqnr_db(reference, approx):.2f} | "
                      f"{sqnr_db(reference[high], approx[high]):.2f} | {sqnr_db(reference[low], approx[low]):.2f} | "
                      f"{elapsed:.1f} | {fp_t * 1e3:.1f} | {q_t * 1e3:.1f} | {ratio:.2f} |", flush=True)
                if label == "W8A8" and method == "rtn":
                    profiled = model
                del model
        if args.profile and profiled is not None:
            print(f"\n### profile of one FP forward ({name})\n\n```")
            print(profile_forward(work.model, work.timing_batch, device))
            print(f"```\n\n### profile of one W8A8 fake-quant forward ({name})\n\n```")
            print(profile_forward(profiled, work.timing_batch, device))
            print("```")
    print(f"\ntotal wall time {time.perf_counter() - began:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default="tiny,fmnist,cifar10", help="comma-separated: tiny, fmnist, cifar10")
    parser.add_argument("--rtn-settings", default=",".join(label for label, *_ in SETTINGS),
                        help="settings run with round-to-nearest (comma-separated; '' for none)")
    parser.add_argument("--gptq-models", default="tiny,fmnist",
                        help="models that also get GPTQ rounding (comma-separated; '' for none)")
    parser.add_argument("--gptq-settings", default="W8A8,W4A8,W4,W8A8 dynamic,W4A8 dynamic",
                        help="settings that also get GPTQ rounding (comma-separated)")
    parser.add_argument("--adaround-iters", type=int, default=200, help="learned-rounding steps per block")
    parser.add_argument("--adaround-models", default="tiny",
                        help="models that also get learned rounding (comma-separated; '' for none)")
    parser.add_argument("--adaround-settings", default="W4A8,W4",
                        help="settings that also get learned rounding (comma-separated, e.g. W8A8,W4A8)")
    parser.add_argument("--cifar-samples", type=int, default=16, help="calibration trajectories, full-size model")
    parser.add_argument("--cifar-kept", type=int, default=10, help="kept DDIM steps per trajectory, full-size model")
    parser.add_argument("--timing-batch", type=int, default=16, help="batch size of the timed forwards")
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards per model (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--profile", action="store_true", help="profile one FP and one W8A8 forward per model")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
