"""Fitting correction tables on paired FP/quantized trajectories through :func:`run_trajectories`.

TAC (Yao et al., ECCV 2024) is calibrated in sampling order: at step ``t`` the quantized
trajectory has been corrected at every earlier step, so each fit sees the inputs that
inference will see. The loop gets ``[fp, calibrating]`` denoisers; the FP one records its
input ``x_t`` and estimate ``r``; the calibrating one, called next at the same step, computes
``mu_t`` from its own input minus the FP input, calls the quantized model on the corrected
input, fits ``K_t`` from ``(q, r)`` and returns ``K_t q``, with which its trajectory advances.

Batches: sequential calibration needs *every* sample's statistics at step ``t`` before ``t`` is
solved, and a trajectory cannot pause between steps across :func:`run_trajectories` calls. So
all ``num_samples`` trajectories advance together (one call; the latents and estimates of a
step, the size of the samples themselves, stay in memory) while each network is called on
chunks of ``batch_size``, which bounds the activation memory. The NER and PTQD sums stream
over those chunks; the NER mask threshold ``tau * mean|r|`` is computed from the whole step's
``r`` first (exact two-pass, see :mod:`tacdiff.correction.ner`), so the result equals the
one-shot fit on all samples.

Processes (``torchrun``, :mod:`tacdiff.distributed`): each rank advances a contiguous block of the
``batch_size`` chunks; every per-step sum (IBC's mean, NER's ``mean|r|`` and sums, PTQD's sums) is
kept per chunk, gathered from all ranks and added in chunk order, so every rank solves the same
tables, bit-identical to a one-process fit at that ``batch_size``.

PTQD (He et al., NeurIPS 2023) is fitted in the same loop, but as in PTQD on the quantization
noise for a fixed input: the quantized model is called on the FP trajectory's input, and the
fit ``q ~ (1 + k_t) r + b_t`` involves no exposure bias.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

import torch
from diffusers import DDPMScheduler, SchedulerMixin
from torch import Tensor, nn

from tacdiff.backends.int8 import backend_of
from tacdiff.correction.ibc import BiasSum, Granularity, check_granularity
from tacdiff.correction.ner import AbsMean, NERStats, check_ner_params
from tacdiff.correction.ptqd import PTQDStats
from tacdiff.correction.tables import CONDITIONING_KEY, IBC_TARGETS, PREDICTION_KEY, CorrectionTables
from tacdiff.correction.wrapper import correct_input, correct_output
from tacdiff.distributed import Shard, shard
from tacdiff.io.artifact import state_dict_sha256
from tacdiff.models.kinds import (ClassifierFreeGuidance, Cond, Denoiser, ModelDenoiser, correction_space, map_cond,
                                  sample_shape_of)
from tacdiff.sampling.batching import batched_trajectories
from tacdiff.sampling.conditioning import Conditioning, tensor_conditioning

# Chosen by benchmarks/tac_sweep.py on the bundled Fashion-MNIST model (DDIM 50, validation seeds;
# benchmarks/results/tac_sweep_round*.md). Round 1 (W4A8, one factor at a time around channel IBC,
# tau = 1): element-wise IBC was the one large gain (FID 40.0 -> 32.3, x0 PSNR 16.2 -> 18.1 dB);
# lam, gamma and calibration size (32-256) moved FID by < 3 and PSNR by < 0.3 dB; tau = 0.1 breaks
# NER. Round 2 (around element IBC, W4A8 and W3A8): tau = 2 was best on both settings by both
# measures (W4A8 FID 32.3 -> 29.1, W3A8 278 -> 265); lam = 1 gained less (FID -0.3 / -6).
DEFAULT_LAM, DEFAULT_GAMMA, DEFAULT_TAU = 0.5, 0.0, 2.0
DEFAULT_IBC: Granularity = "element"
DEFAULT_IBC_TARGET = "state"
GUIDANCE_FITS = ("guided", "branch")
DEFAULT_GUIDANCE_FIT = "guided"


T = TypeVar("T")


@dataclass
class _Row:
    """One timestep's corrections (float32, as stored) and the timestep value."""

    t: float
    input_bias: Tensor
    out_scale: Tensor
    out_bias: Tensor
    residual_var: float = 0.0


