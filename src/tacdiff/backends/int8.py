"""Integer execution of quantized linear and convolution layers.

:class:`Int8Linear` and :class:`Int8Conv2d` replace :class:`~tacdiff.quant.layers.QuantLinear` and
:class:`~tacdiff.quant.layers.QuantConv2d`: they keep the integer weight codes only (no float copy) and
quantize their input with the layer's own :class:`~tacdiff.quant.layers.ActQuantizer` ranges (the
timestep group's calibrated range, or the per-sample / per-token range taken at run time) to the very
codes the fake-quant layer uses. On the CPU, convolutions run on :class:`~tacdiff.backends.onednn.OneDNNConv2d`
and linear layers with static ranges on :class:`~tacdiff.backends.onednn.OneDNNLinear`; layers with dynamic or
per-token ranges (linear, 1x1 convolutions), and every linear layer and 1x1 convolution on CUDA, multiply with
:class:`~tacdiff.backends.int_mm.Int8Matmul`. On CPUs without VNNI or AMX a layer runs int8 only where its codes
keep int16 pair sums exact, and never on ``torch._int_mm``. A split skip concatenation (two activation and weight
ranges) is two convolutions summed, which is exact. :class:`Int8AttentionValues` runs the second matmul of a
quantized attention (``probabilities @ values``) on ``torch._int_mm``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tacdiff.backends.codes import (MAX_REDUCTION, activation_codes, exact_int8_cpu, max_centred_weight,
                                    pair_sums_fit_int16, residual_zero_point, unsigned_codes)
from tacdiff.backends.int_mm import Epilogue, Int8Matmul, padded_int_mm
from tacdiff.backends.onednn import OneDNNConv2d, OneDNNLinear, onednn_available
from tacdiff.quant.attention import VALUES_KERNEL
from tacdiff.quant.layers import ActQuantizer, QuantConv2d, QuantEmbedding, QuantLinear, QuantWeightMixin
from tacdiff.quant.primitives import dequantize_tensor


def unsupported_reason(layer: QuantWeightMixin, device: torch.device) -> str | None:
    """Why ``layer`` cannot run on the int8 path as it is, or None when it can."""
    if isinstance(layer, QuantEmbedding):
        return None  # a lookup of integer rows runs anywhere
    act = layer.act_quant
    if (reason := device_reason(device)) is not None:
        return reason
    if act is None:
        return "weight-only: its input is not quantized"
    if not (act.dynamic or act.enabled):
        return "its activation quantizer was never calibrated (the input runs unquantized)"
    if act.block_size is not None:
        return "block-scaled activations need a block-scaled GEMM"
    if getattr(layer, "smooth", None) is not None:
        return "channel-balanced input (a per-channel division before quantizing, not folded into the layer before)"
    if isinstance(layer, QuantConv2d):
        if layer.groups != 1:
            return f"grouped convolution (groups={layer.groups})"
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return f"padding {layer.padding!r} in mode {layer.padding_mode!r}"
        pointwise = (layer.kernel_size, layer.stride) == ((1, 1), (1, 1))
        if act.dynamic and act.token_dim is not None and not pointwise:
            return f"per-token ranges on a {layer.kernel_size} convolution with stride {layer.stride}"
        if device.type == "cuda" and not (pointwise and (act.token_dim is not None or not act.dynamic)):
            return ("no int8 convolution kernel is wired on CUDA (GEMMs only: linear layers and 1x1 convolutions "
                    "with static or per-token ranges)")
    if uses_onednn(layer, device) and not onednn_available():
        return "this PyTorch build has no oneDNN x86 int8 kernels"
    kernel = layer.weight[0, 0].numel()
    reduction = max(s.stop - s.start for s in layer.segments()) * kernel
    if reduction > MAX_REDUCTION:
        return f"reduction length {reduction} > {MAX_REDUCTION} would overflow int32"
    if device.type == "cpu" and not exact_int8_cpu():
        return _int16_reason(layer)
    return None


NO_VNNI = "this CPU has no VNNI or AMX, so its int8 kernels sum pairs of products in saturating int16"


def _int16_reason(layer: QuantLinear | QuantConv2d) -> str | None:
    """Why ``layer`` would not be exact on a CPU without VNNI or AMX, or None when it would."""
    if not uses_onednn(layer, torch.device("cpu")):
        return f"{NO_VNNI} (torch._int_mm, which dynamic and per-token ranges need, is not exact there)"
    out = layer.weight_codes.shape[0]
    largest = max(max_centred_weight(layer.weight_codes[:, s].reshape(out, -1).t(), layer.weight_zero_point[:, i])
                  for i, s in enumerate(layer.segments()))
    bits = layer.act_quant.bits
    if pair_sums_fit_int16(bits, largest):
        return None
    return (f"{NO_VNNI}, which {bits}-bit activations times centred weights up to {largest} overflow (weights of "
            "6 bits or fewer, symmetric 7-bit weights or activations of 7 bits or fewer always fit: quantize with "
            "--w-bits 6 (of these, the most accurate on the bundled model) or --a-bits 7, and --first-last-bits for "
            "the first and last layers)")


def uses_onednn(layer: QuantLinear | QuantConv2d, device: torch.device) -> bool:
    """Whether ``layer`` runs on a oneDNN kernel rather than an int8 GEMM (``torch._int_mm``) on ``device``: on the
    CPU, convolutions but for per-token ranges, and linear layers with static ranges (oneDNN's linear kernel applies
    the scales, zero point and bias itself; ``benchmarks/linear_kernels.py`` times it against ``torch._int_mm``)."""
    act = layer.act_quant
    if device.type != "cpu":
        return False
    if isinstance(layer, QuantConv2d):
        return not (act.dynamic and act.token_dim is not None)
    return not act.dynamic


def device_reason(device: torch.device) -> str | None:
    """Why no int8 kernel runs on ``device`` at all, or None when some do."""
    if device.type not in ("cpu", "cuda"):
        return f"int8 kernels are wired for CPU and CUDA only (model on {device.type})"
    return None


class _IntLayer(nn.Module):
    """Shared parts: the input quantizer, the input-channel segments and an :class:`Int8Matmul` for each
    segment whose weights ``weights`` holds (none for convolutions run by oneDNN)."""

    def __init__(self, layer: QuantWeightMixin, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.act_quant: ActQuantizer = layer.act_quant
        self.w_bits = layer.w_bits
        self.segments = layer.segments()
        self.num_weights = layer.num_weights
        self.float_numel = 0 if layer.bias is None else layer.bias.numel()  # the bias, kept outside parameters
        self._qparams: dict[tuple, tuple[torch.Tensor, torch.Tensor, Epilogue | None]] = {}
        self.matmuls = nn.ModuleList(
            Int8Matmul(codes, layer.weight_zero_point[:, i], layer.weight_scale[:, i],
                       layer.bias if i == 0 else None)
            for i, codes in enumerate(weights))

    def static_qparams(self, segment: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The current timestep group's scale and zero point (0-d, in ``dtype``), cached until the ranges change."""
        return self._static(segment, dtype)[:2]

    def run_static(self, kernel: OneDNNConv2d | OneDNNLinear, x: torch.Tensor, segment: int) -> torch.Tensor:
        """``kernel`` on the uint8 codes of ``x`` under the current timestep group's range for ``segment``."""
        scale, zero_point = self.static_qparams(segment, x.dtype)
        return kernel(unsigned_codes(x, scale, zero_point, self.act_quant.bits), float(scale), int(zero_point))

    def _static(self, segment: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, Epilogue | None]:
        """:meth:`static_qparams` and the segment's GEMM epilogue for them (None where oneDNN runs it), cached."""
        act = self.act_quant
        key = (act.router.group, segment, dtype, id(act.scale), act.scale._version, id(act.zero_point),
               act.zero_point._version)
        if key not in self._qparams:
            scale, zero_point = (value[segment] for value in act.static_qparams(dtype))
            epilogue = (self.matmuls[segment].epilogue(scale, residual_zero_point(zero_point, act.bits))
                        if len(self.matmuls) > segment else None)
            self._qparams[key] = scale, zero_point, epilogue
        return self._qparams[key]

    def quantize_input(self, rows: torch.Tensor, segment: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Epilogue | None]:
        """int8 codes of ``rows`` ``(M, K)``, their scale and residual zero point (0-d for a static range,
        ``(M, 1)`` for per-token dynamic ones) and, for a static range, the GEMM epilogue computed ahead."""
        act = self.act_quant
        if act.dynamic:
            lo, hi = rows.detach().amin(1, keepdim=True), rows.detach().amax(1, keepdim=True)
            scale, zero_point = act.dynamic_qparams(lo, hi)
            epilogue = None
        else:
            scale, zero_point, epilogue = self._static(segment, rows.dtype)
        codes, residual = activation_codes(rows, scale, zero_point, act.bits)
        return codes, scale, residual, epilogue

    def extra_repr(self) -> str:
        return f"w_bits={self.w_bits}, a_bits={self.act_quant.bits}, segments={len(self.segments)}"


