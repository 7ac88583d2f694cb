"""Input Bias Correction (IBC) of TAC (Yao et al., ECCV 2024): the mean input discrepancy per timestep.

``mu_t = E[x_hat_t - x_t]`` between the quantized and the FP trajectory from the same noise,
estimated on the calibration batch and subtracted from the quantized trajectory. Where it is
subtracted is a choice (``ibc_target`` of :func:`tacdiff.correction.calibrate_tac`):

* ``"state"`` (default): from the sampler's latent at the start of the step,
  ``x_hat_t <- x_hat_t - mu_t``, so the correction carries on through the later steps. It needs
  the sampling loop's ``correct_states`` hook.
* ``"input"``: from the network input only (the scheduler's scaled model input), which a plain
  UNet wrapper can do inside any diffusers pipeline, but the latent keeps its bias and the
  network's own pull back towards the data is lost.

Measured on the bundled model (W4A8, DDIM-50, 128 calibration and 128 fresh samples, CPU): IBC
alone on the input raised FID from 56.0 (uncorrected) to 68.5 and TAC to 72.8, while on the
state IBC alone gave 60.0 and TAC 51.4; x0 PSNR was about the same either way (TAC 16.4-16.5
dB against 12.5 uncorrected). On stochastic DDPM-100 the input-only shift made the fitted
``mu_t`` grow (final step 0.79 vs 0.15 uncorrected).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

Granularity = Literal["channel", "element"]
GRANULARITIES = ("channel", "element")


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"IBC granularity must be 'channel' or 'element', got {granularity!r}")


def input_bias(x_hat: Tensor, x: Tensor, granularity: Granularity = "channel") -> Tensor:
    """The mean of ``x_hat - x`` (both ``(N, C, H, W)``): ``(C,)`` per channel, ``(C, H, W)`` per element.

    Sums in float64 and returns float64.
    """
    check_granularity(granularity)
    if x_hat.shape != x.shape or x.ndim < 2:
        raise ValueError(f"inputs must share a shape (N, C, ...), got {tuple(x_hat.shape)} and {tuple(x.shape)}")
    diff = x_hat.double() - x.double()
    dims = (0,) if granularity == "element" else (0, *range(2, diff.ndim))
    return diff.mean(dims)


def broadcast_bias(bias: Tensor, x: Tensor) -> Tensor:
    """``bias`` ``(C,)`` or ``(C, H, W)`` shaped to broadcast against ``x`` ``(N, C, H, W)``, in ``x``'s dtype."""
    bias = bias.to(x.device, x.dtype)
    return bias.view(1, -1, *([1] * (x.ndim - 2))) if bias.ndim == 1 else bias.unsqueeze(0)
