"""``tacdiff bench``: FP, PTQ, PTQD and TAC (with its NER/IBC ablations) on one model, paired.

The model is the bundled Fashion-MNIST DDPM by default, or any model or pipeline folder
(latent pipelines are scored on decoded images; text-to-image pipelines sample their prompts
with classifier-free guidance, and the tables are fitted on the guided estimate).

For every step count, one :func:`tacdiff.evaluation.score_methods` call samples the
FP model and, for every bit setting, the uncorrected PTQ model and its PTQD/NER/IBC/TAC-corrected
wrappers from the same starting noise (and the same per-step noise), so every method is compared
with the same FP images. Choices, written down:

* Seeds: quantization calibration inputs come from ``derive_seed(seed, "quantize")``, the
  correction tables are fitted on trajectories from ``derive_seed(seed, "calibrate")`` and the
  evaluation samples start from ``derive_seed(seed, "evaluate")``: the tables never see an
  evaluation seed, and the same ``seed`` reproduces every number but the timings.
* PTQ: ``QuantConfig(weight_bits=w, act_bits=a, weight_rounding=...)`` (round-to-nearest by
  default, or GPTQ; MSE-searched ranges, first and last layer at 8 bits), once per bit setting,
  its activation ranges (and GPTQ's Gram matrices) calibrated on
  ``min(quant_calib_samples, calib_samples)`` FP DDIM trajectories of ``min(50, max(steps))``
  steps with 25 steps kept (Q-Diffusion's time-uniform calibration).
* IBC (in ``ibc`` and ``tac``) shifts the quantized trajectory's latent (``ibc_target="state"``,
  the default; the loop applies it through the corrected denoiser's ``correct_state``).
* Sampler: DDIM (eta 0) from the reference scheduler config. PTQD is its deterministic part
  (``(q - b_t) / (1 + k_t)``); its variance-schedule calibration needs a stochastic sampler.
* FID/KID use the bundled Fashion-MNIST classifier, so only grayscale images of at least 28x28 get them
  (centre-cropped to 28x28; else None).
* FP rows have ``bits == "fp"``, one per step count (FP is sampled once per step count).
* ``calib_seconds``: for ``ptq`` the quantization (calibration inputs, ranges), for
  ``ptqd``/``ner``/``ibc``/``tac`` the table fit alone (on top of the PTQ model), 0 for ``fp``.
* ``sample_seconds``: wall time spent in that method's denoiser calls (UNet plus output
  correction), synchronised on CUDA before and after every call; the scheduler arithmetic, the
  same for every method, is not counted, and neither is IBC's state shift (one subtraction per
  step in the loop's hook).
* ``x0_mse``/``x0_psnr``: final images clamped to [-1, 1] against FP's (PSNR peak-to-peak 2);
  per-step ``‖x̂_t − x_t‖²`` (mean over samples, latents before each step) go to the plot.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from diffusers import SchedulerMixin
from torch import nn
from tqdm.auto import tqdm

from tacdiff import __version__
from tacdiff.backends import check_backend, use_backend
from tacdiff.correction import CorrectedDenoiser
from tacdiff.correction.calibrate import CALIBRATORS, check_tac_options, fit_tables, tac_settings
from tacdiff.evaluation import Method, TimedDenoiser, prompted_classes, score_methods, timed_call
from tacdiff.metrics.fid import FID_KEYS
from tacdiff.models.kinds import Denoiser, ModelDenoiser, sample_shape_of
from tacdiff.models.loading import (AUTO_SCHEDULER, FLOW_SCHEDULER, REFERENCE, build_scheduler, check_settings,
                                   load_any_model, resolve_scheduler)
from tacdiff.quant import QuantConfig, quantize
from tacdiff.quant.config import parse_setting
from tacdiff.report import save_grid
from tacdiff.sampling.batching import derive_seed
from tacdiff.sampling.conditioning import Conditioning, PromptOptions, conditioning_for
from tacdiff.workflows import CalibrationSettings, calibrate_inputs

METHODS = ("fp", "ptq", "ptqd", "ner", "ibc", "tac")
ROUNDINGS = ("rtn", "gptq", "adaround")  # learned rounding (Q-Diffusion's base) takes minutes per bit setting
CORRECTED = tuple(m for m in METHODS if m in CALIBRATORS)
ROW_KEYS = ("bits", "steps", "method", *FID_KEYS, "prompt_accuracy", "x0_mse", "x0_psnr", "x0_ssim",
            "calib_seconds", "sample_seconds")
FP_BITS = "fp"
GRID_SAMPLES = 10
"""Images per method kept for the sample grid (with the default Fashion prompts, one per class)."""
NUM_TRAIN_TIMESTEPS = 1000

@dataclass
class BenchResult:
    """Rows (see :data:`ROW_KEYS`), the run's settings (what made them: model, sizes, seed, PTQ recipe, TAC's
    options, guidance, machine), per-step curves ``{(bits, steps): {method: (T,) ‖x̂_t − x_t‖²}}`` and each
    row's first :data:`GRID_SAMPLES` images ``{(label, steps): (n, C, H, W)}`` (the same noise and prompts)."""

    rows: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    step_errors: dict[tuple[str, int], dict[str, list[float]]] = field(default_factory=dict)
    timesteps: dict[int, list[float]] = field(default_factory=dict)
    first_images: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def save_grid(self, path: str | Path) -> Path:
        """A PNG grid of :attr:`first_images`, one row per method (labelled with its bits and steps)."""
        return save_grid({f"{label}, DDIM {steps}": images for (label, steps), images in self.first_images.items()},
                         path, columns=GRID_SAMPLES)


