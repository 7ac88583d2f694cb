"""Applying per-timestep correction tables (TAC, Yao et al., ECCV 2024; PTQD) around a denoiser or a UNet.

:class:`CorrectedDenoiser` wraps a denoiser ``(x, t, **cond) -> eps`` (see
:mod:`tacdiff.models.kinds`): it looks the timestep up in the tables, subtracts
``input_bias[t]`` from the input, calls the denoiser and returns ``out_scale[t] * (eps - out_bias[t])``.
Tables whose IBC targets the sampler state (``ibc_target="state"``, TAC's default) shift the
latents instead (:func:`shift_state`), through the denoiser's ``correct_state`` capability, which
the sampling loop calls at the start of every step; it also checks that the step is the tables'
step at that timestep, so another schedule or step count raises.

:class:`CorrectedUNet` is a drop-in for the UNet inside diffusers pipelines
(``DDIMPipeline(unet=wrapper, scheduler=...)``) that runs a :class:`CorrectedDenoiser`, for tables
that only touch the network input: a pipeline cannot shift its own latents, so state tables raise
there (:func:`tacdiff.load_pipeline` builds pipelines that can, by hooking their scheduler). It
checks that every timestep is in the tables, but (keeping no call-order state) not that the
pipeline runs the calibrated schedule: call :meth:`CorrectionTables.check_scheduler` first.
The correction arithmetic lives in :func:`correct_input` and :func:`correct_output`, which
calibration uses too, so both apply the same operations.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import SchedulerMixin, UNet2DConditionModel, UNet2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import Tensor, nn

from tacdiff.correction.ibc import broadcast_bias
from tacdiff.correction.tables import TIMESTEP_ATOL, CorrectionTables
from tacdiff.models.kinds import ClassifierFreeGuidance, Denoiser, DenoiserWrapper, ModelDenoiser


def correct_input(x: Tensor, bias: Tensor | None) -> Tensor:
    """``x - bias`` with ``bias`` ``(C,)``, ``(C, H, W)`` or per sample ``(N, C)`` / ``(N, C, H, W)``."""
    if bias is None:
        return x
    return x - _rows_like(bias, x)


def correct_output(out: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """``scale * (out - bias)`` with ``scale, bias`` ``(C,)`` or per sample ``(N, C)``."""
    return (out - _rows_like(bias, out)) * _rows_like(scale, out)


def _rows_like(value: Tensor, x: Tensor) -> Tensor:
    """Shape per-channel (``(C,)``/``(C,H,W)``) or per-sample (``(N,C)``/``(N,C,H,W)``) values to broadcast on ``x``."""
    if value.ndim in (1, 3):
        return broadcast_bias(value, x)
    value = value.to(x.device, x.dtype)
    return value.view(*value.shape, *([1] * (x.ndim - 2))) if value.ndim == 2 else value


def _finite(eps: Tensor, raw: Tensor, tables: CorrectionTables, timestep: Tensor | float | int) -> Tensor:
    """``eps``, or ``ValueError`` when the tables turned a finite estimate ``raw`` into NaN or inf."""
    if not bool(torch.isfinite(eps).all()) and bool(torch.isfinite(raw).all()):
        t = torch.as_tensor(timestep).reshape(-1)[0].item()
        raise ValueError(f"the correction tables turned a finite noise estimate into NaN or inf at timestep {t:g}: "
                         "their values are absurd for this model. Recalibrate the tables")
    return eps


def _chain(denoiser: Any) -> list[Any]:
    """A denoiser and the ones it wraps, outermost first (following ``inner``)."""
    chain = []
    while denoiser is not None:
        chain.append(denoiser)
        denoiser = getattr(denoiser, "inner", None)
    return chain


def _model_of(denoiser: Any) -> nn.Module | None:
    """The model at the bottom of a chain of denoiser wrappers (``inner`` ... ``model``), if any."""
    models = [d.model for d in _chain(denoiser) if isinstance(getattr(d, "model", None), nn.Module)]
    return models[0] if models else None


def _rows(tables: CorrectionTables, timestep: Tensor | float | int) -> Callable[[Tensor], Tensor]:
    """A function picking the table rows of ``timestep`` (scalar or ``(N,)``): one row when all samples
    share it, else ``(N, ...)``. ``ValueError`` for a timestep the tables do not have."""
    rows = tables.index_of(timestep)
    if bool((rows == rows[0]).all()):
        return lambda table: table[rows[0]]
    return lambda table: table[rows]


def shift_state(tables: CorrectionTables, x: Tensor, t: Tensor | float, step: int) -> Tensor:
    """The latents ``x`` at the start of step ``step`` (timestep ``t``), shifted by ``-input_bias[step]`` for
    state tables (as is for input tables); ``ValueError`` unless ``t`` is the tables' timestep of that step."""
    timesteps = tables.timesteps
    if step >= len(timesteps) or abs(float(timesteps[step]) - float(t)) > TIMESTEP_ATOL:
        expected = "none" if step >= len(timesteps) else f"{timesteps[step].item():g}"
        raise ValueError(f"step {step} of the sampler is at timestep {float(t):g}, but the correction tables "
                         f"({tables.describe()}) have {expected} there: the sampler uses another "
                         "schedule or step count. Sample with the calibrated schedule, or recalibrate")
    return correct_input(x, tables.input_bias[step]) if tables.ibc_target == "state" else x


