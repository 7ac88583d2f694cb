"""Quantized, corrected diffusers pipelines: :func:`load_pipeline`.

TAC (Yao et al., ECCV 2024) corrects the quantized denoiser at every sampling step; here the
correction runs inside the diffusers pipeline itself, so ``pipe(prompt, num_inference_steps=...,
guidance_scale=...)`` samples as tacdiff's own loop does:

* the pipeline's ``unet`` (or ``transformer``) becomes a :class:`~tacdiff.correction.wrapper.CorrectedUNet`
  that runs ``CorrectedDenoiser(ModelDenoiser(unet, scheduler), tables)`` (output correction, and IBC
  on the network input for ``ibc_target="input"`` tables) and checks each call against the pipeline;
* the pipeline's scheduler consumes noise estimates (velocities under flow matching), and for state
  tables (``ibc_target="state"``, TAC's default) its ``step`` shifts the latents it returns for step ``i + 1`` by
  ``-input_bias[i + 1]``: the loop's ``correct_state`` at the start of that step, done where every
  pipeline passes its latents (``LDMPipeline`` has no step callbacks).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, SchedulerMixin
from torch import Tensor, nn

from tacdiff.correction.tables import CorrectionTables, short_timesteps
from tacdiff.correction.wrapper import CorrectedUNet, shift_state
from tacdiff.models.kinds import denoiser_scheduler, prediction_type
from tacdiff.models.loading import fit_resolution_shift, load_any_model, scheduler_class
from tacdiff.sampling.conditioning import named_classes


def load_pipeline(model: str | Path, tables: str | Path | CorrectionTables | None = None, *,
                  force_tables: bool = False, device: str | torch.device = "cpu", backend: str = "fake"
                  ) -> DiffusionPipeline:
    """The diffusers pipeline of ``model`` with its (quantized) UNet, corrected by ``tables`` if given.

    Args:
        model: a quantized artifact folder quantized from a pipeline folder (its metadata names
            that folder), or a diffusers pipeline folder.
        tables: correction tables (a file written by ``tacdiff calibrate`` or
            :class:`CorrectionTables`) fitted for this model, scheduler and step count.
        force_tables: apply tables fitted for another model, scheduler class, noise schedule or
            conditioning with a warning instead of a ``ValueError``; another step count always raises.
        device: where the pipeline's components go.
        backend: how the quantized UNet's layers execute: ``"fake"``, ``"int8"`` or ``"auto"``
            (:func:`tacdiff.backends.use_backend`); tables apply unchanged.

    Returns:
        The pipeline's own class (e.g. ``StableDiffusionPipeline``) with its text encoder and
        autoencoder (full precision, or quantized where the artifact holds them); called as in
        diffusers, at the tables' step count and (for text-to-image pipelines) guidance scale,
        which every call checks before any step runs.
        The pipeline samples with the tables' scheduler class (built from the pipeline's scheduler
        config when the folder names another, e.g. Stable Diffusion's PNDM). Its ``unet`` is a
        wrapper that ``save_pretrained`` cannot write; save the artifact and tables instead.
    """
    loaded = load_any_model(model, device, backend)
    if loaded.pipeline is None:
        raise ValueError(f"{model} holds a bare model, not a pipeline: load_pipeline needs a diffusers pipeline folder "
                         "(with model_index.json) or an artifact quantized from one (`tacdiff quantize` on the "
                         "pipeline folder)")
    if tables is None:
        return loaded.pipeline
    if not isinstance(tables, CorrectionTables):
        tables = CorrectionTables.load(tables)
    prompted = loaded.reads_prompts or bool(named_classes(loaded))
    return _corrected(loaded.pipeline, loaded.kind.denoiser, tables, prompted=prompted, force=force_tables)


def _corrected(pipe: DiffusionPipeline, denoiser: str, tables: CorrectionTables, *, prompted: bool,
               force: bool) -> DiffusionPipeline:
    """``pipe`` (changed in place) sampling with ``tables``: a corrected denoiser (component ``denoiser``), a
    scheduler that consumes what it returns and, for state tables, shifts the latents after every step, and a
    ``__call__`` that notes its guidance scale for the checks."""
    scheduler = fit_resolution_shift(_tables_scheduler(pipe.scheduler, tables), getattr(pipe, denoiser))
    wrapper = PipelineUNet(getattr(pipe, denoiser), tables, scheduler, pipe, prompted=prompted, force=force)
    tables.check_scheduler(scheduler, tables.num_inference_steps, force=force)  # after the model check: clearer
    scheduler = denoiser_scheduler(scheduler)
    if tables.ibc_target == "state":
        scheduler.step = StateShiftingStep(scheduler.step, tables)
    pipe.scheduler = scheduler
    setattr(pipe, denoiser, wrapper)
    pipe.save_pretrained = _not_saveable  # diffusers would write a folder without the denoiser
    pipe.__class__ = _noting_guidance(type(pipe))
    return pipe


GUIDANCE_NOTE = "_tacdiff_guidance_scale"


@functools.cache
def _noting_guidance(cls: type[DiffusionPipeline]) -> type[DiffusionPipeline]:
    """A subclass of ``cls`` (same name) whose ``__call__`` notes the guidance scale it runs at (its argument, or
    the pipeline's default) before running as ``cls``: DiT and PixArt pipelines keep no ``guidance_scale``."""
    signature = inspect.signature(cls.__call__)

    def __call__(self: DiffusionPipeline, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        setattr(self, GUIDANCE_NOTE, bound.arguments.get("guidance_scale"))
        return cls.__call__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": functools.wraps(cls.__call__)(__call__),
                                       "__module__": cls.__module__, "__doc__": cls.__doc__})


