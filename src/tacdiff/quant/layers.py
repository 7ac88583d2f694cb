"""Quantized layers: an activation quantizer with timestep-grouped ranges, fake-quant Conv2d/Linear and
weight-only Embedding.

Weights are stored as integer codes with per-output-channel scale and zero point (two
of each per channel when the input is a split skip concatenation); the float weight the
layer computes with is always the exact dequantization of those codes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init

from tacdiff.quant import primitives as P


class TimestepRouter:
    """Shared state telling every activation quantizer which timestep group is running.

    The range ``[0, num_train_timesteps)`` is cut into ``groups`` equal intervals; a
    forward pre-hook on the model calls :meth:`set_timestep` before each call.
    """

    def __init__(self, groups: int = 1, num_train_timesteps: int = 1000) -> None:
        self.groups = groups
        self.num_train_timesteps = num_train_timesteps
        self.group = 0

    def group_of(self, timestep: torch.Tensor | float | int) -> int:
        """The group index of ``timestep`` (a number or a tensor whose entries share one group)."""
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).cpu()
        if not torch.isfinite(t).all():
            raise ValueError(f"timestep must be finite, got {t.tolist()}")
        groups = torch.clamp((t * self.groups / self.num_train_timesteps).floor().long(), 0, self.groups - 1)
        if groups.numel() == 0:
            raise ValueError("timestep is empty")
        if (groups != groups[0]).any():
            raise ValueError("a batch mixes timesteps from different range groups "
                             f"({sorted(set(groups.tolist()))}); call the model once per timestep group")
        return int(groups[0])

    def group_for(self, timestep: torch.Tensor | float | int) -> int:
        """The group a forward pass at ``timestep`` runs in (0, unchecked, when there is one group)."""
        return self.group_of(timestep) if self.groups > 1 else 0

    def set_timestep(self, timestep: torch.Tensor | float | int) -> None:
        """Select the group of ``timestep`` for the next forward pass."""
        self.group = self.group_for(timestep)


class RangeObserver:
    """Collects a bounded random subsample plus exact min/max of every value seen, per group and segment.

    The subsample draws every value seen with about the same probability: the first call
    contributes ``per_call`` values, later calls in proportion to their size, and each time the
    store passes ``cap`` it is halved and later calls take half as many.
    """

    def __init__(self, groups: int, segments: int, per_call: int = 4096, cap: int = 1 << 18,
                 seed: int = 0) -> None:
        self.values: list[list[list[torch.Tensor]]] = [[[] for _ in range(segments)] for _ in range(groups)]
        self.rate: list[list[float | None]] = [[None] * segments for _ in range(groups)]  # values kept per value
        self.groups, self.segments, self.per_call, self.cap, self.seed = groups, segments, per_call, cap, seed
        self.generator = torch.Generator().manual_seed(seed)

    def observe(self, parts: list[torch.Tensor], group: int, name: str) -> None:
        """Record each segment's values for ``group``; non-finite values raise ``ValueError``."""
        for seg, x in enumerate(parts):
            self.add(group, seg, self.entry(x, self.draw(group, seg, x.numel()), name))

    def draw(self, group: int, segment: int, numel: int) -> torch.Tensor:
        """Positions of the values that a call of ``numel`` values contributes (advances the random stream)."""
        rate = self.rate[group][segment]
        if rate is None:
            rate = self.rate[group][segment] = self.per_call / numel
        count = min(numel, max(1, round(rate * numel)))
        return torch.randint(numel, (count,), generator=self.generator)

    @staticmethod
    def entry(x: torch.Tensor, pick: torch.Tensor, name: str) -> torch.Tensor:
        """What a call stores: the values of ``x`` at ``pick``, then its min and max, on the CPU."""
        flat = x.detach().reshape(-1).float()
        if not torch.isfinite(flat).all():
            raise ValueError(f"NaN or inf in the activations entering {name!r} during calibration; "
                             "check the model's weights and the calibration inputs")
        return torch.cat([flat[pick.to(flat.device)], flat.amin()[None], flat.amax()[None]]).cpu()

    def add(self, group: int, segment: int, entry: torch.Tensor) -> None:
        """Store one call's :meth:`entry`; past ``cap`` values, keep a random half (advances the random stream)."""
        store = self.values[group][segment]
        store.append(entry)
        if sum(v.numel() for v in store) > self.cap:
            merged = torch.cat(store)
            keep = torch.randperm(merged.numel(), generator=self.generator)[: self.cap // 2]
            store[:] = [merged[keep], merged.amin()[None], merged.amax()[None]]
            self.rate[group][segment] = self.rate[group][segment] * keep.numel() / merged.numel()

    def fresh(self) -> "RangeObserver":
        """An empty observer with this one's settings and seed (its random stream from the start)."""
        return RangeObserver(self.groups, self.segments, per_call=self.per_call, cap=self.cap, seed=self.seed)

    def samples(self, group: int, segment: int) -> torch.Tensor | None:
        """All recorded values of one group and segment, or None if none were seen."""
        store = self.values[group][segment]
        return torch.cat(store) if store else None


class ActQuantizer(nn.Module):
    """Per-tensor fake quantizer for activations with one range per timestep group.

    With ``split`` set, channels ``[:split]`` and ``[split:]`` (dimension 1) get separate
    ranges. Until calibrated (``enabled`` False) it passes values through unchanged. A
    ``dynamic`` quantizer needs no calibration: it takes every sample's (dimension 0) own
    min-max range at run time and is enabled from the start. With ``token_dim`` set as well
    it takes every token's own range instead, the min-max over that (feature) dimension only:
    an integer matmul can rescale each of its output rows, so a linear layer or a 1x1
    convolution can consume per-token codes, while a wider convolution mixes neighbouring
    positions and needs one scale per sample (unless its matmul is block-scaled).
    ``block_size`` further splits each token's features into blocks of that many, each with
    its own range, for block-scaled matmuls.
    """

    def __init__(self, bits: int, symmetric: bool, router: TimestepRouter, split: int | None = None,
                 dynamic: bool = False, token_dim: int | None = None, block_size: int | None = None) -> None:
        super().__init__()
        self.bits, self.symmetric, self.split = P.check_bits(bits, "act_bits"), symmetric, split
        self.router, self.dynamic, self.token_dim, self.block_size = router, dynamic, token_dim, block_size
        segments = 1 if split is None else 2
        self.register_buffer("scale", torch.ones(router.groups, segments))
        self.register_buffer("zero_point", torch.zeros(router.groups, segments))
        self.enabled = dynamic
        self.observer: RangeObserver | None = None
        self.name = ""

    def extra_repr(self) -> str:
        ranges = f"groups={self.router.groups}"
        if self.dynamic:
            ranges = "dynamic per sample" if self.token_dim is None else "dynamic per token"
            if self.block_size is not None:
                ranges += f" and block of {self.block_size}"
        return f"bits={self.bits}, symmetric={self.symmetric}, {ranges}, split={self.split}"

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The segments of ``x`` that get separate ranges."""
        return [x] if self.split is None else [x[:, : self.split], x[:, self.split:]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(self.parts(x), self.router.group, self.name)
        if not self.enabled:
            return x
        if self.dynamic:
            out = [self.quantize_dynamic(part) for part in self.parts(x)]
        else:
            scale, zero_point = self.static_qparams(x.dtype)
            out = [P.fake_quantize(part, scale[i], zero_point[i], self.bits) for i, part in enumerate(self.parts(x))]
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def quantize_dynamic(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with the min-max range of each sample (dimension 0), token or token block."""
        if self.token_dim is None:
            flat = x.detach().reshape(x.shape[0], -1)
            shape = (-1,) + (1,) * (x.dim() - 1)
            lo, hi = flat.amin(1).reshape(shape), flat.amax(1).reshape(shape)  # faster than aminmax on CPU
            return self._fake_quantize_minmax(x, lo, hi)
        dim = self.token_dim % x.dim()
        blocks = P.to_blocks(x, dim, self.block_size)
        lo, hi = blocks.detach().amin(dim + 1, keepdim=True), blocks.detach().amax(dim + 1, keepdim=True)
        return P.from_blocks(self._fake_quantize_minmax(blocks, lo, hi), dim, x.shape[dim])

    def _fake_quantize_minmax(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return P.fake_quantize(x, *self.dynamic_qparams(lo, hi), self.bits)

    def static_qparams(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The current timestep group's calibrated scales and zero points ``(segments,)`` in ``dtype``."""
        g = self.router.group
        return _scale_in(self.scale[g], dtype), self.zero_point[g].to(dtype)

    def dynamic_qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales and zero points of run-time min-max ranges ``lo``/``hi``, in their dtype (the integer
        backend derives its codes from the same values, so they match this quantizer's exactly)."""
        scale, zero_point = P.qparams_unchecked(lo.float(), hi.float(), self.bits, self.symmetric)
        return _scale_in(scale, lo.dtype), zero_point.to(lo.dtype)

    def set_ranges(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set ranges of shape ``(groups, segments)`` and enable quantization."""
        scale, zp = P.qparams_from_range(lo.float(), hi.float(), self.bits, self.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        self.enabled = True


def _scale_in(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32 scale cast to the activations' dtype, kept above 0 (a tiny range would divide by 0)."""
    return scale.to(dtype).clamp(min=torch.finfo(dtype).tiny)


class QuantWeightMixin:
    """Integer-coded weights shared by :class:`QuantConv2d` and :class:`QuantLinear`.

    Buffers: ``weight_codes`` (uint8, weight's shape), ``weight_scale`` and
    ``weight_zero_point`` of shape ``(out_channels, segments)``.
    """

    weight: nn.Parameter

    def _init_quant(self, bits: int, symmetric: bool, split: int | None, act_quant: ActQuantizer | None) -> None:
        self.w_bits, self.w_symmetric, self.split = P.check_bits(bits, "weight_bits"), symmetric, split
        self.act_quant = act_quant
        segments = 1 if split is None else 2
        out_channels = self.weight.shape[0]
        self.weight.requires_grad_(False)
        self.register_buffer("weight_codes", torch.zeros_like(self.weight, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_channels, segments, device=self.weight.device))
        self.register_buffer("weight_zero_point", torch.zeros(out_channels, segments, device=self.weight.device))

    @property
    def num_weights(self) -> int:
        """Number of quantized weights."""
        return self.weight.numel()

    def segments(self) -> list[slice]:
        """Input-channel slices that get separate weight ranges."""
        n_in = self.weight.shape[1]
        return [slice(0, n_in)] if self.split is None else [slice(0, self.split), slice(self.split, n_in)]

    def expand(self, p: torch.Tensor) -> torch.Tensor:
        """Broadcast a ``(out_channels, segments)`` parameter against the weight."""
        seg_of_input = torch.zeros(self.weight.shape[1], dtype=torch.long, device=p.device)
        if self.split is not None:
            seg_of_input[self.split:] = 1
        full = p[:, seg_of_input]
        return full.reshape(*full.shape, *([1] * (self.weight.dim() - 2)))

    def weight_qparams(self, method: P.RangeMethod = "mse") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-output-channel (and per-segment) scale and zero point from the current float weight."""
        ranges = [P.choose_range(self.weight[:, s].float(), method, self.w_bits, self.w_symmetric, axis=0)
                  for s in self.segments()]
        lo = torch.stack([r[0] for r in ranges], dim=1)
        hi = torch.stack([r[1] for r in ranges], dim=1)
        return P.qparams_from_range(lo, hi, self.w_bits, self.w_symmetric)

    def quantize_weight(self, method: P.RangeMethod = "mse") -> None:
        """Round-to-nearest quantization of the float weight with ranges chosen by ``method``."""
        scale, zp = self.weight_qparams(method)
        codes = P.quantize_tensor(self.weight.float(), self.expand(scale), self.expand(zp), self.w_bits)
        self.set_codes(codes, scale, zp)

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Store integer codes and their parameters; the float weight becomes their dequantization."""
        self.weight_codes.copy_(codes.to(torch.uint8))
        self.weight_scale.copy_(scale)
        self.weight_zero_point.copy_(zero_point)
        self.refresh_weight()

    def refresh_weight(self) -> None:
        """Recompute the float weight from the stored codes (after loading a state dict)."""
        with torch.no_grad():
            P.dequantize_tensor(self.weight_codes, self.expand(self.weight_scale), self.expand(self.weight_zero_point),
                                self.weight.dtype, out=self.weight)

    def enable_smoothing(self) -> None:
        """Give the layer a per-input-channel ``smooth`` divisor (ones until :meth:`set_smoothing`)."""
        self.register_buffer("smooth", torch.ones(self.weight.shape[1], device=self.weight.device))

    def set_smoothing(self, scale: torch.Tensor) -> None:
        """SmoothQuant's balancing: divide input channel ``j`` by ``scale[j]`` at run time and multiply the float
        weight's input channel ``j`` by it (same product in exact arithmetic); before the weights are quantized."""
        self.smooth.copy_(scale)
        with torch.no_grad():
            self.weight.mul_(scale.reshape(1, -1, *([1] * (self.weight.dim() - 2))).to(self.weight.dtype))

    def matmul_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input the weights multiply before it is quantized: ``x``, divided by ``smooth`` when balanced."""
        smooth = getattr(self, "smooth", None)
        return x if smooth is None else x / smooth.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The float layer's forward on the (balanced,) fake-quantized input."""
        x = self.matmul_input(x)
        return super().forward(x if self.act_quant is None else self.act_quant(x))

    def extra_repr(self) -> str:
        act = "none" if self.act_quant is None else str(self.act_quant.bits)
        return f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={act}, split={self.split}"


class QuantConv2d(QuantWeightMixin, nn.Conv2d):
    """``nn.Conv2d`` with integer-coded weights and a fake-quantized input."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: int, symmetric: bool, split: int | None,
                   act_quant: ActQuantizer | None, copy_state: bool = True) -> "QuantConv2d":
        """A quantized copy of ``conv`` (weights still float until :meth:`quantize_weight`; left uninitialised
        without ``copy_state``, for a caller that loads every tensor itself)."""
        new = skip_init(cls, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                        device=conv.weight.device, dtype=conv.weight.dtype)
        if copy_state:
            new.load_state_dict(conv.state_dict())
        new._init_quant(bits, symmetric, split, act_quant)
        return new


class QuantLinear(QuantWeightMixin, nn.Linear):
    """``nn.Linear`` with integer-coded weights and a fake-quantized input."""

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, symmetric: bool, split: int | None,
                   act_quant: ActQuantizer | None, copy_state: bool = True) -> "QuantLinear":
        """A quantized copy of ``linear`` (as :meth:`QuantConv2d.from_float`)."""
        new = skip_init(cls, linear.in_features, linear.out_features, linear.bias is not None,
                        device=linear.weight.device, dtype=linear.weight.dtype)
        if copy_state:
            new.load_state_dict(linear.state_dict())
        new._init_quant(bits, symmetric, split, act_quant)
        return new


class QuantEmbedding(QuantWeightMixin, nn.Embedding):
    """``nn.Embedding`` with integer-coded rows (one scale and zero point per row); lookups, no activation quantizer."""

    @classmethod
    def from_float(cls, embedding: nn.Embedding, bits: int, symmetric: bool, split: int | None,
                   act_quant: ActQuantizer | None, copy_state: bool = True) -> "QuantEmbedding":
        """A quantized copy of ``embedding`` (as :meth:`QuantConv2d.from_float`)."""
        if split is not None or act_quant is not None:
            raise ValueError("an embedding is quantized weight-only and whole: no split, no activation quantizer")
        new = skip_init(cls, embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                        embedding.max_norm, embedding.norm_type, embedding.scale_grad_by_freq, embedding.sparse,
                        device=embedding.weight.device, dtype=embedding.weight.dtype)
        if copy_state:
            new.load_state_dict(embedding.state_dict())
        new._init_quant(bits, symmetric, None, None)
        return new
