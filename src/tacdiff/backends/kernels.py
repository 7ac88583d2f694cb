"""Integer matmul math: signed int8 operands, ``torch._int_mm`` (int8 x int8 -> int32), exact zero points.

tacdiff's codes are unsigned, ``[0, 2**bits)``, with integer zero points. An int8 GEMM takes signed
operands, so each operand is stored shifted, ``A = codes - c``, and the zero point left over,
``r = zero_point - c``, is folded into the float epilogue:

    sum_k (A - r)(W - rw) = A @ W - r * colsum(W) - rw * rowsum(A) + K * r * rw

Activations shift by ``2**(bits-1)``; each weight channel by its own zero point when the centred
codes fit in int8 (always below 8 bits, so ``rw = 0`` and the ``rowsum(A)`` term vanishes), else by 128.
Every integer sum is exact in int32 while the reduction length stays below :data:`MAX_REDUCTION`.

Why ``torch._int_mm``: PyTorch 2.13 deprecates the quantized-tensor functions that the ``torch.ao``
quantized conv/linear kernels need, and ``torch._weight_int8pack_mm`` is far slower than float32
here; ``torch._int_mm`` is the plain int8 GEMM that torchao builds its int8 paths on
(``benchmarks/speed.py --kernels`` measures all three).
"""

from __future__ import annotations

import torch
from torch import nn

from tacdiff.quant import primitives as P

MAX_REDUCTION = (2**31 - 1) // (255 * 255 * 2)  # |A - r|, |W - rw| <= 255; 2x headroom for the partial terms


def activation_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed int8 codes ``A`` of ``x`` and the residual zero point ``r`` (``x ~ (A - r) * scale``).

    The same arithmetic as :func:`tacdiff.quant.primitives.fake_quantize` (divide, round, add, clamp,
    in ``x``'s dtype), so the codes equal the fake-quant path's exactly.
    """
    half = 2 ** (bits - 1)
    residual = zero_point - half
    codes = torch.div(x, scale).round_().add_(residual).clamp_(-half, half - 1)
    return codes.to(torch.int8), residual


def dynamic_qparams(rows: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from each row's min-max range, shapes ``(rows, 1)``, as the fake path takes them."""
    lo, hi = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    scale, zero_point = P.qparams_unchecked(lo.float(), hi.float(), bits, symmetric)
    return scale.to(rows.dtype).clamp(min=torch.finfo(rows.dtype).tiny), zero_point.to(rows.dtype)


def centred_weight(codes: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``codes`` ``(K, N)`` (unsigned) as int8 ``W`` and the residual zero point ``rw`` ``(N,)`` per column."""
    codes = codes.to(torch.int16)
    zp = zero_point.round().to(torch.int16)
    centred = codes - zp
    fits = (centred.amin(0) >= -128) & (centred.amax(0) <= 127)
    shift = torch.where(fits, zp, torch.full_like(zp, 128))
    return (codes - shift).to(torch.int8), (zp - shift).float()


class Int8Matmul(nn.Module):
    """``(A - r) * a_scale @ (W - rw) * w_scale + bias`` for int8 ``A`` ``(M, K)``, with ``W`` ``(K, N)`` stored.

    ``a_scale`` and ``r`` are 0-d (one range for the whole input) or ``(M, 1)`` (one per row).
    """

    def __init__(self, codes: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        if codes.shape[0] > MAX_REDUCTION:
            raise ValueError(f"reduction length {codes.shape[0]} exceeds {MAX_REDUCTION} (int32 exactness)")
        weight, residual = centred_weight(codes, zero_point)
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("w_scale", scale.float())
        self.register_buffer("colsum_scaled", weight.sum(0, dtype=torch.int32).float() * self.w_scale)
        self.register_buffer("residual_scaled", residual * self.w_scale if residual.any() else None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, a: torch.Tensor, a_scale: torch.Tensor, a_residual: torch.Tensor) -> torch.Tensor:
        """float32 ``(M, N)``."""
        acc = torch._int_mm(a, self.weight)
        a_scale, a_residual = a_scale.float(), a_residual.float()
        if a_scale.dim() == 0:  # one range: the epilogue is one fused multiply-add
            shift = -a_scale * a_residual * self.colsum_scaled
            if self.residual_scaled is not None:
                shift = shift + a_scale * a.shape[1] * a_residual * self.residual_scaled
            out = torch.addcmul(shift if self.bias is None else shift + self.bias, acc, a_scale * self.w_scale)
        else:
            out = acc.float().mul_(self.w_scale).sub_(a_residual * self.colsum_scaled)
            if self.residual_scaled is not None:
                out.sub_(_rowsum(a).sub_(a.shape[1] * a_residual) * self.residual_scaled)
            out.mul_(a_scale)
            if self.bias is not None:
                out.add_(self.bias)
        if self.residual_scaled is not None and a_scale.dim() == 0:
            out.sub_((a_scale * _rowsum(a)) * self.residual_scaled)
        return out


def _rowsum(a: torch.Tensor) -> torch.Tensor:
    return a.sum(1, keepdim=True, dtype=torch.int32).float()
