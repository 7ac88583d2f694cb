"""The one verb: :func:`quantize` applies a :class:`QuantConfig` to a diffusers UNet.

The walker plans which layers get which bits, swaps ``Conv2d``/``Linear`` for their
quantized twins, attaches matmul-operand quantizers to attention modules, quantizes the
weights (round-to-nearest or learned rounding) and calibrates activation ranges.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from tacdiff.models.kinds import MODEL_KINDS, cond_leaves, kind_of
from tacdiff.quant.calibrate import calibrate_activations
from tacdiff.quant.attention import MATMUL_OPERANDS, quant_processor, reproduces_processor
from tacdiff.quant.config import QuantConfig
from tacdiff.quant.gptq import quantize_weights_gptq
from tacdiff.quant.layers import (ActQuantizer, QuantConv2d, QuantEmbedding, QuantLinear, QuantWeightMixin,
                                  TimestepRouter)
from tacdiff.quant.smooth import balance_channels

if TYPE_CHECKING:  # quant/ sits below sampling/: the calibration set is only named here
    from tacdiff.sampling.calibration import CalibrationSet

STATE_ATTR = "_tacdiff_quant"
WEIGHT_LAYERS = {"conv": QuantConv2d, "linear": QuantLinear, "embedding": QuantEmbedding}


@dataclass(frozen=True)
class LayerPlan:
    """How one module is quantized: ``kind`` is ``conv``, ``linear``, ``embedding`` (weight-only) or ``attention``
    (matmul operands)."""

    name: str
    kind: str
    weight_bits: int | None
    act_bits: int | None
    split: int | None = None


@dataclass
class QuantState:
    """What :func:`quantize` attached to a model: its config, plan and timestep router, the
    SHA-256 of the FP model it was quantized from when known (artifacts record it), and where each
    quantized module runs once a backend was chosen (``{name: "int8" or "fake: why"}``)."""

    config: QuantConfig
    plan: list[LayerPlan]
    router: TimestepRouter
    hook: Any  # the timestep router's forward pre-hook (None on components without timesteps)
    source_sha256: str | None = None
    execution: dict[str, str] = field(default_factory=dict)


def check_supported(model: nn.Module) -> None:
    """Raise ``TypeError`` unless ``model``'s class is in the model-kind registry."""
    kind_of(model)
    if hasattr(model, STATE_ATTR):
        raise ValueError("this model is already quantized; start again from the full-precision model")


def check_finite(model: nn.Module, calibration: CalibrationSet | None) -> None:
    """Raise ``ValueError`` naming the first weight or calibration tensor that holds NaN or inf."""
    for name, tensor in [*model.state_dict().items(), *_calibration_tensors(calibration)]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} holds NaN or inf; tacdiff quantizes only finite weights and calibration "
                             "inputs. Fix or re-export the model, or rebuild the calibration set")


def _calibration_tensors(calibration: CalibrationSet | None) -> list[tuple[str, torch.Tensor]]:
    if calibration is None:
        return []
    cond = [(f"calibration input {key!r}", value) for key, value in cond_leaves(calibration.cond)]
    return [("calibration input x", calibration.x), *cond]


def quant_state(model: nn.Module) -> QuantState:
    """The :class:`QuantState` of a quantized model; ``ValueError`` if it was never quantized."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("model is not quantized by tacdiff; call tacdiff.quantize(model, config, calibration) first")
    return state


def plan_layers(model: nn.Module, config: QuantConfig) -> list[LayerPlan]:
    """Decide bits and splits for every quantizable module of ``model`` (module order)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise ValueError("model has no Conv2d or Linear layers to quantize")
    _check_patterns_match(model, config.exclude)
    edges = {layers[0][0], layers[-1][0]} if config.first_last_bits is not None else set()
    splits = skip_concat_splits(model) if config.split_shortcut else {}
    plan = []
    for name, module in layers:
        if _excluded(name, config):
            continue
        w_bits = config.first_last_bits if name in edges else config.weight_bits
        a_bits = config.first_last_bits if (name in edges and config.act_bits) else config.act_bits
        if name == layers[0][0] and not config.quantize_model_input:
            a_bits = None
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        plan.append(LayerPlan(name, kind, w_bits, a_bits, splits.get(name)))
    if config.quantize_embeddings:
        plan += [LayerPlan(n, "embedding", config.weight_bits, None) for n in _untied_embeddings(model)
                 if not _excluded(n, config)]
    if config.act_bits is not None and config.quantize_attention_matmuls:
        plan += [LayerPlan(n, "attention", None, config.act_bits) for n, m in model.named_modules()
                 if isinstance(m, Attention) and reproduces_processor(m) and not _excluded(n, config)]
    if not plan:
        raise ValueError(f"nothing left to quantize: the exclude patterns {list(config.exclude)} match every "
                         "Conv2d and Linear layer; narrow them")
    return plan


