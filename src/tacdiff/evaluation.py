"""Evaluation: ``tacdiff eval`` on one model folder (:func:`evaluate`), and paired multi-method scoring
(:func:`score_methods`): sample several denoisers from the same noise and score each against the first.

The scoring is what ``tacdiff bench`` and ``benchmarks/tac_sweep.py`` share. Every denoiser runs in one
:func:`tacdiff.sampling.batched_trajectories` call, so all start from the same noise, draw the
same per-step noise and are compared with the same reference (FP) images.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers import SchedulerMixin
from torch import Tensor

from tacdiff.correction import load_correction
from tacdiff.distributed import shard
from tacdiff.io.artifact import check_source, read_metadata
from tacdiff.data.prompts import fashion_class_of
from tacdiff.metrics.fid import FID_KEYS, fid_or_note, fid_ready
from tacdiff.metrics.paired import Decode, PairedStepStats, paired_errors, psnr_db, ssim_sum
from tacdiff.metrics.prompt_accuracy import prompt_accuracy
from tacdiff.models.kinds import Cond, Denoiser, DenoiserWrapper, ModelDenoiser, sample_shape_of
from tacdiff.models.loading import build_scheduler, check_settings, load_any_model, scheduler_name
from tacdiff.sampling.batching import Rows, batched_trajectories, to_images
from tacdiff.sampling.conditioning import Conditioning, PromptOptions, conditioning_for
from tacdiff.sampling.loop import StepRecord


class TimedDenoiser(DenoiserWrapper):
    """A denoiser that adds the wall time of each call of ``inner`` to ``seconds`` (CUDA synchronised)."""

    def __init__(self, inner: Denoiser, device: torch.device | str) -> None:
        super().__init__(inner)
        self.device, self.seconds = torch.device(device), 0.0

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        out, seconds = timed_call(self.device, lambda: self.inner(x, t, **cond))
        self.seconds += seconds
        return out


def timed_call(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds, synchronised before and after on CUDA."""
    _sync(device)
    started = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Method:
    """One row of a paired comparison: its labels, its (timed) denoiser and the seconds its fit took."""

    bits: str
    name: str
    denoiser: TimedDenoiser
    calib_seconds: float


class _AllPairs:
    """A ``run_trajectories`` callback feeding one :class:`PairedStepStats` per estimate (reference 0)."""

    def __init__(self, count: int) -> None:
        self.stats = [PairedStepStats(0, i) for i in range(count)]

    def __call__(self, record: StepRecord) -> None:
        for stats in self.stats:
            stats(record)


@dataclass
class Scored:
    """What :func:`score_methods` finds, one entry per method in order.

    Attributes:
        rows: one dict per method with ``bits``, ``steps``, ``method``, :data:`~tacdiff.metrics.fid.FID_KEYS`
            (FID and KID in both bundled feature spaces, :func:`~tacdiff.metrics.fid.fid_or_note`: grayscale
            images of at least 28x28, centre-cropped to it; else None), ``prompt_accuracy``
            (:func:`~tacdiff.metrics.prompt_accuracy.prompt_accuracy`, None without labels),
            ``x0_mse``/``x0_psnr``/``x0_ssim`` (final images clamped to [-1, 1] against the reference's;
            PSNR peak-to-peak 2, dB; SSIM mean over samples), ``calib_seconds`` and ``sample_seconds``
            (the denoiser's timed calls).
        state_sq_err: ``(T,)`` mean over samples of ``‖x̂_t − x_t‖²`` (latents before each step).
        timesteps: ``(T,)`` the scheduler timesteps in sampling order.
        first_images: the first ``keep`` final images ``(keep, C, H, W)`` in [-1, 1], for a sample grid.
    """

    rows: list[dict[str, Any]]
    state_sq_err: list[list[float]]
    timesteps: list[float]
    first_images: list[Tensor]