def _not_saveable(*args: Any, **kwargs: Any) -> None:
    raise ValueError("a corrected pipeline cannot be saved with save_pretrained (its UNet is a tacdiff wrapper, "
                     "which diffusers would leave out); keep the quantized artifact and the tables file instead, "
                     "and load them with tacdiff.load_pipeline(artifact, tables)")


def _tables_scheduler(scheduler: SchedulerMixin, tables: CorrectionTables) -> SchedulerMixin:
    """``scheduler``, or the tables' scheduler class built from its config when it is of another class."""
    if type(scheduler).__name__ == tables.scheduler_class:
        return scheduler
    cls = scheduler_class(tables.scheduler_class, "the correction tables' scheduler")
    return cls.from_config(scheduler.config)


def _check_timesteps(scheduler: SchedulerMixin, tables: CorrectionTables) -> None:
    """``ValueError`` unless the timesteps ``scheduler`` was set to are the tables' (no subset, no other count)."""
    if tables.same_timesteps(scheduler.timesteps):
        return
    theirs = torch.as_tensor(scheduler.timesteps).detach().cpu()
    raise ValueError(f"the pipeline samples {len(theirs)} steps at timesteps {short_timesteps(theirs)}, but the "
                     f"correction tables are for {tables.describe()}: call it with num_inference_steps="
                     f"{tables.num_inference_steps}, or recalibrate for this schedule")


class StateShiftingStep:
    """``scheduler.step`` followed by TAC's state IBC: the latents it returns after step ``i`` (those step
    ``i + 1`` starts from) are shifted by ``-input_bias[i + 1]`` (:func:`~tacdiff.correction.wrapper.shift_state`).

    Set on the scheduler instance (``scheduler.step = StateShiftingStep(scheduler.step, tables)``); it
    looks like the method it wraps (``inspect.signature`` shows its ``eta``/``generator``, which
    pipelines inspect) and deep-copies with its scheduler. The step index comes from the timestep,
    after checking that the scheduler runs the tables' schedule, so no call order is remembered.
    """

    def __init__(self, step: Callable[..., Any], tables: CorrectionTables) -> None:
        functools.update_wrapper(self, step)
        self.tables = tables

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.__wrapped__(*args, **kwargs)
        scheduler = self.__wrapped__.__self__
        _check_timesteps(scheduler, self.tables)
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        step = int(self.tables.index_of(timestep)[0]) + 1
        if step == len(self.tables.timesteps):
            return out
        latents = out[0] if isinstance(out, tuple) else out.prev_sample
        shifted = shift_state(self.tables, latents, scheduler.timesteps[step], step)
        if isinstance(out, tuple):
            return (shifted, *out[1:])
        out.prev_sample = shifted
        return out