def _untied_embeddings(model: nn.Module) -> list[str]:
    """Names of the ``nn.Embedding`` modules registered once (a tied table, reachable under two names, is left out:
    replacing it under one name would untie it)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Embedding):
            names.setdefault(id(module), []).append(name)
    return [found[0] for found in names.values() if len(found) == 1]


def _check_patterns_match(model: nn.Module, patterns: tuple[str, ...]) -> None:
    """Every exclude pattern names some module of ``model`` (one that matches nothing is most likely a typo)."""
    names = [name for name, _ in model.named_modules() if name]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            nested = [name for name in names if "." in name] or names
            raise ValueError(f"exclude pattern {pattern!r} matches no module of the model; module names look like "
                             f"{names[0]!r} or {nested[len(nested) // 2]!r} (fnmatch: * stands for any text)")


def _excluded(name: str, config: QuantConfig) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in config.exclude)


def skip_concat_splits(model: nn.Module) -> dict[str, int]:
    """Channel index where each up-block resnet's input switches from the hidden state to the skip.

    Up-block resnets consume ``cat([hidden, skip], dim=1)``: ``conv1`` (after norm and
    activation) and ``conv_shortcut`` see that concatenation channel by channel. Models without up blocks
    (transformers) have none.
    """
    splits: dict[str, int] = {}
    if not hasattr(model, "up_blocks"):
        return splits
    hidden = model.config.block_out_channels[-1]
    for b, block in enumerate(model.up_blocks):
        for j, resnet in enumerate(block.resnets):
            if 0 < hidden < resnet.in_channels:
                for conv in ("conv1", "conv_shortcut"):
                    if getattr(resnet, conv, None) is not None:
                        splits[f"up_blocks.{b}.resnets.{j}.{conv}"] = hidden
            hidden = resnet.out_channels
    return splits


def install(model: nn.Module, config: QuantConfig, plan: list[LayerPlan], copy_state: bool = True) -> QuantState:
    """Swap modules per ``plan`` (weights still float; uninitialised without ``copy_state``, for a caller that loads
    every tensor itself) and attach the timestep router; in place.

    Only denoisers (:data:`~tacdiff.models.kinds.MODEL_KINDS`) route timesteps; other modules
    (a text encoder, an autoencoder's decoder) are quantized by :func:`quantize_weights_only`.
    """
    router = TimestepRouter(config.timestep_groups, config.num_train_timesteps)
    dynamic = config.act_range == "dynamic"
    for entry in plan:
        module = model.get_submodule(entry.name)
        token_dim = _token_dim(module, config.act_block_size is not None) if dynamic else None
        act = None if entry.act_bits is None else ActQuantizer(
            entry.act_bits, config.act_symmetric, router, entry.split if entry.kind == "conv" else None, dynamic,
            token_dim, config.act_block_size)
        if entry.kind == "attention":
            for operand in MATMUL_OPERANDS:
                module.add_module(operand, ActQuantizer(entry.act_bits, config.act_symmetric, router, dynamic=dynamic))
            module.set_processor(quant_processor(module))
            continue
        new = WEIGHT_LAYERS[entry.kind].from_float(module, entry.weight_bits, config.weight_symmetric, entry.split,
                                                   act, copy_state)
        if _balanced(entry, config):
            new.enable_smoothing()
        model.set_submodule(entry.name, new)
    device = next(model.parameters()).device
    for name, module in model.named_modules():
        if isinstance(module, ActQuantizer):
            module.name = name
            module.to(device)
    denoiser = isinstance(model, tuple(kind.cls for kind in MODEL_KINDS.values()))
    hook = model.register_forward_pre_hook(_route_timestep, with_kwargs=True) if denoiser else None
    state = QuantState(config, plan, router, hook)
    setattr(model, STATE_ATTR, state)
    return state


def _balanced(entry: LayerPlan, config: QuantConfig) -> bool:
    """Whether ``config`` balances the channels of this layer's input (SmoothQuant): linear layers matching
    ``smooth_layers`` whose input is quantized."""
    return (config.smooth_alpha is not None and entry.kind == "linear" and entry.act_bits is not None
            and any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in config.smooth_layers))


def _token_dim(layer: nn.Module, block_scaled: bool) -> int | None:
    """The feature dimension of a layer whose integer matmul takes activation scales per token, if any.

    A plain int8 GEMM rescales whole output rows, so only linear layers and 1x1 convolutions
    qualify. A block-scaled one rescales every block of the reduction dimension; a convolution's
    reduction runs tap by tap over channels, so each block comes from one input position and
    every layer qualifies.
    """
    if isinstance(layer, nn.Linear):
        return -1
    return 1 if isinstance(layer, nn.Conv2d) and (block_scaled or layer.kernel_size == (1, 1)) else None


def _route_timestep(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: select the timestep group; reads the router from the model so deep copies work."""
    timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
    quant_state(model).router.set_timestep(timestep)


def quantize(model: nn.Module, config: QuantConfig, calibration: CalibrationSet | None = None, *,
             batch_size: int = 64, progress: bool = True) -> nn.Module:
    """Quantize a diffusers UNet **in place** and return it.

    All or nothing: if any stage raises (bad calibration data, an interrupt), the model is put
    back in full precision before the error propagates, so it can be quantized again. Until
    it returns, the replaced float modules are kept, so peak memory is about twice the weights.

    Args:
        model: a full-precision ``UNet2DModel`` or ``UNet2DConditionModel``.
        config: the recipe (bits, ranges, rounding, timestep groups, ...).
        calibration: model inputs drawn across timesteps (see
            :func:`tacdiff.sampling.collect_calibration_set`); needed for calibrated
            activation ranges, GPTQ and learned rounding, optional for round-to-nearest weights with
            ``act_bits=None`` or ``act_range="dynamic"``.
        batch_size: calibration forward batch size.
        progress: show progress bars.
    """
    check_supported(model)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}; e.g. "
                        "tacdiff.QuantConfig(weight_bits=4, act_bits=8)")
    check_finite(model, calibration)
    calibrated_acts = config.act_bits is not None and config.act_range != "dynamic"
    if calibration is None and config.weight_rounding != "rtn":
        what = {"adaround": "learned rounding", "gptq": "GPTQ rounding"}[config.weight_rounding]
        raise ValueError(f"{what} needs calibration inputs; pass "
                         "calibration=collect_calibration_set(model, scheduler) or use weight_rounding='rtn'")
    if calibration is None and calibrated_acts:
        raise ValueError("calibrated activation ranges need calibration inputs; pass calibration="
                         "collect_calibration_set(model, scheduler), or set act_range='dynamic' or act_bits=None")
    if calibration is None and config.smooth_alpha is not None:
        raise ValueError("channel balancing (smooth_alpha) measures the layers' inputs on calibration inputs; pass "
                         "calibration=collect_calibration_set(model, scheduler) or set smooth_alpha=None")
    fp_model = _frozen_copy(model) if config.weight_rounding == "adaround" else None
    model.eval()
    plan = plan_layers(model, config)
    undo = _Undo.record(model, plan)
    try:
        install(model, config, plan)
        if config.smooth_alpha is not None:
            balance_channels(model, calibration, config.smooth_alpha, batch_size=batch_size, progress=progress)
        for module in model.modules():  # embeddings round to nearest under every rounding, before GPTQ reads inputs
            if isinstance(module, QuantEmbedding):
                module.quantize_weight(config.weight_range)
        if config.weight_rounding == "gptq":
            quantize_weights_gptq(model, calibration, config.weight_range, batch_size=batch_size, progress=progress)
        else:
            for module in model.modules():
                if isinstance(module, (QuantConv2d, QuantLinear)):
                    module.quantize_weight(config.weight_range)
        if fp_model is not None:
            from tacdiff.quant.adaround import learn_rounding

            learn_rounding(model, fp_model, calibration, config, progress=progress)
        if calibrated_acts:
            calibrate_activations(model, calibration, config, batch_size=batch_size, progress=progress)
    except BaseException:
        undo.restore(model)
        raise
    return model