@dataclass
class _FPRecorder:
    """The FP denoiser of the pair: returns its estimate and keeps the latents, ``x_t`` and ``r`` of the step.

    With ``combine`` (per-branch fitting), ``denoise`` returns both guidance branches, kept as ``r``,
    and the trajectory advances with ``combine(r)``, the guided estimate.
    """

    denoise: Denoiser
    combine: Callable[[Tensor], Tensor] | None = None
    state: Tensor | None = None
    x: Tensor | None = None
    eps: Tensor | None = None

    def correct_state(self, x: Tensor, t: Tensor, step: int) -> Tensor:
        self.state = x
        return x

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        self.x, self.eps = x, self.denoise(x, t, **cond)
        return self.eps if self.combine is None else self.combine(self.eps)


@dataclass
class _Calibrating:
    """The quantized denoiser of the pair: ``step(x_hat, x_fp, r, t, quant) -> (row, eps)`` fits each step.

    With ``state_ibc`` set, :meth:`correct_state` (called by the loop at the start of the step,
    after the FP recorder's) measures ``mu_t`` on the latents of both trajectories and shifts the
    quantized one; the row then records that ``mu_t`` as its input bias.
    """

    quant: Denoiser
    fp: _FPRecorder
    step: Callable[..., tuple[_Row, Tensor]]
    shard: Shard
    state_ibc: Granularity | None = None
    rows: list[_Row] = field(default_factory=list)
    _state_bias: Tensor | None = None

    def correct_state(self, x: Tensor, t: Tensor, step: int) -> Tensor:
        if self.state_ibc is None:
            return x
        self._state_bias = _input_bias(x, self.fp.state, self.state_ibc, self.shard).float()
        return correct_input(x, self._state_bias)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if self.fp.x is None or self.fp.eps is None:
            raise RuntimeError("the FP denoiser must come first in the denoiser list")
        row, eps = self.step(x, self.fp.x, self.fp.eps, float(t), lambda inp: self.quant(inp, t, **cond),
                             shard=self.shard)
        if self._state_bias is not None:
            row.input_bias = self._state_bias.cpu()
        self.rows.append(row)
        return eps


