"""Speed and memory of one model's execution variants, measured side by side in one process.

Variants: ``fp32`` and ``bf16`` (the float model), ``fake`` (quantized, simulated in float) and ``int8``
(the same quantized model on :mod:`tacdiff.backends`' integer kernels). Each is timed per denoiser call at
every batch size; speed-ups are against ``fp32`` at the same batch size in the same run, so machine load
shifts both sides alike. Weight memory is the bytes of the variant's parameters and buffers; activation
memory the peak resident memory of the process during its timed calls above the level before them.
Quantization here is for timing only: weight ranges by min-max and activation ranges from one batch of
random inputs (the speed of a layer does not depend on its ranges).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from tacdiff.backends import backend_counts, use_backend
from tacdiff.models.kinds import MODEL_KINDS, example_inputs, sample_shape_of
from tacdiff.quant.apply import quantize
from tacdiff.quant.config import QuantConfig
from tacdiff.sampling.calibration import CalibrationSet

VARIANTS = ("fp32", "bf16", "fake", "int8")


@dataclass
class SpeedRow:
    """One variant at one batch size: seconds per call (median), speed-up over fp32, memory in MiB."""

    model: str
    variant: str
    bits: str
    batch: int
    seconds: float
    speedup: float
    weight_mib: float
    weight_ratio: float
    activation_mib: float
    placement: str


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def random_calibration(model: nn.Module, samples: int = 2, seed: int = 0) -> CalibrationSet:
    """Gaussian model inputs at t=500 with random conditioning: ranges good enough for timing."""
    x, t, cond = example_inputs(model, samples)
    generator = torch.Generator().manual_seed(seed)
    cond = {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v for k, v in cond.items()}
    return CalibrationSet(torch.randn(x.shape, generator=generator), t, cond)


def quantized_for_timing(fp: nn.Module, weight_bits: int, act_bits: int) -> nn.Module:
    """A fake-quant copy of ``fp`` (min-max weight ranges, activation ranges from random inputs)."""
    config = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, weight_range="minmax", act_range="minmax")
    return quantize(copy.deepcopy(fp), config, random_calibration(fp), progress=False)


@contextmanager
def peak_rss_above_start() -> Iterator[list[float]]:
    """Yields a one-item list that holds, on exit, the peak resident MiB above the level at entry
    (``/proc/self/statm`` polled every 2 ms; 0 where it is not available)."""
    result = [0.0]
    start, peak, done = _rss_bytes(), [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            done.wait(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result[0] = max(0, max(peak[0], _rss_bytes()) - start) / 2**20


def _rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


@torch.no_grad()
def seconds_per_call(model: nn.Module, batch: int, repeats: int = 3, dtype: torch.dtype = torch.float32
                     ) -> tuple[float, float]:
    """Median seconds of ``repeats`` calls after one warm-up, and the peak activation MiB while calling."""
    x, t, cond = example_inputs(model, batch)
    x = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
    times = []
    with peak_rss_above_start() as activation:
        model(x, t, **cond)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, t, **cond)
            times.append(time.perf_counter() - start)
    return statistics.median(times), activation[0]


def measure_speed(name: str, fp: nn.Module, *, bits: tuple[tuple[int, int], ...] = ((8, 8), (4, 8)),
                  batches: tuple[int, ...] = (1, 8, 64), repeats: int = 3, progress: bool = True
                  ) -> list[dict[str, Any]]:
    """Time every variant of ``fp`` (a registered denoiser in fp32 on the CPU) at every batch size.

    ``bits`` are the (weight, activation) settings quantized for ``fake`` and ``int8``; ``fp32`` and
    ``bf16`` rows carry ``bits="fp"``. Returns :class:`SpeedRow` dicts, fp32 first at each batch size.
    """
    fp_bytes = weight_bytes(fp)
    variants: list[tuple[str, str, nn.Module, torch.dtype, str]] = [
        ("fp32", "fp", fp, torch.float32, ""), ("bf16", "fp", copy.deepcopy(fp).to(torch.bfloat16), torch.bfloat16, "")]
    for w_bits, a_bits in bits:
        fake = quantized_for_timing(fp, w_bits, a_bits)
        int8 = copy.deepcopy(fake)
        placement = backend_counts(use_backend(int8, "int8"))
        variants += [("fake", f"w{w_bits}a{a_bits}", fake, torch.float32, ""),
                     ("int8", f"w{w_bits}a{a_bits}", int8, torch.float32, placement)]
    rows: list[SpeedRow] = []
    steps = tqdm(total=len(variants) * len(batches), desc=f"speed {name}", disable=not progress)
    for batch in batches:
        baseline = None
        for variant, label, model, dtype, placement in variants:
            gc.collect()
            seconds, activation = seconds_per_call(model, batch, repeats, dtype)
            baseline = seconds if baseline is None else baseline
            weights = weight_bytes(model)
            rows.append(SpeedRow(name, variant, label, batch, seconds, baseline / seconds, weights / 2**20,
                                 weights / fp_bytes, activation, placement))
            steps.update()
    steps.close()
    return [asdict(row) for row in rows]


def format_speed_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| model | variant | bits | batch | s/call | x fp32 | weights MiB | x fp32 weights | activations MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['bits']} | {r['batch']} | {r['seconds']:.4f} | "
                     f"{r['speedup']:.2f} | {r['weight_mib']:.1f} | {r['weight_ratio']:.2f} | "
                     f"{r['activation_mib']:.0f} |")
    return "\n".join(lines)


def model_for_speed(spec: str | Path) -> nn.Module:
    """The fp32 denoiser of ``spec``: ``"reference"``, a diffusers model or pipeline folder, or a folder with
    only a model ``config.json`` (built with seeded random weights, e.g. ``../shared/configs/sd-1.5-unet``)."""
    from tacdiff.models.loading import load_any_model  # models.loading reaches the pipelines; load it on use

    path = Path(spec)
    config = path / "unet" / "config.json" if (path / "unet" / "config.json").is_file() else path / "config.json"
    has_weights = any(config.parent.glob("*.safetensors")) or any(config.parent.glob("*.bin"))
    if str(spec) == "reference" or not config.is_file() or has_weights:
        return load_any_model(spec).model
    record = json.loads(config.read_text())
    kind = MODEL_KINDS.get(record.get("_class_name", ""))
    if kind is None:
        raise ValueError(f"{config} describes a {record.get('_class_name')!r}; tacdiff times {', '.join(MODEL_KINDS)}")
    torch.manual_seed(0)
    model = kind.cls.from_config(record).eval()
    sample_shape_of(model)
    return model
