"""Integer kernels: int8 GEMMs (``torch._int_mm``) and oneDNN int8 convolutions, with exact zero points.

tacdiff's codes are unsigned, ``[0, 2**bits)``, with integer zero points. An int8 GEMM takes signed
operands, so each operand is stored shifted, ``A = codes - c``, and the zero point left over,
``r = zero_point - c``, is folded into the float epilogue:

    sum_k (A - r)(W - rw) = A @ W - r * colsum(W) - rw * rowsum(A) + K * r * rw

Activations shift by ``2**(bits-1)``; each weight channel by its own zero point when the centred
codes fit in int8 (always below 8 bits, so ``rw = 0`` and the ``rowsum(A)`` term vanishes), else by 128.
The float epilogue adds the zero-point terms; the integer sums are exact in int32 while the reduction
length stays below :data:`MAX_REDUCTION` (and on CPUs with VNNI or AMX: without them x86 int8 kernels
sum pairs of products in saturating int16, see :func:`exact_int8_cpu`).
oneDNN's convolution takes the unsigned activation codes and zero point as they are, but only
symmetric weights: the same centred weights, with one extra all-ones output channel whose result
(the sum of the dequantized inputs under the kernel) carries the ``rw`` term where one is left.

Why these kernels: PyTorch 2.13 deprecates the quantized-tensor functions that the ``torch.ao``
quantized modules need. ``torch.ops.onednn.qconv2d_pointwise`` is the int8 convolution that PyTorch's
own x86 Inductor lowering of quantized models calls, on plain uint8/int8 tensors, and ``torch._int_mm``
the plain int8 GEMM that torchao builds its int8 paths on; ``torch._weight_int8pack_mm`` is far slower
than float32 here. ``benchmarks/speed.py --kernels`` measures the candidates.
"""

from __future__ import annotations

import platform

import torch
from torch import nn

from tacdiff.quant import primitives as P

MAX_REDUCTION = (2**31 - 1) // (255 * 128)  # oneDNN sums uint8 x int8 products in int32 (_int_mm: int8 x int8)


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


def unsigned_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``clamp(round(x / scale) + zero_point, 0, 2**bits - 1)``, as :func:`activation_codes` computes them."""
    return torch.div(x, scale).round_().add_(zero_point).clamp_(0, 2**bits - 1).to(torch.uint8)


def dynamic_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from run-time min-max ranges, in ``lo``'s dtype, as the fake path takes them."""
    scale, zero_point = P.qparams_unchecked(lo.float(), hi.float(), bits, symmetric)
    return scale.to(lo.dtype).clamp(min=torch.finfo(lo.dtype).tiny), zero_point.to(lo.dtype)


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


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's x86 int8 convolution."""
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.onednn, "qconv2d_pointwise"))


def exact_int8_cpu() -> bool:
    """Whether this CPU multiplies int8 exactly into int32 (VNNI or AMX). Older x86 CPUs sum pairs of
    uint8 x int8 products in saturating int16 (``vpmaddubsw``), which full-range 8-bit codes overflow."""
    return torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported()


class OneDNNConv2d(nn.Module):
    """oneDNN int8 convolution of uint8 activation codes (one scale and zero point per call) with stored
    weight codes, returning float32 in channels-last layout.

    The prepacked weight is an opaque oneDNN tensor: a module holding one cannot be deep-copied or saved
    (copy and save the fake-quant model instead).
    """

    def __init__(self, codes: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int]) -> None:
        super().__init__()
        out_channels = codes.shape[0]
        flat, residual = centred_weight(codes.reshape(out_channels, -1).t(), zero_point)
        weight = flat.t().reshape(codes.shape).contiguous()
        w_scale = scale.detach().float().contiguous()  # oneDNN reads raw memory: contiguous float32
        self.residual_scaled = residual * w_scale if residual.any() else None
        if self.residual_scaled is not None:  # the all-ones channel: sums of the dequantized inputs
            weight = torch.cat([weight, torch.ones_like(weight[:1])])
            w_scale = torch.cat([w_scale, w_scale.new_ones(1)])
            bias = None if bias is None else torch.cat([bias.detach(), bias.new_zeros(1)])
        self.out_channels, self.geometry = out_channels, ([*stride], [*padding], [*dilation])
        self.register_buffer("packed", torch.ops.onednn.qconv_prepack(weight, w_scale, 1.0, 0, *self.geometry, 1,
                                                                      None))
        self.w_scale, self.w_zero_point = w_scale, torch.zeros(len(w_scale), dtype=torch.long)
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __deepcopy__(self, memo: dict) -> "OneDNNConv2d":
        raise TypeError("a model running on the int8 backend cannot be copied (oneDNN's packed weights); copy the "
                        "fake-quant model and convert the copy with tacdiff.backends.use_backend")

    def forward(self, codes: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        out = torch.ops.onednn.qconv2d_pointwise(codes, scale, zero_point, self.packed, self.w_scale,
                                                 self.w_zero_point, self.bias, *self.geometry, 1, 1.0, 0,
                                                 torch.float32, "none", [], None)
        if self.residual_scaled is None:
            return out
        # one fused pass into a fresh dense tensor (writing in place into the strided slice is ~30x slower)
        return torch.addcmul(out[:, : self.out_channels], out[:, self.out_channels:],
                             self.residual_scaled.view(1, -1, 1, 1), value=-1.0)
