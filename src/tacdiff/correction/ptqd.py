"""The PTQD baseline (He et al., NeurIPS 2023): correlated/residual split of the quantization noise.

Per timestep, the quantized estimate is modelled as ``q = (1 + k_t) r + b_t + e`` with the FP
estimate ``r`` and a residual ``e``. As in PTQD, the correlation coefficient ``k_t`` is one
scalar per timestep (shared by all channels) and the bias ``b_t`` (the residual's mean) is
per channel; the joint least-squares fit is closed form in per-channel sums, so it streams
over batches and merges by addition. The corrected estimate is ``(q - b_t) / (1 + k_t)``.
The residual variance ``var(e) / (1 + k_t)^2`` left in the corrected estimate is reported per
timestep for PTQD's variance-schedule calibration of stochastic samplers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from tacdiff.correction.ner import _channel_sum, _check_pair


@dataclass
class PTQDStats:
    """Per-channel float64 sums ``Σ r, Σ q, Σ r², Σ r q, Σ q²`` and the count, for one timestep."""

    s_r: Tensor
    s_q: Tensor
    s_rr: Tensor
    s_rq: Tensor
    s_qq: Tensor
    n: Tensor

    @classmethod
    def empty(cls, channels: int) -> "PTQDStats":
        return cls(*(torch.zeros(channels, dtype=torch.float64) for _ in range(6)))

    def update(self, q: Tensor, r: Tensor) -> "PTQDStats":
        """Add a batch of quantized ``q`` and FP ``r`` estimates ``(N, C, ...)``; returns ``self``."""
        _check_pair(q, r)
        q, r = q.double(), r.double()
        sums = (_channel_sum(r), _channel_sum(q), _channel_sum(r * r), _channel_sum(r * q), _channel_sum(q * q),
                torch.full_like(self.n, r.numel() // r.shape[1]))
        for f, value in zip(fields(self), sums):
            setattr(self, f.name, getattr(self, f.name) + value.to(self.n.device))
        return self

    def __add__(self, other: "PTQDStats") -> "PTQDStats":
        return PTQDStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def solve(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(slope, bias, residual_var)``: the scalar ``1 + k_t``, the ``(C,)`` ``b_t`` and the scalar
        variance of ``e / (1 + k_t)`` per element (float64). A degenerate fit (constant ``r``) gives slope 1."""
        cov = (self.s_rq - self.s_r * self.s_q / self.n).sum()
        var_r = (self.s_rr - self.s_r * self.s_r / self.n).sum()
        slope = cov / var_r if var_r > 0 else torch.ones((), dtype=torch.float64)
        bias = (self.s_q - slope * self.s_r) / self.n
        # Σ e² with e = q - slope r - b, expanded in the sums (the mean of e is zero per channel).
        var_q = (self.s_qq - self.s_q * self.s_q / self.n).sum()
        residual = (var_q - 2 * slope * cov + slope * slope * var_r).clamp(min=0) / self.n.sum()
        return slope, bias, residual / (slope * slope)


def ptqd_fit(q: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One-shot :meth:`PTQDStats.solve` for ``q, r`` of shape ``(N, C, H, W)``."""
    return PTQDStats.empty(r.shape[1]).update(q, r).solve()
