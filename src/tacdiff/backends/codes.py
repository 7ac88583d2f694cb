"""Integer codes for integer kernels: signed and unsigned activation codes, centred weights, exactness.

tacdiff's codes are unsigned, ``[0, 2**bits)``, with integer zero points. An int8 GEMM takes signed
operands, so each operand is stored shifted, ``A = codes - c``, and the zero point left over,
``r = zero_point - c``, is folded into the float epilogue:

    sum_k (A - r)(W - rw) = A @ W - r * colsum(W) - rw * rowsum(A) + K * r * rw

Activations shift by ``2**(bits-1)``; each weight channel by its own zero point when the centred
codes fit in int8 (always below 8 bits, so ``rw = 0`` and the ``rowsum(A)`` term vanishes), else by 128.
The integer sums are exact in int32 while the reduction length stays below :data:`MAX_REDUCTION`;
on CPUs without VNNI or AMX only while each pair of products fits int16 (:func:`pair_sums_fit_int16`).
"""

from __future__ import annotations

import os

import torch


MAX_REDUCTION = (2**31 - 1) // (255 * 128)  # oneDNN sums uint8 x int8 products in int32 (_int_mm: int8 x int8)
INT16_MAX = 2**15 - 1
NO_VNNI_ISAS = ("SSE41", "AVX", "AVX2", "AVX512_CORE")  # values of ONEDNN_MAX_CPU_ISA that rule VNNI and AMX out


def activation_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed int8 codes ``A`` of ``x`` and the residual zero point ``r`` (``x ~ (A - r) * scale``).

    The same arithmetic as :func:`tacdiff.quant.primitives.fake_quantize` (divide, round, add, clamp,
    in ``x``'s dtype), so the codes equal the fake-quant path's exactly.
    """
    half = 2 ** (bits - 1)
    residual = residual_zero_point(zero_point, bits)
    codes = torch.div(x, scale).round_().add_(residual).clamp_(-half, half - 1)
    return codes.to(torch.int8), residual


def residual_zero_point(zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """``r = zero_point - 2**(bits-1)``: the zero point left over once unsigned codes are shifted into int8."""
    return zero_point - 2 ** (bits - 1)


def unsigned_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``clamp(round(x / scale) + zero_point, 0, 2**bits - 1)``, as :func:`activation_codes` computes them."""
    return torch.div(x, scale).round_().add_(zero_point).clamp_(0, 2**bits - 1).to(torch.uint8)


def centred_weight(codes: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``codes`` ``(K, N)`` (unsigned) as int8 ``W`` and the residual zero point ``rw`` ``(N,)`` per column."""
    codes = codes.to(torch.int16)
    zp = zero_point.round().to(torch.int16)
    centred = codes - zp
    fits = (centred.amin(0) >= -128) & (centred.amax(0) <= 127)
    shift = torch.where(fits, zp, torch.full_like(zp, 128))
    return (codes - shift).to(torch.int8), (zp - shift).float()


def exact_int8_cpu() -> bool:
    """Whether this CPU multiplies int8 exactly into int32 (VNNI or AMX, and oneDNN not capped below them
    with ``ONEDNN_MAX_CPU_ISA``). Older x86 CPUs sum pairs of uint8 x int8 products in saturating int16
    (``vpmaddubsw``): see :func:`pair_sums_fit_int16`."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in NO_VNNI_ISAS:
        return False
    return torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported()


def pair_sums_fit_int16(act_bits: int, max_abs_weight: int) -> bool:
    """Whether two products of unsigned ``act_bits`` activation codes and int8 weights of magnitude up to
    ``max_abs_weight`` sum within int16: the condition under which oneDNN's uint8 x int8 kernels are exact on a
    CPU without VNNI or AMX (8-bit activations: centred weights up to 64; 7-bit ones: any int8 weight)."""
    return 2 * (2**act_bits - 1) * max_abs_weight <= INT16_MAX


def max_centred_weight(codes: torch.Tensor, zero_point: torch.Tensor) -> int:
    """The largest magnitude of :func:`centred_weight`'s int8 ``W`` for ``codes`` ``(K, N)``."""
    return int(centred_weight(codes, zero_point)[0].to(torch.int16).abs().max())
