"""Speed and memory of quantized execution against FP32, each model in one run (issue 16).

Per model: seconds per denoiser call at each batch size for FP32, bf16, fake-quant and the int8 backend
(W8A8 with asymmetric and with symmetric weights, and W4A8), weight and activation memory, artifact size
against the FP32 safetensors file and load time (:func:`tacdiff.speed.measure_speed`, also ``tacdiff
bench-speed``). Models: the bundled pixel model, the bundled latent reference UNet and DiT (``--pipelines
latent-reference dit-reference``, or any pipeline folder), and the full-size ``google/ddpm-cifar10-32`` and
Stable Diffusion 1.5 UNet configs (random weights). ``--kernels`` times the int8 kernel candidates on single
layers; ``--end-to-end`` times ``tacdiff sample``'s sampling FP32 against int8 with TAC tables on the
bundled model, with the x0 PSNR the int8 images reach and its gap to the fake model's (bootstrap interval).

Usage: python benchmarks/speed.py [--models reference cifar10 sd15] [--pipelines SPEC ...] [--kernels]
       [--end-to-end [--end-to-end-seed S] [--end-to-end-bits w8a8-sym] [--end-to-end-untimed]] [--batches N ...]
       [--bits w8a8 ...] [--sd-latent 64] [--quantize-embeddings] [--markdown benchmarks/results/speed.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tacdiff.devices import machine_line
from tacdiff.host_memory import OPT_OUT, keep_freed_memory
from tacdiff.io.atomic import write_text_atomically
from tacdiff.speed import SETTINGS, format_speed_markdown, measure_speed, model_for_speed

CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "configs"
MODELS = {"reference": ("reference", (1, 8, 64)), "cifar10": (CONFIGS / "ddpm-cifar10-32" / "unet", (1, 8, 64)),
          # batch 64 of the SD UNet takes minutes per call on two cores; its latents are 32x32 by default (256x256
          # images; --sd-latent 64 for the config's own 512x512)
          "sd15": (CONFIGS / "sd-1.5-unet", (1, 8))}
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")  # set: named in the header
DEPRECATED = "needs quantized tensors (PyTorch 2.13 warns: deprecated)"


def _best_ms(fn: Callable[[], object], repeats: int = 5, min_seconds: float = 1.0) -> float:
    """Fastest of at least ``repeats`` calls after one warm-up, more (up to 100) until ``min_seconds`` are timed."""
    fn()
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < 100):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def kernel_table() -> str:
    """int8 kernel candidates on one 3x3 convolution and one linear layer each, quantize/dequantize included."""
    from tacdiff.backends.codes import activation_codes, unsigned_codes
    from tacdiff.backends.int_mm import Int8Matmul
    from tacdiff.backends.onednn import OneDNNConv2d

    lines = ["| layer | kernel | ms | x fp32 | note |", "|---|---|---|---|---|"]
    for n, c, h in ((8, 128, 32), (8, 320, 32)):
        x, weight = torch.randn(n, c, h, h), torch.randn(c, c, 3, 3)
        codes, w_scale = torch.randint(0, 256, (c, c, 3, 3)), torch.rand(c) * 0.01 + 1e-3
        scale, zero = torch.tensor(0.05), torch.tensor(128.0)
        onednn = OneDNNConv2d(codes, torch.full((c,), 128.0), w_scale, None, (1, 1), (1, 1), (1, 1))
        ao = torch.ao.nn.quantized.Conv2d(c, c, 3, padding=1)
        ao.set_weight_bias(torch.quantize_per_channel(weight, w_scale, torch.zeros(c, dtype=torch.long), 0,
                                                      torch.qint8), None)

        def ao_conv() -> torch.Tensor:
            return ao(torch.quantize_per_tensor(x, 0.05, 128, torch.quint8)).dequantize()
        matmul = Int8Matmul(codes.reshape(c, -1).t(), torch.full((c,), 128.0), w_scale, None)

        def im2col() -> torch.Tensor:
            a, r = activation_codes(x, scale, zero, 8)
            padded = F.pad(a.contiguous(memory_format=torch.channels_last), (1, 1, 1, 1)).permute(0, 2, 3, 1)
            s_n, s_h, s_w, s_c = padded.stride()
            patches = padded.as_strided((n, h, h, 3, 3, c), (s_n, s_h, s_w, s_h, s_w, s_c)).reshape(-1, 9 * c)
            return matmul(patches, scale, r)

        fp32 = _best_ms(lambda: F.conv2d(x, weight, padding=1))
        label = f"conv {c}->{c} 3x3, {n}x{h}x{h}"
        for name, fn, note in (
                ("fp32 F.conv2d", lambda: F.conv2d(x, weight, padding=1), ""),
                ("oneDNN qconv2d_pointwise", lambda: onednn(unsigned_codes(x, scale, zero, 8), 0.05, 128),
                 "chosen for convolutions"),
                ("torch.ao.nn.quantized.Conv2d", ao_conv, DEPRECATED),
                ("torch._int_mm on im2col patches", im2col, "")):
            ms = _best_ms(fn)
            lines.append(f"| {label} | {name} | {ms:.2f} | {fp32 / ms:.2f} | {note} |")
    for m, k in ((8192, 320), (2048, 1280)):
        x, weight, int8_linear, onednn = _linear_case(m, k)
        scale, zero = torch.tensor(0.05), torch.tensor(128.0)
        dynamic = torch.ao.nn.quantized.dynamic.Linear(k, k)
        packed = torch.ops.aten._weight_int8pack_mm
        w_int8, w_scales = torch.randint(-128, 127, (k, k), dtype=torch.int8), torch.rand(k)
        fp32 = _best_ms(lambda: F.linear(x, weight))
        label = f"linear {k}->{k}, {m} rows"
        for name, fn, note in (
                ("fp32 F.linear", lambda: F.linear(x, weight), ""),
                ("torch._int_mm", lambda: int8_linear(x), "chosen for linear layers with dynamic ranges"),
                ("oneDNN qlinear_pointwise", lambda: onednn(unsigned_codes(x, scale, zero, 8), 0.05, 128),
                 "chosen for linear layers with calibrated ranges"),
                ("torch.ao dynamic int8 Linear", lambda: dynamic(x), f"{DEPRECATED}; one dynamic range per call"),
                ("torch._weight_int8pack_mm", lambda: packed(x, w_int8, w_scales), "weight-only int8")):
            ms = _best_ms(fn)
            lines.append(f"| {label} | {name} | {ms:.2f} | {fp32 / ms:.2f} | {note} |")
        for name, ms, note in _compiled_in_child(m, k):
            lines.append(f"| {label} | {name} | {ms:.2f} | {fp32 / ms:.2f} | {note} |" if ms is not None else
                         f"| {label} | {name} | - | - | {note} |")
    if importlib.util.find_spec("torchao") is None:
        lines.append("\ntorchao is not installed: its rows are missing (`pip install -c constraints.txt -e \".[bench]\"`).")
    return "\n".join(lines)


def _linear_case(m: int, k: int) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor], nn.Module]:
    """One linear layer's input ``(m, k)``, FP32 weight, tacdiff's int8 layer on ``torch._int_mm`` (quantize, GEMM,
    epilogue) and its oneDNN twin: seeded, so that a child process builds the same."""
    from tacdiff.backends.codes import activation_codes
    from tacdiff.backends.int_mm import Int8Matmul
    from tacdiff.backends.onednn import OneDNNLinear

    generator = torch.Generator().manual_seed(m + k)
    x, weight = torch.randn(m, k, generator=generator), torch.randn(k, k, generator=generator)
    codes, w_scale = torch.randint(0, 256, (k, k), generator=generator), torch.rand(k, generator=generator) * 0.01
    matmul = Int8Matmul(codes, torch.full((k,), 128.0), w_scale, None)
    scale, zero = torch.tensor(0.05), torch.tensor(128.0)

    def int8_linear(rows: torch.Tensor) -> torch.Tensor:
        return matmul(activation_codes(rows, scale, zero, 8)[0], scale, zero - 128)
    return x, weight, int8_linear, OneDNNLinear(codes.t(), torch.full((k,), 128.0), w_scale, None)


def _compiled_in_child(m: int, k: int) -> list[tuple[str, float | None, str]]:
    """:func:`_compiled_linears` timed in a child process (``(name, ms, note)`` rows): Inductor's compiled int8 GEMM
    aborted the whole process with a double free on an AMD EPYC with AVX-512 VNNI (torch 2.13), and one candidate
    must not take the table down."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_time_compiled, args=(m, k, queue))
    child.start()
    child.join()
    if child.exitcode != 0:
        return [("torch.compile candidates", None, f"the child process timing them died (exit code {child.exitcode}): "
                 "a fault in PyTorch's compiled kernel on this machine")]
    return queue.get()


