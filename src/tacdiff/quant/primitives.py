"""Pure uniform-affine quantization math: ranges, scales, (fake-)quantization, bit packing.

Every function takes tensors and returns tensors; nothing here knows about modules.
Codes are unsigned integers in ``[0, 2**bits - 1]`` and a value is recovered as
``(code - zero_point) * scale``. Symmetric quantization is the special case
``zero_point = 2**(bits-1)`` with the range ``[-amax, amax]``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

RangeMethod = Literal["minmax", "percentile", "mse"]
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if it is an integer in 2..8, else raise ``ValueError``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def check_tensor(x: torch.Tensor, what: str = "tensor") -> torch.Tensor:
    """Raise ``ValueError`` if ``x`` is empty or holds NaN/inf; return it otherwise."""
    if x.numel() == 0:
        raise ValueError(f"cannot quantize an empty {what} (shape {tuple(x.shape)})")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or inf; check the model and its inputs before quantizing")
    return x


def channels_first(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View ``x`` as ``(C, M)`` with the channel ``axis`` first, or ``(1, numel)`` when ``axis`` is None."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def broadcast_to_axis(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Shape a per-channel parameter ``(C,)`` (or a scalar) to broadcast against ``x`` along ``axis``."""
    if axis is None or p.dim() == 0:
        return p.reshape(()) if p.numel() == 1 else p
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[lo, hi]`` (widened to contain 0) onto ``bits``-bit codes.

    Shapes of ``lo`` and ``hi`` are kept; the zero point is an integer-valued float tensor.
    """
    check_bits(bits)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("the quantization range contains NaN or inf; calibrate on finite values")
    return qparams_unchecked(lo, hi, bits, symmetric)


def qparams_unchecked(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`qparams_from_range` without validation, for ranges taken at run time (no device sync)."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.clamp(amax / (2 ** (bits - 1) - 1), min=tiny)
        return scale, torch.full_like(scale, 2.0 ** (bits - 1))
    scale = torch.clamp((hi - lo) / (2 ** bits - 1), min=tiny)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, 2 ** bits - 1)
    return scale, zero_point


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through (identity) gradient; plain rounding without autograd."""
    rounded = torch.round(x)
    return x + (rounded - x).detach() if x.requires_grad else rounded


def quantize_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero_point, 0, 2**bits - 1)`` as float (same shape as ``x``)."""
    check_bits(bits)
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 2 ** bits - 1)


def dequantize_tensor(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """Real values ``(codes - zero_point) * scale`` in ``dtype``, or written into ``out`` (of the scale's dtype: the
    same arithmetic in place, no temporaries)."""
    if out is not None and out.dtype == scale.dtype:
        return torch.sub(codes, zero_point, out=out).mul_(scale)
    values = ((codes.to(scale.dtype) - zero_point) * scale).to(dtype)
    return values if out is None else out.copy_(values)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize ``x``; the gradient passes straight through inside the range.

    ``scale`` and ``zero_point`` must broadcast against ``x``. Values outside the
    representable range are clipped (and get zero gradient).
    """
    check_bits(bits)
    if not (x.requires_grad and torch.is_grad_enabled()):
        # Same arithmetic in place: one allocation instead of five (about 3x faster on CPU).
        return torch.div(x, scale).round_().add_(zero_point).clamp_(0, 2 ** bits - 1).sub_(zero_point).mul_(scale)
    codes = torch.clamp(round_ste(x / scale) + zero_point, 0, 2 ** bits - 1)
    return (codes - zero_point) * scale


