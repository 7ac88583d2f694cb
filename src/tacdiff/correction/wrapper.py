"""A UNet wrapper that applies per-timestep correction tables (TAC, Yao et al., ECCV 2024; PTQD).

:class:`CorrectedUNet` looks the timestep up in the tables, subtracts ``input_bias[t]`` from
the sample, calls the wrapped UNet and returns ``out_scale[t] * (out - out_bias[t])`` in the
UNet's own output type, so diffusers schedulers and pipelines (``DDIMPipeline(unet=wrapper,
scheduler=...)``) use it unchanged. The correction arithmetic lives in :func:`correct_input`
and :func:`correct_output`, which calibration uses too, so both apply the same operations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tacdiff.correction.ibc import broadcast_bias
from tacdiff.correction.tables import CorrectionTables


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
    """

    def __init__(self, unet: nn.Module, tables: CorrectionTables, *, strict_order: bool = True) -> None:
        super().__init__()
        channels = getattr(getattr(unet, "config", None), "out_channels", tables.channels)
        if channels != tables.channels:
            raise ValueError(f"correction tables have {tables.channels} channels but the UNet outputs {channels}; "
                             "use tables calibrated for this model")
        self.unet = unet
        self.tables = tables
        self.strict_order = strict_order
        self._last_row: int | None = None

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
        self._last_row = None

    def forward(self, sample: Tensor, timestep: Tensor | float | int, *args: Any, return_dict: bool = True,
                **kwargs: Any) -> Any:
        rows = self.tables.index_of(timestep)
        if rows.numel() > 1 and bool((rows == rows[0]).all()):
            rows = rows[:1]
        self._check_order(rows)
        pick = (lambda table: table[rows[0]]) if rows.numel() == 1 else (lambda table: table[rows])
        result = self.unet(correct_input(sample, pick(self.tables.input_bias)), timestep, *args,
                           return_dict=return_dict, **kwargs)
        out = result.sample if return_dict else result[0]
        eps = correct_output(out, pick(self.tables.out_scale), pick(self.tables.out_bias))
        if return_dict:
            result.sample = eps
            return result
        return (eps, *result[1:])

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
