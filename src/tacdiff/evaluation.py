"""Paired multi-method scoring: sample several denoisers from the same noise and score each against the first.

What ``tacdiff bench`` and ``benchmarks/tac_sweep.py`` share. Every denoiser runs in one
:func:`tacdiff.sampling.batched_trajectories` call, so all start from the same noise, draw the
same per-step noise and are compared with the same reference (FP) images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from diffusers import SchedulerMixin
from torch import Tensor

from tacdiff.metrics.evaluate import fid_or_note
from tacdiff.metrics.paired import PairedStepStats, psnr_db
from tacdiff.models.kinds import Cond, Denoiser, DenoiserWrapper
from tacdiff.sampling.batching import Rows, batched_trajectories, to_images
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


def score_methods(methods: Sequence[Method], scheduler: SchedulerMixin, *, num_inference_steps: int,
                  num_samples: int, sample_shape: Sequence[int], seed: int, batch_size: int,
                  device: torch.device | str = "cpu", cond: Cond | Rows | None = None,
                  decode: Callable[[Tensor], Tensor] | None = None, progress: bool = True
                  ) -> tuple[list[dict[str, Any]], list[list[float]], list[float]]:
    """Sample every method from the same noise; score each against ``methods[0]`` (the reference).

    ``cond`` conditions every sample (as in :func:`~tacdiff.sampling.batching.batched_trajectories`);
    ``decode`` turns final latents into images (a latent pipeline's autoencoder).

    Returns:
        rows: one dict per method with ``bits``, ``steps``, ``method``, ``fid``, ``kid`` (bundled
            Fashion-MNIST classifier features, so 1x28x28 images only; else None),
            ``x0_mse``/``x0_psnr`` (final images clamped to [-1, 1] against the reference's; PSNR
            peak-to-peak 2, dB),
            ``calib_seconds`` and ``sample_seconds`` (the denoiser's timed calls).
        state_sq_err: per method, ``(T,)`` mean over samples of ``‖x̂_t − x_t‖²`` (latents before each step).
        timesteps: ``(T,)`` the scheduler timesteps in sampling order.
    """
    callback = _AllPairs(len(methods))
    images: list[list[Tensor]] = [[] for _ in methods]
    for _, finals in batched_trajectories([m.denoiser for m in methods], scheduler, num_samples=num_samples,
                                          sample_shape=sample_shape, num_inference_steps=num_inference_steps,
                                          seed=seed, batch_size=batch_size, device=device, cond=cond,
                                          callback=callback, progress=progress):
        for kept, final in zip(images, finals):
            kept.append(to_images(final if decode is None else decode(final)).float().cpu())
    reference = torch.cat(images[0]).double()
    rows = []
    for method, kept in zip(methods, images):
        samples = torch.cat(kept)
        mse = float((samples.double() - reference).pow(2).mean())
        scores, _ = fid_or_note(kept, tuple(samples.shape[1:]), seed % 2 ** 31)
        rows.append({"bits": method.bits, "steps": num_inference_steps, "method": method.name, "fid": scores["fid"],
                     "kid": scores["kid"], "x0_mse": mse, "x0_psnr": psnr_db(mse),
                     "calib_seconds": method.calib_seconds, "sample_seconds": method.denoiser.seconds})
    return rows, [stats.mean_sq_norms()[0].tolist() for stats in callback.stats], callback.stats[0].timesteps