def check_bench_args(bits: Sequence[str], steps: Sequence[int], methods: Sequence[str], samples: int,
                     calib_samples: int, batch_size: int, device: str, weight_rounding: str,
                     num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[tuple[int, int, bool]]:
    """Raise ``ValueError`` naming the first bad setting; return the bit settings as
    :func:`~tacdiff.quant.config.parse_setting` reads them (weight bits, activation bits, symmetric weights)."""
    if weight_rounding not in ROUNDINGS:
        raise ValueError(f"weight_rounding must be one of {', '.join(ROUNDINGS)} for the benchmark, "
                         f"got {weight_rounding!r}")
    if not bits:
        raise ValueError("give at least one bit setting, e.g. --bits w4a8")
    if not steps:
        raise ValueError("give at least one step count, e.g. --steps 50")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown or methods!r}; choose from {', '.join(METHODS)}")
    if samples < 2:
        raise ValueError(f"samples must be >= 2 (FID needs two images), got {samples}")
    if calib_samples < 1:
        raise ValueError(f"calib_samples must be >= 1, got {calib_samples}")
    for count in steps:
        check_settings(AUTO_SCHEDULER, count, samples, batch_size, device)
        if count > num_train_timesteps:
            raise ValueError(f"steps must be <= {num_train_timesteps} (the model's training steps), got {count}")
    return [parse_setting(b) for b in bits]


