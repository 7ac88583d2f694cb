"""What keeping freed memory (:func:`tacdiff.host_memory.keep_freed_memory`) is worth: FP32 and int8 per call, and
page faults per call, with glibc's allocator kept and left as it is, in alternating fresh processes.

Each round starts one child process per allocator mode (their order alternates between rounds, so that a machine
growing busier does not favour one mode). A child times FP32 and the int8 backend in turns (fastest call of each
after a warm-up) and counts the minor page faults of further calls; the parent prints every round and the medians.

Usage: python benchmarks/allocator.py [--models reference cifar10 sd15] [--bits w4a8] [--batch 8] [--rounds 3]
       [--calls 8] [--sd-latent 32] [--markdown benchmarks/results/allocator.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("kept", "default")
HERE = Path(__file__).resolve().parent


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child(model: str, setting: str, batch: int, mode: str, calls: int, sd_latent: int) -> dict[str, float]:
    """One fresh process's measurement of ``model`` (a name of ``benchmarks/speed.py`` or a model folder)."""
    from tacdiff.host_memory import OPT_OUT, keep_freed_memory

    if mode == "default":
        os.environ[OPT_OUT] = "0"  # use_backend would keep it otherwise
    elif not keep_freed_memory():
        raise SystemExit("glibc's allocator is not available here: nothing to compare")
    import torch

    from tacdiff.backends import use_backend
    from tacdiff.models.kinds import example_inputs
    from tacdiff.speed import model_for_speed, quantized_for_timing

    from speed import MODELS  # benchmarks/speed.py's model names

    fp = model_for_speed(str(MODELS[model][0]) if model in MODELS else model).eval()
    if model == "sd15":
        fp.register_to_config(sample_size=sd_latent)
    int8 = quantized_for_timing(fp, setting)
    use_backend(int8, "int8")
    x, t, cond = example_inputs(fp, batch)
    x = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    models = {"fp32": fp, "int8": int8}
    seconds = {name: float("inf") for name in models}
    faults = dict.fromkeys(models, 0.0)
    with torch.no_grad():
        for model in models.values():
            model(x, timestep=t, **cond)
        for _ in range(calls):  # in turns, so that both see the same machine
            for name, model in models.items():
                start = time.perf_counter()
                model(x, timestep=t, **cond)
                seconds[name] = min(seconds[name], time.perf_counter() - start)
        for name, model in models.items():
            before = _faults()
            for _ in range(3):
                model(x, timestep=t, **cond)
            faults[name] = (_faults() - before) / 3
    return {**{f"{k}_s": v for k, v in seconds.items()}, **{f"{k}_faults": v for k, v in faults.items()}}


def run_child(model: str, args: argparse.Namespace, mode: str) -> dict[str, float]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--models", model, "--bits", args.bits,
               "--batch", str(args.batch), "--calls", str(args.calls), "--sd-latent", str(args.sd_latent)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child {mode} for {model} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(model: str, rounds: list[dict[str, dict[str, float]]], args: argparse.Namespace) -> str:
    lines = [f"{model}, {args.bits.upper()}, batch {args.batch}:", "",
             "| round | allocator | FP32 s/call | int8 s/call | int8 x FP32 | FP32 faults/call | int8 faults/call |",
             "|---|---|---|---|---|---|---|"]
    for label, picked in [*((str(i + 1), r) for i, r in enumerate(rounds)), ("median", _medians(rounds))]:
        for mode in MODES:
            m = picked[mode]
            lines.append(f"| {label} | {mode} | {m['fp32_s']:.4f} | {m['int8_s']:.4f} | "
                         f"{m['fp32_s'] / m['int8_s']:.2f}x | {m['fp32_faults']:.0f} | {m['int8_faults']:.0f} |")
    return "\n".join(lines)


def _medians(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {mode: {key: statistics.median(r[mode][key] for r in rounds) for key in rounds[0][mode]} for mode in MODES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["reference", "cifar10"])
    parser.add_argument("--bits", default="w4a8")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=8, help="Timed calls per variant and child.")
    parser.add_argument("--sd-latent", type=int, default=32, help="Latent side of the SD 1.5 UNet (its config: 64).")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(HERE))
        print(json.dumps(child(args.models[0], args.bits, args.batch, args.child, args.calls, args.sd_latent)))
        return
    from tacdiff.devices import machine_line
    from tacdiff.io.atomic import write_text_atomically

    sections = [f"`python {' '.join(sys.argv)}` on {time.strftime('%Y-%m-%d')}. Machine: {machine_line()} (the "
                "parent; each child sets its own allocator). Fastest of the timed calls; faults: minor page faults "
                "per call, averaged over 3 calls after the timing."]
    for model in args.models:
        rounds = []
        for i in range(args.rounds):
            order = MODES if i % 2 == 0 else MODES[::-1]
            rounds.append({mode: run_child(model, args, mode) for mode in order})
        sections.append(table(model, rounds, args))
        print(sections[-1], flush=True)
    if args.markdown:
        write_text_atomically(args.markdown, "\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
