"""End-to-end workflows that the CLI exposes: quantize a model folder, and the bundled-model demo."""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler
from torch import nn

from tacdiff.io.artifact import save_quantized, state_dict_sha256
from tacdiff.io.atomic import check_writable
from tacdiff.metrics.paired import sqnr_db
from tacdiff.models.kinds import ModelDenoiser
from tacdiff.models.loading import load_scheduler, load_unet
from tacdiff.quant import QuantConfig, quantize
from tacdiff.sampling import CalibrationSet, collect_calibration_set
from tacdiff.sampling.calibration import random_text_embeddings


@dataclass(frozen=True)
class CalibrationSettings:
    """How calibration inputs are drawn: trajectories, DDIM steps, steps kept, seed."""

    samples: int = 64
    steps: int = 50
    kept_steps: int = 25
    seed: int = 0


def calibrate_inputs(model: nn.Module, scheduler, settings: CalibrationSettings, progress: bool = True,
                     warn: bool = True) -> CalibrationSet:
    """Calibration inputs for ``model``; conditional UNets get random embeddings (with a warning, if ``warn``)."""
    cond = random_text_embeddings(model, settings.samples, settings.seed)
    if cond and warn:
        warnings.warn("calibrating a conditional UNet on random text embeddings; for best results build "
                      "the calibration set in Python with real prompt embeddings", stacklevel=2)
    return collect_calibration_set(model, scheduler, num_samples=settings.samples,
                                   num_inference_steps=settings.steps, kept_steps=settings.kept_steps,
                                   seed=settings.seed, cond=cond, progress=progress)


@torch.no_grad()
def output_sqnr_db(reference: nn.Module, model: nn.Module, inputs: CalibrationSet, batch_size: int = 64) -> float:
    """SQNR (dB) of ``model``'s noise estimates against ``reference``'s on the same inputs."""
    device = next(model.parameters()).device
    pairs = [(ModelDenoiser(reference)(x, t, **cond), ModelDenoiser(model)(x, t, **cond))
             for x, t, cond in inputs.batches(batch_size, device)]
    return sqnr_db(torch.cat([r for r, _ in pairs]), torch.cat([e for _, e in pairs]))


def quantize_dir(model_dir: str | Path, out_dir: str | Path, config: QuantConfig, *,
                 scheduler_path: str | Path | None = None, calibration: CalibrationSettings = CalibrationSettings(),
                 device: str = "cpu", overwrite: bool = False, progress: bool = True) -> tuple[Path, nn.Module, float]:
    """Quantize the diffusers UNet in ``model_dir`` and write the artifact to ``out_dir``.

    Returns the artifact path, the quantized model and its output SQNR (dB) against the
    FP model on held-out inputs (drawn with ``calibration.seed + 1``). ``out_dir`` is checked
    first; ``config.num_train_timesteps`` is replaced by the scheduler's.
    """
    check_writable(out_dir, overwrite)
    model = load_unet(model_dir, device)
    scheduler = load_scheduler(scheduler_path, model_dir)
    config = replace(config, num_train_timesteps=scheduler.config.num_train_timesteps)
    fp_model = copy.deepcopy(model)
    source_hash = state_dict_sha256(model)
    started = time.perf_counter()
    calib = calibrate_inputs(model, scheduler, calibration, progress)
    quantize(model, config, calib, progress=progress)
    seconds = time.perf_counter() - started
    held_out = CalibrationSettings(min(calibration.samples, 16), calibration.steps, 10, calibration.seed + 1)
    sqnr = output_sqnr_db(fp_model, model, calibrate_inputs(fp_model, scheduler, held_out, progress=False,
                                                            warn=False))
    metadata = {
        "source_model": str(Path(model_dir).resolve()), "source_sha256": source_hash,
        "scheduler_class": type(scheduler).__name__, "scheduler_config": json.dumps(dict(scheduler.config)),
        "calibration": json.dumps(calibration.__dict__), "quantize_seconds": f"{seconds:.2f}",
        "held_out_sqnr_db": f"{sqnr:.3f}",
    }
    return save_quantized(model, out_dir, metadata=metadata, overwrite=overwrite), model, sqnr


@torch.no_grad()
def run_demo(out_dir: str | Path = "tacdiff-demo", *, bits: tuple[tuple[int, int], ...] = ((8, 8), (4, 8)),
             samples: int = 16, steps: int = 50, seed: int = 0, calib_samples: int = 32,
             progress: bool = True) -> list[dict[str, Any]]:
    """Quantize the bundled Fashion-MNIST model at each ``(weight, activation)`` bit pair, correct the
    last one with TAC, and compare every model's samples with FP's.

    All models sample with DDIM from the same seeded noise (paired trajectories). Returns one
    row per setting, plus one for the last setting with TAC tables fitted on ``calib_samples``
    trajectories of their own seed: bits, seconds to quantize (or to fit the tables), held-out
    noise-estimate SQNR in dB (None for the TAC row, whose correction acts along trajectories),
    final-image MSE and PSNR against FP (images in [-1, 1]); writes ``out_dir/samples.png``.
    """
    from tacdiff.correction import CorrectedDenoiser, calibrate_tac
    from tacdiff.metrics.paired import psnr_db
    from tacdiff.models.reference import load_reference_model
    from tacdiff.report import save_grid
    from tacdiff.sampling.batching import batched_trajectories, to_images

    fp, ddpm = load_reference_model()
    scheduler = DDIMScheduler.from_config(ddpm.config)
    calib = calibrate_inputs(fp, ddpm, CalibrationSettings(calib_samples, steps, min(25, steps), seed), progress)
    held_out = calibrate_inputs(fp, ddpm, CalibrationSettings(16, steps, min(10, steps), seed + 1), progress=False)
    names, denoisers, rows = ["FP"], [ModelDenoiser(fp, scheduler)], []
    for w_bits, a_bits in bits:
        started = time.perf_counter()
        model = quantize(copy.deepcopy(fp), QuantConfig(weight_bits=w_bits, act_bits=a_bits), calib, progress=progress)
        rows.append({"bits": f"w{w_bits}a{a_bits}", "seconds": time.perf_counter() - started,
                     "eps_sqnr_db": output_sqnr_db(fp, model, held_out)})
        names.append(f"W{w_bits}A{a_bits}")
        denoisers.append(ModelDenoiser(model, scheduler))
    started = time.perf_counter()
    tables = calibrate_tac(fp, model, scheduler, num_inference_steps=steps, num_samples=calib_samples,
                           batch_size=calib_samples, seed=seed + 3, progress=progress)
    rows.append({"bits": f"{rows[-1]['bits']}+tac", "seconds": time.perf_counter() - started, "eps_sqnr_db": None})
    names.append(f"{names[-1]}+TAC")
    denoisers.append(CorrectedDenoiser(ModelDenoiser(model, scheduler), tables))
    finals = [torch.cat(parts) for parts in zip(*(batch for _, batch in batched_trajectories(
        denoisers, scheduler, num_samples=samples, sample_shape=(1, 28, 28), num_inference_steps=steps,
        seed=seed + 2, progress=progress)))]
    images = [to_images(x) for x in finals]
    for row, image in zip(rows, images[1:]):
        row["x0_mse"] = float((image - images[0]).pow(2).mean())
        row["x0_psnr_db"] = psnr_db(row["x0_mse"])
    save_grid(dict(zip(names, images)), Path(out_dir) / "samples.png")
    return rows