@torch.no_grad()
def bench(*, bits: Sequence[str] = ("w8a8", "w4a8", "w3a8"), steps: Sequence[int] = (50, 100),
          methods: Sequence[str] = METHODS, samples: int = 1000, calib_samples: int = 256, seed: int = 0,
          batch_size: int = 256, device: str = "cpu", quant_calib_samples: int = 64, weight_rounding: str = "rtn",
          model: str | Path = REFERENCE, prompts: PromptOptions = PromptOptions(), backend: str = "fake",
          act_range: str = "mse", smooth_alpha: float | None = None, timestep_groups: int = 1,
          tac_options: Mapping[str, Any] | None = None, progress: bool = True) -> BenchResult:
    """Run the benchmark; see :func:`run_bench` (this also returns the per-step curves for the plot)."""
    check_bench_args(bits, steps, methods, samples, calib_samples, batch_size, device, weight_rounding)
    options = dict(tac_options or {})
    check_tac_options(**options)
    recipe = QuantConfig(weight_rounding=weight_rounding, act_range=act_range, smooth_alpha=smooth_alpha,
                         timestep_groups=timestep_groups)
    check_backend(backend)
    loaded = load_any_model(model, device)
    if loaded.quantized:
        raise ValueError(f"{model} is a quantized artifact; bench quantizes the full-precision model itself")
    config = loaded.scheduler_config
    flow = resolve_scheduler(AUTO_SCHEDULER, config) == FLOW_SCHEDULER
    base = build_scheduler(FLOW_SCHEDULER if flow else "ddpm", config, loaded.model)  # quantization draws DDIM from it
    bit_settings = check_bench_args(bits, steps, methods, samples, calib_samples, batch_size, device,
                                    weight_rounding, base.config.num_train_timesteps)
    names = [b.strip().lower() for b in bits]
    dev = torch.device(device)
    fp, scheduler = loaded.model, build_scheduler(AUTO_SCHEDULER, config, loaded.model)
    conditioning = conditioning_for(loaded, prompts, count=max(samples, calib_samples, quant_calib_samples),
                                    seed=seed, what=str(model))
    quant_settings = quant_calibration(quant_calib_samples, calib_samples, max(steps), seed)
    quantized: dict[str, tuple[nn.Module, float]] = {}
    how = f"{weight_rounding.upper()}, {act_range} ranges" + (f", smooth {smooth_alpha}" if smooth_alpha else "") \
        + (f", {timestep_groups} timestep groups" if timestep_groups > 1 else "")
    for name, setting in zip(names, bit_settings):
        _log(progress, f"quantize {name} ({how}, {quant_settings.samples} calibration trajectories)")
        quantized[name] = timed_call(dev, lambda setting=setting: quantized_copy(
            fp, base, setting, quant_settings, conditioning, recipe, progress))
    executed = {name: _executed(quant, backend, min(batch_size, samples)) for name, (quant, _) in quantized.items()}

    result = BenchResult([], settings={
        "model": str(model), "bits": names, "steps": list(steps), "samples": samples, "calib_samples": calib_samples,
        "quant_calib_samples": quant_settings.samples, "seed": seed, "batch_size": batch_size, "device": device,
        "backend": backend, "recipe": {"weight_rounding": weight_rounding, "act_range": act_range,
                                       "smooth_alpha": smooth_alpha, "timestep_groups": timestep_groups},
        "tac_options": tac_settings(options), "conditioning": conditioning.record,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "tacdiff": __version__})
    calib_seed, eval_seed = derive_seed(seed, "calibrate"), derive_seed(seed, "evaluate")
    labels = prompted_classes(conditioning, samples, loaded.image_shape)
    wanted = [m for m in METHODS if m in methods]
    for count in steps:
        def timed(denoiser: Denoiser) -> TimedDenoiser:
            return TimedDenoiser(conditioning.guide(denoiser), dev)

        candidates = [Method(FP_BITS, "fp", timed(ModelDenoiser(fp, scheduler)), 0.0)]
        for name in names:
            quant_seconds = quantized[name][1]
            runs = ModelDenoiser(executed[name], scheduler)
            candidates.append(Method(name, "ptq", timed(runs), quant_seconds))
            for method in (m for m in CORRECTED if m in wanted):
                _log(progress, f"calibrate {method} for {name}, DDIM {count}, {calib_samples} trajectories")
                tables, seconds = timed_call(dev, lambda method=method, quant=executed[name]: fit_tables(
                    method, fp, quant, scheduler, options=options, num_inference_steps=count,
                    num_samples=calib_samples, batch_size=batch_size, seed=calib_seed, cond=conditioning,
                    progress=progress))
                candidates.append(Method(name, method, timed(CorrectedDenoiser(runs, tables)), seconds))
        _log(progress, f"sample {len(candidates)} denoisers x {samples} paired images, DDIM {count}")
        scored = score_methods(
            candidates, scheduler, num_inference_steps=count, num_samples=samples,
            sample_shape=sample_shape_of(fp), seed=eval_seed, batch_size=batch_size, device=dev,
            cond=conditioning.rows, decode=loaded.decode, labels=labels, keep=GRID_SAMPLES, progress=progress)
        result.timesteps[count] = scored.timesteps
        for row, curve, images in zip(scored.rows, scored.state_sq_err, scored.first_images):
            if row["method"] not in wanted:
                continue
            result.rows.append(row)
            result.first_images[f"{row['bits']} {row['method']}" if row["bits"] != FP_BITS else "fp", count] = images
            if row["bits"] != FP_BITS:  # FP's own curve is zero
                result.step_errors.setdefault((row["bits"], count), {})[row["method"]] = curve
    return result


