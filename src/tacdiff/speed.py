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
import logging
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from tacdiff.backends import backend_counts, use_backend
from tacdiff.host_memory import rss_bytes, trim_heap
from tacdiff.io.artifact import WEIGHTS_NAME, load_quantized, save_quantized
from tacdiff.models.folders import quiet_loading, read_config
from tacdiff.models.kinds import MODEL_KINDS, example_inputs, map_cond, sample_shape_of
from tacdiff.quant.apply import quant_state, quantize
from tacdiff.quant.config import QuantConfig, parse_setting, setting_label
from tacdiff.quant.layers import ActQuantizer
from tacdiff.sampling.calibration import CalibrationSet

VARIANTS = ("fp32", "bf16", "fake", "int8")
BUSY_SPREAD = 0.25
"""How much slower one of the two FP32 timings at a batch size may be than the other before the run warns."""
LOG = logging.getLogger(__name__)
QUANT_PARAMETERS = (".weight_scale", ".weight_zero_point", ".smooth")
"""Ends of the names of tensors that parametrise quantization (not the model's own weights)."""
SETTINGS = ("w8a8", "w8a8-sym", "w4a8")
"""Default quantized settings: W8A8 with asymmetric weights (the default recipe; the int8 backend adds a zero-point
channel per layer) and with symmetric ones (none needed), and W4A8 (whose centred codes always fit int8)."""


@dataclass
class SpeedRow:
    """One variant at one batch size: seconds per call (fastest of several), speed-up over fp32, memory in MiB."""

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
    fp32_spread: float = 1.0  # slower / faster of the two FP32 timings at this batch size (busy above 1 + BUSY_SPREAD)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def random_calibration(model: nn.Module, samples: int = 2, seed: int = 0) -> CalibrationSet:
    """Gaussian model inputs at t=500 with random conditioning: ranges good enough for timing."""
    x, t, cond = example_inputs(model, samples)
    generator = torch.Generator().manual_seed(seed)
    cond = map_cond(cond, lambda v: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.cpu())
    return CalibrationSet(torch.randn(x.shape, generator=generator), t.cpu(), cond)


def quantized_for_timing(fp: nn.Module, setting: str, quantize_embeddings: bool = False) -> nn.Module:
    """A fake-quant copy of ``fp`` at ``setting`` (see :func:`parse_setting`; min-max weight ranges, activation
    ranges from random inputs; embedding tables quantized too with ``quantize_embeddings``)."""
    weight_bits, act_bits, symmetric = parse_setting(setting)
    config = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, weight_symmetric=symmetric,
                         weight_range="minmax", act_range="minmax", quantize_embeddings=quantize_embeddings)
    return quantize(copy.deepcopy(fp), config, random_calibration(fp), progress=False)


