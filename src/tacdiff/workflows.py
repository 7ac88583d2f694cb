"""End-to-end workflows that the CLI exposes: quantize a model folder, write samples as PNG files, and the
bundled-model demo."""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, SchedulerMixin
from torch import nn

from tacdiff.correction import CorrectedDenoiser, calibrate_tac, load_correction
from tacdiff.distributed import shard
from tacdiff.io.artifact import is_artifact_folder, save_quantized, state_dict_sha256
from tacdiff.io.atomic import check_writable, report_file, write_dir_atomically
from tacdiff.metrics.paired import psnr_db, sqnr_db
from tacdiff.models.kinds import ModelDenoiser, kind_of, sample_shape_of
from tacdiff.models.loading import (PIPELINE_KEY, PIPELINE_SHA256_KEY, REFERENCE, LoadedModel, build_scheduler,
                                   check_settings, find_unet_dir, fit_resolution_shift, input_paths, load_any_model,
                                   load_scheduler, scheduler_name)
from tacdiff.models.pipelines import component, components_sha256, text_encoders
from tacdiff.models.reference import REFERENCE_MODEL_DIR, bundled_folder, load_reference_model
from tacdiff.quant import QuantConfig, plan_layers, quant_state, quantize
from tacdiff.quant.apply import check_finite, quantize_weights_only
from tacdiff.report import save_grid
from tacdiff.report.images import IMAGE_CHANNELS, save_png, tile, to_uint8
from tacdiff.sampling import CalibrationSet, collect_calibration_set
from tacdiff.sampling.batching import batched_trajectories, derive_seed, to_images
from tacdiff.sampling.conditioning import UNCONDITIONAL, Conditioning, PromptOptions, conditioning_for


