"""The int8 GEMM kernel: ``torch._int_mm`` (int8 x int8 -> int32) with a float epilogue for zero points."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tacdiff.backends.codes import MAX_REDUCTION, centred_weight


# torch._int_mm on CUDA (cuBLASLt) takes more than 16 rows and inner and output sizes that are multiples of 8
CUDA_MIN_ROWS, CUDA_MULTIPLE = 17, 8
_REFUSED: set[tuple] = set()  # operand shapes cuBLASLt answered CUBLAS_STATUS_NOT_SUPPORTED for


def padded_int_mm(a: torch.Tensor, weight: torch.Tensor, min_rows: int = CUDA_MIN_ROWS,
                  multiple: int = CUDA_MULTIPLE) -> torch.Tensor:
    """``torch._int_mm(a, weight)`` with zero rows and columns added where CUDA's shape rules need them
    (zeros add nothing to an integer sum, so the result is exact); ``weight`` is normally padded once
    ahead (:func:`pad_weight`). Shapes that cuBLASLt still refuses (seen on an H200 for 1x1 convolutions
    of 32 and 64 channels over 50k-200k positions) are multiplied in float64 instead, which is exact."""
    rows, inner, cols = a.shape[0], a.shape[1], weight.shape[1]
    pad_rows, pad_inner = max(min_rows - rows, 0), -inner % multiple
    if pad_rows or pad_inner:
        a = F.pad(a, (0, pad_inner, 0, pad_rows))
    weight = pad_weight(weight, multiple)
    key = (tuple(a.shape), tuple(weight.shape), a.device)
    if key not in _REFUSED:
        try:
            return torch._int_mm(a, weight)[:rows, :cols]
        except RuntimeError as error:
            if "CUBLAS_STATUS_NOT_SUPPORTED" not in str(error):
                raise
            _REFUSED.add(key)
    return (a.double() @ weight.double()).to(torch.int32)[:rows, :cols]


def pad_weight(weight: torch.Tensor, multiple: int = CUDA_MULTIPLE) -> torch.Tensor:
    """``weight`` ``(K, N)`` with zero rows and columns up to multiples of ``multiple``, stored column-major
    (an H200 refused an int8 GEMM with two row-major operands); itself when it already is both."""
    pad_inner, pad_cols = -weight.shape[0] % multiple, -weight.shape[1] % multiple
    if pad_inner or pad_cols:
        weight = F.pad(weight, (0, pad_cols, 0, pad_inner))
    return weight if weight.t().is_contiguous() else weight.t().contiguous().t()


class Epilogue(NamedTuple):
    """:meth:`Int8Matmul.epilogue`: the activation scale (0-d) and the per-column float32 scale and shift."""

    a_scale: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


class Int8Matmul(nn.Module):
    """``(A - r) * a_scale @ (W - rw) * w_scale + bias`` for int8 ``A`` ``(M, K)``, with ``W`` ``(K, N)`` stored.

    ``a_scale`` and ``r`` are 0-d (one range for the whole input) or ``(M, 1)`` (one per row). Where a
    weight residual ``rw`` is left, ``W`` gets an extra column of ones so that the GEMM also returns
    ``rowsum(A)`` (cheaper than a separate reduction over ``A``). The float32 epilogue vectors are plain
    attributes, not buffers, so that casting the model (``model.to(torch.bfloat16)``) leaves them exact.
    ``padded`` (default: on CUDA) stores ``W`` padded to CUDA's shape rules and pads each input to match
    (:func:`padded_int_mm`); build the layer on the device it runs on.
    """

    def __init__(self, codes: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None, padded: bool | None = None) -> None:
        super().__init__()
        self.padded = codes.is_cuda if padded is None else padded
        if codes.shape[0] > MAX_REDUCTION:
            raise ValueError(f"reduction length {codes.shape[0]} exceeds {MAX_REDUCTION} (int32 exactness)")
        weight, residual = centred_weight(codes, zero_point)
        self.inner, self.out_features = weight.shape
        self.w_scale = scale.detach().float().contiguous()
        self.colsum_scaled = weight.sum(0, dtype=torch.int32).float() * self.w_scale
        self.residual_scaled = residual * self.w_scale if residual.any() else None
        if self.residual_scaled is not None:
            weight = torch.cat([weight, torch.ones_like(weight[:, :1])], dim=1)
        self.register_buffer("weight", pad_weight(weight) if self.padded else weight.contiguous())
        self.bias = None if bias is None else bias.detach().float()

    def epilogue(self, a_scale: torch.Tensor, a_residual: torch.Tensor) -> Epilogue:
        """The float epilogue of one activation range (0-d ``a_scale`` and ``a_residual``):
        ``out = acc * scale + shift - (a_scale * rowsum(A)) * residual_scaled``, with the per-column vectors
        precomputed (a layer with a static range reuses them at every call)."""
        a_scale, a_residual = a_scale.float(), a_residual.float()
        shift = -a_scale * a_residual * self.colsum_scaled
        if self.residual_scaled is not None:
            shift = shift + a_scale * self.inner * a_residual * self.residual_scaled
        return Epilogue(a_scale, a_scale * self.w_scale, shift if self.bias is None else shift + self.bias)

    def forward(self, a: torch.Tensor, a_scale: torch.Tensor, a_residual: torch.Tensor,
                epilogue: Epilogue | None = None) -> torch.Tensor:
        """The float32 product ``(M, N)``; ``epilogue``: :meth:`epilogue` of a 0-d ``a_scale``, computed ahead."""
        acc = padded_int_mm(a, self.weight) if self.padded else torch._int_mm(a, self.weight)
        n = self.out_features
        if a_scale.dim() == 0:  # one range: one fused multiply-add (and the rank-1 term of a weight residual)
            a_scale, scale, shift = epilogue or self.epilogue(a_scale, a_residual)
            out = torch.addcmul(shift, acc[:, :n], scale)
            if self.residual_scaled is None:
                return out
            return out.sub_((a_scale * acc[:, n: n + 1].float()) * self.residual_scaled)
        a_scale, a_residual = a_scale.float(), a_residual.float()
        rowsum = None if self.residual_scaled is None else acc[:, n: n + 1].float()
        out = acc[:, :n].float().mul_(self.w_scale).sub_(a_residual * self.colsum_scaled)
        if rowsum is not None:
            out.sub_(rowsum.sub_(a.shape[1] * a_residual) * self.residual_scaled)
        out.mul_(a_scale)
        return out if self.bias is None else out.add_(self.bias)