def score_methods(methods: Sequence[Method], scheduler: SchedulerMixin, *, num_inference_steps: int,
                  num_samples: int, sample_shape: Sequence[int], seed: int, batch_size: int,
                  device: torch.device | str = "cpu", cond: Cond | Rows | None = None,
                  decode: Callable[[Tensor], Tensor] | None = None, labels: Sequence[int] | None = None,
                  keep: int = 0, progress: bool = True) -> Scored:
    """Sample every method from the same noise; score each against ``methods[0]`` (the reference).

    ``cond`` conditions every sample (as in :func:`~tacdiff.sampling.batching.batched_trajectories`);
    ``decode`` turns final latents into images (a latent pipeline's autoencoder); ``labels`` are the
    Fashion-MNIST classes the samples' prompts name, for prompt accuracy; ``keep`` images per method are
    returned for a sample grid (see :class:`Scored`).
    """
    callback = _AllPairs(len(methods))
    local: list[list[Tensor]] = [[] for _ in methods]
    mine = shard(num_samples, batch_size)
    for _, finals in batched_trajectories([m.denoiser for m in methods], scheduler, num_samples=num_samples,
                                          sample_shape=sample_shape, num_inference_steps=num_inference_steps,
                                          seed=seed, batch_size=batch_size, device=device, cond=cond,
                                          callback=callback, samples=mine.samples, progress=progress):
        for kept, final in zip(local, finals):
            kept.append(to_images(final if decode is None else decode(final)).float().cpu())
    for stats in callback.stats:
        stats.add_other_ranks(mine)
    images = [mine.gather_rows(torch.cat(kept)) for kept in local]
    reference = images[0].double()
    rows = []
    for method, samples in zip(methods, images):
        mse = float((samples.double() - reference).pow(2).mean())
        scores, _ = fid_or_note([samples], tuple(samples.shape[1:]), seed % 2 ** 31)
        rows.append({"bits": method.bits, "steps": num_inference_steps, "method": method.name,
                     **{key: scores[key] for key in FID_KEYS},
                     "prompt_accuracy": None if labels is None else prompt_accuracy(samples, labels)["overall"],
                     "x0_mse": mse, "x0_psnr": psnr_db(mse),
                     "x0_ssim": ssim_sum(reference, samples) / samples.shape[0],
                     "calib_seconds": method.calib_seconds, "sample_seconds": method.denoiser.seconds})
    return Scored(rows, [stats.mean_sq_norms()[0].tolist() for stats in callback.stats], callback.stats[0].timesteps,
                  [samples[:keep] for samples in images])


def _sample_images(denoiser: Denoiser, fp: Denoiser | None, scheduler: SchedulerMixin, keep: bool,
                   decoders: tuple[Decode, Decode], **run: Any) -> tuple[list[Tensor], Any, int]:
    """Final images of ``denoiser`` (kept on the CPU if ``keep``; every process's), paired errors against ``fp``
    (or None) and the number of samples (of either model) holding NaN or inf; ``decoders`` turn ``fp``'s and
    ``denoiser``'s final latents into images."""
    images: list[Tensor] = []
    mine = shard(run["num_samples"], run["batch_size"])
    broken = [0]

    def collect(start: int, ref: Tensor, est: Tensor) -> None:
        broken[0] += int((~torch.isfinite(est) | ~torch.isfinite(ref)).flatten(1).any(1).sum())
        if keep:
            images.append(est.cpu())

    if fp is not None:
        paired = paired_errors(fp, denoiser, scheduler, decode=decoders, on_batch=collect, **run)
    else:
        paired = None
        for start, (final,) in batched_trajectories([denoiser], scheduler, samples=mine.samples, **run):
            image = to_images(decoders[1](final))
            collect(start, image, image)
    gathered = [mine.gather_rows(torch.cat(images))] if keep else []
    return gathered, paired, int(mine.sum(torch.tensor(broken)))


