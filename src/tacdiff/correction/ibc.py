"""Input Bias Correction (IBC) of TAC (Yao et al., ECCV 2024): the mean input discrepancy per timestep.

``mu_t = E[x_hat_t - x_t]`` between the quantized and the FP trajectory from the same noise,
estimated on the calibration batch and subtracted from the quantized trajectory. Where it is
subtracted is a choice (``ibc_target`` of :func:`tacdiff.correction.calibrate_tac`):

* ``"state"`` (default): from the sampler's latent at the start of the step,
  ``x_hat_t <- x_hat_t - mu_t``, so the correction carries on through the later steps. It needs
  the sampling loop, which calls the corrected denoiser's ``correct_state``.
* ``"input"``: from the network input only (the scheduler's scaled model input), which a plain
  UNet wrapper can do inside any diffusers pipeline, but the latent keeps its bias and the
  network's own pull back towards the data is lost.

Granularity (``ibc`` of :func:`~tacdiff.correction.calibrate_tac`): ``"element"`` (default)
keeps one mean per latent element, ``"channel"`` one per channel, and ``"shrunk"`` one per element
pulled towards its channel's mean by the James-Stein factor (James and Stein, 1961) of each channel
and step: ``m_c + k_c (m_e - m_c)``, ``k_c = max(0, 1 - (p - 3) s2 / sum_e (m_e - m_c)^2)`` over the
``p`` elements of channel ``c``, ``s2`` the mean sampling variance of an element's mean. Element means
that differ from their channel's by no more than their own noise collapse to it; a real spatial
pattern keeps most of its detail. No hyper-parameter.

Measured by ``benchmarks/tac_sweep.py`` on the bundled model (W4A8, DDIM 50, 128 calibration
trajectories, 256 validation images; PTQ FID 55.9, FP 24.2): TAC with per-channel IBC on the
input had FID 61.1, on the state 40.0, and per element on the state 32.3 (x0 PSNR 16.4, 16.2
and 18.1 dB; PTQ 12.1). On stochastic DDPM-100 the input-only shift also let the fitted
``mu_t`` grow from step to step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Granularity = Literal["channel", "element", "shrunk"]
GRANULARITIES = ("channel", "element", "shrunk")


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"IBC granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")


@dataclass
class BiasSum:
    """The float64 sums of ``x_hat - x`` and of its square per channel ``(C,)`` or per element ``(C, H, W)``
    and how many values each entry adds up; batches (and processes) merge with ``+``."""

    total: Tensor
    squares: Tensor
    count: Tensor

    @classmethod
    def of(cls, x_hat: Tensor, x: Tensor, granularity: Granularity = "channel") -> "BiasSum":
        """The sums of one batch, ``x_hat`` and ``x`` of shape ``(N, C, H, W)`` (per element unless ``channel``)."""
        check_granularity(granularity)
        if x_hat.shape != x.shape or x.ndim < 2:
            raise ValueError(f"inputs must share a shape (N, C, ...), got {tuple(x_hat.shape)} and {tuple(x.shape)}")
        diff = x_hat.double() - x.double()
        dims = (0, *range(2, diff.ndim)) if granularity == "channel" else (0,)
        total = diff.sum(dims)
        count = torch.tensor(float(diff.numel() // total.numel()), dtype=torch.float64)
        return cls(total, diff.square().sum(dims), count)

    def __add__(self, other: "BiasSum") -> "BiasSum":
        return BiasSum(self.total + other.total.to(self.total.device),
                       self.squares + other.squares.to(self.squares.device), self.count + other.count)

    def mean(self) -> Tensor:
        """The mean ``mu_t`` (float64)."""
        return self.total / self.count.to(self.total.device)

    def estimate(self, granularity: Granularity) -> Tensor:
        """``mu_t`` at ``granularity``: :meth:`shrunk_mean` for ``"shrunk"``, else :meth:`mean`."""
        return self.shrunk_mean() if granularity == "shrunk" else self.mean()

    def shrunk_mean(self) -> Tensor:
        """Per-element means ``(C, H, W)`` shrunk towards their channel's mean by the James-Stein factor (see
        the module docstring; float64)."""
        means = self.mean()
        if means.ndim < 2:
            raise ValueError("shrinkage needs per-element sums; take them with granularity 'shrunk' or 'element'")
        count = self.count.to(means.device)
        noise = ((self.squares / count - means.square()).clamp(min=0) / count).flatten(1).mean(1)  # (C,)
        centre = means.flatten(1).mean(1)  # (C,)
        spread = (means.flatten(1) - centre[:, None]).square().sum(1)
        elements = means[0].numel()
        keep = (1 - (elements - 3) * noise / spread.clamp(min=torch.finfo(torch.float64).tiny)).clamp(0, 1)
        shape = (-1, *([1] * (means.ndim - 1)))
        return centre.view(shape) + keep.view(shape) * (means - centre.view(shape))


def input_bias(x_hat: Tensor, x: Tensor, granularity: Granularity = "channel") -> Tensor:
    """``mu_t`` of ``x_hat - x`` (both ``(N, C, H, W)``): the mean per channel ``(C,)``, per element ``(C, H, W)``,
    or per element shrunk towards the channel mean (``"shrunk"``, :meth:`BiasSum.shrunk_mean`).

    Sums in float64 and returns float64.
    """
    return BiasSum.of(x_hat, x, granularity).estimate(granularity)


def broadcast_bias(bias: Tensor, x: Tensor) -> Tensor:
    """``bias`` ``(C,)`` or ``(C, H, W)`` shaped to broadcast against ``x`` ``(N, C, H, W)``, in ``x``'s dtype."""
    if bias.ndim > 1 and bias.shape[1:] != x.shape[2:]:
        raise ValueError(f"element-wise input bias was fitted on {tuple(bias.shape[1:])} latents, got "
                         f"{tuple(x.shape[2:])}; recalibrate at this size or with ibc='channel'")
    bias = bias.to(x.device, x.dtype)
    return bias.view(1, -1, *([1] * (x.ndim - 2))) if bias.ndim == 1 else bias.unsqueeze(0)
