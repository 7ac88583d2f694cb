"""PTQD's variance-schedule calibration (He et al., NeurIPS 2023) for stochastic diffusers samplers.

After PTQD's correction the noise estimate still carries a residual ``e_t`` of variance ``v_t``
per element (``CorrectionTables.residual_var``), uncorrelated with the FP estimate. A step
``x_{t-1} = mean(x_t, eps) + sigma_t z`` passes it on as extra noise ``c_t e_t``, with
``c_t`` the coefficient of ``eps`` in the mean. PTQD absorbs it by sampling with
``sigma_t'^2 = max(sigma_t^2 - c_t^2 v_t, 0)``. Here that is a subclass of the diffusers
scheduler whose ``_get_variance`` returns the reduced variance; every other part of the step
is diffusers' own. Supported: ``DDPMScheduler`` (``fixed_small``/``fixed_large`` variance,
epsilon prediction) and ``DDIMScheduler`` with ``eta > 0`` (``eta = 0`` samples without noise,
so nothing changes). ``c_t`` ignores ``x_0`` clipping, as PTQD's derivation does.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin
from torch import Tensor

from tacdiff.correction.tables import CorrectionTables


def _residual_var(tables: CorrectionTables, t: Any) -> float:
    return float(tables.residual_var[tables.index_of(torch.as_tensor(t))[0]])


class PTQDVarianceDDPMScheduler(DDPMScheduler):
    """``DDPMScheduler`` whose step noise variance is reduced by the corrected estimate's residual."""

    ptqd_tables: CorrectionTables

    def _get_variance(self, t: int, predicted_variance: Tensor | None = None,
                      variance_type: str | None = None) -> Tensor:
        variance = super()._get_variance(t, predicted_variance, variance_type)
        prev_t = self.previous_timestep(t)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_t = 1 - abar_t / abar_prev
        # eps enters the mean through x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t).
        coeff = abar_prev.sqrt() * beta_t / (1 - abar_t) * (1 - abar_t).sqrt() / abar_t.sqrt()
        return (variance - coeff ** 2 * _residual_var(self.ptqd_tables, t)).clamp(min=1e-20)


class PTQDVarianceDDIMScheduler(DDIMScheduler):
    """``DDIMScheduler`` whose ``eta``-scaled noise variance is reduced by the corrected estimate's residual."""

    ptqd_tables: CorrectionTables
    _ptqd_eta: float = 0.0

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, eta: float = 0.0, *args: Any,
             **kwargs: Any) -> Any:
        self._ptqd_eta = eta
        return super().step(model_output, timestep, sample, eta, *args, **kwargs)

    def _get_variance(self, timestep: Any, prev_timestep: Any) -> Tensor:
        variance = super()._get_variance(timestep, prev_timestep)
        eta = self._ptqd_eta
        if eta == 0:
            return variance
        abar_t = self.alphas_cumprod[timestep]
        abar_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        sigma_sq = eta ** 2 * variance
        coeff = (1 - abar_prev - sigma_sq).clamp(min=0).sqrt() - (abar_prev * (1 - abar_t) / abar_t).sqrt()
        reduced = (sigma_sq - coeff ** 2 * _residual_var(self.ptqd_tables, timestep)).clamp(min=0)
        return reduced / eta ** 2


VARIANCE_SCHEDULERS: dict[type[SchedulerMixin], type[SchedulerMixin]] = {
    DDPMScheduler: PTQDVarianceDDPMScheduler, DDIMScheduler: PTQDVarianceDDIMScheduler,
}


def ptqd_variance_scheduler(scheduler: SchedulerMixin, tables: CorrectionTables,
                            num_inference_steps: int) -> SchedulerMixin:
    """A copy of ``scheduler`` (DDPM or DDIM) that samples with PTQD's reduced noise variance.

    ``tables`` must have been calibrated for this scheduler and ``num_inference_steps``.
    """
    cls = VARIANCE_SCHEDULERS.get(type(scheduler))
    if cls is None:
        names = ", ".join(c.__name__ for c in VARIANCE_SCHEDULERS)
        raise ValueError(f"PTQD variance calibration supports {names}; got {type(scheduler).__name__} "
                         "(deterministic samplers need none)")
    if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"PTQD variance calibration needs prediction_type='epsilon', "
                         f"got {scheduler.config.prediction_type!r}")
    if type(scheduler) is DDPMScheduler and scheduler.config.variance_type not in ("fixed_small", "fixed_large"):
        raise ValueError(f"PTQD variance calibration supports variance_type fixed_small or fixed_large, "
                         f"got {scheduler.config.variance_type!r}")
    tables.check_scheduler(scheduler, num_inference_steps)
    calibrated = cls.from_config(scheduler.config)
    calibrated.ptqd_tables = tables
    return calibrated
