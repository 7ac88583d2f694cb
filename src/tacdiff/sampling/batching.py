"""Batching and seeding: every random draw of sampling derives from a seed and a sample index.

Sample ``i``'s starting noise and per-step noise come from generators seeded by
:func:`derive_seed` with ``i``, so no image depends on the batch size, the device or how
many samples are drawn.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterator, Sequence

import torch
from diffusers import SchedulerMixin
from torch import Tensor
from tqdm.auto import tqdm

from tacdiff.models.kinds import Cond, Denoiser, map_cond
from tacdiff.sampling.loop import StepRecord, run_trajectories

Rows = Callable[[int, int], Cond]
"""``rows(start, count)``: the model keywords of samples ``start .. start+count-1`` (leading dimension ``count``)."""

IMAGE_RANGE = (-1.0, 1.0)


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed determined by ``seed`` and ``keys`` alone (distinct keys give unrelated streams)."""
    text = ":".join(str(k) for k in (seed, *keys)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def sample_noise(shape: Sequence[int], start: int, count: int, seed: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """Starting noise ``(count, *shape)`` for samples ``start .. start+count-1``.

    Sample ``i`` is drawn on the CPU from ``derive_seed(seed, "noise", i)`` alone, so an image
    does not depend on the batch size, the device or how many samples are drawn.
    """
    gens = (torch.Generator("cpu").manual_seed(derive_seed(seed, "noise", i)) for i in range(start, start + count))
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device, dtype)


def batched_trajectories(denoisers: Sequence[Denoiser], scheduler: SchedulerMixin, *, num_samples: int,
                         sample_shape: Sequence[int], num_inference_steps: int, seed: int = 0,
                         batch_size: int = 64, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32, cond: Cond | Rows | None = None,
                         callback: Callable[[StepRecord], None] | None = None, samples: range | None = None,
                         progress: bool = True) -> Iterator[tuple[int, list[Tensor]]]:
    """Run :func:`run_trajectories` over ``num_samples`` in batches; yield ``(start, final latents)`` per batch.

    Starting noise comes from :func:`sample_noise`. Stochastic schedulers draw sample ``i``'s
    per-step noise from its own generator (seeded by ``seed`` and ``i``), identical for every
    denoiser, so no image depends on ``batch_size``.
    ``cond`` values have a leading dimension ``num_samples`` and are sliced per batch, or ``cond`` is a
    function ``(start, count) -> keywords`` called per batch (prompts streamed, see
    :class:`~tacdiff.sampling.conditioning.Conditioning`); ``callback`` sees every step of every batch.
    ``samples`` restricts the run to those indices (a process's share, :func:`tacdiff.distributed.shard`;
    batches start at ``samples.start``); the progress bar then counts every process's work as this one's.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    samples = range(num_samples) if samples is None else samples
    share = num_samples / len(samples) if len(samples) else 1.0
    with tqdm(total=num_samples, desc="samples", unit="img", disable=not progress) as bar:
        for start in range(samples.start, samples.stop, batch_size):
            count = min(batch_size, samples.stop - start)
            noise = sample_noise(sample_shape, start, count, seed, device, dtype)
            rows = cond(start, count) if callable(cond) else map_cond(cond or {}, lambda v: v[start:start + count])
            chunk = map_cond(rows, lambda v: v.to(device))
            finals = run_trajectories(denoisers, scheduler, noise, num_inference_steps=num_inference_steps,
                                      seed=[derive_seed(seed, "steps", i) for i in range(start, start + count)],
                                      cond=chunk, callback=callback, progress=progress)
            bar.update(min(round(count * share), num_samples - bar.n))
            yield start, finals


def to_images(latents: Tensor) -> Tensor:
    """Final latents clamped to the image range [-1, 1]."""
    return latents.clamp(*IMAGE_RANGE)