class Int8Linear(_IntLayer):
    """A :class:`QuantLinear` run on :class:`OneDNNLinear` where :func:`uses_onednn` says so, else as an int8 GEMM
    (per-token dynamic ranges scale whole rows)."""

    def __init__(self, layer: QuantLinear) -> None:
        onednn = uses_onednn(layer, layer.weight_codes.device)
        super().__init__(layer, [] if onednn else [layer.weight_codes.t()])
        self.onednn = (OneDNNLinear(layer.weight_codes, layer.weight_zero_point[:, 0], layer.weight_scale[:, 0],
                                    layer.bias) if onednn else None)
        self.out_features = layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.onednn is not None:
            out = self.run_static(self.onednn, flat, 0)
        else:
            out = self.matmuls[0](*self.quantize_input(flat, 0))
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int8Conv2d(_IntLayer):
    """A :class:`QuantConv2d` run as oneDNN int8 convolutions (one per input-channel segment, summed).

    A static range or one range per sample (called sample by sample) feeds oneDNN; per-token ranges
    (1x1 convolutions with dynamic ranges), and every 1x1 convolution on CUDA, run as an int8 GEMM over
    the positions instead. The output is float32 in channels-last layout (the layout oneDNN writes;
    diffusers' blocks accept it).
    """

    def __init__(self, layer: QuantConv2d, gemm: bool | None = None) -> None:
        """``gemm``: run as a GEMM over positions (default: for per-token ranges, and on CUDA; 1x1 convolutions
        only)."""
        gemm = not uses_onednn(layer, layer.weight_codes.device) if gemm is None else gemm
        weights = [layer.weight_codes[:, s].reshape(layer.out_channels, -1).t() for s in layer.segments()]
        super().__init__(layer, weights if gemm else [])
        self.gemm = gemm
        if not gemm:
            self.convs = nn.ModuleList(
                OneDNNConv2d(layer.weight_codes[:, s], layer.weight_zero_point[:, i], layer.weight_scale[:, i],
                             layer.bias if i == 0 else None, layer.stride, layer.padding, layer.dilation)
                for i, s in enumerate(layer.segments()))
        self.out_channels, self.padding = layer.out_channels, layer.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x[:, channels] for channels in self.segments] if len(self.segments) > 1 else [x]
        run = self._gemm if self.gemm else self._onednn
        out = run(parts[0], 0)
        for i, part in enumerate(parts[1:], start=1):
            out = out + run(part, i)
        return out.to(x.dtype)

    def _onednn(self, x: torch.Tensor, segment: int) -> torch.Tensor:
        act = self.act_quant
        if not act.dynamic:
            return self.run_static(self.convs[segment], x, segment)
        lo = x.detach().flatten(1).amin(1)
        scales, zero_points = act.dynamic_qparams(lo, x.detach().flatten(1).amax(1))
        return torch.cat([self.convs[segment](unsigned_codes(x[n: n + 1], scale, zero_point, act.bits), float(scale),
                                              int(zero_point))
                          for n, (scale, zero_point) in enumerate(zip(scales, zero_points))])

    def _gemm(self, x: torch.Tensor, segment: int) -> torch.Tensor:
        n, _, h, w = x.shape
        ph, pw = self.padding
        rows = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        out = self.matmuls[segment](*self.quantize_input(rows, segment))
        return out.view(n, h + 2 * ph, w + 2 * pw, -1).permute(0, 3, 1, 2)