def quant_calibration(quant_calib_samples: int, calib_samples: int, steps: int, seed: int) -> CalibrationSettings:
    """The FP trajectories PTQ's activation ranges come from: ``min(quant_calib_samples, calib_samples)`` of them,
    at most 50 DDPM steps (25 kept), on the ``"quantize"`` seed stream of ``seed``."""
    quant_steps = min(50, steps)
    return CalibrationSettings(min(quant_calib_samples, calib_samples), quant_steps, min(25, quant_steps),
                               derive_seed(seed, "quantize"))


def quantized_copy(fp: nn.Module, scheduler: SchedulerMixin, bits: tuple[int, int, bool], settings: CalibrationSettings,
                   conditioning: Conditioning, recipe: QuantConfig, progress: bool) -> nn.Module:
    """A copy of ``fp`` quantized by ``recipe`` at ``bits`` (weight bits, activation bits, symmetric weights) as
    the benchmark does it: calibration inputs from FP trajectories drawn with ``settings`` (DDIM from
    ``scheduler``'s config, or flow matching) under ``conditioning``."""
    calib = calibrate_inputs(fp, scheduler, settings, conditioning, progress=progress)
    config = replace(recipe, weight_bits=bits[0], act_bits=bits[1], weight_symmetric=bits[2],
                     num_train_timesteps=scheduler.config.num_train_timesteps)
    return quantize(copy.deepcopy(fp), config, calib, progress=progress)