def quantize_weights_only(module: nn.Module, config: QuantConfig) -> nn.Module:
    """Quantize the Conv2d and Linear weights of any ``module`` **in place** (round to nearest, ranges by
    ``config.weight_range``; first and last layer at ``config.first_last_bits``), activations float.

    For the parts of a pipeline around the denoiser: its text encoder or its autoencoder's decoder.
    ``config.act_bits`` must be None; no calibration inputs are needed.
    """
    if config.act_bits is not None or config.weight_rounding != "rtn":
        raise ValueError("pipeline components are quantized weight-only with round-to-nearest: pass a QuantConfig "
                         "with act_bits=None and weight_rounding='rtn'")
    if hasattr(module, STATE_ATTR):
        raise ValueError("this module is already quantized; start again from the full-precision module")
    check_finite(module, None)
    config = replace(config, split_shortcut=False, timestep_groups=1)
    plan = plan_layers(module.eval(), config)
    undo = _Undo.record(module, plan)
    try:
        install(module, config, plan)
        for layer in module.modules():
            if isinstance(layer, QuantWeightMixin):
                layer.quantize_weight(config.weight_range)
    except BaseException:
        undo.restore(module)
        raise
    return module


@dataclass
class _Undo:
    """The modules and attention processors :func:`install` replaces, to put back if quantizing fails."""

    modules: dict[str, nn.Module]
    processors: dict[str, Any]

    @classmethod
    def record(cls, model: nn.Module, plan: list[LayerPlan]) -> "_Undo":
        modules = {e.name: model.get_submodule(e.name) for e in plan if e.kind != "attention"}
        processors = {e.name: model.get_submodule(e.name).processor for e in plan if e.kind == "attention"}
        return cls(modules, processors)

    def restore(self, model: nn.Module) -> None:
        """Return ``model`` to its full-precision state (the recorded modules were never modified)."""
        for name, module in self.modules.items():
            model.set_submodule(name, module)
        for name, processor in self.processors.items():
            attn = model.get_submodule(name)
            for operand in MATMUL_OPERANDS:
                if hasattr(attn, operand):
                    delattr(attn, operand)
            attn.set_processor(processor)
        state = getattr(model, STATE_ATTR, None)
        if state is not None:
            if state.hook is not None:
                state.hook.remove()
            delattr(model, STATE_ATTR)


