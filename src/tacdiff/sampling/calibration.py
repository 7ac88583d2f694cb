"""Calibration inputs: ``(x_t, t[, conditioning])`` recorded from the full-precision model's own sampling.

Following Q-Diffusion's time-uniform calibration, the FP model samples from seeded noise
and the model inputs of a uniform subset of the sampling steps are kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

import torch
from diffusers import DDIMScheduler, SchedulerMixin

from tacdiff.distributed import shard
from tacdiff.models.kinds import (Cond, ModelDenoiser, cond_leaves, guidance_batch, is_flow_matching, map_cond,
                                  sample_shape_of)
from tacdiff.sampling.batching import batched_trajectories
from tacdiff.sampling.conditioning import Conditioning, tensor_conditioning
from tacdiff.sampling.loop import StepRecord


@dataclass
class CalibrationSet:
    """Model inputs for calibration.

    Attributes:
        x: ``(N, C, H, W)`` noisy model inputs.
        timesteps: ``(N,)`` the scheduler timestep of each input.
        cond: extra model keyword arguments, one row per conditioning (e.g. ``encoder_hidden_states``
            of shape ``(M, L, D)``): input ``i`` takes row ``cond_index[i]``, so inputs of one
            trajectory share their prompt's row instead of copying it.
        cond_index: ``(N,)`` row of ``cond`` per input; ``None`` means row ``i`` for input ``i``.
    """

    x: torch.Tensor
    timesteps: torch.Tensor
    cond: Cond
    cond_index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if n == 0:
            raise ValueError("the calibration set is empty; draw at least one sample")
        if self.timesteps.shape != (n,):
            raise ValueError(f"timesteps must have shape ({n},), got {tuple(self.timesteps.shape)}")
        rows = n if self.cond_index is None else int(self.cond_index.max()) + 1
        if self.cond_index is not None and self.cond_index.shape != (n,):
            raise ValueError(f"cond_index must have shape ({n},), got {tuple(self.cond_index.shape)}")
        for key, value in cond_leaves(self.cond):
            if value.shape[0] < rows or (self.cond_index is None and value.shape[0] != n):
                raise ValueError(f"cond[{key!r}] has {value.shape[0]} rows, expected {rows}")

    def __len__(self) -> int:
        return self.x.shape[0]

    def cond_of(self, index: torch.Tensor) -> Cond:
        """The conditioning rows of the inputs ``index``."""
        rows = index if self.cond_index is None else self.cond_index[index]
        return map_cond(self.cond, lambda v: v[rows])

    def batches(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, Cond]]:
        """Yield ``(x, t, cond)`` batches of at most ``batch_size`` inputs sharing one timestep.

        ``dtype`` (the model's) applies to floating-point tensors only: timesteps and integer
        conditioning such as ``class_labels`` keep theirs.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")

        def move(value: torch.Tensor) -> torch.Tensor:
            return value.to(device, dtype if value.is_floating_point() else None)

        for t in torch.unique(self.timesteps, sorted=True).flip(0):
            index = torch.nonzero(self.timesteps == t).flatten()
            for chunk in index.split(batch_size):
                yield move(self.x[chunk]), self.timesteps[chunk].to(device), map_cond(self.cond_of(chunk), move)

    def subset(self, count: int, seed: int = 0) -> "CalibrationSet":
        """A random subset of ``count`` inputs (all of them if ``count >= len(self)``)."""
        if count >= len(self):
            return self
        pick = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count]
        rows = pick if self.cond_index is None else self.cond_index[pick]
        return CalibrationSet(self.x[pick], self.timesteps[pick], self.cond, rows)


def collect_calibration_set(model: torch.nn.Module, scheduler: SchedulerMixin, *, num_samples: int = 64,
                            num_inference_steps: int = 50, kept_steps: int | None = 25, seed: int = 0,
                            batch_size: int = 64, cond: Cond | Conditioning | None = None,
                            sample_shape: tuple[int, ...] | None = None,
                            progress: bool = True) -> CalibrationSet:
    """Run the FP ``model`` with DDIM (built from ``scheduler``'s config; a flow-matching scheduler samples as
    itself) and record its inputs.

    Args:
        num_samples: trajectories; sample ``i`` starts from the noise (and, for the record, per-step
            seed) that :func:`~tacdiff.sampling.batching.batched_trajectories` gives it for ``seed``
            and ``i``, so the set does not depend on ``batch_size``.
        num_inference_steps: DDIM steps per trajectory.
        kept_steps: how many steps, uniformly spaced over the trajectory, to keep
            (None keeps all); the set has ``num_samples * kept_steps`` inputs.
        cond: extra model keyword arguments of batch size ``num_samples`` (e.g. text embeddings), or a
            :class:`~tacdiff.sampling.conditioning.Conditioning` (prompts, guidance). Guided
            trajectories keep both halves the model sees: every kept input twice, once with the
            unconditional row (``2 * num_samples * kept_steps`` inputs).
        sample_shape: ``(C, H, W)``; read from the model config when omitted.
    In a process group (``torchrun``) every rank runs its share of the trajectories
    (:func:`tacdiff.distributed.shard`) and all ranks get the whole set.

    Returns:
        A :class:`CalibrationSet` on the CPU, ordered by kept step, then sample.
    """
    for name, value in (("num_samples", num_samples), ("num_inference_steps", num_inference_steps),
                        ("batch_size", batch_size), ("kept_steps", 1 if kept_steps is None else kept_steps)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    conditioning = cond if isinstance(cond, Conditioning) else tensor_conditioning(cond or {})
    kept = num_inference_steps if kept_steps is None else min(kept_steps, num_inference_steps)
    keep = sorted(set(torch.linspace(0, num_inference_steps - 1, kept).round().long().tolist()))
    ddim = copy.deepcopy(scheduler) if is_flow_matching(scheduler) else DDIMScheduler.from_config(scheduler.config)
    shape = sample_shape or sample_shape_of(model)
    param = next(model.parameters())
    inputs: dict[int, list[torch.Tensor]] = {step: [] for step in keep}
    timesteps: dict[int, float] = {}

    def record(rec: StepRecord) -> None:
        if rec.step in inputs:
            inputs[rec.step].append(rec.inputs[0].cpu())
            timesteps[rec.step] = float(rec.t)

    mine = shard(num_samples, batch_size)
    for _ in batched_trajectories([conditioning.guide(ModelDenoiser(model, ddim))], ddim, num_samples=num_samples,
                                  sample_shape=shape, num_inference_steps=num_inference_steps, seed=seed,
                                  batch_size=batch_size, device=param.device, dtype=param.dtype,
                                  cond=conditioning.rows, callback=record, samples=mine.samples, progress=progress):
        pass
    table = map_cond(conditioning.rows(0, num_samples), lambda v: v.cpu())
    copies = 2 if conditioning.guided else 1
    if conditioning.guided:
        table = guidance_batch(table, map_cond(conditioning.uncond, lambda v: v.cpu()))
    kept_inputs = {step: mine.gather_rows(torch.cat(inputs[step])) for step in keep}
    x = torch.cat([kept_inputs[step] for step in keep for _ in range(copies)])
    t = torch.cat([torch.full((num_samples * copies,), timesteps[step]) for step in keep])
    return CalibrationSet(x, t, table, torch.arange(num_samples * copies).repeat(len(keep)))