class Int8Embedding(nn.Module):
    """A :class:`QuantEmbedding` that keeps only its integer codes and dequantizes the rows it looks up: the
    same values as the fake-quant table (the same arithmetic on the same rows), at a quarter of the memory or less."""

    def __init__(self, layer: QuantEmbedding) -> None:
        super().__init__()
        self.register_buffer("codes", layer.weight_codes.clone())
        self.register_buffer("scale", layer.weight_scale[:, :1].clone())
        self.register_buffer("zero_point", layer.weight_zero_point[:, :1].clone())
        self.dtype, self.w_bits = layer.weight.dtype, layer.w_bits

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return dequantize_tensor(self.codes[index], self.scale[index], self.zero_point[index], self.dtype)

    def extra_repr(self) -> str:
        return f"{self.codes.shape[0]}, {self.codes.shape[1]}, w_bits={self.w_bits}"


MIN_KEYS = 1024
"""Fewest keys for which :class:`Int8AttentionValues` runs: self-attention over 32x32 latents and larger."""


class Int8AttentionValues:
    """``probabilities @ values`` of a quantized attention (:func:`tacdiff.quant.attention.quantized_attention`,
    attached as :data:`~tacdiff.quant.attention.VALUES_KERNEL`) on int8 GEMMs, one per head: the probabilities'
    and the values' codes under their calibrated static ranges (the very codes the fake quantizers use), with the
    values stored column-major and padded to a multiple of 8 columns (``torch._int_mm`` on the CPU ran several
    times slower on 40 row-major columns), one of which is all ones: it returns each row's code sum for the
    values' zero point. Only the float rounding of the product differs from the fake path."""

    def __init__(self, attn: nn.Module) -> None:
        self.probs_quant, self.v_quant = attn.probs_quant, attn.v_quant

    def __call__(self, value: torch.Tensor) -> Callable[[torch.Tensor, slice], torch.Tensor] | None:
        """The product with ``value`` ``(batch * heads, keys, dim)``: ``(probabilities, heads) -> output``; None
        (run it in float) below :data:`MIN_KEYS` keys, where one small GEMM per head costs more in calls than it
        saves, and above :data:`MAX_REDUCTION`, where int32 sums would not be exact."""
        if not MIN_KEYS <= value.shape[1] <= MAX_REDUCTION:
            return None
        v_scale, v_zero_point = (q[0] for q in self.v_quant.static_qparams(value.dtype))
        p_scale, p_zero_point = (q[0] for q in self.probs_quant.static_qparams(value.dtype))
        codes, v_residual = activation_codes(value, v_scale, v_zero_point, self.v_quant.bits)
        heads, keys, dim = codes.shape
        packed = codes.new_zeros(heads, -(-(dim + 1) // 8) * 8, keys)
        packed[:, :dim], packed[:, dim] = codes.transpose(1, 2), 1
        p_residual = residual_zero_point(p_zero_point, self.probs_quant.bits).float()
        v_residual = v_residual.float()
        # sum_k (P - rp)(V - rv) = P @ V - rv * rowsum(P) + rp * (keys * rv - colsum(V))
        shift = p_residual * (keys * v_residual - codes.sum(1, dtype=torch.int32).float())
        scale = (p_scale * v_scale).float()
        matmul = padded_int_mm if value.is_cuda else torch._int_mm

        def product(probs: torch.Tensor, which: slice) -> torch.Tensor:
            p_codes, _ = activation_codes(probs, p_scale, p_zero_point, self.probs_quant.bits)
            acc = torch.stack([matmul(block, packed[h].t())
                               for block, h in zip(p_codes, range(heads)[which])]).float()
            out = acc[..., :dim].sub_(v_residual * acc[..., dim: dim + 1]).add_(shift[which, None])
            return out.mul_(scale).to(value.dtype)

        return product


def values_kernel_reason(attn: nn.Module, device: torch.device) -> str | None:
    """Why :class:`Int8AttentionValues` cannot run ``attn``'s ``probabilities @ values``, or None when it can."""
    if (reason := device_reason(device)) is not None:
        return reason
    if device.type == "cpu" and not exact_int8_cpu():
        return f"{NO_VNNI}; torch._int_mm is not exact there"
    quantizers = (attn.probs_quant, attn.v_quant)
    if any(q.dynamic for q in quantizers):
        return "dynamic ranges (one per head and sample, taken over the whole matrix)"
    if not all(q.enabled for q in quantizers):
        return "its quantizers were never calibrated"
    return None


INT_LAYERS = (_IntLayer, Int8Embedding)


def to_int8(layer: QuantWeightMixin) -> Int8Linear | Int8Conv2d | Int8Embedding:
    """The integer twin of a quantized layer (check :func:`unsupported_reason` first)."""
    if isinstance(layer, QuantEmbedding):
        return Int8Embedding(layer)
    return Int8Conv2d(layer) if isinstance(layer, QuantConv2d) else Int8Linear(layer)


def adds_weight_zero_point(layer: nn.Module) -> bool:
    """Whether an int8 layer adds a weight zero point back at run time: 8-bit weight codes whose centred values
    do not fit int8 (asymmetric ranges), an extra output channel and pass per call (symmetric ones need none)."""
    return any(getattr(m, "residual_scaled", None) is not None for m in layer.modules())


def is_converted(model: nn.Module) -> bool:
    """Whether any layer (or attention product) of ``model`` runs on the int8 path."""
    return any(isinstance(m, INT_LAYERS) or hasattr(m, VALUES_KERNEL) for m in model.modules())


def backend_of(model: nn.Module) -> str:
    """``"int8"`` when any layer of ``model`` runs on the int8 path, else ``"fake"``."""
    return "int8" if is_converted(model) else "fake"
