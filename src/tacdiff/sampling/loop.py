"""The one sampling loop: trajectories of several denoisers advanced in lockstep on a diffusers scheduler.

In the k-diffusion style, a denoiser is any callable ``denoiser(x, t, **cond) -> eps`` (see
:mod:`tacdiff.models.kinds`, which adapts diffusers models to it) and the loop reports each step
through a callback. Every trajectory gets its own copy of the scheduler (multistep solvers keep
history), set to consume what denoisers return (noise estimates, ``prediction_type="epsilon"``; the
velocity under flow-matching schedulers, which start from unit noise and have no input scaling), and its own generator
seeded alike, so paired trajectories start from the same noise and draw the same per-step noise.
Calibration, evaluation and the CLI all go through :func:`run_trajectories`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from diffusers import SchedulerMixin
from tqdm.auto import tqdm

from tacdiff.models.kinds import Denoiser, correct_state, denoiser_scheduler, set_timesteps


@dataclass
class StepRecord:
    """What every trajectory saw at one sampling step (index ``step``, scheduler timestep ``t``).

    ``states`` are the latents before the step, ``inputs`` the scaled model inputs and
    ``eps`` the noise estimates the scheduler is about to consume, one per denoiser.
    """

    step: int
    t: torch.Tensor
    states: list[torch.Tensor]
    inputs: list[torch.Tensor]
    eps: list[torch.Tensor]


def _generators(seed: int | Sequence[int], noise: torch.Tensor) -> torch.Generator | list[torch.Generator]:
    """One generator seeded by ``seed``, or one per sample for a sequence of per-sample seeds."""
    if isinstance(seed, int):
        return torch.Generator(noise.device).manual_seed(seed)
    if len(seed) != noise.shape[0]:
        raise ValueError(f"got {len(seed)} per-sample seeds for {noise.shape[0]} samples; pass one seed per sample")
    return [torch.Generator(noise.device).manual_seed(s) for s in seed]


def _step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator | list[torch.Generator]) -> dict[str, Any]:
    accepts = inspect.signature(scheduler.step).parameters
    return {"generator": generator} if "generator" in accepts else {}


def _model_input(scheduler: SchedulerMixin, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``scheduler.scale_model_input(x, t)``; flow-matching schedulers have none and take ``x`` as it is."""
    scale = getattr(scheduler, "scale_model_input", None)
    return x if scale is None else scale(x, t)


@torch.no_grad()
def run_trajectories(denoisers: Sequence[Denoiser], scheduler: SchedulerMixin, noise: torch.Tensor, *,
                     num_inference_steps: int, seed: int | Sequence[int] = 0, cond: dict[str, Any] | None = None,
                     callback: Callable[[StepRecord], None] | None = None,
                     progress: bool = True) -> list[torch.Tensor]:
    """Sample with every denoiser from the same ``noise`` (shape ``(N, C, H, W)``); return the final latents.

    At the start of each step, before the model inputs are formed, every denoiser with a
    ``correct_state`` capability (see :class:`Denoiser`) may replace its trajectory's latents.

    The denoisers (and their ``correct_state``) are called in list order at each step, so a later
    one may read what an earlier one recorded (TAC calibration pairs the FP model with the quantized one this way).
    Stochastic schedulers draw their per-step noise from ``seed``: one generator for the whole
    batch, or with one seed per sample (a sequence of length ``N``) one generator per sample,
    so that a sample's noise does not depend on which batch it is in.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    cond = cond or {}
    schedulers = [denoiser_scheduler(scheduler) for _ in denoisers]
    for sched in schedulers:
        set_timesteps(sched, num_inference_steps, device=noise.device)
    generators = [_generators(seed, noise) for _ in denoisers]
    states = [noise * getattr(sched, "init_noise_sigma", 1.0) for sched in schedulers]
    timesteps = schedulers[0].timesteps
    for step, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
        states = [correct_state(den, x, t, step) for den, x in zip(denoisers, states)]
        inputs = [_model_input(sched, x, t) for sched, x in zip(schedulers, states)]
        eps = [den(inp, t, **cond) for den, inp in zip(denoisers, inputs)]
        if callback is not None:
            callback(StepRecord(step, t, states, inputs, eps))
        states = [sched.step(e, t, x, return_dict=False, **_step_kwargs(sched, g))[0]
                  for sched, e, x, g in zip(schedulers, eps, states, generators)]
    return states


def sample(denoiser: Denoiser, scheduler: SchedulerMixin, noise: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Sample one trajectory; keyword arguments as in :func:`run_trajectories`."""
    return run_trajectories([denoiser], scheduler, noise, **kwargs)[0]