def _frozen_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model).eval()
    clone.requires_grad_(False)
    return clone


def quantization_summary(model: nn.Module) -> list[dict[str, Any]]:
    """One row per planned module: name, kind, weight bits, activation bits, split channel."""
    return [asdict(entry) for entry in quant_state(model).plan]


def format_summary(model: nn.Module) -> str:
    """A plain-text table of :func:`quantization_summary` with parameter counts per bit width, where each
    module runs once an execution backend was chosen (:func:`tacdiff.backends.use_backend`), and the attention
    modules whose matmuls stay float because tacdiff does not reproduce their processor."""
    rows = quantization_summary(model)
    execution = quant_state(model).execution
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'module':<{width}}  kind       w_bits  a_bits  split" + ("  runs" if execution else "")]
    for r in rows:
        runs = f"  {execution.get(r['name'], 'fake')}" if execution else ""
        lines.append(f"{r['name']:<{width}}  {r['kind']:<9}  {_fmt(r['weight_bits']):>6}  "
                     f"{_fmt(r['act_bits']):>6}  {_fmt(r['split']):>5}{runs}")
    counts: dict[str, int] = {}
    for module in model.modules():
        if hasattr(module, "w_bits") and hasattr(module, "num_weights"):
            counts[f"{module.w_bits}-bit"] = counts.get(f"{module.w_bits}-bit", 0) + module.num_weights
    fake_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, QuantWeightMixin))
    held_apart = sum(getattr(m, "float_numel", 0) for m in model.modules())  # int8 layers' biases
    counts["float"] = sum(p.numel() for p in model.parameters()) - fake_weights + held_apart
    lines.append("weights: " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
    float_attention = [f"{name} ({type(module.processor).__name__})" for name, module in model.named_modules()
                       if isinstance(module, Attention) and not hasattr(module, "probs_quant")
                       and not reproduces_processor(module)]
    if float_attention:
        lines.append("attention matmuls kept float (a processor tacdiff does not reproduce): "
                     + ", ".join(float_attention))
    return "\n".join(lines)


def _fmt(value: int | None) -> str:
    return "-" if value is None else str(value)
