"""Throughput of ``tacdiff quantize`` and ``calibrate`` (trajectories/s) and ``eval`` (images/s) at 1..N processes.

Every run is the real command started by ``torchrun`` (``python -m torch.distributed.run --standalone``), as a user
starts it; the wall time includes start-up (imports, model loading, the process group), which a longer run
amortises. Each configuration is named ``P x T``: P processes with T threads each. On the 2-core CPU the fair
comparison is 1 x 2 against 2 x 1 (the same cores); 1 x 1 shows the per-process cost. The outputs of every
configuration are compared with the first one's (artifacts, tables and metrics must be equal at the same thread
count).

    python benchmarks/scale.py --configs 1x1 1x2 2x1 --out benchmarks/results/scale_cpu
    python benchmarks/scale.py --device cuda:0 --configs 1x4 2x4 4x4   # processes sharing one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from tacdiff.io.atomic import write_text_atomically
from tacdiff.models.reference import REFERENCE_MODEL_DIR

ROOT = Path(__file__).resolve().parent


def run(processes: int, threads: int, *args: str) -> float:
    """Wall seconds of ``tacdiff ARGS`` under torchrun with ``processes`` x ``threads``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "tacdiff", *args, "--quiet"]
    started = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def measure(config: str, work: Path, args: argparse.Namespace) -> dict[str, object]:
    processes, threads = (int(part) for part in config.split("x"))
    folder = work / config
    artifact, tables = folder / "artifact", folder / "tables.safetensors"
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--device", args.device]
    quantize_seconds = run(processes, threads, "quantize", str(REFERENCE_MODEL_DIR), "--out", str(artifact),
                           "--w-bits", str(args.w_bits), "--weight-rounding", args.weight_rounding,
                           "--calib-samples", str(args.quant_samples), "--calib-steps", str(args.steps),
                           "--calib-kept-steps", str(min(10, args.steps)), "--batch-size", str(args.batch_size),
                           "--device", args.device)
    calib_seconds = run(processes, threads, "calibrate", str(artifact), "--fp-model", "reference", "--out",
                        str(tables), "--samples", str(args.calib_samples), *common)
    eval_json = folder / "eval.json"
    eval_seconds = run(processes, threads, "eval", str(artifact), "--fp-model", "reference", "--tables", str(tables),
                       "--samples", str(args.samples), *common, "--json", str(eval_json))
    scores = json.loads(eval_json.read_text())
    return {"config": config, "processes": processes, "threads": threads, "quantize_seconds": quantize_seconds,
            "artifact": load_file(str(artifact / "quantized.safetensors")), "calibrate_seconds": calib_seconds,
            "trajectories_per_s": args.calib_samples / calib_seconds,
            "eval_seconds": eval_seconds, "images_per_s": args.samples / eval_seconds,
            "eval_sampling_seconds": scores["sampling_seconds"],
            "fid": scores["fid"], "x0_psnr": scores["x0_psnr"], "tables": load_file(str(tables))}


def _equal(a: dict, b: dict) -> bool:
    """Whether two tables files hold the same tensors, bit for bit (their headers' key order varies)."""
    return a.keys() == b.keys() and all(bool((a[key] == b[key]).all()) for key in a)


def gpu_name(device: str) -> str:
    """``", GPU NAME"`` when ``device`` is a CUDA device, else nothing."""
    if not device.startswith("cuda"):
        return ""
    import torch

    return f", {torch.cuda.get_device_name(torch.device(device))}"


def markdown(rows: list[dict[str, object]], args: argparse.Namespace) -> str:
    base = rows[0]
    lines = [f"`benchmarks/scale.py`: bundled model quantized W{args.w_bits}A8 ({args.weight_rounding} weights, "
             f"{args.quant_samples} trajectories) + TAC, DDIM {args.steps}, batch size {args.batch_size}; calibrate "
             f"{args.calib_samples} trajectories, eval {args.samples} images (paired with FP) on {args.device}. Wall "
             f"time of the whole command, start-up included. Machine: {os.cpu_count()} CPUs{gpu_name(args.device)}.",
             "", f"| processes x threads | quantize s | calibrate s | trajectories/s | eval s | images/s | speed-up vs "
                 f"{base['config']} (quantize / calibrate / eval) | FID | x0 PSNR | artifact and tables equal to "
                 "(first run at these threads) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        same = next(other for other in rows if other["threads"] == row["threads"])
        speedups = " / ".join(f"{base[key] / row[key]:.2f}x"
                              for key in ("quantize_seconds", "calibrate_seconds", "eval_seconds"))
        equal = _equal(row["artifact"], same["artifact"]) and _equal(row["tables"], same["tables"])
        lines.append(f"| {row['config']} | {row['quantize_seconds']:.1f} | {row['calibrate_seconds']:.1f} | "
                     f"{row['trajectories_per_s']:.2f} | {row['eval_seconds']:.1f} | {row['images_per_s']:.2f} | "
                     f"{speedups} | {row['fid']:.3f} | {row['x0_psnr']:.3f} | {equal} ({same['config']}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["1x1", "1x2", "2x1"], help="PROCESSESxTHREADS each.")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--weight-rounding", default="gptq", choices=["rtn", "gptq"])
    parser.add_argument("--quant-samples", type=int, default=64, help="Calibration trajectories of quantize.")
    parser.add_argument("--device", default="cpu", help="cuda: one GPU per process (cuda:LOCAL_RANK); cuda:0: "
                        "every process on GPU 0.")
    parser.add_argument("--out", type=Path, help="Write OUT.md and OUT.json.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for config in args.configs:
            rows.append(measure(config, Path(tmp), args))
            print({k: v for k, v in rows[-1].items() if k not in ("artifact", "tables")}, flush=True)
    table = markdown(rows, args)
    print(table)
    if args.out:
        write_text_atomically(args.out.with_suffix(".md"), table + "\n")
        for row in rows:
            row.pop("artifact"), row.pop("tables")
        write_text_atomically(args.out.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
