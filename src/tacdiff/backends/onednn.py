"""The oneDNN int8 kernels: ``qconv2d_pointwise`` and ``qlinear_pointwise`` on uint8 activation codes.

oneDNN takes the unsigned activation codes and zero point as they are, but only symmetric weights: the
centred weights of :func:`~tacdiff.backends.codes.centred_weight`, with one extra all-ones output
channel (the sum of the dequantized inputs under the kernel) that carries the residual weight zero
point where one is left. The scales, zero points and bias are applied inside the kernel (float32 out).
"""

from __future__ import annotations

import platform
from typing import Callable

import torch
from torch import nn

from tacdiff.backends.codes import centred_weight


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's x86 int8 convolution and linear kernels."""
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.onednn, "qconv2d_pointwise") and hasattr(torch.ops.onednn, "qlinear_pointwise"))


class _OneDNNKernel(nn.Module):
    """Shared parts of the oneDNN kernels: the centred weight, float32 scales and bias, and the all-ones channel.

    The prepacked weight is an opaque oneDNN tensor: a module holding one cannot be deep-copied or saved
    (copy and save the fake-quant model instead).
    """

    def __init__(self, codes: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None, pack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """``pack(weight, w_scale)``: the oneDNN prepack of the int8 weight."""
        super().__init__()
        self.out_channels = codes.shape[0]
        flat, residual = centred_weight(codes.reshape(self.out_channels, -1).t(), zero_point)
        weight = flat.t().reshape(codes.shape).contiguous()
        w_scale = scale.detach().float().contiguous()  # oneDNN reads raw memory: contiguous float32
        self.residual_scaled = residual * w_scale if residual.any() else None
        if self.residual_scaled is not None:  # the all-ones channel: sums of the dequantized inputs
            weight = torch.cat([weight, torch.ones_like(weight[:1])])
            w_scale = torch.cat([w_scale, w_scale.new_ones(1)])
            bias = None if bias is None else torch.cat([bias.detach(), bias.new_zeros(1)])
        self.register_buffer("packed", pack(weight, w_scale))
        self.w_scale, self.w_zero_point = w_scale, torch.zeros(len(w_scale), dtype=torch.long)
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __deepcopy__(self, memo: dict) -> "_OneDNNKernel":
        raise TypeError("a model running on the int8 backend cannot be copied (oneDNN's packed weights); copy the "
                        "fake-quant model and convert the copy with tacdiff.backends.use_backend")

    def _zero_point_removed(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` (channels on dimension 1) less the residual weight zero point times the all-ones channel."""
        if self.residual_scaled is None:
            return out
        shape = [1] * out.dim()
        shape[1] = -1
        # one fused pass into a fresh dense tensor (writing in place into the strided slice is ~30x slower)
        return torch.addcmul(out[:, : self.out_channels], out[:, self.out_channels:],
                             self.residual_scaled.view(shape), value=-1.0)


class OneDNNConv2d(_OneDNNKernel):
    """oneDNN int8 convolution of uint8 activation codes (one scale and zero point per call) with stored
    weight codes ``(out, in, kh, kw)``, returning float32 in channels-last layout."""

    def __init__(self, codes: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int]) -> None:
        geometry = ([*stride], [*padding], [*dilation])
        super().__init__(codes, zero_point, scale, bias,
                         lambda weight, w_scale: torch.ops.onednn.qconv_prepack(weight, w_scale, 1.0, 0, *geometry, 1,
                                                                                None))
        self.geometry = geometry

    def forward(self, codes: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        out = torch.ops.onednn.qconv2d_pointwise(codes, scale, zero_point, self.packed, self.w_scale,
                                                 self.w_zero_point, self.bias, *self.geometry, 1, 1.0, 0,
                                                 torch.float32, "none", [], None)
        return self._zero_point_removed(out)


class OneDNNLinear(_OneDNNKernel):
    """oneDNN int8 linear layer: uint8 activation codes ``(M, K)`` (one scale and zero point per call) times
    stored weight codes ``(N, K)``, returning float32 ``(M, N)``, with the scales, zero point and bias applied in the
    kernel. Unlike ``torch._int_mm`` it runs exactly on CPUs without VNNI, within
    :func:`~tacdiff.backends.codes.pair_sums_fit_int16`."""

    def __init__(self, codes: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__(codes, zero_point, scale, bias,
                         lambda weight, w_scale: torch.ops.onednn.qlinear_prepack(weight, None))

    def forward(self, codes: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        out = torch.ops.onednn.qlinear_pointwise(codes, scale, zero_point, self.packed, self.w_scale,
                                                 self.w_zero_point, self.bias, 1.0, 0, torch.float32, "none", [], "")
        return self._zero_point_removed(out)
