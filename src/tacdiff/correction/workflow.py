"""``tacdiff calibrate``: fit TAC (Yao et al., ECCV 2024), its ablations or PTQD for a quantized artifact."""

from __future__ import annotations

from pathlib import Path

import torch

from tacdiff.correction.calibrate import (CALIBRATORS, DEFAULT_GAMMA, DEFAULT_GUIDANCE_FIT, DEFAULT_IBC,
                                         DEFAULT_IBC_TARGET, DEFAULT_LAM, DEFAULT_TAU, check_tac_options, fit_tables)
from tacdiff.correction.ibc import Granularity
from tacdiff.correction.tables import CorrectionTables, is_tables_file
from tacdiff.io.artifact import check_source, read_metadata
from tacdiff.io.atomic import check_writable
from tacdiff.models.loading import build_scheduler, check_settings, input_paths, load_any_model
from tacdiff.sampling.conditioning import PromptOptions, conditioning_for


def calibrate_artifact(quant_artifact: str | Path, fp_model: str | Path, out: str | Path, *, method: str = "tac",
                       scheduler: str = "auto", steps: int = 50, samples: int = 256, batch_size: int = 64,
                       seed: int = 0, lam: float = DEFAULT_LAM, gamma: float = DEFAULT_GAMMA,
                       tau: float = DEFAULT_TAU, ibc: Granularity = DEFAULT_IBC,
                       ibc_target: str = DEFAULT_IBC_TARGET, guidance_fit: str = DEFAULT_GUIDANCE_FIT,
                       ner_bias: bool = False, prompts: PromptOptions = PromptOptions(),
                       device: str = "cpu", backend: str = "fake", overwrite: bool = False,
                       progress: bool = True) -> tuple[Path, CorrectionTables]:
    """Calibrate correction tables for the quantized artifact folder against its FP model; write ``out``.

    ``fp_model`` is a diffusers UNet/pipeline folder or ``"reference"``. The scheduler config
    comes from the artifact's metadata when present, else from the FP model. ``ValueError``
    when the FP model is not the one the artifact was quantized from (by state-dict hash).
    Text-to-image pipelines calibrate on ``prompts`` (sample ``i`` gets prompt ``i mod n``) with
    classifier-free guidance: the tables correct the guided estimate (or each branch, with
    ``guidance_fit="branch"``) and record the guidance scale, which
    :meth:`CorrectionTables.check_conditioning` compares, and the prompt-set hash.
    ``backend``: how the quantized model runs while the tables are fitted (:func:`tacdiff.backends.use_backend`);
    tables apply on any backend, but fit the one they were fitted on best (recorded in their metadata: ``"int8"``
    where any layer ran on integer kernels, else ``"fake"``).
    """
    if method not in CALIBRATORS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(CALIBRATORS)}")
    check_tac_options(lam=lam, gamma=gamma, tau=tau, ibc=ibc, ibc_target=ibc_target, guidance_fit=guidance_fit)
    if method == "ptqd" and guidance_fit != DEFAULT_GUIDANCE_FIT:
        raise ValueError(f"guidance_fit={guidance_fit!r} applies to tac, ner and ibc; ptqd fits the guided estimate")
    if ner_bias and method not in ("tac", "ner"):
        raise ValueError(f"ner_bias adds a bias to NER's scales (methods tac and ner); {method} fits no NER scales")
    check_settings(scheduler, steps, samples, batch_size, device)
    check_writable(out, overwrite, recognise=is_tables_file, what="correction tables file",
                   inputs=input_paths(quant_artifact, fp_model))
    meta = read_metadata(quant_artifact)
    fp = load_any_model(fp_model, device)
    if fp.quantized:
        raise ValueError(f"--fp-model {fp_model} is a quantized artifact; pass the full-precision model")
    check_source(meta, fp.model, fp_model)
    quant = load_any_model(quant_artifact, device, backend, probe_batch=min(batch_size, samples))
    config = quant.scheduler_config or fp.scheduler_config
    sched = build_scheduler(scheduler, config, fp.model)
    # the artifact's own components (a quantized text encoder, if any) make the embeddings both models see
    conditioning = conditioning_for(quant if quant.reads_prompts else fp, prompts, count=samples, seed=seed,
                                    what=f"--fp-model {fp_model}")
    run = dict(num_inference_steps=steps, num_samples=samples, batch_size=batch_size, seed=seed, cond=conditioning,
               progress=progress)
    options = dict(lam=lam, gamma=gamma, tau=tau, ibc=ibc, ibc_target=ibc_target, guidance_fit=guidance_fit,
                   ner_bias=ner_bias)
    with torch.no_grad():
        tables = fit_tables(method, fp.model, quant.model, sched, options=options, **run)
    tables.metadata["quant_artifact"] = str(Path(quant_artifact).resolve())
    return tables.save(out, overwrite=overwrite), tables