def _check_finite(broken: int, samples: int, model: str | Path) -> None:
    """Raise when samples hold NaN or inf, instead of reporting a NaN metric."""
    if broken:
        raise ValueError(f"{model} (or its --fp-model) produced NaN or inf in {broken} of {samples} samples: the "
                         "model (or its correction tables) is numerically broken at these settings, so no metric "
                         "was computed. Try more bits or other ranges, or recalibrate the tables")


def evaluate(model: str | Path, *, fp_model: str | Path | None = None, scheduler: str = "auto", steps: int = 50,
             samples: int = 1000, seed: int = 0, batch_size: int = 256, device: str = "cpu",
             tables: str | Path | None = None, force_tables: bool = False, prompts: PromptOptions = PromptOptions(),
             backend: str = "fake", progress: bool = True) -> dict[str, Any]:
    """Sample ``model`` and score it; pair it with ``fp_model`` for the paired metrics.

    Args:
        model: a diffusers UNet2DModel or UNet2DConditionModel folder or pipeline folder, a
            quantized artifact folder, or ``"reference"`` for the bundled Fashion-MNIST model.
            Latent pipelines are scored on images decoded by their autoencoder; text-to-image
            pipelines sample ``prompts`` with classifier-free guidance (the same for ``model`` and
            ``fp_model``); a bare text-conditioned UNet samples seeded random stand-in embeddings.
        fp_model: the FP model (same kinds of spec) to pair with; ``None`` skips the paired metrics.
            Both sides see ``model``'s text embeddings (from its text encoder, quantized or not) and
            each decodes with its own autoencoder, so the paired metrics include a quantized decoder's
            error but not a quantized text encoder's.
        scheduler: ddim, ddpm, dpm (DPM-Solver++ multistep) or euler, built with ``from_config``
            from the model's scheduler config (an artifact's recorded one, else ``fp_model``'s,
            else a 1000-step linear DDPM schedule).
        steps, samples, seed, batch_size, device: sampling settings; see
            :func:`tacdiff.sampling.batching.sample_noise` for how seeds map to images.
        tables: correction tables (``tacdiff calibrate --out``) to apply to ``model``; they must
            have been calibrated for ``scheduler`` at ``steps`` and for ``model`` (its bits, FP
            model and sample shape: :meth:`CorrectionTables.check_model`).
        force_tables: apply ``tables`` fitted for another model, noise schedule or guidance scale, with a warning.
        prompts: prompts, negative prompt and guidance scale of text-to-image pipelines.
        backend: how a quantized ``model`` executes (:func:`tacdiff.backends.use_backend`).
    Returns:
        A JSON-ready dict: the settings, ``fid``/``kid``/``kid_std`` and ``fid_allconv``/``kid_allconv``/
        ``kid_std_allconv`` (the two bundled feature spaces; None unless the model makes grayscale images of
        at least 28x28, centre-cropped to it), ``x0_mse``/``x0_psnr``/``x0_ssim``
        (None without ``fp_model``; PSNR with peak-to-peak 2; SSIM of the final images, mean over samples),
        ``x0_mse_per_image`` (each image's x0 MSE, in sample order; None without ``fp_model``),
        ``per_step`` paired series (or None), ``prompt_accuracy`` and ``prompt_accuracy_per_class``
        (:func:`~tacdiff.metrics.prompt_accuracy.prompt_accuracy`; None unless the images are
        grayscale and every prompt names one Fashion-MNIST class), ``note`` and ``seconds``
        (sampling plus metrics, models already loaded) with ``sampling_seconds``.
    """
    check_settings(scheduler, steps, samples, batch_size, device)
    loaded = load_any_model(model, device, backend, probe_batch=min(batch_size, samples))
    fp = load_any_model(fp_model, device) if fp_model is not None else None
    if fp is not None and loaded.quantized:
        check_source(read_metadata(model), fp.model, fp_model)
    shape = tuple(sample_shape_of(loaded.model))
    if fp is not None and tuple(sample_shape_of(fp.model)) != shape:
        raise ValueError(f"--fp-model makes {tuple(sample_shape_of(fp.model))} samples but MODEL makes {shape}; "
                         "pair a quantized model with the FP model it came from")
    config = loaded.scheduler_config or (fp.scheduler_config if fp is not None else None)
    sched = build_scheduler(scheduler, config, loaded.model)
    if steps > sched.config.num_train_timesteps:
        raise ValueError(f"steps must be <= num_train_timesteps={sched.config.num_train_timesteps}, got {steps}")
    # prompts, image shape and a decoder for a side without them come from the side with a pipeline's components
    components = loaded if loaded.pipeline is not None or fp is None else fp
    conditioning = conditioning_for(components, prompts, count=samples, seed=seed, what=str(model))
    sampler = ModelDenoiser(loaded.model, sched)
    if tables is not None:
        sampler = load_correction(sampler, tables, sched, steps, force=force_tables)
        sampler.tables.check_conditioning(conditioning.record, force=force_tables)
        correction = sampler.tables
    image_shape = components.image_shape
    labels = prompted_classes(conditioning, samples, image_shape)
    decoders = tuple(side.decode if side is not None and side.pipeline is not None else components.decode
                     for side in (fp, loaded))
    started = time.perf_counter()
    images, paired, broken = _sample_images(
        conditioning.guide(sampler), conditioning.guide(ModelDenoiser(fp.model, sched)) if fp is not None else None,
        sched, fid_ready(image_shape) or labels is not None, decoders, num_samples=samples, sample_shape=shape,
        num_inference_steps=steps, seed=seed, batch_size=batch_size, device=device, cond=conditioning.rows,
        progress=progress)
    _sync(torch.device(device))
    sampling_seconds = time.perf_counter() - started
    _check_finite(broken, samples, model)
    scores, note = fid_or_note(images, image_shape, seed)
    accuracy = None if labels is None else prompt_accuracy(torch.cat(images), labels)
    return {
        "model": str(model), "fp_model": None if fp_model is None else str(fp_model),
        "tables": None if tables is None else str(tables),
        "correction": None if tables is None else f"{correction.method} (IBC on the {correction.ibc_target})",
        "quantized": loaded.quantized, "scheduler": scheduler_name(sched), "steps": steps, "samples": samples,
        "seed": seed, "batch_size": batch_size, "device": device, "backend": backend,
        "conditioning": conditioning.record, **scores,
        "x0_mse": None if paired is None else paired.x0_mse, "x0_psnr": None if paired is None else paired.x0_psnr,
        "x0_ssim": None if paired is None else paired.x0_ssim,
        "x0_mse_per_image": None if paired is None else paired.x0_mse_per_image.tolist(),
        "per_step": None if paired is None else paired.per_step(), "note": note,
        "prompt_accuracy": None if accuracy is None else accuracy["overall"],
        "prompt_accuracy_per_class": None if accuracy is None else accuracy["per_class"],
        "seconds": time.perf_counter() - started, "sampling_seconds": sampling_seconds,
    }


def prompted_classes(conditioning: Conditioning, samples: int, image_shape: Sequence[int]) -> list[int] | None:
    """The Fashion-MNIST class each sample's prompt names, for prompt accuracy on grayscale ``(C, H, W)`` images,
    when every prompt names exactly one; else None."""
    if conditioning.prompts is None or image_shape[0] != 1:
        return None
    classes = [fashion_class_of(conditioning.prompt(i)) for i in range(samples)]
    return None if None in classes else classes


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.6g}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    """The scalar results of :func:`evaluate` as a two-column text table."""
    keys = ("model", "fp_model", "tables", "correction", "backend", "scheduler", "steps", "samples", "seed", "fid", "kid",
            "kid_std", "fid_allconv", "kid_allconv", "prompt_accuracy", "x0_mse", "x0_psnr", "x0_ssim",
            "sampling_seconds", "seconds")
    width = max(len(k) for k in keys)
    lines = [f"{k:<{width}}  {_cell(result.get(k))}" for k in keys]
    return "\n".join(lines + ([result["note"]] if result.get("note") else []))
