"""Guided versus per-branch correction under classifier-free guidance, on a text-to-image pipeline folder.

    python benchmarks/guidance_fit.py PIPELINE_DIR [--bits w4a8] [--steps 20] [--guidance-scale 7.5]
           [--calib-samples 64] [--samples 64] [--prompts-file F] [--seed 0] [--markdown out.md]

Quantizes the pipeline's UNet (round to nearest, MSE ranges, calibration inputs from the guided FP
model on the prompts), then fits TAC twice on the same calibration trajectories: NER on the guided
estimate that enters the scheduler (``--guidance-fit guided``, the default) and one NER scale per
branch (``--guidance-fit branch``). All three (PTQ, TAC guided, TAC per branch) then sample the same
evaluation noise and prompts, on a seed stream the calibration never saw, paired with FP: it prints
x0 PSNR on decoded images (dB, peak-to-peak 2) and the mean squared latent error before the last step.
"""

from __future__ import annotations

import argparse
import copy
import platform
from pathlib import Path

import torch

import tacdiff
from tacdiff.quant.config import parse_bits
from tacdiff.correction import CorrectedDenoiser, calibrate_tac
from tacdiff.data.prompts import read_prompts
from tacdiff.io.atomic import write_text_atomically
from tacdiff.metrics.paired import paired_errors
from tacdiff.models.kinds import ModelDenoiser, sample_shape_of
from tacdiff.models.loading import build_scheduler, load_any_model
from tacdiff.sampling.batching import derive_seed
from tacdiff.sampling.conditioning import PromptOptions, conditioning_for
from tacdiff.workflows import CalibrationSettings, calibrate_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", type=Path)
    parser.add_argument("--bits", default="w4a8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--prompts-file", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()

    w_bits, a_bits = parse_bits(args.bits)
    loaded = load_any_model(args.pipeline)
    prompts = tuple(read_prompts(args.prompts_file)) if args.prompts_file else None
    conditioning = conditioning_for(loaded, PromptOptions(prompts, None, args.guidance_scale))
    scheduler = build_scheduler("ddim", loaded.scheduler_config)
    fp = loaded.model
    settings = CalibrationSettings(min(64, args.calib_samples), args.steps, min(25, args.steps),
                                   derive_seed(args.seed, "quantize"))
    quant = tacdiff.quantize(copy.deepcopy(fp), tacdiff.QuantConfig(weight_bits=w_bits, act_bits=a_bits),
                             calibrate_inputs(fp, scheduler, settings, conditioning), progress=False)
    fit = dict(num_inference_steps=args.steps, num_samples=args.calib_samples, batch_size=16,
               seed=derive_seed(args.seed, "calibrate"), cond=conditioning, progress=False)
    candidates = {"PTQ": ModelDenoiser(quant, scheduler)}
    for name in ("guided", "branch"):
        tables = calibrate_tac(fp, quant, scheduler, guidance_fit=name, **fit)
        candidates[f"TAC, NER fit per {'branch' if name == 'branch' else 'guided estimate'}"] = CorrectedDenoiser(
            ModelDenoiser(quant, scheduler), tables)
    reference = conditioning.guide(ModelDenoiser(fp, scheduler))
    lines = [f"{args.pipeline}, {args.bits.upper()}, DDIM {args.steps}, guidance {args.guidance_scale}, "
             f"{args.calib_samples} calibration / {args.samples} evaluation samples, seed {args.seed}, torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}", "",
             "| method | x0 PSNR dB (decoded) | latent MSE before the last step |", "|---|---|---|"]
    for name, denoiser in candidates.items():
        errors = paired_errors(reference, conditioning.guide(denoiser), scheduler, num_samples=args.samples,
                               sample_shape=sample_shape_of(fp), num_inference_steps=args.steps,
                               seed=derive_seed(args.seed, "evaluate"), batch_size=16, cond=conditioning.rows,
                               decode=loaded.decode, progress=False)
        latent = float(errors.state_sq_err[-1]) / torch.Size(sample_shape_of(fp)).numel()
        lines.append(f"| {name} | {errors.x0_psnr:.2f} | {latent:.3g} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        write_text_atomically(args.markdown, text + "\n")


if __name__ == "__main__":
    main()