class PipelineUNet(CorrectedUNet):
    """The UNet of a pipeline built by :func:`load_pipeline`: ``CorrectedDenoiser(ModelDenoiser(unet, scheduler),
    tables)`` on the pipeline's whole batch, checked against the pipeline at every call.

    Classifier-free guidance batches the unconditional and conditional inputs, so each half is
    corrected before the pipeline combines them. That is exactly the correction of the guided
    estimate the tables were fitted on (in exact arithmetic), since the correction is affine per
    channel: ``u' + s (c' - u') = K ((1 - s) u + s c - b)`` for ``u' = K (u - b)``, ``c' = K (c - b)``.

    Every call checks that the pipeline's scheduler consumes noise estimates, still shifts the
    latents (state tables) and runs the tables' timesteps; the first step's call also checks the
    pipeline's conditioning (prompted or not, guidance scale) against the tables' record.
    State tables are applied by the scheduler (:class:`StateShiftingStep`); their first row
    must be zero (as tacdiff fits it: both trajectories start from the same noise).
    """

    def __init__(self, unet: nn.Module, tables: CorrectionTables, scheduler: SchedulerMixin,
                 pipe: DiffusionPipeline, *, prompted: bool, force: bool) -> None:
        super().__init__(unet, tables, scheduler=scheduler, force=force)
        self._pipeline = weakref.ref(pipe)
        self.prompted, self.force = prompted, force

    def check_target(self, tables: CorrectionTables) -> None:
        """State tables are applied by the scheduler from the first step's output on: row 0 must be zero."""
        if tables.ibc_target == "state" and bool(tables.input_bias[0].ne(0).any()):
            raise ValueError("these state correction tables shift the starting noise (input_bias row 0 is non-zero), "
                             "which a pipeline cannot do; tacdiff fits a zero row 0 (both trajectories start from "
                             "the same noise), so these tables are not tacdiff's: recalibrate with `tacdiff calibrate`")

    def check_call(self, timestep: Tensor | float | int) -> None:
        pipe = self._pipeline()
        if pipe is None:
            raise ValueError("this UNet wrapper belongs to a pipeline built by tacdiff.load_pipeline that no longer "
                             "exists; call the pipeline, or sample with tacdiff's loop and CorrectedDenoiser")
        scheduler = pipe.scheduler
        if prediction_type(scheduler) != self.tables.prediction or (
                self.tables.ibc_target == "state" and not isinstance(scheduler.step, StateShiftingStep)):
            raise ValueError("the pipeline's scheduler was replaced after load_pipeline, so the correction tables "
                             "can no longer be applied (the new one does not shift the latents or consume what the "
                             "corrected model returns); call load_pipeline again instead of replacing pipe.scheduler")
        _check_timesteps(scheduler, self.tables)
        if int(self.tables.index_of(timestep)[0]) == 0:
            self.tables.check_conditioning(self._conditioning_record(pipe), force=self.force)

    def _conditioning_record(self, pipe: DiffusionPipeline) -> dict[str, Any]:
        """What this pipeline call conditions on, as :meth:`CorrectionTables.check_conditioning` reads it."""
        if not self.prompted:
            return {}
        scale = getattr(pipe, GUIDANCE_NOTE, None)
        return {"prompted": True, "guidance_scale": None if scale is None else float(scale)}
