"""FP baseline of the bundled reference model: DDIM 50 and 100 steps, FID/KID and seconds.

    python benchmarks/fp_reference.py [--samples 5000] [--steps 50 100] [--batch-size 1000] [--device auto]

Prints the machine and a markdown table. FID/KID are on the bundled Fashion-MNIST classifier's
features against the 10,000-image test split (see ``tacdiff.metrics.fid``); the seconds are
measured after one warm-up batch, with the model already loaded.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import diffusers
import torch

from tacdiff.devices import cpu_name
from tacdiff.evaluation import evaluate


def machine(device: str) -> str:
    """One line naming the hardware and software the numbers come from."""
    parts = [f"CPU {cpu_name()} ({torch.get_num_threads()} torch threads)"]
    if torch.device(device).type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(torch.device(device))}")
    parts += [f"torch {torch.__version__}", f"diffusers {diffusers.__version__}", f"python {platform.python_version()}"]
    return ", ".join(parts)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`tacdiff.evaluation.evaluate` results."""
    lines = ["| model | sampler | steps | samples | FID | KID | KID std | sampling s | total s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| FP reference | {r['scheduler'].upper()} | {r['steps']} | {r['samples']} | {r['fid']:.3f} | "
                     f"{r['kid']:.4f} | {r['kid_std']:.4f} | {r['sampling_seconds']:.1f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    print(f"machine: {machine(device)}", flush=True)
    evaluate("reference", steps=2, samples=min(args.batch_size, args.samples), batch_size=args.batch_size,
             device=device, progress=False)  # warm-up: kernels, allocator, feature extractor
    rows = []
    for steps in args.steps:
        started = time.perf_counter()
        rows.append(evaluate("reference", scheduler="ddim", steps=steps, samples=args.samples, seed=args.seed,
                             batch_size=args.batch_size, device=device, progress=not args.quiet))
        print(f"DDIM {steps}: done in {time.perf_counter() - started:.1f} s", flush=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
