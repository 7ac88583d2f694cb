"""Paired trajectory errors: an estimate denoiser (e.g. quantized) against a reference (FP) one.

Both run through :func:`tacdiff.sampling.run_trajectories` from the same starting noise with
the same per-step noise, in batches, so memory is bounded by the batch size. The per-step
sums live in :class:`PairedStepStats`, a ``run_trajectories`` callback that other per-step
consumers (e.g. a correction calibration) can reuse or copy the shape of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from diffusers import SchedulerMixin
from torch import Tensor

from tacdiff.distributed import Shard, shard
from tacdiff.models.kinds import Cond, Denoiser
from tacdiff.sampling.batching import IMAGE_RANGE, Rows, batched_trajectories, to_images
from tacdiff.sampling.loop import StepRecord

PEAK_TO_PEAK = IMAGE_RANGE[1] - IMAGE_RANGE[0]
Decode = Callable[[Tensor], Tensor]
"""Final latents to images in [-1, 1]."""


def sqnr_db(reference: Tensor, estimate: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σ reference² / Σ (estimate − reference)²)`` in dB.

    Sums in float64 over all elements; ``inf`` when the tensors are equal.
    """
    if reference.shape != estimate.shape:
        raise ValueError(f"shapes differ: reference {tuple(reference.shape)}, estimate {tuple(estimate.shape)}")
    ref = reference.detach().double()
    noise = (estimate.detach().double() - ref).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return -math.inf if signal == 0 else 10.0 * math.log10(signal / noise)


def psnr_db(mse: float, peak_to_peak: float = PEAK_TO_PEAK) -> float:
    """PSNR ``10·log10(peak_to_peak² / mse)`` in dB (``inf`` for ``mse == 0``); images in [-1, 1] span 2."""
    return math.inf if mse == 0 else 10.0 * math.log10(peak_to_peak ** 2 / mse)


