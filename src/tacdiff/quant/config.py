"""The quantization recipe: a small validated dataclass that :func:`tacdiff.quantize` applies."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from tacdiff.quant.primitives import check_bits

_RANGE_METHODS = ("minmax", "percentile", "mse")
_ACT_RANGES = (*_RANGE_METHODS, "dynamic")
_ROUNDINGS = ("rtn", "gptq", "adaround")
_BITS = re.compile(r"^w(\d)a(\d)$")
SYMMETRIC_SUFFIX = "-sym"
MODULATED_INPUTS = ("*.to_q", "*.to_k", "*.to_v", "*.add_q_proj", "*.add_k_proj", "*.add_v_proj", "*.ff.net.0.proj",
                    "*.ff_context.net.0.proj")
"""Linear layers reading a transformer block's normalised tokens (adaLN-modulated in DiT, PixArt and SD3 blocks;
the text in cross-attention): the attention projections and the first MLP layer."""


@dataclass(frozen=True)
class QuantConfig:
    """Post-training quantization settings (Q-Diffusion-style PTQ).

    Attributes:
        weight_bits: bits for weights, per output channel (2..8).
        act_bits: bits for layer inputs and attention matmul operands (2..8), or None
            for weight-only quantization.
        weight_symmetric / act_symmetric: symmetric ranges instead of asymmetric ones.
        weight_range: how each channel's clipping range is chosen for round-to-nearest.
        weight_rounding: ``"rtn"`` (round to nearest), ``"gptq"`` (each layer's rounding error
            compensated within the layer from its calibration inputs, seconds) or ``"adaround"``
            (learned rounding, reconstructing each block's full-precision output, minutes).
        act_range: how activation ranges are chosen: ``minmax``, ``percentile`` or ``mse`` fix
            them from calibration samples; ``dynamic`` takes min and max at run time, per token
            (each sample's position) for the inputs of linear layers and 1x1 convolutions, per
            sample for wider convolutions, per sample and head for attention operands (each half
            of a split skip concatenation apart, with ``split_shortcut``): the
            finest ranges a plain int8 matmul can rescale its output by. It needs no calibration
            and follows the activations' drift across timesteps by construction.
        act_block_size: with ``act_range="dynamic"``, block-scaled activations instead: the input
            of every convolution (3x3 ones too) and linear layer gets one range per token and per
            block of this many consecutive channels (a block as wide as the layer: per token).
            Much finer than ``dynamic`` alone, but it needs a block-scaled integer matmul (one
            scale per row and per block of the reduction dimension, as in the OCP Microscaling
            formats and Atom's group quantization) rather than a plain int8 GEMM. Attention
            operands keep their per-sample-and-head ranges. None: off.
        act_percentile: the upper percentile (in %) for ``act_range="percentile"``.
        first_last_bits: bits for the first and last layer (weights and inputs), or None
            to treat them like every other layer.
        quantize_model_input: also quantize the network input ``x_t`` (the first layer's input).
            Off by default: as in Q-Diffusion, whose activation quantizers sit on layer
            outputs, ``x_t`` stays in full precision, because at small ``t`` the noise the
            model must estimate is far below an 8-bit step of ``x_t``'s range.
        smooth_alpha: SmoothQuant's channel balancing (Xiao et al., ICML 2023) for the linear layers
            matching ``smooth_layers``: every input channel ``j`` is divided by
            ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (absolute maxima over the calibration inputs and
            the weight's column) and the weight's column multiplied by it, so the product is unchanged while
            outlier channels move from the activations into the weights. ``alpha`` in [0, 1] (0.5 is the
            paper's default); None: off. The division runs at run time before the input quantizer (in the
            adaLN blocks of DiT and SD3 it could be folded into the modulation's scale and shift).
        smooth_layers: ``fnmatch`` patterns of the linear layers ``smooth_alpha`` balances (default
            :data:`MODULATED_INPUTS`).
        quantize_embeddings: also quantize the ``nn.Embedding`` tables (class and label embeddings; a
            DiT gives each block its own) weight-only at ``weight_bits``, one range per row, round to
            nearest: lookups, so no activation to quantize, but a smaller artifact. Tables shared by two
            modules (tied) stay float. Off by default.
        exclude: ``fnmatch`` patterns of module names to leave in full precision.
        split_shortcut: quantize the two halves of each up-block skip concatenation
            separately (Q-Diffusion's shortcut splitting).
        quantize_attention_matmuls: also quantize the operands of ``q @ k^T`` and ``softmax @ v``.
        timestep_groups: number of activation ranges per quantizer; the one in use is
            picked at run time from the current timestep (1 = one time-uniform range).
        num_train_timesteps: the scheduler's training timesteps; the groups split ``[0, T)`` evenly.
        adaround_iters: optimisation steps per block for learned rounding.
        adaround_lr: Adam learning rate for the rounding variables.
        adaround_batch_size: calibration samples per learned-rounding step.
        seed: seed for every random choice made while quantizing.
    """

    weight_bits: int = 8
    act_bits: int | None = 8
    weight_symmetric: bool = False
    act_symmetric: bool = False
    weight_range: Literal["minmax", "percentile", "mse"] = "mse"
    weight_rounding: Literal["rtn", "gptq", "adaround"] = "rtn"
    act_range: Literal["minmax", "percentile", "mse", "dynamic"] = "mse"
    act_block_size: int | None = None
    act_percentile: float = 99.99
    first_last_bits: int | None = 8
    quantize_model_input: bool = False
    smooth_alpha: float | None = None
    smooth_layers: tuple[str, ...] = MODULATED_INPUTS
    quantize_embeddings: bool = False
    exclude: tuple[str, ...] = field(default_factory=tuple)
    split_shortcut: bool = True
    quantize_attention_matmuls: bool = True
    timestep_groups: int = 1
    num_train_timesteps: int = 1000
    adaround_iters: int = 500
    adaround_lr: float = 1e-2
    adaround_batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, "act_bits")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        _check_choice("weight_range", self.weight_range, _RANGE_METHODS)
        _check_choice("act_range", self.act_range, _ACT_RANGES)
        _check_choice("weight_rounding", self.weight_rounding, _ROUNDINGS)
        for name in ("weight_symmetric", "act_symmetric", "quantize_model_input", "split_shortcut",
                     "quantize_attention_matmuls", "quantize_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not _is_number(self.act_percentile) or not 50.0 < self.act_percentile <= 100.0:
            raise ValueError(f"act_percentile must be a number in (50, 100], got {self.act_percentile!r}")
        if not _is_number(self.adaround_lr) or not self.adaround_lr > 0:
            raise ValueError(f"adaround_lr must be a positive number, got {self.adaround_lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        _check_positive("timestep_groups", self.timestep_groups)
        _check_positive("num_train_timesteps", self.num_train_timesteps)
        _check_positive("adaround_iters", self.adaround_iters)
        _check_positive("adaround_batch_size", self.adaround_batch_size)
        if self.act_range == "dynamic" and self.timestep_groups > 1:
            raise ValueError("timestep_groups > 1 picks calibrated ranges by timestep, and act_range='dynamic' "
                             "has none; use one or the other")
        if self.act_block_size is not None:
            _check_positive("act_block_size", self.act_block_size)
            if self.act_range != "dynamic":
                raise ValueError(f"act_block_size takes ranges at run time and needs act_range='dynamic' "
                                 f"(got act_range={self.act_range!r}); set both or neither")
        if self.timestep_groups > self.num_train_timesteps:
            raise ValueError(f"timestep_groups ({self.timestep_groups}) cannot exceed "
                             f"num_train_timesteps ({self.num_train_timesteps})")
        if self.smooth_alpha is not None and not (_is_number(self.smooth_alpha) and 0 <= self.smooth_alpha <= 1):
            raise ValueError(f"smooth_alpha must be a number in [0, 1] (0.5 balances evenly) or None, got "
                             f"{self.smooth_alpha!r}")
        for name in ("exclude", "smooth_layers"):
            patterns = getattr(self, name)
            if isinstance(patterns, str) or not isinstance(patterns, (tuple, list)) or \
                    not all(isinstance(p, str) for p in patterns):
                raise ValueError(f"{name} must be a sequence of name patterns, e.g. ('time_embedding.*',); "
                                 f"got {patterns!r}")
            object.__setattr__(self, name, tuple(patterns))

    def to_json(self) -> str:
        """The config as a JSON string (stored in artifact metadata)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        """Rebuild a config written by :meth:`to_json`; unknown keys raise ``ValueError``."""
        data: dict[str, Any] = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {unknown}; the artifact comes from a newer tacdiff")
        return cls(**data)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def parse_bits(text: str) -> tuple[int, int]:
    """``"w4a8"`` -> ``(4, 8)``; ``ValueError`` naming the value unless it is ``w<2..8>a<2..8>``."""
    match = _BITS.match(text.strip().lower())
    if match is None or not all(2 <= int(b) <= 8 for b in match.groups()):
        raise ValueError(f"bits must look like w4a8 (weight and activation bits each 2..8), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_setting(text: str) -> tuple[int, int, bool]:
    """``"w4a8"`` -> ``(4, 8, False)``; a ``-sym`` suffix (``"w8a8-sym"``) asks for symmetric weight ranges."""
    plain = text.strip().lower().removesuffix(SYMMETRIC_SUFFIX)
    try:
        return (*parse_bits(plain), plain != text.strip().lower())
    except ValueError:
        raise ValueError(f"a setting looks like w4a8, or w8a8{SYMMETRIC_SUFFIX} for symmetric weights (bits 2..8), "
                         f"got {text!r}") from None


def setting_label(config: QuantConfig) -> str:
    """The :func:`parse_setting` text of ``config``'s bits and weight symmetry."""
    return f"w{config.weight_bits}a{config.act_bits}" + (SYMMETRIC_SUFFIX if config.weight_symmetric else "")