@contextmanager
def peak_rss_above_start() -> Iterator[list[float]]:
    """Yields a one-item list that holds, on exit, the peak resident MiB above the level at entry
    (``/proc/self/statm`` polled every 2 ms; 0 where it is not available). Freed heap memory is handed
    back to the system first (glibc ``malloc_trim``), so that memory the calls allocate shows up."""
    result = [0.0]
    gc.collect()
    trim_heap()
    start, peak, done = rss_bytes(), [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            done.wait(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result[0] = max(0, max(peak[0], rss_bytes()) - start) / 2**20


@torch.no_grad()
def seconds_per_call(model: nn.Module, batch: int, repeats: int = 3, dtype: torch.dtype = torch.float32,
                     min_seconds: float = 2.0) -> tuple[float, float]:
    """Fastest of at least ``repeats`` calls after one warm-up (more, up to 50, until ``min_seconds`` have
    been timed: short calls are the noisy ones), and the peak activation MiB while calling (measured after the
    warm-up, so that one-time allocations such as thread pools and kernel caches do not count)."""
    x, t, cond = example_inputs(model, batch)
    x = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    cond = map_cond(cond, lambda v: v.to(dtype) if v.is_floating_point() else v)
    times: list[float] = []
    model(x, timestep=t, **cond)
    with peak_rss_above_start() as activation:
        while len(times) < repeats or (sum(times) < min_seconds and len(times) < 50):
            start = time.perf_counter()
            model(x, timestep=t, **cond)
            times.append(time.perf_counter() - start)
    return min(times), activation[0]


def measure_speed(name: str, fp: nn.Module, *, bits: tuple[str, ...] = SETTINGS,
                  batches: tuple[int, ...] = (1, 8, 64), repeats: int = 3, quantize_embeddings: bool = False,
                  bf16: bool = True, progress: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Time every variant of ``fp`` (a registered denoiser in fp32 on the CPU) at every batch size, and
    save and load each quantized setting as an artifact.

    ``bits`` are the settings (see :func:`parse_setting`) quantized for ``fake`` and ``int8`` (embedding tables
    too with ``quantize_embeddings``); ``fp32`` and ``bf16`` rows (none with ``bf16=False``) carry ``bits="fp"``. Returns ``{"calls": [SpeedRow
    dicts, fp32 first at each batch size], "artifacts": [artifact_row dicts]}``.

    FP32 is timed first and again last; each speed-up is against the faster of the two, and where they differ by
    more than :data:`BUSY_SPREAD` a warning says the machine was busy (the ratios at that batch size are not to be
    trusted).
    """
    fp_bytes, rows, artifacts = weight_bytes(fp), [], []
    steps = tqdm(total=(2 + bf16 + 2 * len(bits)) * len(batches), desc=f"speed {name}", disable=not progress)
    labels = ["fp"]

    def time_variant(model: nn.Module, variant: str, label: str, dtype: torch.dtype, placement: str = "") -> None:
        for batch in batches:
            gc.collect()
            seconds, activation = seconds_per_call(model, batch, repeats, dtype)
            weights = weight_bytes(model)
            rows.append(SpeedRow(name, variant, label, batch, seconds, 0.0, weights / 2**20, weights / fp_bytes,
                                 activation, placement))
            steps.update()

    # one variant alive at a time beside the FP32 model, so that full-size models fit in memory
    time_variant(fp, "fp32", "fp", torch.float32)
    try:
        if bf16:
            time_variant(_bf16_copy(fp), "bf16", "fp", torch.bfloat16)
    except RuntimeError as error:  # diffusers casts some embeddings back to fp32 (UNet2DModel's timestep classes)
        LOG.warning("%s does not run in bf16 (%s); its table has no bf16 rows", name, str(error).splitlines()[0])
    with tempfile.TemporaryDirectory(prefix="tacdiff-speed-") as tmp:
        for setting in bits:
            model = quantized_for_timing(fp, setting, quantize_embeddings)
            label = setting_label(quant_state(model).config)
            labels.append(label)
            artifacts.append(artifact_row(name, fp, model, Path(tmp)))
            time_variant(model, "fake", label, torch.float32)
            placement = backend_counts(use_backend(model, "int8"))
            time_variant(model, "int8", label, torch.float32, placement)
            del model
    time_variant(fp, "fp32", "fp", torch.float32)
    steps.close()
    rows = relative_to_fp32(rows)
    rows.sort(key=lambda r: (r.batch, labels.index(r.bits), VARIANTS.index(r.variant)))
    return {"calls": [asdict(row) for row in rows], "artifacts": artifacts}


@contextmanager
def _silenced(logger: str) -> Iterator[None]:
    """``logger``'s info and warnings off for the duration (errors still log)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _bf16_copy(model: nn.Module) -> nn.Module:
    with quiet_loading():  # diffusers warns on any dtype cast of a model that keeps modules in float32
        return copy.deepcopy(model).to(torch.bfloat16)


def relative_to_fp32(rows: list[SpeedRow]) -> list[SpeedRow]:
    """``rows`` with one fp32 row per batch size (the faster of its two timings) and every speed-up against it;
    a warning where the two fp32 timings differ by more than :data:`BUSY_SPREAD`."""
    fp32: dict[int, SpeedRow] = {}
    spread: dict[int, float] = {}
    for row in (r for r in rows if r.variant == "fp32"):
        first = fp32.setdefault(row.batch, row)
        slow, fast = sorted((first.seconds, row.seconds), reverse=True)
        spread[row.batch] = slow / fast
        if slow > (1 + BUSY_SPREAD) * fast:
            LOG.warning("%s: FP32 at batch %d took %.4f s per call at one time and %.4f s at another: the machine "
                        "was busy, so the speed-ups at this batch size are not reliable; time again on a quiet "
                        "machine", row.model, row.batch, slow, fast)
        fp32[row.batch] = min(first, row, key=lambda r: r.seconds)
    others = [r for r in rows if r.variant != "fp32"]
    return [replace(r, speedup=fp32[r.batch].seconds / r.seconds, fp32_spread=spread[r.batch])
            for r in [*fp32.values(), *others]]


def artifact_row(name: str, fp: nn.Module, fake: nn.Module, tmp: Path) -> dict[str, Any]:
    """Size of ``fake``'s artifact against ``fp``'s safetensors file (and the ``bits / 32 + 0.03`` target),
    and seconds to load each (the artifact onto the int8 backend)."""
    config = quant_state(fake).config
    fp_dir, artifact = tmp / f"fp-{id(fp)}", tmp / setting_label(config)
    if not fp_dir.exists():
        fp.save_pretrained(fp_dir)
    artifact = save_quantized(fake, artifact, overwrite=True)
    fp_file = next(fp_dir.glob("*.safetensors"))
    start = time.perf_counter()
    with quiet_loading():
        type(fp).from_pretrained(fp_dir)
    fp_load = time.perf_counter() - start
    start = time.perf_counter()
    with _silenced(use_backend.__module__):  # the timed conversion of the same model has logged its placement
        load_quantized(artifact, backend="int8")
    load = time.perf_counter() - start
    ratio = (artifact / WEIGHTS_NAME).stat().st_size / fp_file.stat().st_size
    target = config.weight_bits / 32 + 0.03
    return {"model": name, "bits": setting_label(config), "fp32_mib": fp_file.stat().st_size / 2**20,
            "artifact_mib": (artifact / WEIGHTS_NAME).stat().st_size / 2**20, "ratio": ratio,
            "target_ratio": target, "met": ratio <= target,
            "breakdown": artifact_breakdown(artifact / WEIGHTS_NAME, fp_file.stat().st_size, fake),
            "fp32_load_seconds": fp_load, "int8_load_seconds": load}


def artifact_breakdown(file: Path, fp_bytes: int, model: nn.Module) -> dict[str, Any]:
    """What the artifact ``file`` of the quantized ``model`` stores, as shares of the ``fp_bytes`` FP32 file: integer
    codes, quantization parameters (weight scales and zero points, activation ranges), float tensors (parameters and
    buffers, by the class of the module holding them, largest first) and the file header (names, shapes, metadata)."""
    modules = dict(model.named_modules())
    shares = {"codes": 0, "quantization parameters": 0, "float tensors": {}, "header": file.stat().st_size}
    for name, tensor in load_file(file).items():
        size = tensor.numel() * tensor.element_size()
        owner = modules.get(name.rpartition(".")[0])
        shares["header"] -= size
        if name.endswith(".weight_codes"):
            shares["codes"] += size
        elif isinstance(owner, ActQuantizer) or name.endswith(QUANT_PARAMETERS):
            shares["quantization parameters"] += size
        else:
            floats = shares["float tensors"]
            floats[type(owner).__name__] = floats.get(type(owner).__name__, 0) + size
    floats = sorted(shares["float tensors"].items(), key=lambda item: -item[1])
    return {**{k: v / fp_bytes for k, v in shares.items() if k != "float tensors"},
            "float tensors": {cls: size / fp_bytes for cls, size in floats}}


def format_speed_markdown(report: dict[str, list[dict[str, Any]]]) -> str:
    """:func:`measure_speed`'s report as two markdown tables (per call; artifacts and loading)."""
    lines = ["| model | variant | bits | batch | s/call | x fp32 | weights MiB | x fp32 weights | activations MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["calls"]:
        variant = f"{r['variant']} (no layer converted)" if ran_fake(r) else r["variant"]
        lines.append(f"| {r['model']} | {variant} | {r['bits']} | {r['batch']} | {r['seconds']:.4f} | "
                     f"{r['speedup']:.2f} | {r['weight_mib']:.1f} | {r['weight_ratio']:.2f} | "
                     f"{r['activation_mib']:.0f} |")
    placements = {(r["model"], r["bits"]): r["placement"] for r in report["calls"] if r["variant"] == "int8"}
    lines += ["", fastest_summary(report["calls"])]
    if placements:
        lines += ["", "int8 placement: " + "; ".join(f"{model} {bits}: {where}" for (model, bits), where in placements.items())]
    if any(ran_fake(r) for r in report["calls"]):
        lines += ["", "A row marked (no layer converted) timed the fake-quant model: on this machine no layer of that "
                  "setting runs on integer kernels (`tacdiff.format_summary` of a model loaded with backend=\"int8\" "
                  "says why; on CPUs without VNNI or AMX, 8-bit weights with 8-bit activations stay fake)."]
    lines += ["", "| model | bits | fp32 file MiB | artifact MiB | x fp32 | target | met | fp32 load s | int8 load s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["artifacts"]:
        lines.append(f"| {r['model']} | {r['bits']} | {r['fp32_mib']:.1f} | {r['artifact_mib']:.1f} | "
                     f"{r['ratio']:.3f} | {r['target_ratio']:.3f} | {'yes' if r['met'] else 'no'} | "
                     f"{r['fp32_load_seconds']:.2f} | {r['int8_load_seconds']:.2f} |")
    notes = [above_target_note(r) for r in report["artifacts"] if not r["met"]]
    lines += ["", *notes] if notes else []
    return "\n".join(lines)


def above_target_note(artifact: dict[str, Any]) -> str:
    """Why an artifact row is above its size target: what its file holds (:func:`artifact_breakdown`)."""
    parts = artifact["breakdown"]
    floats = parts["float tensors"]
    largest = ", ".join(f"{cls} {share:.3f}" for cls, share in list(floats.items())[:3] if share >= 0.0005)
    hint = "; --quantize-embeddings stores embedding tables as codes" if "Embedding" in floats else ""
    return (f"{artifact['model']} {artifact['bits']} is above the size target ({artifact['ratio']:.3f} > "
            f"{artifact['target_ratio']:.3f}). Of the FP32 file, codes take {parts['codes']:.3f}, float tensors "
            f"{sum(floats.values()):.3f} ({largest or 'none'}), quantization parameters "
            f"{parts['quantization parameters']:.3f}, the file header {parts['header']:.3f}{hint}.")


def ran_fake(call: dict[str, Any]) -> bool:
    """Whether an int8 row of :func:`measure_speed` converted no layer, so that it timed the fake-quant model."""
    return call["variant"] == "int8" and call["placement"].startswith("int8: 0 modules")


def fastest_summary(calls: list[dict[str, Any]]) -> str:
    """One line naming the fastest variant of each model at each batch size, e.g. ``"Fastest: cifar10 batch 8
    int8 w4a8 (2.17x FP32)"``: on some machines and models that is bf16, not an integer backend."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for call in (c for c in calls if not ran_fake(c)):
        key = (call["model"], call["batch"])
        if key not in best or call["speedup"] > best[key]["speedup"]:
            best[key] = call
    return "Fastest: " + "; ".join(f"{r['model']} batch {r['batch']} {r['variant']}"
                                   f"{'' if r['bits'] == 'fp' else ' ' + r['bits']} ({r['speedup']:.2f}x FP32"
                                   f"{busy_caveat(r)})" for r in best.values())


def busy_caveat(call: dict[str, Any]) -> str:
    """``", busy: ..."`` where the two FP32 timings of ``call``'s batch size differed by more than
    :data:`BUSY_SPREAD` (its speed-up is then not to be trusted), else ``""``."""
    spread = call.get("fp32_spread", 1.0)
    return f", busy: FP32 timings {spread:.2f}x apart" if spread > 1 + BUSY_SPREAD else ""


def timed_config(spec: str | Path) -> Path | None:
    """The ``config.json`` that :func:`model_for_speed` builds ``spec`` from (None for the bundled pixel model), checked
    to name a class tacdiff times: a bad ``--model`` fails before any other is timed."""
    from tacdiff.models.loading import find_unet_dir  # models.loading reaches the pipelines; load it on use
    from tacdiff.models.reference import bundled_folder

    if str(spec) == "reference":
        return None
    config = find_unet_dir(bundled_folder(spec)) / "config.json"
    record = read_config(config)
    if record.get("_class_name") not in MODEL_KINDS:
        named = f"describes a {record['_class_name']!r}" if "_class_name" in record else "names no _class_name"
        raise ValueError(f"{config} {named}; tacdiff times {', '.join(MODEL_KINDS)}")
    return config


def model_for_speed(spec: str | Path) -> nn.Module:
    """The fp32 denoiser of ``spec``: ``"reference"``, ``"latent-reference"``, a diffusers model or pipeline
    folder, or a folder with only a model ``config.json`` (built with seeded random weights, e.g.
    ``../shared/configs/sd-1.5-unet``)."""
    from tacdiff.models.loading import load_any_model

    config = timed_config(spec)
    if config is None or any(config.parent.glob("*.safetensors")) or any(config.parent.glob("*.bin")):
        return load_any_model(spec, sampled=False).model  # timing makes its own inputs
    record = read_config(config)
    torch.manual_seed(0)
    model = MODEL_KINDS[record["_class_name"]].cls.from_config(record).eval()
    sample_shape_of(model)
    return model
