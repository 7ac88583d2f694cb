"""Noise Estimation Reconstruction (NER) of TAC (Yao et al., ECCV 2024): closed-form per-channel scales.

For one timestep and channel ``c`` the quantized noise estimate ``q`` is rescaled, ``K q``,
towards the full-precision estimate ``r`` by minimising

    L(K) = (1 - lam) mean_all (K q - r)^2 + lam mean_M ((K q - r) / r)^2 + gamma (K - 1)^2,

with the mask ``M = {|r| > tau * mean|r|}`` (mean over the channel's elements). ``L`` is a
quadratic in ``K``, so

    K* = [(1-lam) S_qr/N + lam S_{q/r}/N_M + gamma] / [(1-lam) S_qq/N + lam S_{qq/rr}/N_M + gamma].

With ``bias`` (:meth:`NERStats.solve_affine`, an extension beyond the paper, in the spirit of PTQD's
per-channel bias) the correction is ``K (q - b)`` and ``(K, K b)`` jointly minimise the same loss with
``K q - K b`` in place of ``K q``: a 2x2 linear system per channel.

Streaming: every term is a per-channel sum, kept by :class:`NERStats`. The mask threshold
``tau * mean|r|`` is *not* a sum of the terms above, so it is fixed before the sums are
taken: :class:`NERStats` holds the threshold it was built with, and the exact two-pass
recipe is (1) accumulate ``sum|r|`` and the count per channel with :class:`AbsMean` over
every batch, (2) build ``NERStats.empty(threshold=tau * absmean.mean())`` and ``update``
it with every batch. Stats with different thresholds refuse to merge. TAC calibration
holds all of one timestep's ``r`` in memory (the size of the latents), so pass 1 is one
reduction there and the result equals :func:`ner_scale` on the whole batch.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, fields

import torch
from torch import Tensor


def _channel_sum(x: Tensor) -> Tensor:
    """``(N, C, ...)`` -> ``(C,)`` float64 sums over every dimension but the channel one."""
    return x.double().transpose(0, 1).reshape(x.shape[1], -1).sum(1)


def _check_pair(q: Tensor, r: Tensor) -> None:
    if q.shape != r.shape or q.ndim < 2:
        raise ValueError(f"q and r must share a shape (N, C, ...), got {tuple(q.shape)} and {tuple(r.shape)}")


@dataclass
class AbsMean:
    """Per-channel running ``sum|r|`` and element count: pass 1 of the streamed NER fit."""

    total: Tensor
    count: Tensor

    @classmethod
    def empty(cls, channels: int) -> "AbsMean":
        return cls(torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64))

    def update(self, r: Tensor) -> "AbsMean":
        """Add a batch ``r`` of shape ``(N, C, ...)``; returns ``self``."""
        self.total = self.total + _channel_sum(r.abs()).to(self.total.device)
        self.count = self.count + r.numel() // r.shape[1]
        return self

    def __add__(self, other: "AbsMean") -> "AbsMean":
        return AbsMean(self.total + other.total, self.count + other.count)

    def mean(self) -> Tensor:
        """``(C,)`` mean of ``|r|`` per channel."""
        return self.total / self.count


def mask_threshold(r: Tensor, tau: float) -> Tensor:
    """``(C,)`` float64 threshold ``tau * mean|r|`` per channel of ``r`` ``(N, C, ...)``."""
    return tau * AbsMean.empty(r.shape[1]).update(r).mean()


@dataclass
class NERStats:
    """Per-channel sums of the NER loss for a fixed mask ``threshold`` (all ``(C,)`` float64).

    ``s_qr = Σ q r``, ``s_qq = Σ q²``, ``s_q = Σ q``, ``s_r = Σ r``, ``n`` = element count over all
    elements; ``s_q_r = Σ_M q / r``, ``s_qq_rr = Σ_M q² / r²``, ``s_q_rr = Σ_M q / r²``,
    ``s_1_r = Σ_M 1 / r``, ``s_1_rr = Σ_M 1 / r²``, ``n_mask = |M|`` over the masked ones.
    Two workers' stats (same threshold) merge with ``+``.
    """

    threshold: Tensor
    s_qr: Tensor
    s_qq: Tensor
    n: Tensor
    s_q_r: Tensor
    s_qq_rr: Tensor
    n_mask: Tensor
    s_q: Tensor
    s_r: Tensor
    s_q_rr: Tensor
    s_1_r: Tensor
    s_1_rr: Tensor

    @classmethod
    def empty(cls, threshold: Tensor) -> "NERStats":
        """Zero sums for a ``(C,)`` mask threshold (e.g. ``tau * AbsMean.mean()``)."""
        threshold = torch.as_tensor(threshold, dtype=torch.float64)
        zeros = [torch.zeros_like(threshold) for _ in range(len(fields(cls)) - 1)]
        return cls(threshold, *zeros)

    def update(self, q: Tensor, r: Tensor) -> "NERStats":
        """Add a batch of quantized ``q`` and FP ``r`` estimates, shape ``(N, C, ...)``; returns ``self``."""
        _check_pair(q, r)
        q, r = q.double(), r.double()
        shape = (1, -1) + (1,) * (r.ndim - 2)
        mask = r.abs() > self.threshold.to(r.device).view(shape)
        inverse = torch.where(mask, 1 / torch.where(mask, r, torch.ones_like(r)), torch.zeros_like(r))
        ratio = q * inverse
        sums = {"s_qr": q * r, "s_qq": q * q, "s_q_r": ratio, "s_qq_rr": ratio * ratio, "n_mask": mask, "s_q": q,
                "s_r": r, "s_q_rr": ratio * inverse, "s_1_r": inverse, "s_1_rr": inverse * inverse}
        for name, value in sums.items():
            setattr(self, name, getattr(self, name) + _channel_sum(value).to(self.n.device))
        self.n = self.n + r.numel() // r.shape[1]
        return self

    def __add__(self, other: "NERStats") -> "NERStats":
        if not torch.equal(self.threshold, other.threshold):
            raise ValueError("NERStats with different mask thresholds cannot be merged; build both from the "
                             "same tau * mean|r| (see AbsMean)")
        sums = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != "threshold"}
        return NERStats(self.threshold, **sums)

    def solve(self, lam: float, gamma: float) -> Tensor:
        """``(C,)`` float64 minimisers ``K*`` of the NER loss.

        A channel whose loss does not depend on ``K`` (zero curvature, e.g. ``q = 0`` with
        ``gamma = 0``) gets ``K = 1``; an empty mask drops the relative term for that channel.
        """
        check_ner_params(lam, gamma)
        n_mask = self.n_mask.clamp(min=1)
        num = (1 - lam) * self.s_qr / self.n + lam * self.s_q_r / n_mask + gamma
        den = (1 - lam) * self.s_qq / self.n + lam * self.s_qq_rr / n_mask + gamma
        return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))

    def solve_affine(self, lam: float, gamma: float) -> tuple[Tensor, Tensor]:
        """``(C,)`` float64 ``(K, b)`` minimising the NER loss of the correction ``K (q - b)``.

        Solves the normal equations in ``(K, c = K b)``; a channel whose system is singular (e.g. constant
        ``q``) or whose ``K`` comes out 0 keeps :meth:`solve`'s scale and no bias.
        """
        check_ner_params(lam, gamma)
        full, masked = (1 - lam) / self.n, lam / self.n_mask.clamp(min=1)
        a11 = full * self.s_qq + masked * self.s_qq_rr + gamma  # the K-K, K-c and c-c curvatures
        a12 = full * self.s_q + masked * self.s_q_rr
        a22 = full * self.n + masked * self.s_1_rr
        y1 = full * self.s_qr + masked * self.s_q_r + gamma
        y2 = full * self.s_r + masked * self.s_1_r
        det = a11 * a22 - a12 * a12
        ok = det > 1e-12 * (a11 * a22).clamp(min=torch.finfo(torch.float64).tiny)
        safe = torch.where(ok, det, torch.ones_like(det))
        scale = (y1 * a22 - a12 * y2) / safe
        shift = (a12 * y1 - a11 * y2) / safe  # c = K b
        ok = ok & (scale.abs() > 1e-12)
        bias = torch.where(ok, shift / torch.where(ok, scale, torch.ones_like(scale)), torch.zeros_like(scale))
        return torch.where(ok, scale, self.solve(lam, gamma)), bias


def check_ner_params(lam: float, gamma: float, tau: float = 0.0) -> None:
    """Raise ``ValueError`` unless ``0 <= lam <= 1`` and ``gamma``, ``tau`` are finite and ``>= 0``."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if not 0 <= gamma < math.inf:
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    if not 0 <= tau < math.inf:
        raise ValueError(f"tau must be finite and >= 0, got {tau}")


def ner_stats(q: Tensor, r: Tensor, *, tau: float) -> NERStats:
    """One-shot :class:`NERStats` of ``q, r`` ``(N, C, ...)`` with the mask threshold from ``r`` itself."""
    _check_pair(q, r)
    return NERStats.empty(mask_threshold(r, tau)).update(q, r)


def ner_scale(q: Tensor, r: Tensor, *, lam: float, gamma: float, tau: float) -> Tensor:
    """``(C,)`` float64 closed-form NER scales ``K*`` for quantized ``q`` and FP ``r`` of shape ``(N, C, H, W)``.

    The mask keeps elements with ``|r| > tau * mean|r|``, the mean over that channel's elements.
    """
    check_ner_params(lam, gamma, tau)
    return ner_stats(q, r, tau=tau).solve(lam, gamma)
