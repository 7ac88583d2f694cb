"""``tacdiff calibrate``: fit TAC (Yao et al., ECCV 2024), its ablations or PTQD for a quantized artifact."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tacdiff.correction.calibrate import (CALIBRATORS, DEFAULT_GAMMA, DEFAULT_IBC, DEFAULT_IBC_TARGET, DEFAULT_LAM,
                                         DEFAULT_TAU, fit_tables)
from tacdiff.correction.ibc import Granularity, check_granularity
from tacdiff.correction.tables import IBC_TARGETS, CorrectionTables
from tacdiff.io.artifact import load_quantized, read_metadata, state_dict_sha256
from tacdiff.models.loading import build_scheduler, check_settings, load_any_model

def calibrate_artifact(quant_artifact: str | Path, fp_model: str | Path, out: str | Path, *, method: str = "tac",
                       scheduler: str = "ddim", steps: int = 50, samples: int = 256, batch_size: int = 64,
                       seed: int = 0, lam: float = DEFAULT_LAM, gamma: float = DEFAULT_GAMMA,
                       tau: float = DEFAULT_TAU, ibc: Granularity = DEFAULT_IBC,
                       ibc_target: str = DEFAULT_IBC_TARGET,
                       device: str = "cpu",
                       overwrite: bool = False, progress: bool = True) -> tuple[Path, CorrectionTables]:
    """Calibrate correction tables for the quantized artifact folder against its FP model; write ``out``.

    ``fp_model`` is a diffusers UNet/pipeline folder or ``"reference"``. The scheduler config
    comes from the artifact's metadata when present, else from the FP model. ``ValueError``
    when the FP model is not the one the artifact was quantized from (by state-dict hash).
    """
    if method not in CALIBRATORS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(CALIBRATORS)}")
    check_granularity(ibc)
    if ibc_target not in IBC_TARGETS:
        raise ValueError(f"ibc_target must be 'state' or 'input', got {ibc_target!r}")
    check_settings(scheduler, steps, samples, batch_size, device)
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    meta = read_metadata(quant_artifact)
    fp = load_any_model(fp_model, device)
    if fp.quantized:
        raise ValueError(f"--fp-model {fp_model} is a quantized artifact; pass the full-precision model")
    _check_source(meta, fp.model, fp_model)
    quant = load_quantized(quant_artifact, device)
    config = json.loads(meta["scheduler_config"]) if meta.get("scheduler_config") else fp.scheduler_config
    sched = build_scheduler(scheduler, config)
    run = dict(num_inference_steps=steps, num_samples=samples, batch_size=batch_size, seed=seed, progress=progress)
    options = dict(lam=lam, gamma=gamma, tau=tau, ibc=ibc, ibc_target=ibc_target)
    with torch.no_grad():
        tables = fit_tables(method, fp.model, quant, sched, options=options, **run)
    tables.metadata["quant_artifact"] = str(Path(quant_artifact).resolve())
    return tables.save(out, overwrite=overwrite), tables


def _check_source(meta: dict[str, str], fp_model: torch.nn.Module, name: str | Path) -> None:
    """Raise when the artifact records a source hash that the FP model does not have."""
    source = meta.get("source_sha256")
    if source and source != state_dict_sha256(fp_model):
        raise ValueError(f"the quantized artifact was made from another model ({meta.get('source_model', '?')}, "
                         f"sha256 {source[:12]}...) than --fp-model {name}; pass the model it was quantized from")
