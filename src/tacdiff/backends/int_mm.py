"""The int8 GEMM kernel: ``torch._int_mm`` (int8 x int8 -> int32) with a float epilogue for zero points."""

from __future__ import annotations

import torch
from torch import nn

from tacdiff.backends.codes import MAX_REDUCTION, centred_weight


class Int8Matmul(nn.Module):
    """``(A - r) * a_scale @ (W - rw) * w_scale + bias`` for int8 ``A`` ``(M, K)``, with ``W`` ``(K, N)`` stored.

    ``a_scale`` and ``r`` are 0-d (one range for the whole input) or ``(M, 1)`` (one per row). Where a
    weight residual ``rw`` is left, ``W`` gets an extra column of ones so that the GEMM also returns
    ``rowsum(A)`` (cheaper than a separate reduction over ``A``). The float32 epilogue vectors are plain
    attributes, not buffers, so that casting the model (``model.to(torch.bfloat16)``) leaves them exact.
    """

    def __init__(self, codes: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        if codes.shape[0] > MAX_REDUCTION:
            raise ValueError(f"reduction length {codes.shape[0]} exceeds {MAX_REDUCTION} (int32 exactness)")
        weight, residual = centred_weight(codes, zero_point)
        self.out_features = weight.shape[1]
        self.w_scale = scale.detach().float().contiguous()
        self.colsum_scaled = weight.sum(0, dtype=torch.int32).float() * self.w_scale
        self.residual_scaled = residual * self.w_scale if residual.any() else None
        if self.residual_scaled is not None:
            weight = torch.cat([weight, torch.ones_like(weight[:, :1])], dim=1)
        self.register_buffer("weight", weight.contiguous())
        self.bias = None if bias is None else bias.detach().float()

    def forward(self, a: torch.Tensor, a_scale: torch.Tensor, a_residual: torch.Tensor) -> torch.Tensor:
        """The float32 product ``(M, N)``."""
        acc = torch._int_mm(a, self.weight)
        rowsum = None
        if self.residual_scaled is not None:
            acc, rowsum = acc[:, : self.out_features], acc[:, self.out_features:].float()
        a_scale, a_residual = a_scale.float(), a_residual.float()
        if a_scale.dim() == 0:  # one range: the epilogue is one fused multiply-add
            shift = -a_scale * a_residual * self.colsum_scaled
            if rowsum is not None:
                shift = shift + a_scale * a.shape[1] * a_residual * self.residual_scaled
            out = torch.addcmul(shift if self.bias is None else shift + self.bias, acc, a_scale * self.w_scale)
            return out if rowsum is None else out.sub_((a_scale * rowsum) * self.residual_scaled)
        out = acc.float().mul_(self.w_scale).sub_(a_residual * self.colsum_scaled)
        if rowsum is not None:
            out.sub_(rowsum.sub_(a.shape[1] * a_residual) * self.residual_scaled)
        out.mul_(a_scale)
        return out if self.bias is None else out.add_(self.bias)
