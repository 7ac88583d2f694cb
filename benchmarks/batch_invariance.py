"""How much TAC's tables and the corrected model's images move with the batch size and the thread count.

CPU kernels are not batch- or thread-invariant: the same sample computed in another batch, or with another
number of threads, can differ in the last bit, and a quantized model can turn that into a flipped rounding
that later steps amplify. tacdiff therefore shards work by whole batches (:mod:`tacdiff.distributed`): a run
is reproducible for a fixed batch size and thread count per process. This script measures what changing
either does on the bundled model: it quantizes it once (W4A8, round to nearest), fits TAC at each batch size
and thread count on the same calibration trajectories (same seeds), and reports the largest relative change
of each table against the first setting, plus the x0 PSNR of the corrected model against FP on evaluation
seeds the fit never saw (sampled at one fixed batch size and thread count, so only the tables differ).
``--backend int8`` does the same on the integer backend: its integer sums do not depend on either, but the
layers that stay float (the first convolution, the attention matmuls, normalisation) still can.

    python benchmarks/batch_invariance.py --batch-sizes 8 16 32 --threads 1 2 [--backend int8] --markdown out.md
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from tacdiff.backends import use_backend
from tacdiff.bench import quantized_copy
from tacdiff.correction import CorrectedDenoiser, CorrectionTables, calibrate_tac
from tacdiff.io.atomic import write_text_atomically
from tacdiff.metrics.paired import paired_errors
from tacdiff.models.kinds import ModelDenoiser
from tacdiff.models.reference import load_reference_model
from tacdiff.quant import QuantConfig
from tacdiff.sampling.conditioning import UNCONDITIONAL
from tacdiff.workflows import CalibrationSettings

TABLES = ("input_bias", "out_scale")


def max_relative_change(base: CorrectionTables, other: CorrectionTables) -> dict[str, float]:
    """Per table: ``max |other - base| / max |base|`` (float64)."""
    found = {}
    for name in TABLES:
        a, b = getattr(base, name).double(), getattr(other, name).double()
        found[name] = float((b - a).abs().max() / a.abs().max().clamp(min=1e-30))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64, help="Evaluation images (paired with FP).")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", choices=["fake", "int8"], default="fake")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()

    fp, ddpm = load_reference_model()
    scheduler = DDIMScheduler.from_config(ddpm.config)
    quant = quantized_copy(fp, ddpm, (4, 8), CalibrationSettings(32, args.steps, min(25, args.steps), 1),
                           UNCONDITIONAL, QuantConfig(), progress=False)
    use_backend(quant, args.backend)
    evaluation = dict(num_samples=args.samples, sample_shape=(1, 28, 28), num_inference_steps=args.steps, seed=7,
                      batch_size=32, progress=False)
    settings = [(threads, batch) for threads in args.threads for batch in args.batch_sizes]
    fitted = {}
    for threads, batch in settings:
        torch.set_num_threads(threads)
        fitted[threads, batch] = calibrate_tac(fp, quant, scheduler, num_inference_steps=args.steps,
                                               num_samples=args.calib_samples, batch_size=batch, seed=3,
                                               progress=False)
    torch.set_num_threads(args.threads[0])
    base_key = settings[0]
    lines = [f"`benchmarks/batch_invariance.py --backend {args.backend}`: bundled model W4A8 (RTN) on the "
             f"{args.backend} backend, TAC defaults fitted on "
             f"{args.calib_samples} trajectories (the same seeds), DDIM {args.steps}; x0 PSNR of the corrected "
             f"model against FP on {args.samples} evaluation images (other seeds, batch 32, "
             f"{args.threads[0]} thread). Change: max |table - table at {base_key[0]} thread(s), batch "
             f"{base_key[1]}| / max |that table|. Machine: {os.cpu_count()} CPUs, torch {torch.__version__}.", "",
             "| threads | batch size | input_bias change | out_scale change | x0 PSNR (dB) |", "|---|---|---|---|---|"]
    for key in settings:
        change = max_relative_change(fitted[base_key], fitted[key])
        errors = paired_errors(ModelDenoiser(fp, scheduler), CorrectedDenoiser(ModelDenoiser(quant, scheduler),
                                                                               fitted[key]), scheduler, **evaluation)
        lines.append(f"| {key[0]} | {key[1]} | {change['input_bias']:.3g} | {change['out_scale']:.3g} | "
                     f"{errors.x0_psnr:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        write_text_atomically(args.markdown, table + "\n")


if __name__ == "__main__":
    main()