def chunked(denoise: Denoiser, batch_size: int) -> Denoiser:
    """A denoiser that calls ``denoise`` on chunks of ``batch_size`` samples (and the matching
    rows of batched ``cond`` values) and concatenates the estimates."""

    def run(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        n = x.shape[0]
        pieces = []
        for start in range(0, n, batch_size):
            part = map_cond(cond, lambda v: v[start:start + batch_size] if _batched(v, n) else v)
            pieces.append(denoise(x[start:start + batch_size], t, **part))
        return torch.cat(pieces)

    return run


def _batched(value: Any, n: int) -> bool:
    return isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n


def _batch_stats(shard: Shard, stats: Callable[..., T], *tensors: Tensor) -> T:
    """``stats`` of every batch of ``shard.batch_size`` rows of ``tensors``, merged over batches and processes
    in sample order (:meth:`~tacdiff.distributed.Shard.merge`)."""
    size = shard.batch_size
    return shard.merge([stats(*(x[start:start + size] for x in tensors)) for start in range(0, len(tensors[0]), size)])


def _input_bias(x_hat: Tensor, x: Tensor, granularity: Granularity, shard: Shard) -> Tensor:
    """IBC's ``mu_t`` over every process's samples (float64)."""
    return _batch_stats(shard, lambda a, b: BiasSum.of(a, b, granularity), x_hat, x).estimate(granularity)


def _tac_step(x_hat: Tensor, x_fp: Tensor, r: Tensor, t: float, quant: Callable[[Tensor], Tensor], *,
              lam: float, gamma: float, tau: float, ibc: Granularity, use_ibc: bool, use_ner: bool,
              ner_bias: bool, shard: Shard, combine: Callable[[Tensor], Tensor] | None = None
              ) -> tuple[_Row, Tensor]:
    """IBC then NER at one step; the estimate returned is the corrected ``K_t (q - b_t)`` (``b_t = 0`` unless
    ``ner_bias``).

    With ``combine``, ``q`` and ``r`` hold both guidance branches ``[uncond; cond]``: NER fits one
    ``K_t`` per branch and the estimate returned is ``combine`` of the corrected branches.
    """
    channels = x_hat.shape[1]
    mu = _input_bias(x_hat, x_fp, ibc, shard).float().cpu()
    if not use_ibc:
        mu = torch.zeros_like(mu)
    q = quant(correct_input(x_hat, mu))
    branches = 1 if combine is None else 2
    identity = (torch.ones(channels), torch.zeros(channels))
    fits = [_ner_fit(qb, rb, lam, gamma, tau, ner_bias, shard) if use_ner else identity
            for qb, rb in zip(q.chunk(branches), r.chunk(branches))]
    scale, bias = (torch.stack(part) for part in zip(*fits))
    if combine is None:
        scale, bias = scale[0], bias[0]
    corrected = torch.cat([correct_output(qb, s, b) for qb, (s, b) in zip(q.chunk(branches), fits)])
    return _Row(t, mu, scale, bias), corrected if combine is None else combine(corrected)


def _ner_fit(q: Tensor, r: Tensor, lam: float, gamma: float, tau: float, bias: bool,
             shard: Shard) -> tuple[Tensor, Tensor]:
    """NER's per-channel ``K_t`` (and with ``bias`` its ``b_t``) for quantized estimates ``q`` against FP ones
    ``r``, summed per batch."""
    threshold = tau * _batch_stats(shard, lambda rb: AbsMean.empty(rb.shape[1]).update(rb), r).mean()
    stats = _batch_stats(shard, lambda qb, rb: NERStats.empty(threshold).update(qb, rb), q, r)
    if bias:
        return tuple(part.float() for part in stats.solve_affine(lam, gamma))
    return stats.solve(lam, gamma).float(), torch.zeros(q.shape[1])


def _ptqd_step(x_hat: Tensor, x_fp: Tensor, r: Tensor, t: float, quant: Callable[[Tensor], Tensor], *,
               shard: Shard) -> tuple[_Row, Tensor]:
    """PTQD at one step on the FP input; the estimate returned is ``(q - b_t) / (1 + k_t)``."""
    q = quant(x_fp)
    slope, bias, residual_var = _batch_stats(shard, lambda qb, rb: PTQDStats.empty(qb.shape[1]).update(qb, rb),
                                             q, r).solve()
    scale = torch.full((q.shape[1],), 1.0 / float(slope))
    mu = torch.zeros(q.shape[1])
    return _Row(t, mu, scale, bias.float(), float(residual_var)), correct_output(q, scale, bias.float())


def _provenance(fp_model: nn.Module, quant_model: nn.Module) -> dict[str, Any]:
    """FP model hash, sample shape and the quantized model's bits and backend (when tacdiff quantized it)."""
    from tacdiff.quant.apply import quant_state

    meta: dict[str, Any] = {"fp_model_sha256": state_dict_sha256(fp_model),
                            "sample_shape": list(sample_shape_of(fp_model))}
    try:
        config = quant_state(quant_model).config
    except ValueError:
        return meta
    return {**meta, "weight_bits": config.weight_bits, "act_bits": config.act_bits, "quant_config": config.to_json(),
            "backend": backend_of(quant_model)}


def _fit(method: str, step: Callable[..., tuple[_Row, Tensor]], fp_model: nn.Module, quant_model: nn.Module,
         scheduler: SchedulerMixin, *, num_inference_steps: int, num_samples: int, batch_size: int, seed: int,
         cond: Cond | Conditioning | None, progress: bool, hyper: dict[str, Any],
         denoiser: Callable[[nn.Module], Denoiser] | None, state_ibc: Granularity | None = None,
         per_branch: bool = False) -> CorrectionTables:
    """Run the paired loop once over all samples with ``step`` fitting each timestep; build the tables.

    ``per_branch``: the recorder and ``step`` see both guidance branches (``step`` gets ``combine``).
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    conditioning = cond if isinstance(cond, Conditioning) else tensor_conditioning(cond or {})
    if denoiser is not None and conditioning.guided:
        raise ValueError("pass either a guided Conditioning (the denoisers are guided for you) or a denoiser "
                         "factory with unguided cond, not both: the tables would record guidance they were not fitted "
                         "with")
    param = next(fp_model.parameters())
    mine = shard(num_samples, batch_size)
    if per_branch:
        fp, calibrating = _branch_pair(step, fp_model, quant_model, scheduler, conditioning, mine, state_ibc,
                                       denoiser)
    else:
        if denoiser is None:
            denoiser = lambda model: conditioning.guide(ModelDenoiser(model, scheduler))  # noqa: E731
        fp = _FPRecorder(chunked(denoiser(fp_model), batch_size))
        calibrating = _Calibrating(chunked(denoiser(quant_model), batch_size), fp, step, mine, state_ibc)
    for _ in batched_trajectories([fp, calibrating], scheduler, num_samples=num_samples,
                                  sample_shape=sample_shape_of(fp_model), num_inference_steps=num_inference_steps,
                                  seed=seed, batch_size=len(mine.samples), device=param.device, dtype=param.dtype,
                                  cond=conditioning.rows, samples=mine.samples, progress=progress):
        pass
    rows = calibrating.rows
    hyper = {**hyper, "num_samples": num_samples, "seed": seed}
    return CorrectionTables(
        method, torch.tensor([row.t for row in rows], dtype=torch.float64),
        torch.stack([row.input_bias for row in rows]), torch.stack([row.out_scale for row in rows]),
        torch.stack([row.out_bias for row in rows]), torch.tensor([row.residual_var for row in rows]),
        type(scheduler).__name__, dict(scheduler.config), num_inference_steps,
        {**_provenance(fp_model, quant_model), "hyperparameters": hyper, CONDITIONING_KEY: conditioning.record,
         PREDICTION_KEY: correction_space(scheduler)},
        "state" if state_ibc is not None else "input")


def _branch_pair(step: Callable[..., tuple[_Row, Tensor]], fp_model: nn.Module, quant_model: nn.Module,
                 scheduler: SchedulerMixin, conditioning: Conditioning, mine: Shard,
                 state_ibc: Granularity | None,
                 denoiser: Callable[[nn.Module], Denoiser] | None) -> tuple[_FPRecorder, _Calibrating]:
    """The FP recorder and calibrating denoiser of a per-branch fit: both see ``[eps_u; eps_c]``."""
    if not conditioning.guided or denoiser is not None:
        raise ValueError("guidance_fit='branch' fits one correction per classifier-free-guidance branch: it needs "
                         "prompts with guidance_scale > 1 (a Conditioning) and the default denoiser")

    def guided(model: nn.Module) -> ClassifierFreeGuidance:
        inner = chunked(ModelDenoiser(model, scheduler), mine.batch_size)
        return ClassifierFreeGuidance(inner, conditioning.guidance_scale, conditioning.uncond)

    fp, quant = guided(fp_model), guided(quant_model)
    recorder = _FPRecorder(fp.branches, fp.combine)
    return recorder, _Calibrating(quant.branches, recorder, functools.partial(step, combine=quant.combine), mine,
                                  state_ibc)


def calibrate_tac(fp_model: nn.Module, quant_model: nn.Module, scheduler: SchedulerMixin, *,
                  num_inference_steps: int, num_samples: int = 256, batch_size: int = 64, seed: int = 0,
                  lam: float = DEFAULT_LAM, gamma: float = DEFAULT_GAMMA, tau: float = DEFAULT_TAU,
                  ibc: Granularity = DEFAULT_IBC, ibc_target: str = DEFAULT_IBC_TARGET, use_ibc: bool = True,
                  use_ner: bool = True, cond: Cond | Conditioning | None = None, progress: bool = True,
                  denoiser: Callable[[nn.Module], Denoiser] | None = None,
                  guidance_fit: str = DEFAULT_GUIDANCE_FIT, ner_bias: bool = False) -> CorrectionTables:
    """Fit TAC's IBC and NER tables (Yao et al., ECCV 2024) for ``quant_model`` against ``fp_model``.

    Args:
        fp_model, quant_model: diffusers UNets predicting ``eps``, on the same device.
        scheduler: the sampler the tables are for; they are keyed by its timesteps at
            ``num_inference_steps`` and fail on any other schedule.
        num_samples: calibration trajectories, all advanced together; ``batch_size`` bounds
            each network call (see the module docstring).
        seed: starting noise and per-step noise, as in :func:`tacdiff.sampling.batching.batched_trajectories`.
        lam, gamma, tau: NER's relative-distortion weight, pull towards 1 and mask threshold.
        ibc: ``"element"`` (``mu_t`` of shape ``(C, H, W)``, the default), ``"channel"`` (``(C,)``) or
            ``"shrunk"`` (per element, James-Stein shrunk towards the channel mean; :mod:`tacdiff.correction.ibc`).
            Element-wise means need more trajectories: on a tiny random-weight test UNet, 8 or 32
            of them overfit (fresh-seed x0 error above the uncorrected one) and 64 did not.
        ibc_target: ``"state"`` subtracts ``mu_t`` from the quantized trajectory's latent at the
            start of each step (``x_hat_t <- x_hat_t - mu_t``), so the correction carries on to
            later steps; sampling then needs tacdiff's loop, which calls
            :class:`~tacdiff.correction.CorrectedDenoiser`'s ``correct_state``. ``"input"`` shifts only what the
            network sees, which a plain UNet wrapper can do inside any diffusers pipeline, but
            the uncorrected latent keeps its bias (measured worse: see the README).
        use_ibc, use_ner: switch the parts off for ablations (method ``ner``/``ibc``).
        ner_bias: NER fits a per-channel bias beside each scale, ``K_t (q - b_t)`` (not in the paper;
            :meth:`~tacdiff.correction.ner.NERStats.solve_affine`); off by default.
        cond: model keyword arguments with a leading dimension ``num_samples``, or a
            :class:`~tacdiff.sampling.conditioning.Conditioning` (prompts and guidance: the tables
            are then fitted on the guided estimate that enters the sampler, and record its guidance
            scale, which :meth:`CorrectionTables.check_conditioning` compares, and the prompt-set hash).
        denoiser: adapts a model to ``(x, t, **cond) -> eps``; by default
            ``ModelDenoiser(model, scheduler)``, guided as ``cond`` says.
        guidance_fit: with guidance, ``"guided"`` fits NER's ``K_t`` on the guided estimate that
            enters the sampler; ``"branch"`` fits one ``K_t`` per branch (unconditional and
            conditional estimates, ``out_scale`` of shape ``(T, 2, C)``) and advances the
            calibrating trajectory with the guided combination of the corrected branches. IBC is
            the same either way (it acts on the shared latents).
    Returns:
        :class:`CorrectionTables` (method ``tac``, ``ner``, ``ibc`` or ``none``).
    """
    check_tac_options(lam=lam, gamma=gamma, tau=tau, ibc=ibc, ibc_target=ibc_target, guidance_fit=guidance_fit)
    in_state = use_ibc and ibc_target == "state"
    if use_ibc and not in_state and isinstance(scheduler, DDPMScheduler):
        warnings.warn("IBC on the network input only was measured to make the drift grow on the stochastic DDPM "
                      "sampler (see tacdiff.correction.ibc); prefer ibc_target='state'", stacklevel=2)
    method = {(True, True): "tac", (False, True): "ner", (True, False): "ibc", (False, False): "none"}
    hyper = {"lam": lam, "gamma": gamma, "tau": tau, "ibc": ibc, "ibc_target": ibc_target, "use_ibc": use_ibc,
             "use_ner": use_ner, "guidance_fit": guidance_fit, "ner_bias": ner_bias}

    def step(*args: Any, **context: Any) -> tuple[_Row, Tensor]:
        return _tac_step(*args, lam=lam, gamma=gamma, tau=tau, ibc=ibc, use_ibc=use_ibc and not in_state,
                         use_ner=use_ner, ner_bias=ner_bias, **context)

    return _fit(method[use_ibc, use_ner], step, fp_model, quant_model, scheduler,
                num_inference_steps=num_inference_steps, num_samples=num_samples, batch_size=batch_size,
                seed=seed, cond=cond, progress=progress, hyper=hyper, denoiser=denoiser,
                state_ibc=ibc if in_state else None, per_branch=guidance_fit == "branch")


def check_tac_options(*, lam: float = DEFAULT_LAM, gamma: float = DEFAULT_GAMMA, tau: float = DEFAULT_TAU,
                      ibc: str = DEFAULT_IBC, ibc_target: str = DEFAULT_IBC_TARGET,
                      guidance_fit: str = DEFAULT_GUIDANCE_FIT, ner_bias: bool = False) -> None:
    """``ValueError`` naming the first of TAC's hyper-parameters (:func:`calibrate_tac`) out of its range; call it
    before long work. Takes every option ``fit_tables`` passes on (``ner_bias`` needs no check), so a whole
    options mapping can be checked as ``check_tac_options(**options)``."""
    check_granularity(ibc)
    check_ner_params(lam, gamma, tau)
    if ibc_target not in IBC_TARGETS:
        raise ValueError(f"ibc_target must be 'state' or 'input', got {ibc_target!r}")
    if guidance_fit not in GUIDANCE_FITS:
        raise ValueError(f"guidance_fit must be one of {', '.join(GUIDANCE_FITS)}, got {guidance_fit!r}")


def tac_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` completed with the default of every TAC option :func:`check_tac_options` takes (for records)."""
    defaults = {name: param.default for name, param in inspect.signature(check_tac_options).parameters.items()}
    return {**defaults, **options}


def calibrate_ptqd(fp_model: nn.Module, quant_model: nn.Module, scheduler: SchedulerMixin, *,
                   num_inference_steps: int, num_samples: int = 256, batch_size: int = 64, seed: int = 0,
                   cond: Cond | Conditioning | None = None, progress: bool = True,
                   denoiser: Callable[[nn.Module], Denoiser] | None = None) -> CorrectionTables:
    """Fit the PTQD baseline's tables (He et al., NeurIPS 2023): per step ``q ~ (1 + k_t) r + b_t``
    with a scalar ``k_t`` and per-channel ``b_t`` on FP-trajectory inputs, plus the residual variance.

    Arguments as in :func:`calibrate_tac`.
    """

    return _fit("ptqd", _ptqd_step, fp_model, quant_model, scheduler, num_inference_steps=num_inference_steps,
                num_samples=num_samples, batch_size=batch_size, seed=seed, cond=cond, progress=progress,
                hyper={}, denoiser=denoiser)


Calibrator = Callable[[nn.Module, nn.Module, SchedulerMixin, dict[str, Any], dict[str, Any]], CorrectionTables]


def _tac(**switches: bool) -> Calibrator:
    return lambda fp, quant, scheduler, run, options: calibrate_tac(fp, quant, scheduler, **switches, **options, **run)


CALIBRATORS: dict[str, Calibrator] = {
    "tac": _tac(),
    "ner": _tac(use_ibc=False),
    "ibc": _tac(use_ner=False),
    "ptqd": lambda fp, quant, scheduler, run, options: calibrate_ptqd(fp, quant, scheduler, **run),
}
"""How each correction method's tables are fitted: ``(fp, quant, scheduler, run, options) -> tables``."""


def fit_tables(method: str, fp_model: nn.Module, quant_model: nn.Module, scheduler: SchedulerMixin, *,
               options: dict[str, Any] | None = None, **run: Any) -> CorrectionTables:
    """Fit ``method``'s tables (a key of :data:`CALIBRATORS`) for ``quant_model`` against ``fp_model``.

    ``options`` are TAC's hyper-parameters (``lam``, ``gamma``, ``tau``, ``ibc``, ``ibc_target``,
    ``guidance_fit``; PTQD has none); ``run`` the settings every method shares (``num_inference_steps``,
    ``num_samples``, ``batch_size``, ``seed``, ``cond``, ``progress``, ``denoiser``), as in :func:`calibrate_tac`.
    """
    if method not in CALIBRATORS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(CALIBRATORS)}")
    return CALIBRATORS[method](fp_model, quant_model, scheduler, run, options or {})