def run_bench(*, bits: Sequence[str] = ("w8a8", "w4a8", "w3a8"), steps: Sequence[int] = (50, 100),
              methods: Sequence[str] = METHODS, samples: int = 1000, calib_samples: int = 256, seed: int = 0,
              batch_size: int = 256, device: str = "cpu", quant_calib_samples: int = 64, weight_rounding: str = "rtn",
              model: str | Path = REFERENCE, prompts: PromptOptions = PromptOptions(), backend: str = "fake",
              act_range: str = "mse", smooth_alpha: float | None = None, timestep_groups: int = 1,
              tac_options: Mapping[str, Any] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Benchmark FP, PTQ, PTQD, NER, IBC and TAC on one model (the bundled Fashion-MNIST one by default) with DDIM.

    Args:
        bits: settings like ``"w4a8"`` (weight bits, activation bits), ``"w8a8-sym"`` for symmetric weight
            ranges; each is quantized once.
        steps: DDIM step counts; correction tables are fitted per bit setting and step count.
        methods: the rows wanted (FP is always sampled: it is the paired reference).
        samples: evaluation images per method, all from the same noise.
        calib_samples: trajectories the correction tables are fitted on (calibration seeds).
        seed: derives the quantization, calibration and evaluation seeds (see the module docstring).
        batch_size: trajectories per batch when sampling, and samples per network call when calibrating.
        device: torch device.
        quant_calib_samples: FP trajectories for PTQ's calibration inputs (capped at ``calib_samples``).
        weight_rounding: PTQ's weight rounding, ``"rtn"``, ``"gptq"`` or ``"adaround"`` (learned; minutes per bit
            setting on a CPU).
        model: ``"reference"`` or a full-precision diffusers model or pipeline folder.
        prompts: prompts, negative prompt and guidance scale of text-to-image pipelines.
        backend: how the quantized models execute (:func:`tacdiff.backends.use_backend`), when the tables are
            fitted and when they are sampled.
        act_range, smooth_alpha, timestep_groups: PTQ's activation ranges, channel balancing and range groups
            over timesteps (:class:`QuantConfig`).
        tac_options: TAC's hyper-parameters for the ``tac``, ``ner`` and ``ibc`` rows (keywords of
            :func:`~tacdiff.correction.calibrate.check_tac_options`: ``lam``, ``gamma``, ``tau``, ``ibc``,
            ``ibc_target``, ``guidance_fit``, ``ner_bias``); the defaults where absent. PTQD has none.
    Returns:
        One dict per (bits, steps, method) with exactly :data:`ROW_KEYS`: ``fid``/``kid`` on the
        bundled classifier's features and ``fid_allconv``/``kid_allconv`` on the second feature space's,
        ``prompt_accuracy`` (text-to-image pipelines whose prompts each name a Fashion-MNIST class; else None),
        ``x0_mse``/``x0_psnr``/``x0_ssim`` against FP, ``calib_seconds``
        and ``sample_seconds`` (see the module docstring); FP rows have ``bits == "fp"``.
    """
    return bench(bits=bits, steps=steps, methods=methods, samples=samples, calib_samples=calib_samples, seed=seed,
                 batch_size=batch_size, device=device, quant_calib_samples=quant_calib_samples,
                 weight_rounding=weight_rounding, model=model, prompts=prompts, backend=backend,
                 act_range=act_range, smooth_alpha=smooth_alpha, timestep_groups=timestep_groups,
                 tac_options=tac_options, progress=progress).rows


def _executed(quant: nn.Module, backend: str, batch: int) -> nn.Module:
    """``quant`` itself for the fake backend, else a copy running on ``backend`` (``auto`` probed at ``batch``)."""
    if backend == "fake":
        return quant
    twin = copy.deepcopy(quant)
    use_backend(twin, backend, probe_batch=batch)
    return twin


def _log(progress: bool, message: str) -> None:
    if progress:
        tqdm.write(f"[bench] {message}")


def format_cell(value: Any, digits: int) -> str:
    """``value`` with ``digits`` decimals when a float (``inf`` spelled out), ``n/a`` for None, else as it is."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def format_settings(settings: Mapping[str, Any]) -> str:
    """A run's :attr:`BenchResult.settings` as one line for a report (nested records flattened)."""
    def items(record: Mapping[str, Any]) -> list[str]:
        return [f"{key}={value}" if not isinstance(value, Mapping) else ", ".join(items(value))
                for key, value in record.items() if value != {}]

    return "Settings: " + ", ".join(items(settings))


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table, grouped by step count and bits, with the FP reference first."""
    lines = ["| bits | steps | method | FID | KID | FID allconv | KID allconv | prompt acc | x0 MSE | x0 PSNR dB | "
             "x0 SSIM | calib s | sample s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['steps']} | {r['method']} | {format_cell(r['fid'], 3)} | "
                     f"{format_cell(r['kid'], 5)} | {format_cell(r.get('fid_allconv'), 3)} | "
                     f"{format_cell(r.get('kid_allconv'), 5)} | {format_cell(r.get('prompt_accuracy'), 3)} | "
                     f"{format_cell(r['x0_mse'], 6)} | {format_cell(r['x0_psnr'], 2)} | "
                     f"{format_cell(r.get('x0_ssim'), 4)} | {format_cell(r['calib_seconds'], 1)} | "
                     f"{format_cell(r['sample_seconds'], 2)} |")
    return "\n".join(lines)