class CorrectedDenoiser(DenoiserWrapper):
    """A denoiser with :class:`CorrectionTables` applied around ``inner`` (the tables' denoiser, e.g.
    ``ModelDenoiser(quantized_unet, scheduler)`` or a guided one); exposes ``correct_state`` for state IBC.

    When ``inner`` wraps a model, the tables must have been fitted for it
    (:meth:`CorrectionTables.check_model`; ``force`` warns instead of raising).
    """

    def __init__(self, inner: Denoiser, tables: CorrectionTables, *, force: bool = False) -> None:
        super().__init__(inner)
        if not isinstance(tables, CorrectionTables):
            raise TypeError(f"tables must be CorrectionTables, got {type(tables).__name__}; load a file with "
                            "CorrectionTables.load(path)")
        if tables.per_branch and any(isinstance(d, ClassifierFreeGuidance) for d in _chain(inner)):
            raise ValueError(_PER_BRANCH_HINT)
        model = _model_of(inner)
        if model is not None:
            tables.check_model(model, force=force)
        self.tables = tables

    def correct_state(self, x: Tensor, t: Tensor, step: int) -> Tensor:
        """The latents at the start of step ``step`` (timestep ``t``), as :func:`shift_state` corrects them."""
        return shift_state(self.tables, super().correct_state(x, t, step), t, step)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if x.shape[1] != self.tables.channels:
            raise ValueError(f"correction tables have {self.tables.channels} channels but the samples have "
                             f"{x.shape[1]}; use tables calibrated for this model")
        pick = _rows(self.tables, t)
        if self.tables.ibc_target == "input":
            x = correct_input(x, pick(self.tables.input_bias))
        raw = self.inner(x, t, **cond)
        scale, bias = pick(self.tables.out_scale), pick(self.tables.out_bias)
        if self.tables.per_branch:
            scale, bias = (_per_branch(value, x.shape[0]) for value in (scale, bias))
        eps = correct_output(raw, scale, bias)
        return _finite(eps, raw, self.tables, t)


