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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import SchedulerMixin
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import Tensor

import tacdiff
from tacdiff.io.atomic import write_file_atomically

FORMAT = "tacdiff-correction-tables"
FORMAT_VERSION = "1"
METHODS = ("tac", "ner", "ibc", "ptqd", "none")
IBC_TARGETS = ("state", "input")
TENSOR_NAMES = ("timesteps", "input_bias", "out_scale", "out_bias", "residual_var")
TIMESTEP_ATOL = 1e-3


@dataclass
class CorrectionTables:
    """Per-step corrections for one scheduler and step count.

    Attributes:
        method: ``tac``, ``ner``, ``ibc``, ``ptqd`` (or ``none``).
        timesteps: ``(T,)`` float64 scheduler timesteps in sampling order.
        input_bias: ``(T, C)`` or ``(T, C, H, W)`` subtracted from the model input (IBC's ``mu_t``).
        out_scale: ``(T, C)`` multiplying the bias-corrected output (NER's ``K_t``; PTQD's ``1/(1+k_t)``).
        out_bias: ``(T, C)`` subtracted from the raw output (PTQD's ``b_t``).
        residual_var: ``(T,)`` variance per element of the corrected estimate's residual noise (PTQD; else 0).
        scheduler_class, scheduler_config: the scheduler calibrated with.
        num_inference_steps: its step count.
        metadata: provenance (bits, FP model hash, hyper-parameters), JSON-able values.
        ibc_target: ``"state"`` (subtract ``input_bias`` from the sampler's latent, which needs
            the sampling loop's ``correct_states`` hook) or ``"input"`` (from the network input
            only, a pure UNet wrapper). Files without it are ``"input"``.
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
        if self.out_scale.ndim != 2 or self.out_bias.shape != self.out_scale.shape or self.residual_var.ndim != 1:
            raise ValueError(f"correction tables have inconsistent shapes: out_scale {tuple(self.out_scale.shape)}, "
                             f"out_bias {tuple(self.out_bias.shape)}, residual_var {tuple(self.residual_var.shape)}")
        if self.input_bias.ndim not in (2, 4) or self.input_bias.shape[1] != self.out_scale.shape[1]:
            raise ValueError(f"input_bias shape {tuple(self.input_bias.shape)} does not match "
                             f"{self.out_scale.shape[1]} channels")

    @property
    def channels(self) -> int:
        return self.out_scale.shape[1]

    def describe(self) -> str:
        """One line naming the schedule, e.g. ``DDIMScheduler, 10 steps, timesteps [900, ..., 0]``."""
        return f"{self.scheduler_class}, {self.num_inference_steps} steps, timesteps {_short(self.timesteps)}"

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

    def check_scheduler(self, scheduler: SchedulerMixin, num_inference_steps: int) -> None:
        """Raise ``ValueError`` naming both schedules unless ``scheduler`` at ``num_inference_steps``
        is the class and timestep sequence the tables were calibrated with."""
        probe = type(scheduler).from_config(scheduler.config)
        probe.set_timesteps(num_inference_steps)
        theirs = probe.timesteps.double().cpu()
        same = (type(scheduler).__name__ == self.scheduler_class and theirs.shape == self.timesteps.shape
                and bool(((theirs - self.timesteps).abs() <= TIMESTEP_ATOL).all()))
        if not same:
            raise ValueError(f"correction tables are for {self.describe()}, but the sampler is "
                             f"{type(scheduler).__name__}, {num_inference_steps} steps, timesteps {_short(theirs)}. "
                             "Use the calibrated scheduler and step count, or recalibrate for this one")

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the tables to one safetensors file, atomically; return its path."""
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in TENSOR_NAMES}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "tacdiff_version": tacdiff.__version__,
                "method": self.method, "scheduler_class": self.scheduler_class,
                "scheduler_config": json.dumps(self.scheduler_config, sort_keys=True, default=str),
                "num_inference_steps": str(self.num_inference_steps), "ibc_target": self.ibc_target,
                "extra": json.dumps(self.metadata, sort_keys=True, default=str)}
        return write_file_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "CorrectionTables":
        """Read tables written by :meth:`save`; ``ValueError`` for a foreign, old or corrupt file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"correction tables not found: {path}; create them with `tacdiff calibrate`")
        try:
            with safe_open(path, framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ValueError(f"{path} is not a readable safetensors file ({error}); recalibrate") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a tacdiff correction table (format={meta.get('format')!r}); "
                             "pass a file written by `tacdiff calibrate`")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} has correction-table format version {meta.get('format_version')!r}; this "
                             f"tacdiff reads version {FORMAT_VERSION}. Upgrade tacdiff or recalibrate")
        if set(tensors) != set(TENSOR_NAMES):
            raise ValueError(f"{path} holds tensors {sorted(tensors)}, expected {sorted(TENSOR_NAMES)}; "
                             "the file is corrupt, recalibrate")
        try:
            return cls(meta["method"], *(tensors[name] for name in TENSOR_NAMES), meta["scheduler_class"],
                       json.loads(meta["scheduler_config"]), int(meta["num_inference_steps"]),
                       json.loads(meta["extra"]), meta.get("ibc_target", "input"))
        except (KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} has incomplete metadata ({error}); the file is corrupt, recalibrate") from None


def _short(timesteps: Tensor) -> str:
    values = [f"{v:g}" for v in timesteps.tolist()]
    return "[" + ", ".join(values if len(values) <= 6 else values[:3] + ["..."] + values[-2:]) + "]"


def is_identity(tables: CorrectionTables) -> bool:
    """Whether the tables change nothing (zero biases, unit scales)."""
    return bool((tables.input_bias == 0).all() and (tables.out_bias == 0).all() and (tables.out_scale == 1).all())