def psnr_gap(base: Sequence[float] | Tensor, other: Sequence[float] | Tensor, *, confidence: float = 0.95,
             resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``PSNR(other) − PSNR(base)`` in dB from per-image MSEs of the same images (e.g.
    :attr:`PairedErrors.x0_mse_per_image` of two runs on the same noise), with a ``confidence`` percentile-bootstrap
    interval: images are resampled with replacement, in pairs, so that the images both runs find hard count once.
    Returns ``(gap, low, high)``."""
    base, other = torch.as_tensor(base, dtype=torch.float64), torch.as_tensor(other, dtype=torch.float64)
    if base.shape != other.shape or base.dim() != 1 or len(base) < 2:
        raise ValueError(f"need two equal-length lists of per-image MSEs (2 or more), got shapes {tuple(base.shape)} "
                         f"and {tuple(other.shape)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    picks = torch.randint(len(base), (resamples, len(base)), generator=torch.Generator().manual_seed(seed))
    gaps = 10.0 * torch.log10(base[picks].mean(1) / other[picks].mean(1))
    tail = (1 - confidence) / 2
    low, high = torch.quantile(gaps, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return 10.0 * math.log10(base.mean().item() / other.mean().item()), low, high


def ssim_sum(reference: Tensor, estimate: Tensor) -> float:
    """Sum over samples of the SSIM (torchmetrics; Wang et al. 2004) of ``estimate`` against ``reference``,
    images ``(N, C, H, W)`` in [-1, 1] (data range 2), Gaussian window of 11 pixels (the largest odd size
    that fits for images under 11 pixels)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    kernel = min(11, min(reference.shape[-2:]) - (1 - min(reference.shape[-2:]) % 2))
    per_sample = structural_similarity_index_measure(estimate.double(), reference.double(), data_range=PEAK_TO_PEAK,
                                                     kernel_size=kernel, reduction="none")
    return float(per_sample.sum())


class PairedStepStats:
    """Per-step discrepancy sums between two trajectories of a :class:`StepRecord`; a ``run_trajectories`` callback.

    With ``d = record.<field>[estimate] - record.<field>[reference]`` it accumulates, per step
    index and over every batch it is called on, in float64: the sample count, ``Σ_n ‖d_state‖²``,
    ``Σ_n ‖d_eps‖²`` and the sum of ``d_input`` per channel (``granularity="channel"``, summed
    over samples and pixels) or per element (``"element"``, summed over samples).
    ``d_state`` compares the latents before the step, ``d_input`` the scaled model inputs
    (what a denoiser wrapper sees; the same as the latents for DDIM and DDPM).
    """

    def __init__(self, reference: int = 0, estimate: int = 1,
                 granularity: Literal["channel", "element"] = "channel") -> None:
        if granularity not in ("channel", "element"):
            raise ValueError(f"granularity must be 'channel' or 'element', got {granularity!r}")
        self.reference, self.estimate, self.granularity = reference, estimate, granularity
        self.timesteps: list[float] = []
        self.counts: list[int] = []
        self.state_sq: list[float] = []
        self.eps_sq: list[float] = []
        self.input_sum: list[Tensor] = []
        self.input_elements: list[int] = []

    def _diff(self, pair: list[Tensor]) -> Tensor:
        return pair[self.estimate].double() - pair[self.reference].double()

    def _slot(self, step: int, t: float) -> None:
        if step == len(self.timesteps):
            self.timesteps.append(t)
            self.counts.append(0)
            self.state_sq.append(0.0)
            self.eps_sq.append(0.0)
            self.input_sum.append(torch.zeros(()))
            self.input_elements.append(0)
        elif step > len(self.timesteps) or self.timesteps[step] != t:
            raise ValueError(f"step {step} at timestep {t} does not match the steps seen so far "
                             f"({self.timesteps}); use one PairedStepStats per scheduler and step count")

    def __call__(self, record: StepRecord) -> None:
        self._slot(record.step, float(record.t))
        i = record.step
        d_state, d_input, d_eps = (self._diff(p) for p in (record.states, record.inputs, record.eps))
        self.counts[i] += d_state.shape[0]
        self.state_sq[i] += d_state.flatten(1).pow(2).sum().item()
        self.eps_sq[i] += d_eps.flatten(1).pow(2).sum().item()
        dims = (0,) if self.granularity == "element" else (0, *range(2, d_input.ndim))
        summed = d_input.sum(dims)
        self.input_sum[i] = self.input_sum[i] + summed.cpu()
        self.input_elements[i] += d_input.numel() // summed.numel()

    def add_other_ranks(self, mine: Shard) -> None:
        """Add the sums of the other processes of a split run (:mod:`tacdiff.distributed`); else nothing."""
        if not mine.split:
            return
        self._require_data()
        self.counts = [int(n) for n in mine.sum(torch.tensor(self.counts, dtype=torch.float64))]
        self.state_sq = mine.sum(torch.tensor(self.state_sq, dtype=torch.float64)).tolist()
        self.eps_sq = mine.sum(torch.tensor(self.eps_sq, dtype=torch.float64)).tolist()
        self.input_sum = list(mine.sum(torch.stack(self.input_sum)))
        self.input_elements = [int(n) for n in mine.sum(torch.tensor(self.input_elements, dtype=torch.float64))]

    def mean_input_bias(self) -> Tensor:
        """``(T, C)`` (or ``(T, C, H, W)`` per element): the mean of ``x̂_t − x_t`` at each step."""
        self._require_data()
        return torch.stack([s / n for s, n in zip(self.input_sum, self.input_elements)])

    def mean_sq_norms(self) -> tuple[Tensor, Tensor]:
        """``(T,)`` means over samples of ``‖x̂_t − x_t‖²`` and of ``‖ε̂_t − ε_t‖²``."""
        self._require_data()
        counts = torch.tensor(self.counts, dtype=torch.float64)
        return (torch.tensor(self.state_sq, dtype=torch.float64) / counts,
                torch.tensor(self.eps_sq, dtype=torch.float64) / counts)

    def _require_data(self) -> None:
        if not self.timesteps:
            raise ValueError("no steps recorded yet; pass this object as run_trajectories' callback first")


@dataclass(frozen=True)
class PairedErrors:
    """How far the estimate's trajectories are from the reference's on the same noise.

    Attributes:
        num_samples, num_inference_steps: what was run.
        timesteps: ``(T,)`` the scheduler timesteps, in sampling order.
        x0_mse: mean over samples and pixels of ``(x̂_0 − x_0)²``, final images clamped to [-1, 1].
        x0_psnr: ``10·log10(2² / x0_mse)`` dB (peak-to-peak 2 for images in [-1, 1]); ``inf`` if equal.
        x0_mse_per_image: ``(num_samples,)`` each image's mean over pixels of ``(x̂_0 − x_0)²`` (for intervals
            on paired differences: resample images, not pixels).
        x0_ssim: mean over samples of the final images' SSIM (:func:`ssim_sum`); 1 if equal.
        state_sq_err: ``(T,)`` mean over samples of the per-sample ``‖x̂_t − x_t‖²`` (latents before step t).
        eps_sq_err: ``(T,)`` mean over samples of the per-sample ``‖ε̂_t − ε_t‖²``.
        input_bias: ``(T, C)`` mean over samples and pixels of ``x̂_t − x_t`` per channel (model inputs).
    """

    num_samples: int
    num_inference_steps: int
    timesteps: Tensor
    x0_mse: float
    x0_psnr: float
    x0_ssim: float
    x0_mse_per_image: Tensor
    state_sq_err: Tensor
    eps_sq_err: Tensor
    input_bias: Tensor

    def per_step(self) -> dict[str, list[Any]]:
        """The per-step series as plain lists (for JSON)."""
        return {"timesteps": self.timesteps.tolist(), "state_sq_err": self.state_sq_err.tolist(),
                "eps_sq_err": self.eps_sq_err.tolist(), "input_bias": self.input_bias.tolist()}


def paired_errors(reference: Denoiser, estimate: Denoiser, scheduler: SchedulerMixin, *, num_samples: int,
                  sample_shape: Sequence[int], num_inference_steps: int, seed: int = 0, batch_size: int = 64,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  cond: Cond | Rows | None = None, decode: Decode | tuple[Decode, Decode] | None = None,
                  on_batch: Callable[[int, Tensor, Tensor], None] | None = None,
                  progress: bool = True) -> PairedErrors:
    """Sample ``reference`` (FP) and ``estimate`` (e.g. quantized) in lockstep and measure their discrepancy.

    Args:
        reference, estimate: denoisers ``(x, t, **cond) -> eps`` (see :class:`tacdiff.models.kinds.ModelDenoiser`).
        scheduler: any diffusers scheduler; each trajectory gets its own copy.
        num_samples: trajectories per denoiser, run ``batch_size`` at a time.
        sample_shape: ``(C, H, W)`` of the latents.
        seed: starting noise and per-step noise, as in :func:`tacdiff.sampling.batching.batched_trajectories`.
        cond: model keyword arguments with a leading dimension ``num_samples``, or ``(start, count) -> keywords``.
        decode: turns final latents into images in [-1, 1] (a latent pipeline's autoencoder), or a pair
            ``(reference's, estimate's)`` when their decoders differ (a quantized one); the x0
            errors compare the decoded images. ``None``: the latents are the images.
        on_batch: called as ``on_batch(start, reference_images, estimate_images)`` with each
            batch's final images clamped to [-1, 1] (e.g. to keep them for FID); in a process group
            only with this process's batches (:func:`tacdiff.distributed.shard`), while the errors
            returned cover every process's samples.
    Returns:
        :class:`PairedErrors`; the images are not kept.
    """
    stats = PairedStepStats()
    sq_err, ssim, elements, per_image = 0.0, 0.0, 0, []
    decoders = decode if isinstance(decode, tuple) else (decode, decode)
    mine = shard(num_samples, batch_size)
    for start, (ref, est) in batched_trajectories(
            [reference, estimate], scheduler, num_samples=num_samples, sample_shape=sample_shape,
            num_inference_steps=num_inference_steps, seed=seed, batch_size=batch_size, device=device,
            dtype=dtype, cond=cond, callback=stats, samples=mine.samples, progress=progress):
        ref, est = (to_images(final if fn is None else fn(final)) for fn, final in zip(decoders, (ref, est)))
        squares = (est.double() - ref.double()).pow(2)
        sq_err += squares.sum().item()
        per_image.append(squares.flatten(1).mean(1).cpu())
        ssim += ssim_sum(ref, est)
        elements += ref.numel()
        if on_batch is not None:
            on_batch(start, ref, est)
    sq_err, ssim, elements = mine.sum(torch.tensor([sq_err, ssim, elements], dtype=torch.float64)).tolist()
    stats.add_other_ranks(mine)
    mse = sq_err / elements
    state_sq, eps_sq = stats.mean_sq_norms()
    return PairedErrors(num_samples, num_inference_steps, torch.tensor(stats.timesteps), mse, psnr_db(mse),
                        ssim / num_samples, mine.gather_rows(torch.cat(per_image)), state_sq, eps_sq,
                        stats.mean_input_bias())
