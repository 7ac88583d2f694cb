"""Scale check on a DiT-XL/2-sized transformer (28 layers, width 1152, patch 2, 32x32 latents, 1000 classes;
random weights): `tacdiff quantize` (W8A8) and `tacdiff calibrate` (TAC) on its model folder, with seconds per
stage and the process's peak resident memory, as `benchmarks/sd_scale.py` does for the SD 1.5 UNet.

Usage: python benchmarks/dit_scale.py [--samples 2] [--steps 2] [--batch-size 1] [--device cpu]
       [--markdown benchmarks/results/dit_scale.md]

Nothing is downloaded: the model is built from DiT-XL/2's published shape (Peebles & Xie, ICCV 2023) with seeded
random weights and saved with ``save_pretrained``; the stages are the command line's own functions
(``quantize_dir``, ``calibrate_artifact``). Classes are drawn as sample index mod 1000, unguided. Peak memory is
``ru_maxrss`` after each stage (a running maximum).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

from sd_scale import Stages, quantize_and_calibrate, scale_parser
from tacdiff.workflows import CalibrationSettings

DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def main() -> None:
    args = scale_parser(__doc__).parse_args()
    stages = Stages()
    settings = CalibrationSettings(args.samples, args.steps, args.steps, 0, args.batch_size)
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "dit"
        started = time.perf_counter()
        torch.manual_seed(0)
        model = DiTTransformer2DModel(**DIT_XL_2).eval()
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder)
        del model
        stages.done(f"build and save the model ({params / 1e6:.0f}M parameters)", started)

        quantize_and_calibrate(stages, folder, Path(work), settings, args, trajectories="trajectories",
                               inputs=f"{args.samples} x {args.steps} DDIM steps of inputs")
    stages.report("DiT-XL/2-sized DiTTransformer2DModel, random weights, 32x32x4 latents", args)


if __name__ == "__main__":
    main()
