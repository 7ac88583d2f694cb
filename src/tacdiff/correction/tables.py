"""Per-timestep correction tables (TAC of Yao et al., ECCV 2024, and the PTQD baseline), as safetensors.

Every method is the same affine correction around the network, keyed by the scheduler's
timestep values::

    eps = out_scale[t] * (model(x - input_bias[t], t) - out_bias[t])

With ``ibc_target="state"`` the input bias is subtracted from the sampler's latent itself at the
start of the step (``x_hat_t <- x_hat_t - mu_t``, so the trajectory carries the correction on)
instead of from the network's input only.

TAC sets ``input_bias = mu_t`` (IBC) and ``out_scale = K_t`` (NER) with ``out_bias = 0``; PTQD
sets ``input_bias = 0``, ``out_bias = b_t`` and ``out_scale = 1 / (1 + k_t)``. The file holds
those tensors, the residual variance per step (PTQD) and metadata naming the scheduler, step
count, quantization bits, FP model hash and hyper-parameters. Writes are atomic.

``eps`` is whatever the denoiser returns under the scheduler, recorded as :data:`PREDICTION_KEY`: the
noise estimate, or under flow-matching schedulers the flow velocity (NER scales the velocity, IBC
still shifts the sampler's latent); tables refuse a sampler of the other parameterization.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import SchedulerMixin
from torch import Tensor, nn

import tacdiff
from tacdiff.backends.int8 import backend_of
from tacdiff.io.atomic import is_regular_file, write_file_atomically
from tacdiff.io.formats import read_safetensors, safetensors_format, save_safetensors
from tacdiff.quant.apply import STATE_ATTR, QuantState
from tacdiff.models.kinds import correction_space, estimate_channels, sample_shape_of, set_timesteps

FORMAT = "tacdiff-correction-tables"
FORMAT_VERSION = "1"
METHODS = ("tac", "ner", "ibc", "ptqd", "none")
IBC_TARGETS = ("state", "input")
TENSOR_NAMES = ("timesteps", "input_bias", "out_scale", "out_bias", "residual_var")
TIMESTEP_ATOL = 1e-3
ALPHAS_RTOL = 1e-5
CONDITIONING_KEY = "conditioning"
"""Metadata key of the conditioning record the tables were fitted with (prompts, guidance scale)."""
FORCE_HINT = "pass --force-tables / force=True to apply them anyway"


@dataclass
class CorrectionTables:
    """Per-step corrections for one scheduler and step count.

    Attributes:
        method: ``tac``, ``ner``, ``ibc``, ``ptqd`` (or ``none``).
        timesteps: ``(T,)`` float64 scheduler timesteps in sampling order.
        input_bias: ``(T, C)`` or ``(T, C, H, W)`` subtracted from the model input (IBC's ``mu_t``).
        out_scale: ``(T, C)`` multiplying the bias-corrected output (NER's ``K_t``; PTQD's ``1/(1+k_t)``),
            or ``(T, 2, C)`` per classifier-free-guidance branch (unconditional, conditional) for
            tables fitted with ``guidance_fit="branch"``, applied to each half of the guided batch.
        out_bias: ``(T, C)`` (or ``(T, 2, C)``) subtracted from the raw output (PTQD's ``b_t``).
        residual_var: ``(T,)`` variance per element of the corrected estimate's residual noise (PTQD; else 0).
        scheduler_class, scheduler_config: the scheduler calibrated with.
        num_inference_steps: its step count.
        metadata: provenance (bits, FP model hash, hyper-parameters), JSON-able values.
        ibc_target: ``"state"`` (subtract ``input_bias`` from the sampler's latent, which needs
            the sampling loop to call ``CorrectedDenoiser.correct_state``) or ``"input"`` (from the
            network input only, a pure UNet wrapper). Files without it are ``"input"``.
    """

    method: str
    timesteps: Tensor
    input_bias: Tensor
    out_scale: Tensor
    out_bias: Tensor
    residual_var: Tensor
    scheduler_class: str
    scheduler_config: dict[str, Any]
    num_inference_steps: int
    metadata: dict[str, Any] = field(default_factory=dict)
    ibc_target: str = "input"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown correction method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.ibc_target not in IBC_TARGETS:
            raise ValueError(f"ibc_target must be 'state' or 'input', got {self.ibc_target!r}")
        steps = self.timesteps.shape[0] if self.timesteps.ndim == 1 else -1
        for name in TENSOR_NAMES[1:]:
            value = getattr(self, name)
            if value.shape[:1] != (steps,):
                raise ValueError(f"correction table {name} has shape {tuple(value.shape)}; expected {steps} "
                                 "rows, one per timestep. The tables are corrupt; recalibrate")
            if not torch.isfinite(value).all():
                raise ValueError(f"correction table {name} holds NaN or inf; recalibrate")
        branched = self.out_scale.ndim == 3 and self.out_scale.shape[1] == 2
        if (self.out_scale.ndim != 2 and not branched) or self.out_bias.shape != self.out_scale.shape \
                or self.residual_var.ndim != 1:
            raise ValueError(f"correction tables have inconsistent shapes: out_scale {tuple(self.out_scale.shape)}, "
                             f"out_bias {tuple(self.out_bias.shape)}, residual_var {tuple(self.residual_var.shape)}")
        if self.input_bias.ndim not in (2, 4) or self.input_bias.shape[1] != self.channels:
            raise ValueError(f"input_bias shape {tuple(self.input_bias.shape)} does not match "
                             f"{self.channels} channels")

    @property
    def channels(self) -> int:
        return self.out_scale.shape[-1]

    @property
    def per_branch(self) -> bool:
        """Whether the output correction has one row per guidance branch (``out_scale`` ``(T, 2, C)``)."""
        return self.out_scale.ndim == 3

    def describe(self) -> str:
        """One line naming the schedule, e.g. ``DDIMScheduler, 10 steps, timesteps [900, ..., 0]``."""
        return f"{self.scheduler_class}, {self.num_inference_steps} steps, timesteps {short_timesteps(self.timesteps)}"

    def index_of(self, t: Tensor) -> Tensor:
        """Row indices ``(N,)`` of timestep values ``t`` (scalar or ``(N,)``); ``ValueError`` if one is absent."""
        values = torch.as_tensor(t).detach().reshape(-1).double().cpu()
        match = (values[:, None] - self.timesteps[None, :]).abs() <= TIMESTEP_ATOL
        missing = ~match.any(1)
        if missing.any():
            raise ValueError(f"timestep {values[missing][0].item():g} is not in the correction tables "
                             f"({self.describe()}): the sampler uses another schedule or step count. "
                             "Sample with the scheduler and step count the tables were calibrated for, "
                             "or recalibrate with `tacdiff calibrate --scheduler ... --steps ...`")
        return match.double().argmax(1)

    def same_timesteps(self, timesteps: Tensor) -> bool:
        """Whether ``timesteps`` are the tables' timesteps, all of them in order (within :data:`TIMESTEP_ATOL`)."""
        theirs = torch.as_tensor(timesteps).detach().double().cpu()
        return theirs.shape == self.timesteps.shape and bool(((theirs - self.timesteps).abs() <= TIMESTEP_ATOL).all())

    def check_scheduler(self, scheduler: SchedulerMixin, num_inference_steps: int, *, force: bool = False) -> None:
        """Raise ``ValueError`` naming both schedules unless ``scheduler`` at ``num_inference_steps`` has the
        class, noise schedule (``alphas_cumprod``) and timestep sequence the tables were calibrated with.

        ``force`` turns a class or noise-schedule mismatch into a warning; other timesteps and another
        parameterization (:meth:`check_prediction`) always raise.
        """
        self.check_prediction(scheduler)
        probe = copy.deepcopy(scheduler)
        set_timesteps(probe, num_inference_steps)
        theirs = probe.timesteps.double().cpu()
        if not self.same_timesteps(theirs):
            raise ValueError(f"correction tables are for {self.describe()}, but the sampler is "
                             f"{type(scheduler).__name__}, {num_inference_steps} steps, timesteps "
                             f"{short_timesteps(theirs)}. "
                             "Use the calibrated scheduler and step count, or recalibrate for this one")
        problems = []
        if type(scheduler).__name__ != self.scheduler_class:
            problems.append(f"scheduler class {self.scheduler_class} (tables) vs {type(scheduler).__name__} (sampler)")
        if not _same_noise_schedule(self.scheduler_config, scheduler):
            problems.append("noise schedule (betas) of the tables' scheduler config differs from the sampler's "
                            f"({_betas(self.scheduler_config)} vs {_betas(dict(scheduler.config))})")
        _refuse(problems, "the sampler", force)

    @property
    def prediction(self) -> str:
        """What the tables correct: ``"epsilon"`` (noise estimates) or the flow velocity (tables that do not
        record :data:`PREDICTION_KEY` are noise tables)."""
        return self.metadata.get(PREDICTION_KEY, "epsilon")

    def check_prediction(self, scheduler: SchedulerMixin) -> None:
        """Raise ``ValueError`` when the tables correct another parameterization (noise or flow velocity) than
        denoisers return under ``scheduler``."""
        fitted, wanted = self.prediction, correction_space(scheduler)
        if fitted != wanted:
            raise ValueError(f"correction tables correct {fitted!r} predictions, but under {type(scheduler).__name__} "
                             f"the model predicts {wanted!r}; calibrate tables with this scheduler")

    def check_model(self, model: nn.Module, *, force: bool = False) -> None:
        """Raise ``ValueError`` naming both sides unless the tables were fitted for ``model``: the same
        output channels, sample shape, quantization config and (where both record it) FP-model hash.

        ``force`` turns every mismatch but the channel count into a warning (deliberate reuse).
        """
        config = getattr(model, "config", None)
        channels = estimate_channels(getattr(config, "out_channels", self.channels), getattr(config, "in_channels", 0))
        if channels != self.channels:
            raise ValueError(f"correction tables have {self.channels} channels but the model outputs {channels}; "
                             "use tables calibrated for this model")
        if not any(key in self.metadata for key in ("fp_model_sha256", "quant_config", "sample_shape")):
            warnings.warn("these correction tables record no provenance (FP-model hash, quantization config, "
                          "sample shape), so tacdiff cannot check that they belong to this model", stacklevel=2)
        _refuse(_model_mismatches(self.metadata, model), "this model", force)
        fitted, running = self.metadata.get("backend"), backend_of(model)
        if fitted is not None and fitted != running:
            warnings.warn(f"these tables were fitted with the model running on the {fitted} backend, and it now runs "
                          f"on {running}: they apply, but fit the backend they were fitted on best (fit them with "
                          f"`tacdiff calibrate --backend {running}`)", stacklevel=2)

    def check_conditioning(self, record: dict[str, Any], *, force: bool = False) -> None:
        """Raise ``ValueError`` unless ``record`` (a :class:`~tacdiff.sampling.conditioning.Conditioning`'s
        ``record``) conditions as the tables were fitted: prompted or not, and the same guidance scale
        (the guided estimate is what the tables correct). The prompt set itself may differ: tables fitted
        on calibration prompts serve any prompt. ``force`` warns instead of raising.
        """
        fitted = self.metadata.get(CONDITIONING_KEY, {})
        problems = []
        if bool(fitted.get("prompted")) != bool(record.get("prompted")):
            side = ("fitted with prompts, sampled without", "fitted without prompts, sampled with")
            problems.append(side[0] if fitted.get("prompted") else side[1])
        elif fitted.get("prompted") and _guidance(fitted) != _guidance(record):
            problems.append(f"guidance scale {fitted.get('guidance_scale')} (tables) vs "
                            f"{record.get('guidance_scale')} (sampler); the tables correct the guided estimate, "
                            "which changes with the scale")
        _refuse(problems, "this run's conditioning", force)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the tables to one safetensors file, atomically; return its path."""
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in TENSOR_NAMES}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "tacdiff_version": tacdiff.__version__,
                "method": self.method, "scheduler_class": self.scheduler_class,
                "scheduler_config": json.dumps(self.scheduler_config, sort_keys=True, default=str),
                "num_inference_steps": str(self.num_inference_steps), "ibc_target": self.ibc_target,
                "extra": json.dumps(self.metadata, sort_keys=True, default=str)}
        return write_file_atomically(path, lambda tmp: save_safetensors(tensors, tmp, meta), overwrite,
                                     recognise=is_tables_file, what="correction tables file")

    @classmethod
    def load(cls, path: str | Path) -> "CorrectionTables":
        """Read tables written by :meth:`save`; ``ValueError`` for a foreign, old or corrupt file."""
        meta, tensors = read_safetensors(path, kind="tacdiff correction tables file", fmt=FORMAT,
                                         version=FORMAT_VERSION, fix="pass a file written by `tacdiff calibrate`")
        if set(tensors) != set(TENSOR_NAMES):
            raise ValueError(f"{path} holds tensors {sorted(tensors)}, expected {sorted(TENSOR_NAMES)}; "
                             "the file is corrupt, recalibrate")
        try:
            config, extra = json.loads(meta["scheduler_config"]), json.loads(meta["extra"])
            steps = int(meta["num_inference_steps"])
            method, scheduler_class = meta["method"], meta["scheduler_class"]
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path} has incomplete metadata ({error}); the file is corrupt, recalibrate") from None
        if not (isinstance(config, dict) and isinstance(extra, dict)):
            raise ValueError(f"{path} has malformed metadata (scheduler_config and extra must be JSON objects); "
                             "the file is corrupt, recalibrate")
        return cls(method, *(tensors[name] for name in TENSOR_NAMES), scheduler_class, config, steps, extra,
                   meta.get("ibc_target", "input"))


def is_tables_file(path: Path) -> bool:
    """Whether ``path`` is a correction tables file written by tacdiff (so ``--overwrite`` may replace it)."""
    return is_regular_file(path) and safetensors_format(path) == FORMAT


PREDICTION_KEY = "prediction"
"""Tables metadata: what the corrected estimate is, ``"epsilon"`` or ``"flow"`` (:func:`correction_space`)."""


def _refuse(problems: list[str], target: str, force: bool) -> None:
    """Raise (or with ``force`` warn) listing how the tables and ``target`` disagree."""
    if not problems:
        return
    message = (f"these correction tables do not fit {target}: "
               + "; ".join(problems) + f". Recalibrate with `tacdiff calibrate`, or {FORCE_HINT}")
    if not force:
        raise ValueError(message)
    warnings.warn(message.replace(f", or {FORCE_HINT}", " (applied anyway: force=True)"), stacklevel=3)


def _model_mismatches(metadata: dict[str, Any], model: nn.Module) -> list[str]:
    """How the tables' provenance disagrees with ``model`` (fields the tables do not record are skipped)."""
    problems = []
    shape = metadata.get("sample_shape")
    if shape is not None and list(shape) != list(sample_shape_of(model)):
        problems.append(f"sample shape {tuple(shape)} (tables) vs {tuple(sample_shape_of(model))} (model)")
    recorded = metadata.get("quant_config")
    state: QuantState | None = getattr(model, STATE_ATTR, None)
    if recorded is not None and state is None:
        problems.append(f"tables fitted for a quantized model ({_bits(json.loads(recorded))}), model is not "
                        "quantized by tacdiff")
    elif recorded is not None:
        ours, theirs = json.loads(recorded), json.loads(state.config.to_json())
        diff = [f"{k} {ours.get(k)!r} (tables) vs {theirs.get(k)!r} (model)" for k in sorted(set(ours) | set(theirs))
                if ours.get(k) != theirs.get(k)]
        if diff:
            problems.append(f"quantization {_bits(ours)} vs {_bits(theirs)}: " + ", ".join(diff))
    source = state.source_sha256 if state is not None else None
    if metadata.get("fp_model_sha256") and source and metadata["fp_model_sha256"] != source:
        problems.append(f"FP model sha256 {metadata['fp_model_sha256'][:12]}... (tables) vs {source[:12]}... "
                        "(the model was quantized from another FP model)")
    return problems


def _guidance(record: dict[str, Any]) -> float | None:
    """A record's guidance scale, ``None`` when it does not guide (at most 1, as in diffusers)."""
    scale = record.get("guidance_scale")
    return scale if scale is not None and scale > 1 else None


def _bits(config: dict[str, Any]) -> str:
    return f"W{config.get('weight_bits')}A{config.get('act_bits') or 'fp'}"


def _same_noise_schedule(config: dict[str, Any], scheduler: SchedulerMixin) -> bool:
    """Whether a scheduler built from ``config`` has ``scheduler``'s ``alphas_cumprod`` (True if either lacks it)."""
    public = {k: v for k, v in config.items() if not k.startswith("_")}  # e.g. _use_default_values resets keys
    ours = getattr(type(scheduler).from_config(public), "alphas_cumprod", None)
    theirs = getattr(scheduler, "alphas_cumprod", None)
    if ours is None or theirs is None:
        return True
    return ours.shape == theirs.shape and torch.allclose(ours.double(), theirs.double().cpu(), rtol=ALPHAS_RTOL)


def _betas(config: dict[str, Any]) -> str:
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
    return ", ".join(f"{k}={config.get(k)}" for k in keys) + (", trained_betas" if config.get("trained_betas") else "")


def short_timesteps(timesteps: Tensor) -> str:
    """Timestep values for a message: all of them, or the first three and last two."""
    values = [f"{v:g}" for v in timesteps.tolist()]
    return "[" + ", ".join(values if len(values) <= 6 else values[:3] + ["..."] + values[-2:]) + "]"


def is_identity(tables: CorrectionTables) -> bool:
    """Whether the tables change nothing (zero biases, unit scales)."""
    return bool((tables.input_bias == 0).all() and (tables.out_bias == 0).all() and (tables.out_scale == 1).all())
