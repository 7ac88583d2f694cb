"""A UNet wrapper that applies per-timestep correction tables (TAC, Yao et al., ECCV 2024; PTQD).

:class:`CorrectedUNet` looks the timestep up in the tables, subtracts ``input_bias[t]`` from
the sample, calls the wrapped UNet and returns ``out_scale[t] * (out - out_bias[t])`` in the
UNet's own output type, so diffusers schedulers and pipelines (``DDIMPipeline(unet=wrapper,
scheduler=...)``) use it unchanged. Tables whose IBC targets the sampler state
(``ibc_target="state"``, TAC's default) also need the sampling loop to shift the latents:
pass :func:`state_correction` as ``correct_states`` to :func:`tacdiff.sampling.run_trajectories`;
a wrapper called without it raises. The correction arithmetic lives in :func:`correct_input`
and :func:`correct_output`, which calibration uses too, so both apply the same operations.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from tacdiff.correction.ibc import broadcast_bias
from tacdiff.correction.tables import CorrectionTables
from tacdiff.sampling.loop import StateCorrection


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


class CorrectedUNet(nn.Module):
    """Wrap a (quantized) diffusers UNet with :class:`CorrectionTables`; a drop-in for the UNet.

    Args:
        unet: ``UNet2DModel`` or ``UNet2DConditionModel`` (any module called as
            ``unet(sample, timestep, ..., return_dict=...)``).
        tables: corrections for one scheduler and step count.
        strict_order: also raise when the timesteps of consecutive calls skip table rows
            (a schedule whose timesteps are a subset of the table's, e.g. 5 of 10 DDIM
            steps). Each call must repeat the previous row, take the next one, or restart
            at the first; batches mixing timesteps are only checked for membership.
        force: apply tables fitted for another model (other bits, FP model or sample shape)
            with a warning instead of the error of :meth:`CorrectionTables.check_model`.

    The corrected estimate must be finite: tables whose values overflow it raise ``ValueError``.
    """

    def __init__(self, unet: nn.Module, tables: CorrectionTables, *, strict_order: bool = True,
                 force: bool = False) -> None:
        super().__init__()
        if not isinstance(tables, CorrectionTables):
            raise TypeError(f"tables must be CorrectionTables, got {type(tables).__name__}; load a file with "
                            "CorrectionTables.load(path)")
        tables.check_model(unet, force=force)
        self.unet = unet
        self.tables = tables
        self.strict_order = strict_order
        self._last_row: int | None = None
        self._shifted_row: int | None = None

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def reset(self) -> None:
        """Forget the last timestep seen (the order check restarts)."""
        self._last_row = self._shifted_row = None

    @property
    def shifts_state(self) -> bool:
        """Whether the tables' input bias must be applied to the sampler state (see :meth:`correct_state`)."""
        return self.tables.ibc_target == "state"

    def correct_state(self, latents: Tensor, timestep: Tensor | float | int) -> Tensor:
        """The latents at the start of the step at ``timestep``, shifted by ``-input_bias[t]`` when
        :attr:`shifts_state`; unchanged otherwise (the bias then goes on the network input)."""
        if not self.shifts_state:
            return latents
        row = int(self.tables.index_of(timestep)[0])
        self._shifted_row = row
        return correct_input(latents, self.tables.input_bias[row])

    def forward(self, sample: Tensor, timestep: Tensor | float | int, *args: Any, return_dict: bool = True,
                **kwargs: Any) -> Any:
        rows = self.tables.index_of(timestep)
        if rows.numel() > 1 and bool((rows == rows[0]).all()):
            rows = rows[:1]
        self._check_order(rows)
        pick = (lambda table: table[rows[0]]) if rows.numel() == 1 else (lambda table: table[rows])
        if self.shifts_state:
            self._check_state_shifted(rows)
        else:
            sample = correct_input(sample, pick(self.tables.input_bias))
        result = self.unet(sample, timestep, *args, return_dict=return_dict, **kwargs)
        out = result.sample if return_dict else result[0]
        eps = correct_output(out, pick(self.tables.out_scale), pick(self.tables.out_bias))
        if not bool(torch.isfinite(eps).all()) and bool(torch.isfinite(out).all()):
            raise ValueError(f"the correction tables turned a finite noise estimate into NaN or inf at timestep "
                             f"{self.tables.timesteps[int(rows[0])].item():g}: their values are absurd for this "
                             "model. Recalibrate the tables")
        if return_dict:
            result.sample = eps
            return result
        return (eps, *result[1:])

    def _check_state_shifted(self, rows: Tensor) -> None:
        row = int(rows[0])
        needed = bool(self.tables.input_bias[rows].ne(0).any())
        if needed and (rows.numel() > 1 or self._shifted_row != row):
            raise ValueError("these correction tables shift the sampler state (ibc_target='state'), which a UNet "
                             "wrapper cannot do alone: sample with tacdiff.sampling.run_trajectories(..., "
                             "correct_states=state_correction([...])), one timestep per call, or recalibrate "
                             "with ibc_target='input' for use inside diffusers pipelines")

    def _check_order(self, rows: Tensor) -> None:
        if rows.numel() != 1:
            return
        row = int(rows[0])
        allowed = {0} if self._last_row is None else {0, self._last_row, self._last_row + 1}
        if self.strict_order and row not in allowed:
            previous = "none" if self._last_row is None else f"{self.tables.timesteps[self._last_row].item():g}"
            self._last_row = None
            raise ValueError(f"timestep {self.tables.timesteps[row].item():g} follows {previous}, but the correction "
                             f"tables ({self.tables.describe()}) expect their timesteps in order from the first: "
                             "the sampler uses another step count or schedule. Sample with the calibrated "
                             "schedule, or pass strict_order=False to look timesteps up one by one")
        self._last_row = row


def state_correction(wrappers: Sequence[CorrectedUNet | None]) -> StateCorrection:
    """The ``correct_states`` hook for trajectories whose denoisers use ``wrappers`` (None: no correction),
    in the same order as the denoisers given to :func:`tacdiff.sampling.run_trajectories`."""
    wrappers = list(wrappers)

    def correct(t: Tensor, states: list[Tensor]) -> list[Tensor]:
        if len(states) != len(wrappers):
            raise ValueError(f"state_correction got {len(wrappers)} wrappers for {len(states)} trajectories")
        return [x if w is None else w.correct_state(x, t) for w, x in zip(wrappers, states)]

    return correct