def _time_compiled(m: int, k: int, queue: multiprocessing.Queue) -> None:
    x, weight, int8_linear, _ = _linear_case(m, k)
    queue.put([(name, _best_ms(fn), note) for name, fn, note in _compiled_linears(x, weight, int8_linear)])


def _compiled_linears(x: torch.Tensor, weight: torch.Tensor, int8_linear: Callable[[torch.Tensor], torch.Tensor]
                      ) -> list[tuple[str, Callable[[], object], str]]:
    """Linear-layer candidates under ``torch.compile`` (Inductor's x86 C++ backend): tacdiff's own
    quantize + ``torch._int_mm`` + epilogue (``int8_linear``), and torchao's int8 dynamic-activation config when
    torchao is installed (``pip install -c constraints.txt -e ".[bench]"``). Each compiles in its warm-up call."""
    ours = torch.compile(int8_linear)
    rows = [("torch._int_mm, torch.compile", lambda: ours(x), "tacdiff's layer compiled (quantize, epilogue fused)")]
    try:
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return rows
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    quantize_(linear, Int8DynamicActivationInt8WeightConfig())
    compiled = torch.compile(linear)
    return rows + [("torchao int8 dynamic, torch.compile", lambda: compiled(x),
                    f"torchao {torchao.__version__}: its own recipe (per-token dynamic activations, symmetric weights)")]