@dataclass(frozen=True)
class CalibrationSettings:
    """How calibration inputs are drawn: trajectories, DDIM steps, steps kept, seed, trajectories per batch
    (also the unit of work that processes share, :mod:`tacdiff.distributed`)."""

    samples: int = 64
    steps: int = 50
    kept_steps: int = 25
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("samples", "steps", "kept_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"calibration {name} must be >= 1, got {getattr(self, name)}")


def calibrate_inputs(model: nn.Module, scheduler: SchedulerMixin, settings: CalibrationSettings,
                     conditioning: Conditioning = UNCONDITIONAL, progress: bool = True) -> CalibrationSet:
    """Calibration inputs for ``model``: its own DDIM trajectories under ``conditioning`` (prompts, guidance)."""
    return collect_calibration_set(model, scheduler, num_samples=settings.samples,
                                   num_inference_steps=settings.steps, kept_steps=settings.kept_steps,
                                   seed=settings.seed, batch_size=settings.batch_size, cond=conditioning,
                                   progress=progress)


@torch.no_grad()
def noise_estimates(model: nn.Module, inputs: CalibrationSet, batch_size: int = 64) -> torch.Tensor:
    """``model``'s noise estimates on every input of ``inputs``, in the order its batches come, on the CPU."""
    device = next(model.parameters()).device
    return torch.cat([ModelDenoiser(model)(x, t, **cond).cpu() for x, t, cond in inputs.batches(batch_size, device)])


def output_sqnr_db(reference: nn.Module, model: nn.Module, inputs: CalibrationSet, batch_size: int = 64) -> float:
    """SQNR (dB) of ``model``'s noise estimates against ``reference``'s on the same inputs."""
    return sqnr_db(noise_estimates(reference, inputs, batch_size), noise_estimates(model, inputs, batch_size))


def _artifact_bytes(model_dir: str | Path, weight_bits: int) -> int:
    """A generous estimate of an artifact's size: the FP weight files at ``weight_bits / 16`` of their size."""
    files = Path(find_unet_dir(model_dir)).glob("*.safetensors")
    return int(sum(f.stat().st_size for f in files) * weight_bits / 16) + 2**20


def quantize_dir(model_dir: str | Path, out_dir: str | Path, config: QuantConfig, *,
                 scheduler_path: str | Path | None = None, calibration: CalibrationSettings = CalibrationSettings(),
                 prompts: PromptOptions = PromptOptions(), components: tuple[str, ...] = (), device: str = "cpu",
                 overwrite: bool = False, progress: bool = True) -> tuple[Path, nn.Module, float]:
    """Quantize the diffusers UNet in ``model_dir`` (a model or pipeline folder) and write the artifact to ``out_dir``.

    Returns the artifact path, the quantized model and its output SQNR (dB) against the
    FP model on held-out inputs (drawn with ``calibration.seed + 1``). Text-to-image pipelines
    calibrate on ``prompts`` with classifier-free guidance; the artifact records the pipeline
    folder, whose FP components (text encoder, autoencoder) sampling needs. ``components`` (names of
    :data:`~tacdiff.io.artifact.COMPONENT_NAMES`) are quantized too, weight-only at
    ``config.weight_bits`` (:func:`~tacdiff.quant.apply.quantize_weights_only`), before the
    denoiser's calibration inputs are drawn, so the denoiser calibrates on what it will see.
    ``out_dir`` is checked first (with ``overwrite`` it may replace an earlier artifact, nothing else; never the model
    or scheduler folder); ``config.num_train_timesteps`` is replaced by the scheduler's.
    """
    model_dir = REFERENCE_MODEL_DIR if str(model_dir) == REFERENCE else bundled_folder(model_dir)
    inputs = [model_dir] + ([scheduler_path] if scheduler_path is not None else [])
    check_writable(out_dir, overwrite, recognise=is_artifact_folder, what="quantized artifact", inputs=inputs,
                   folder=True, need_bytes=_artifact_bytes(model_dir, config.weight_bits))
    loaded = load_any_model(model_dir, device)
    if loaded.quantized:
        raise ValueError(f"{model_dir} is a tacdiff quantized artifact, not a full-precision model; pass the FP "
                         "model folder it was quantized from")
    model = loaded.model
    check_finite(model, None)
    plan_layers(model, config)  # a recipe that does not fit the model (an exclude pattern naming nothing) fails now
    parts = {name: _quantize_component(loaded, name, config, model_dir)
             for name in _every_encoder(loaded, components)}
    scheduler = fit_resolution_shift(load_scheduler(scheduler_path, model_dir, model), model)
    config = replace(config, num_train_timesteps=scheduler.config.num_train_timesteps)
    conditioning = conditioning_for(loaded, prompts, count=calibration.samples, seed=calibration.seed,
                                    what=str(model_dir))
    source_hash = state_dict_sha256(model)
    held_out = CalibrationSettings(min(calibration.samples, 16), calibration.steps, 10, calibration.seed + 1,
                                   calibration.batch_size)
    held_out_inputs = calibrate_inputs(model, scheduler, held_out, _held_out(conditioning, loaded, held_out),
                                       progress=False)
    reference = noise_estimates(model, held_out_inputs)  # kept instead of an FP copy of the model
    started = time.perf_counter()
    quantize(model, config, calibrate_inputs(model, scheduler, calibration, conditioning, progress), progress=progress)
    quant_state(model).source_sha256 = source_hash
    seconds = time.perf_counter() - started
    sqnr = sqnr_db(reference, noise_estimates(model, held_out_inputs))
    metadata = {
        "source_model": str(Path(model_dir).resolve()), "source_sha256": source_hash,
        "scheduler_class": type(scheduler).__name__, "scheduler_config": json.dumps(dict(scheduler.config)),
        "calibration": json.dumps(calibration.__dict__), "conditioning": json.dumps(conditioning.record),
        "quantize_seconds": f"{seconds:.2f}", "held_out_sqnr_db": f"{sqnr:.3f}", **_pipeline_record(loaded, model_dir),
    }
    return save_quantized(model, out_dir, metadata=metadata, components=parts, overwrite=overwrite), model, sqnr


def _held_out(conditioning: Conditioning, loaded: LoadedModel, held_out: CalibrationSettings) -> Conditioning:
    """The held-out inputs' conditioning: the same prompts (other noise), or stand-in embeddings of their own seed."""
    if conditioning.prompts is not None or not conditioning.record:
        return conditioning
    with warnings.catch_warnings():  # the stand-in embeddings warning was given for the calibration set
        warnings.filterwarnings("ignore", message=".*stand-in text embeddings")
        return conditioning_for(loaded, count=held_out.samples, seed=held_out.seed)


def _pipeline_record(loaded: LoadedModel, model_dir: str | Path) -> dict[str, str]:
    """Artifact metadata naming the pipeline folder and hashing its components (nothing for a model folder)."""
    if loaded.pipeline is None:
        return {}
    return {PIPELINE_KEY: str(Path(model_dir).resolve()), PIPELINE_SHA256_KEY: components_sha256(model_dir)}


def _every_encoder(loaded: LoadedModel, components: tuple[str, ...]) -> list[str]:
    """``components`` with ``text_encoder`` standing for every text encoder the pipeline has (SD3 has three)."""
    encoders = [] if loaded.pipeline is None else text_encoders(loaded.pipeline, loaded.kind)
    return [part for name in components for part in (encoders if name == "text_encoder" and encoders else [name])]


def _quantize_component(loaded: LoadedModel, name: str, config: QuantConfig, model_dir: str | Path) -> nn.Module:
    """Quantize a pipeline component of ``loaded`` in place, weight-only at ``config``'s weight bits."""
    if loaded.pipeline is None:
        raise ValueError(f"{model_dir} is not a pipeline folder, so it has no {name.replace('_', ' ')} to quantize")
    weights_only = replace(config, act_bits=None, weight_rounding="rtn", exclude=())
    return quantize_weights_only(component(loaded.pipeline, loaded.kind, name), weights_only)


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

    for name, value in (("samples", samples), ("steps", steps), ("calib_samples", calib_samples)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    grid = check_writable(Path(out_dir) / "samples.png", overwrite=True, recognise=report_file(".png"),
                          what="sample grid")
    fp, ddpm = load_reference_model()
    scheduler = DDIMScheduler.from_config(ddpm.config)
    calib = calibrate_inputs(fp, ddpm, CalibrationSettings(calib_samples, steps, min(25, steps), seed),
                             progress=progress)
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
    save_grid(dict(zip(names, images)), grid)
    return rows


SAMPLES_FORMAT = "tacdiff-samples"
SAMPLES_RECORD = "samples.json"


def is_samples_folder(path: Path) -> bool:
    """Whether ``path`` is a folder :func:`sample_dir` wrote (its ``samples.json`` says so) and nothing else."""
    record = path / SAMPLES_RECORD
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (isinstance(data, dict) and data.get("format") == SAMPLES_FORMAT):
        return False
    ours = {SAMPLES_RECORD, "grid.png"} | {entry.get("file") for entry in data.get("images", [])
                                           if isinstance(entry, dict)}
    return {entry.name for entry in path.iterdir()} <= ours


def _check_samples_images(loaded: LoadedModel, what: str | Path) -> None:
    """``ValueError`` unless ``loaded`` makes images that ``tacdiff sample`` can write and reads what it is given."""
    channels = loaded.image_shape[0]
    if channels not in IMAGE_CHANNELS:
        raise ValueError(f"{what} makes {channels}-channel samples, not images: tacdiff sample writes 1- or "
                         "3-channel images; pass the latent pipeline folder (with its autoencoder) instead of its denoiser")
    if "encoder_hidden_states" in kind_of(loaded.model).cond_keys and not loaded.reads_prompts:
        raise ValueError(f"{what} is a text-conditioned model without its text encoder, so it cannot read prompts; "
                         "pass the pipeline folder (with text_encoder/ and tokenizer/) or an artifact quantized "
                         "from it")


@torch.no_grad()
def sample_dir(model: str | Path, out_dir: str | Path, *, tables: str | Path | None = None,
               force_tables: bool = False, prompts: PromptOptions = PromptOptions(), num_samples: int = 16,
               steps: int = 50, scheduler: str = "auto", seed: int = 0, batch_size: int = 16, device: str = "cpu",
               backend: str = "fake", overwrite: bool = False, progress: bool = True) -> Path:
    """Sample a model and write one PNG per image, ``grid.png`` and ``samples.json``.

    ``model`` is a diffusers model or pipeline folder, a quantized artifact folder or
    ``"reference"``; ``tables`` correct it (they must fit the model, the sampler and the guidance
    scale). Latent pipelines decode with their autoencoder; text-to-image pipelines take
    ``prompts`` (image ``i`` gets prompt ``i mod n``; default: the built-in list) with
    classifier-free guidance. Image ``i`` starts from noise seeded by ``derive_seed(seed, "noise", i)``
    alone (see :func:`tacdiff.sampling.batching.sample_noise`), so the same seed and prompt give the
    same PNG bytes at any ``num_samples`` for a fixed batch size and thread count. The folder is
    written atomically; ``overwrite`` replaces only a folder that this function wrote. ``backend``
    says how a quantized model's layers execute (:func:`tacdiff.backends.use_backend`).
    """

    check_settings(scheduler, steps, num_samples, batch_size, device)
    check_writable(out_dir, overwrite, recognise=is_samples_folder, what="samples folder",
                   inputs=input_paths(model, tables), folder=True)
    loaded = load_any_model(model, device, backend, check=partial(_check_samples_images, what=model),
                            probe_batch=min(batch_size, num_samples))
    conditioning = conditioning_for(loaded, prompts, count=num_samples, seed=seed, what=str(model))
    sched = build_scheduler(scheduler, loaded.scheduler_config, loaded.model)
    denoiser = ModelDenoiser(loaded.model, sched)
    if tables is not None:
        denoiser = load_correction(denoiser, tables, sched, steps, force=force_tables)
        denoiser.tables.check_conditioning(conditioning.record, force=force_tables)
    mine = shard(num_samples, batch_size)
    finals = [to_images(loaded.decode(final)).cpu() for _, (final,) in batched_trajectories(
        [conditioning.guide(denoiser)], sched, num_samples=num_samples, sample_shape=sample_shape_of(loaded.model),
        num_inference_steps=steps, seed=seed, batch_size=batch_size, device=device, cond=conditioning.rows,
        samples=mine.samples, progress=progress)]
    images = mine.gather_rows(torch.cat(finals))
    if not bool(torch.isfinite(images).all()):
        fix = ("Try more bits or other ranges, or recalibrate the tables" if loaded.quantized or tables is not None
               else "The model is full precision: check its weights and that its scheduler config fits it")
        raise ValueError(f"{model} produced NaN or inf samples; nothing was written. {fix}")
    pixels = to_uint8(images)
    record = {"format": SAMPLES_FORMAT, "model": str(model), "tables": None if tables is None else str(tables),
              "scheduler": scheduler_name(sched), "steps": steps, "seed": seed, "batch_size": batch_size,
              "backend": backend, "conditioning": conditioning.record,
              "images": [{"file": f"{i:06d}.png", "index": i, "noise_seed": derive_seed(seed, "noise", i),
                          **({"prompt": conditioning.prompt(i)} if conditioning.prompts is not None else {})}
                         for i in range(num_samples)]}

    def fill(tmp: Path) -> None:
        for entry, image in zip(record["images"], pixels):
            save_png(image, tmp / entry["file"])
        save_png(tile(pixels), tmp / "grid.png")
        (tmp / SAMPLES_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    return write_dir_atomically(out_dir, fill, overwrite=overwrite, recognise=is_samples_folder,
                                what="samples folder")

