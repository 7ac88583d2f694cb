"""What quantizing the embedding tables costs and saves on the bundled DiT (``--quantize-embeddings``).

diffusers' ``DiTTransformer2DModel`` gives every block its own class-embedding table (27% of ``dit-reference``'s
parameters). For W8A8 and W4A8, with and without the tables quantized, this runs ``tacdiff quantize``'s own function
(``quantize_dir``: round to nearest, MSE ranges) and prints the held-out output SQNR against FP and the artifact's
size against the FP32 safetensors file (with the ``bits / 32 + 0.03`` size goal of issue 16).

Usage: python benchmarks/embedding_tables.py [--model dit-reference] [--calib-samples 32]
       [--markdown benchmarks/results/embedding_tables.md]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import tacdiff
from tacdiff.io.artifact import WEIGHTS_NAME
from tacdiff.io.atomic import write_text_atomically
from tacdiff.models.reference import bundled_folder
from tacdiff.workflows import CalibrationSettings, quantize_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dit-reference")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    folder = Path(bundled_folder(args.model))
    fp_bytes = sum(f.stat().st_size for f in (folder / "transformer").glob("*.safetensors"))
    lines = [f"`benchmarks/embedding_tables.py` on {args.model}: {args.calib_samples} calibration trajectories, "
             "round to nearest, MSE ranges.", "",
             "| bits | embedding tables | held-out SQNR dB | artifact x FP32 file | goal |", "|---|---|---|---|---|"]
    settings = CalibrationSettings(samples=args.calib_samples)
    with tempfile.TemporaryDirectory() as work:
        for bits in (8, 4):
            for tables in (False, True):
                config = tacdiff.QuantConfig(weight_bits=bits, act_bits=8, quantize_embeddings=tables)
                artifact, _, sqnr = quantize_dir(folder, Path(work) / f"w{bits}{tables}", config,
                                                 calibration=settings, progress=False)
                ratio = (artifact / WEIGHTS_NAME).stat().st_size / fp_bytes
                lines.append(f"| W{bits}A8 | {'quantized' if tables else 'float'} | {sqnr:.2f} | {ratio:.3f} | "
                             f"<= {bits / 32 + 0.03:.3f} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        write_text_atomically(args.markdown, text + "\n")


if __name__ == "__main__":
    main()
