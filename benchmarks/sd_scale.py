"""Scale check on the real Stable Diffusion 1.5 UNet config (random weights): calibration inputs, W8A8
quantization and a TAC fit at 64x64 latents, with seconds per stage and the process's peak resident memory.

Usage: python benchmarks/sd_scale.py [--config ../shared/configs/sd-1.5-unet] [--latent 64] [--samples 2]
       [--steps 2] [--batch-size 1] [--device cpu] [--markdown benchmarks/results/sd_scale.md]

Nothing is downloaded: the UNet is built from its config with seeded random weights, and the text
embeddings are seeded stand-ins (77 tokens, 768 wide), as `tacdiff quantize` uses without prompts.
Peak memory is ``ru_maxrss`` after each stage (a running maximum), so it shows what each stage
added on top of the stages before it.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

import tacdiff
from tacdiff.correction import calibrate_tac
from tacdiff.sampling.conditioning import random_text_embeddings

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "configs" / "sd-1.5-unet"


def peak_rss_gib() -> float:
    """The process's peak resident set size so far, in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build_unet(config_dir: Path, latent: int) -> UNet2DConditionModel:
    config = json.loads((config_dir / "config.json").read_text())
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config({**config, "sample_size": latent}).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()

    rows = []

    def stage(name: str, started: float, per_step: int | None = None) -> None:
        seconds = time.perf_counter() - started
        rows.append((name, seconds, None if per_step is None else seconds / per_step, peak_rss_gib()))
        print(f"{name}: {seconds:.1f} s, peak RSS {rows[-1][3]:.2f} GiB", flush=True)

    started = time.perf_counter()
    fp = build_unet(args.config, args.latent).to(args.device)
    params = sum(p.numel() for p in fp.parameters())
    stage(f"build FP UNet ({params / 1e6:.0f}M parameters)", started)

    started = time.perf_counter()
    cond = random_text_embeddings(fp, args.samples, seed=0)
    calibration = tacdiff.collect_calibration_set(fp, DDPMScheduler(), num_samples=args.samples,
                                                  num_inference_steps=args.steps, kept_steps=args.steps,
                                                  batch_size=args.batch_size, cond=cond, progress=False)
    stage(f"calibration inputs ({args.samples} x {args.steps} DDIM steps)", started, args.samples * args.steps)

    started = time.perf_counter()
    quant = tacdiff.quantize(copy.deepcopy(fp), tacdiff.QuantConfig(weight_bits=8, act_bits=8), calibration,
                             batch_size=args.batch_size, progress=False)
    stage("quantize W8A8 (MSE ranges, round to nearest)", started)

    started = time.perf_counter()
    with torch.no_grad():
        calibrate_tac(fp, quant, DDIMScheduler(), num_inference_steps=args.steps, num_samples=args.samples,
                      batch_size=args.batch_size, cond=cond, progress=False)
    stage(f"TAC fit ({args.samples} paired trajectories, {args.steps} steps)", started, args.steps)

    lines = [f"SD 1.5 UNet config, random weights, {args.latent}x{args.latent} latents, batch {args.batch_size}, "
             f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}",
             "", "| stage | seconds | seconds per step | peak RSS GiB |", "|---|---|---|---|"]
    lines += [f"| {name} | {sec:.1f} | {'-' if per is None else f'{per:.1f}'} | {rss:.2f} |"
              for name, sec, per, rss in rows]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