def _per_branch(value: Tensor, batch: int) -> Tensor:
    """Per-branch rows ``(2, C)`` as per-sample rows ``(batch, C)`` of a guided batch ``[uncond; cond]``."""
    if value.ndim != 2 or batch % 2:
        raise ValueError(_PER_BRANCH_HINT)
    return value.repeat_interleave(batch // 2, 0)


_PER_BRANCH_HINT = ("these correction tables hold one output correction per guidance branch; apply them inside "
                    "classifier-free guidance, to the batch of both halves (ClassifierFreeGuidance(CorrectedDenoiser("
                    "...)), as tacdiff sample and load_pipeline do), at one timestep per call")


def load_correction(inner: Denoiser, path: str | Path, scheduler: SchedulerMixin, num_inference_steps: int, *,
                    force: bool = False) -> CorrectedDenoiser:
    """``inner`` corrected by the tables file ``path``, after checking that they fit ``scheduler`` at
    ``num_inference_steps`` and the model ``inner`` wraps (``force`` warns instead, where it may)."""
    tables = CorrectionTables.load(path)
    corrected = CorrectedDenoiser(inner, tables, force=force)  # the model first: it names tables for another model
    tables.check_scheduler(scheduler, num_inference_steps, force=force)
    return corrected


_OUTPUTS: dict[type[nn.Module], type] = {UNet2DModel: UNet2DOutput, UNet2DConditionModel: UNet2DConditionOutput}
"""The ``return_dict`` output class of each model kind's forward (transformers: ``Transformer2DModelOutput``)."""


class CorrectedUNet(nn.Module):
    """A (quantized) diffusers UNet or transformer corrected by input-target :class:`CorrectionTables`: a
    drop-in for the denoiser inside diffusers pipelines, running ``CorrectedDenoiser(ModelDenoiser(unet,
    scheduler), tables)``.

    Args:
        unet: a model of a kind in :data:`~tacdiff.models.kinds.MODEL_KINDS` (``UNet2DModel``,
            ``UNet2DConditionModel``, a DiT, PixArt or SD3 transformer).
        tables: corrections for one scheduler and step count, with ``ibc_target="input"`` (or no
            input bias): state tables need tacdiff's sampling loop and :class:`CorrectedDenoiser`,
            or a pipeline from :func:`tacdiff.load_pipeline`.
        scheduler: the pipeline's scheduler, for models trained with v-prediction (the wrapper
            returns noise estimates, so the pipeline's scheduler must then consume ``epsilon``).
        force: apply tables fitted for another model (other bits, FP model or sample shape)
            with a warning instead of the error of :meth:`CorrectionTables.check_model`.

    Keyword arguments the pipeline passes as ``None`` (e.g. ``timestep_cond``) are dropped; the
    others must be the model kind's conditioning. The corrected estimate must be finite: tables
    whose values overflow it raise ``ValueError``.
    """

    def __init__(self, unet: nn.Module, tables: CorrectionTables, *, scheduler: SchedulerMixin | None = None,
                 force: bool = False) -> None:
        super().__init__()
        self.denoiser = CorrectedDenoiser(ModelDenoiser(unet, scheduler), tables, force=force)
        self.check_target(tables)
        self.unet, self.tables = unet, tables
        self._signature = inspect.signature(unet.forward)
        self._output = _OUTPUTS.get(self.denoiser.inner.kind.cls, Transformer2DModelOutput)

    def check_target(self, tables: CorrectionTables) -> None:
        """Refuse tables this wrapper cannot apply: state tables with a non-zero input bias."""
        if tables.ibc_target == "state" and bool(tables.input_bias.ne(0).any()):
            raise ValueError("these correction tables shift the sampler state (ibc_target='state'), which a UNet "
                             "wrapper inside a diffusers pipeline cannot do: use tacdiff.load_pipeline(model, tables), "
                             "or sample with tacdiff's loop and CorrectedDenoiser(ModelDenoiser(unet), tables), or "
                             "recalibrate with ibc_target='input' for use inside diffusers pipelines")

    def check_call(self, timestep: Tensor | float | int) -> None:
        """Checks before every forward; none here (subclasses check their pipeline)."""

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def forward(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        """The model's own call (``sample`` or ``hidden_states``, ``timestep``, its conditioning keywords),
        corrected. A learned-variance model's variance half comes back as zeros: the corrected sampler
        does not read it, and pipelines split it off."""
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        x, timestep = bound.pop(next(iter(self._signature.parameters))), bound.pop("timestep")
        self.check_call(timestep)
        eps = self.denoiser(x, timestep, **{key: value for key, value in bound.items() if value is not None})
        if self.config.out_channels == 2 * x.shape[1]:
            eps = torch.cat([eps, torch.zeros_like(eps)], dim=1)
        return self._output(sample=eps) if return_dict else (eps,)