def minmax_range(x: torch.Tensor, axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (or per-tensor) minimum and maximum, each of shape ``(C,)`` or ``()``."""
    flat = channels_first(check_tensor(x), axis)
    lo, hi = flat.amin(1), flat.amax(1)
    return (lo, hi) if axis is not None else (lo[0], hi[0])


def to_blocks(x: torch.Tensor, dim: int, block: int | None = None) -> torch.Tensor:
    """``x`` with dimension ``dim`` (non-negative) split into ``(blocks, block)``: a view when ``block``
    divides it, else the last entry is repeated to fill the last block (it cannot move that block's
    min or max). None, or a block at least as long as ``dim``, gives one block.

    Reducing over ``dim + 1`` then gives one range per block, as block-scaled formats (OCP
    Microscaling, MX) use; :func:`from_blocks` undoes it. No validation: it runs at every forward.
    """
    size = x.shape[dim]
    block = size if block is None else min(block, size)
    pad = -size % block
    if pad:
        tail = x.narrow(dim, size - 1, 1)
        x = torch.cat([x, tail.expand(*x.shape[:dim], pad, *x.shape[dim + 1:])], dim=dim)
    return x.unflatten(dim, (-1, block))


def from_blocks(blocks: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: merge dimensions ``dim`` and ``dim + 1`` and drop the padding."""
    return blocks.flatten(dim, dim + 1).narrow(dim, 0, size)


def percentile_range(x: torch.Tensor, percentile: float = 99.99, axis: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Range between the ``100 - percentile`` and ``percentile`` percentiles (in %)."""
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    flat = channels_first(check_tensor(x), axis).float()
    q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], device=flat.device)
    lo, hi = torch.quantile(flat, q, dim=1)
    return (lo, hi) if axis is not None else (lo[0], hi[0])


def mse_range(x: torch.Tensor, bits: int, symmetric: bool = False, axis: int | None = None,
              grid: int = 100, norm: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range minimising the ``norm``-error of fake quantization, searched per channel.

    Candidates shrink the min-max range (widened to contain 0) by ``k / grid`` for
    ``k = grid..1``; the best candidate is chosen independently for every channel (the
    widest one on ties). Candidates are evaluated in batches of about 4M elements.
    """
    check_bits(bits)
    flat = channels_first(check_tensor(x), axis).float()
    lo0 = torch.clamp(flat.amin(1), max=0.0)
    hi0 = torch.clamp(flat.amax(1), min=0.0)
    fractions = torch.arange(grid, 0, -1, dtype=torch.float64, device=flat.device).div(grid).float()[:, None]
    lo, hi = lo0 * fractions, hi0 * fractions  # (grid, C)
    scale, zp = qparams_from_range(lo, hi, bits, symmetric)
    chunk = max(1, (1 << 22) // flat.numel())
    err = torch.cat([(fake_quantize(flat, scale[i:i + chunk, :, None], zp[i:i + chunk, :, None], bits) - flat)
                     .abs_().pow_(norm).mean(2) for i in range(0, grid, chunk)])
    best = err.argmin(0, keepdim=True)  # the first minimum: the widest range among equals
    best_lo, best_hi = lo.gather(0, best)[0], hi.gather(0, best)[0]
    return (best_lo, best_hi) if axis is not None else (best_lo[0], best_hi[0])


def choose_range(x: torch.Tensor, method: RangeMethod, bits: int, symmetric: bool = False,
                 axis: int | None = None, percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to :func:`minmax_range`, :func:`percentile_range` or :func:`mse_range`."""
    check_bits(bits)
    if method == "minmax":
        return minmax_range(x, axis)
    if method == "percentile":
        return percentile_range(x, percentile, axis)
    if method == "mse":
        return mse_range(x, bits, symmetric, axis)
    raise ValueError(f"range method must be 'minmax', 'percentile' or 'mse', got {method!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes into a flat uint8 tensor of ``ceil(numel * bits / 8)`` bytes."""
    check_bits(bits)
    if codes.numel() and (codes.min() < 0 or codes.max() > 2 ** bits - 1):
        raise ValueError(f"codes must lie in 0..{2 ** bits - 1} to pack them at {bits} bits; "
                         f"got values from {codes.min().item()} to {codes.max().item()}")
    values = codes.detach().to("cpu", torch.uint8).reshape(-1).numpy()
    planes = np.unpackbits(values[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: a uint8 tensor of ``shape``."""
    check_bits(bits)
    numel = int(np.prod(shape)) if shape else 1
    expected = (numel * bits + 7) // 8
    if packed.numel() != expected:
        raise ValueError(f"packed codes hold {packed.numel()} bytes, expected {expected} for "
                         f"{numel} {bits}-bit values; the artifact is corrupt")
    if bits == 8:
        return packed.clone().reshape(shape)
    # every 8 codes fill exactly `bits` bytes: read each such group as one little-endian word and shift the codes out
    groups = -(-numel // 8)
    grouped = torch.cat([packed, packed.new_zeros(groups * bits - packed.numel())]).view(groups, bits).long()
    words = (grouped << (8 * torch.arange(bits))).sum(1, keepdim=True)
    codes = (words >> (bits * torch.arange(8))) & (2**bits - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8).reshape(shape)
