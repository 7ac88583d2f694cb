"""Integer execution of quantized linear and convolution layers (int8 GEMMs, float epilogue).

:class:`Int8Linear` and :class:`Int8Conv2d` replace :class:`~tacdiff.quant.layers.QuantLinear` and
:class:`~tacdiff.quant.layers.QuantConv2d`: they keep the integer weight codes only (no float copy),
quantize their input with the layer's own :class:`~tacdiff.quant.layers.ActQuantizer` ranges (the
timestep group's static range, or the per-sample / per-token range taken at run time) to the very codes
the fake-quant layer uses, and multiply in int8 with :class:`~tacdiff.backends.kernels.Int8Matmul`.
A convolution is an im2col GEMM over channels-last patches; a split skip concatenation (two
activation and weight ranges) is two GEMMs summed, which is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tacdiff.backends.kernels import MAX_REDUCTION, Int8Matmul, activation_codes, dynamic_qparams
from tacdiff.quant.layers import ActQuantizer, QuantConv2d, QuantLinear, QuantWeightMixin


def unsupported_reason(layer: QuantWeightMixin, device: torch.device) -> str | None:
    """Why ``layer`` cannot run on the int8 path as it is, or None when it can."""
    act = layer.act_quant
    if device.type != "cpu":
        return f"int8 kernels are wired for CPU only (model on {device.type})"
    if act is None:
        return "weight-only: its input is not quantized"
    if act.block_size is not None:
        return "block-scaled activations need a block-scaled GEMM"
    if isinstance(layer, QuantConv2d):
        if layer.groups != 1:
            return f"grouped convolution (groups={layer.groups})"
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return f"padding {layer.padding!r} in mode {layer.padding_mode!r}"
    reduction = layer.weight[0].numel()
    if reduction > MAX_REDUCTION:
        return f"reduction length {reduction} > {MAX_REDUCTION} would overflow int32"
    return None


class _IntLayer(nn.Module):
    """Shared parts: the input quantizer and one :class:`Int8Matmul` per input-channel segment."""

    def __init__(self, layer: QuantWeightMixin, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.act_quant: ActQuantizer = layer.act_quant
        self.w_bits = layer.w_bits
        self.in_channels = layer.weight.shape[1]
        self.segments = layer.segments()
        self.matmuls = nn.ModuleList(
            Int8Matmul(codes, layer.weight_zero_point[:, i], layer.weight_scale[:, i],
                       layer.bias if i == 0 else None)
            for i, codes in enumerate(weights))

    def quantize_input(self, x: torch.Tensor, segment: int, rows_per_range: int | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """int8 codes of ``x`` (channels last), scale and residual zero point: 0-d for a static range,
        ``(M, 1)`` per GEMM row when dynamic (``rows_per_range`` rows share one sample's range; None: per row)."""
        act = self.act_quant
        if not act.dynamic:
            g = act.router.group
            scale = act.scale[g, segment].to(x.dtype).clamp(min=torch.finfo(x.dtype).tiny)
            codes, residual = activation_codes(x, scale, act.zero_point[g, segment].to(x.dtype), act.bits)
            return codes, scale, residual
        rows = x.reshape(x.shape[0], -1) if rows_per_range is not None else x.reshape(-1, x.shape[-1])
        scale, zero_point = dynamic_qparams(rows.detach(), act.bits, act.symmetric)
        shape = (-1,) + (1,) * (x.dim() - 1)
        codes, residual = activation_codes(x, scale.reshape(shape), zero_point.reshape(shape), act.bits)
        if rows_per_range is not None:
            scale, residual = scale.repeat_interleave(rows_per_range, 0), residual.reshape(-1, 1)
            residual = residual.repeat_interleave(rows_per_range, 0)
        return codes, scale, residual.reshape(-1, 1)

    @property
    def num_weights(self) -> int:
        """Number of quantized weights."""
        return sum(m.weight.numel() for m in self.matmuls)

    def extra_repr(self) -> str:
        return f"w_bits={self.w_bits}, a_bits={self.act_quant.bits}, segments={len(self.segments)}"


class Int8Linear(_IntLayer):
    """A :class:`QuantLinear` run as an int8 GEMM (per-token dynamic ranges scale whole rows)."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__(layer, [layer.weight_codes.t()])
        self.out_features = layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        codes, scale, residual = self.quantize_input(flat, 0, None)
        return self.matmuls[0](codes, scale, residual).to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int8Conv2d(_IntLayer):
    """A :class:`QuantConv2d` run as im2col int8 GEMMs over channels-last patches."""

    def __init__(self, layer: QuantConv2d) -> None:
        # GEMM weight rows ordered (kernel row, kernel column, channel), as the patches below
        weights = [layer.weight_codes[:, s].permute(2, 3, 1, 0).reshape(-1, layer.out_channels)
                   for s in layer.segments()]
        super().__init__(layer, weights)
        self.out_channels = layer.out_channels
        self.kernel_size, self.stride = layer.kernel_size, layer.stride
        self.padding, self.dilation = layer.padding, layer.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        (ph, pw), (kh, kw), (sh, sw), (dh, dw) = self.padding, self.kernel_size, self.stride, self.dilation
        # zero padding before quantizing: 0 maps to the zero point exactly and leaves min-max ranges as they are
        padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))
        h_out = (padded.shape[1] - dh * (kh - 1) - 1) // sh + 1
        w_out = (padded.shape[2] - dw * (kw - 1) - 1) // sw + 1
        per_token = self.act_quant.token_dim is not None
        out = None
        for i, channels in enumerate(self.segments):
            part = padded[..., channels] if len(self.segments) > 1 else padded.contiguous()
            if per_token:  # 1x1 convolution: every position is one token with its own range
                part = part[:, : (h_out - 1) * sh + 1: sh, : (w_out - 1) * sw + 1: sw]
                codes, scale, residual = self.quantize_input(part.reshape(-1, part.shape[-1]), i, None)
            else:
                codes, scale, residual = self.quantize_input(part, i, h_out * w_out)
                codes = _patches(codes, (kh, kw), (sh, sw), (dh, dw), (h_out, w_out))
            y = self.matmuls[i](codes, scale, residual)
            out = y if out is None else out.add_(y)
        return out.to(x.dtype).view(n, h_out, w_out, self.out_channels).permute(0, 3, 1, 2).contiguous()


def _patches(codes: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
             out_size: tuple[int, int]) -> torch.Tensor:
    """im2col of channels-last ``codes`` ``(N, H, W, C)``: ``(N * h_out * w_out, kh * kw * C)``."""
    (kh, kw), (sh, sw), (dh, dw), (h_out, w_out) = kernel, stride, dilation, out_size
    if (kh, kw) == (1, 1):
        taps = [codes[:, : (h_out - 1) * sh + 1: sh, : (w_out - 1) * sw + 1: sw]]
    else:
        taps = [codes[:, i * dh: i * dh + (h_out - 1) * sh + 1: sh, j * dw: j * dw + (w_out - 1) * sw + 1: sw]
                for i in range(kh) for j in range(kw)]
    cols = taps[0] if len(taps) == 1 else torch.cat(taps, dim=3)
    return cols.reshape(-1, cols.shape[-1])


def to_int8(layer: QuantWeightMixin) -> Int8Linear | Int8Conv2d:
    """The integer twin of a quantized layer (check :func:`unsupported_reason` first)."""
    return Int8Conv2d(layer) if isinstance(layer, QuantConv2d) else Int8Linear(layer)