def end_to_end(samples: int = 64, batch: int = 64, steps: int = 50, psnr_batches: tuple[int, ...] = (),
               setting: str = "w8a8", seed: int = 1, timed: bool = True) -> str:
    """Sampling time of the bundled model, FP32 against ``setting`` + TAC on the fake and the int8 backend (each
    sampled alone, at ``batch``), and the x0 PSNR against FP (paired run) of each backend with TAC tables fitted
    on either backend, on images held out from the tables' calibration, with each row's PSNR gap to the fake
    backend with fake-fitted tables (same images) and its 95% bootstrap interval over images; with
    ``psnr_batches``, also at those batch sizes (only the float summation order changes) with the tables of the
    backend's own. ``seed``: the images' (the tables are fitted on seed 0). Without ``timed``, only the x0 PSNR of
    each backend with its own tables (no timing passes, no cross-backend tables: a third of the sampling, for
    larger image counts)."""
    from tacdiff.correction.workflow import calibrate_artifact
    from tacdiff.evaluation import evaluate
    from tacdiff.metrics import psnr_gap
    from tacdiff.models.reference import REFERENCE_MODEL_DIR
    from tacdiff.quant.config import QuantConfig, parse_setting
    from tacdiff.workflows import CalibrationSettings, quantize_dir

    weight_bits, act_bits, symmetric = parse_setting(setting)
    backends, calibration_samples, calibration_seed = ("fake", "int8"), 64, 0
    if seed == calibration_seed:
        raise ValueError(f"seed {seed} is the tables' calibration seed; evaluate on held-out images (another seed)")
    lines = [f"DDIM {steps}, {samples} images (seed {seed}; the tables were fitted on {calibration_samples} "
             f"trajectories of seed {calibration_seed}), batch {batch} unless noted; gap: x0 PSNR minus the fake "
             "backend's with fake-fitted tables on the same images, [95% bootstrap interval over images]", "",
             "| model | backend | tables fitted on | sampling s | x fp32 | x0 PSNR dB | gap dB |",
             "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="tacdiff-e2e-") as tmp:
        artifact = Path(tmp) / setting
        quantize_dir(REFERENCE_MODEL_DIR, artifact, QuantConfig(weight_bits=weight_bits, act_bits=act_bits,
                                                                weight_symmetric=symmetric),
                     calibration=CalibrationSettings(64, 50, 25, 0), progress=False)
        tables = {backend: Path(tmp) / f"tac-{backend}.safetensors" for backend in backends}
        for backend, path in tables.items():
            calibrate_artifact(artifact, "reference", path, steps=steps, samples=calibration_samples,
                               seed=calibration_seed, backend=backend, progress=False)
        common = dict(steps=steps, samples=samples, seed=seed, progress=False)
        if timed:
            fp_seconds = evaluate("reference", batch_size=batch, **common)["sampling_seconds"]
            lines.append(f"| reference | fp32 | - | {fp_seconds:.1f} | 1.00 | - | - |")
        base = None
        for backend in backends:
            if timed:
                seconds = evaluate(artifact, tables=tables[backend], backend=backend, batch_size=batch,
                                   **common)["sampling_seconds"]
            fitted_on = backends if timed else (backend,)
            runs = [(fitted, batch) for fitted in fitted_on] + [(backend, size) for size in psnr_batches]
            for fitted, size in runs:
                timing = (f"{seconds:.1f} | {fp_seconds / seconds:.2f}" if timed and (fitted, size) == (backend, batch)
                          else "- | -")
                paired = evaluate(artifact, fp_model="reference", tables=tables[fitted], backend=backend,
                                  batch_size=size, **common)
                base = base or paired["x0_mse_per_image"]  # the first row: fake backend, fake-fitted tables
                gap = "%+.2f [%+.2f, %+.2f]" % psnr_gap(base, paired["x0_mse_per_image"])
                note = "" if size == batch else f" (batch {size})"
                lines.append(f"| {setting.upper()} + TAC | {backend}{note} | {fitted} | {timing} | "
                             f"{paired['x0_psnr']:.2f} | {gap} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--pipelines", nargs="*", default=[], help="bundled pipeline names or pipeline folders to "
                        "time too (their denoisers, at batch 1, 8 and 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", help="Instead of each model's batch sizes.")
    parser.add_argument("--bits", nargs="+", default=list(SETTINGS), help="Quantized settings to time.")
    parser.add_argument("--sd-latent", type=int, default=32, help="Latent side of the SD 1.5 UNet (its config: 64).")
    parser.add_argument("--quantize-embeddings", action="store_true", help="Quantize embedding tables too.")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="Skip the bf16 rows (minutes per call on "
                        "CPUs without native bf16, e.g. AVX2).")
    parser.add_argument("--kernels", action="store_true")
    parser.add_argument("--end-to-end", action="store_true")
    parser.add_argument("--end-to-end-samples", type=int, default=64, help="Images per end-to-end row (batch 64).")
    parser.add_argument("--end-to-end-bits", default="w8a8", help="Quantized setting of the end-to-end rows, e.g. "
                        "w8a8-sym (symmetric weights).")
    parser.add_argument("--end-to-end-seed", type=int, default=1, help="Seed of the end-to-end images (not 0: "
                        "the tables' calibration seed).")
    parser.add_argument("--end-to-end-psnr-batches", type=int, nargs="*", default=[],
                        help="Further batch sizes for the end-to-end x0 PSNR of both backends (no timing).")
    parser.add_argument("--end-to-end-untimed", action="store_true",
                        help="Only each backend's x0 PSNR with its own tables (no timing, no cross-backend tables).")
    parser.add_argument("--default-allocator", action="store_true", help="Leave glibc's allocator as it is (by "
                        "default freed memory is kept for the next call, as the tacdiff command line and use_backend "
                        "keep it): sets TACDIFF_KEEP_FREED_MEMORY=0.")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.default_allocator:
        os.environ[OPT_OUT] = "0"  # use_backend keeps freed memory too, unless told not to
    else:
        keep_freed_memory()

    caps = "".join(f"{name}={os.environ[name]} " for name in ISA_CAPS if name in os.environ)
    header = (f"`{caps}python {' '.join(sys.argv)}` on {time.strftime('%Y-%m-%d')}. Machine: {machine_line()}. "
              "Speed-ups are against FP32 at the same batch size in this run.")
    sections, report = [header], {"calls": [], "artifacts": []}
    specs = [(name, *MODELS[name]) for name in args.models]
    specs[1:1] = [(Path(spec).name, spec, (1, 8, 64)) for spec in args.pipelines]
    for name, spec, batches in specs:
        model = model_for_speed(spec)
        if name == "sd15":
            model.register_to_config(sample_size=args.sd_latent)
        part = measure_speed(name, model, bits=tuple(args.bits), batches=tuple(args.batches or batches),
                             repeats=args.repeats, quantize_embeddings=args.quantize_embeddings, bf16=args.bf16)
        for key in report:
            report[key] += part[key]
        print(format_speed_markdown(part), flush=True)
        del model
    if report["calls"]:
        sections.append(format_speed_markdown(report))
    if args.kernels:
        sections.append(kernel_table())
        print(sections[-1], flush=True)
    if args.end_to_end:
        sections.append(end_to_end(args.end_to_end_samples, psnr_batches=tuple(args.end_to_end_psnr_batches),
                                   setting=args.end_to_end_bits, seed=args.end_to_end_seed,
                                   timed=not args.end_to_end_untimed))
        print(sections[-1], flush=True)
    text = "\n\n".join(sections) + "\n"
    if args.markdown:
        write_text_atomically(args.markdown, text)
    if args.json:
        write_text_atomically(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
