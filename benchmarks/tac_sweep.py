"""One-factor-at-a-time sweep of TAC's hyper-parameters on one model, scored on validation seeds.

    OMP_NUM_THREADS=1 python benchmarks/tac_sweep.py [--model reference] [--guidance-scale G]
        [--weight-rounding rtn] [--bits w4a8] [--steps 50] [--samples 256]
        [--calib-samples 128] [--seed 0] [--device cpu] [--batch-size 256]
        [--lams ...] [--gammas ...] [--taus ...] [--ibcs ...] [--targets ...] [--calib-sizes ...] [--quick]
        [--json benchmarks/results/tac_sweep.json] [--markdown benchmarks/results/tac_sweep.md]

What it sweeps: around the centre, the current defaults ``DEFAULT_LAM``, ``DEFAULT_GAMMA``,
``DEFAULT_TAU``, ``DEFAULT_IBC`` and ``DEFAULT_IBC_TARGET`` (:mod:`tacdiff.correction.calibrate`) with
``--calib-samples`` calibration trajectories, one factor at a time: lam in {0, 0.25, 0.5, 0.75, 1},
gamma in {0, 0.1, 1}, tau in {0.1, 0.5, 1, 2}, IBC granularity in {channel, element, shrunk}, IBC target in
{state, input} (the sampler's latent or only the network input), calibration size in {32, 64, 128, 256},
NER's per-channel bias off or on (``--biases``)
(``--lams`` etc. replace a list; ``--quick`` makes every list, the sample counts and the step
count tiny for a smoke run). Reference rows: FP, PTQ (no correction) and NER alone at the centre.

Model and quantization as in ``tacdiff bench`` (:mod:`tacdiff.bench`): ``--model`` (the bundled Fashion-MNIST
DDPM by default; ``latent-reference``, ``dit-reference`` or any pipeline folder, on its default prompts or class
names with classifier-free guidance at ``--guidance-scale``), DDIM (eta 0) from its scheduler config,
``QuantConfig(w, a)`` with ``--weight-rounding`` once per ``--bits`` setting with activation ranges from
``min(--quant-calib-samples, --calib-samples)`` FP trajectories (:func:`tacdiff.bench.quantized_copy`); every
table is fitted on that one quantized model.

Seeds (never tune on the evaluation seeds): quantization inputs come from
``derive_seed(seed, "quantize")`` and the tables are fitted on ``derive_seed(seed, "calibrate")``,
as in bench; every configuration is scored on ``derive_seed(seed, "validate")``, a third stream,
so neither the fit nor the choice made here sees bench's ``derive_seed(seed, "evaluate")`` images.
A calibration set of n trajectories starts from the first n noises of the larger ones.

Scoring: FP and every denoiser (PTQ, NER, each TAC setting) are sampled in one paired run of
:func:`tacdiff.evaluation.score_methods` (bench's scorer), so FP's validation images are drawn once and
every row is compared with the same ones. Per row:
x0 MSE/PSNR of the final images (clamped to [-1, 1]) against FP on the same noise, FID/KID on
both bundled feature spaces (:func:`tacdiff.metrics.fid.fid_or_note`; with a few hundred
samples FID is biased upwards: compare rows, not absolute values), and the table fit's seconds
(``fit s``; for the ``ptq`` row the quantization's).

How to read it: the ``factor`` column names the one setting a row changes (``centre`` for the
current defaults); "best per factor" picks, among the centre and that factor's rows, the highest
x0 PSNR and the lowest FID. Paired x0 PSNR (same noise as FP) says how closely the corrected
sampler tracks FP and is less noisy; FID from a few hundred images is noisy and this
script draws one validation set only, so treat small FID differences as ties. One factor at a
time finds no interactions: re-run around a new centre before changing several defaults at once.

Example (the full sweep, written where the other benchmark results live):

    OMP_NUM_THREADS=1 python benchmarks/tac_sweep.py --bits w4a8 --steps 50 --samples 256 \
        --json benchmarks/results/tac_sweep_round1.json --markdown benchmarks/results/tac_sweep_round1.md
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from fp_reference import machine  # sibling benchmark script (run as python benchmarks/tac_sweep.py)
from tacdiff.bench import FP_BITS, check_bench_args, format_cell, quant_calibration, quantized_copy
from tacdiff.correction import CorrectedDenoiser
from tacdiff.correction.tables import IBC_TARGETS
from tacdiff.evaluation import Method, TimedDenoiser, prompted_classes, score_methods, timed_call
from tacdiff.io.atomic import write_text_atomically
from tacdiff.correction.calibrate import (DEFAULT_GAMMA, DEFAULT_IBC, DEFAULT_IBC_TARGET, DEFAULT_LAM, DEFAULT_TAU,
                                         fit_tables)
from tacdiff.correction.ibc import check_granularity
from tacdiff.correction.ner import check_ner_params
from tacdiff.report.json import write_json
from tacdiff.models.kinds import ModelDenoiser, sample_shape_of
from tacdiff.models.loading import build_scheduler, load_any_model
from tacdiff.quant import QuantConfig
from tacdiff.sampling.batching import derive_seed
from tacdiff.sampling.conditioning import PromptOptions, conditioning_for, named_classes

FACTORS = ("lam", "gamma", "tau", "ibc", "target", "calib", "bias")
FULL: dict[str, Any] = {"lam": [0.0, 0.25, 0.5, 0.75, 1.0], "gamma": [0.0, 0.1, 1.0], "tau": [0.1, 0.5, 1.0, 2.0],
                        "ibc": ["channel", "element", "shrunk"], "target": ["state", "input"],
                        "calib": [32, 64, 128, 256], "bias": [False, True],
                        "samples": 256, "calib_samples": 128, "steps": 50}
QUICK: dict[str, Any] = {"lam": [0.0, 1.0], "gamma": [0.1], "tau": [1.0], "ibc": ["channel"], "target": ["input"],
                         "calib": [8], "bias": [False], "samples": 16, "calib_samples": 16, "steps": 10}


@dataclass(frozen=True)
class Setting:
    """One TAC configuration: NER's lam/gamma/tau, IBC granularity and target, calibration trajectories, and
    whether NER fits a per-channel bias too."""

    lam: float
    gamma: float
    tau: float
    ibc: str
    target: str
    calib: int
    bias: bool = False

    def differs_in(self, centre: "Setting") -> str:
        """The one factor this setting changes from ``centre`` (``"centre"`` when none)."""
        changed = [f for f in FACTORS if getattr(self, f) != getattr(centre, f)]
        return changed[0] if changed else "centre"


def one_at_a_time(centre: Setting, values: dict[str, Sequence[Any]]) -> list[Setting]:
    """The centre, then each factor's values with the others at the centre (duplicates dropped)."""
    swept = [replace(centre, **{factor: value}) for factor in FACTORS for value in values[factor]]
    return list(dict.fromkeys([centre, *swept]))


def label(setting: Setting, centre: Setting) -> str:
    factor = setting.differs_in(centre)
    return "tac" if factor == "centre" else f"tac {factor}={getattr(setting, factor)}"


@torch.no_grad()
def sweep(args: argparse.Namespace, values: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Quantize, fit every setting's tables, score all on the validation seeds; one row per denoiser."""
    pairs = check_bench_args(args.bits, [args.steps], ["ptq", "ner", "tac"], args.samples,
                             min(args.calib_samples, *values["calib"]), args.batch_size, args.device,
                             args.weight_rounding)
    dev = torch.device(args.device)
    loaded = load_any_model(args.model, dev)
    fp, ddpm = loaded.model, build_scheduler("ddpm", loaded.scheduler_config)
    scheduler = build_scheduler("ddim", loaded.scheduler_config)
    guided = loaded.reads_prompts or bool(named_classes(loaded))  # prompts, or a DiTPipeline's class names
    prompts = PromptOptions(guidance_scale=args.guidance_scale) if guided else PromptOptions()
    conditioning = conditioning_for(loaded, prompts, count=max(args.samples, *values["calib"], args.calib_samples),
                                    seed=args.seed, what=args.model)
    centre = Setting(DEFAULT_LAM, DEFAULT_GAMMA, DEFAULT_TAU, DEFAULT_IBC, DEFAULT_IBC_TARGET, args.calib_samples)
    settings = one_at_a_time(centre, values)
    calib_seed = derive_seed(args.seed, "calibrate")

    def timed(denoiser: Any) -> TimedDenoiser:
        return TimedDenoiser(conditioning.guide(denoiser), dev)

    methods = [Method(FP_BITS, "fp", timed(ModelDenoiser(fp, scheduler)), 0.0)]
    swept: dict[str, Setting] = {}
    quant_settings = quant_calibration(args.quant_calib_samples, args.calib_samples, args.steps, args.seed)
    for name, bits in zip(args.bits, pairs):
        log(f"quantize {name} ({args.weight_rounding.upper()}, {quant_settings.samples} calibration trajectories)")
        model, seconds = timed_call(dev, lambda bits=bits: quantized_copy(
            fp, ddpm, bits, quant_settings, conditioning, QuantConfig(weight_rounding=args.weight_rounding),
            args.progress))
        methods.append(Method(name, "ptq", timed(ModelDenoiser(model, scheduler)), seconds))
        fits = [("ner", centre, False)] + [(label(s, centre), s, True) for s in settings]
        for i, (method, s, use_ibc) in enumerate(fits, 1):
            log(f"[{name} {i}/{len(fits)}] fit {method}: lam={s.lam} gamma={s.gamma} tau={s.tau} ibc={s.ibc} "
                f"on the {s.target}, {s.calib} trajectories, NER bias {s.bias}, DDIM {args.steps}")
            options = dict(lam=s.lam, gamma=s.gamma, tau=s.tau, ibc=s.ibc, ibc_target=s.target, ner_bias=s.bias)
            tables, seconds = timed_call(dev, lambda s=s, use_ibc=use_ibc, options=options: fit_tables(
                "tac" if use_ibc else "ner", fp, model, scheduler, options=options, num_inference_steps=args.steps,
                num_samples=s.calib, batch_size=args.batch_size, seed=calib_seed, cond=conditioning,
                progress=args.progress))
            methods.append(Method(name, method, timed(CorrectedDenoiser(ModelDenoiser(model, scheduler), tables)),
                                  seconds))
            swept[method] = s
    log(f"sample {len(methods)} denoisers x {args.samples} paired validation images, DDIM {args.steps}")
    labels = prompted_classes(conditioning, args.samples, loaded.image_shape)
    rows = score_methods(methods, scheduler, num_inference_steps=args.steps, num_samples=args.samples,
                         sample_shape=sample_shape_of(fp), seed=derive_seed(args.seed, "validate"),
                         batch_size=args.batch_size, device=dev, cond=conditioning.rows, decode=loaded.decode,
                         labels=labels, progress=args.progress).rows
    for row in rows:
        s = swept.get(row["method"])
        row["factor"] = "" if s is None else "ner" if row["method"] == "ner" else s.differs_in(centre)
        row.update(asdict(s) if s is not None else dict.fromkeys(FACTORS))
    return rows


def best_per_factor(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per bits and factor, among the centre and that factor's rows: the highest x0 PSNR and the lowest FID."""
    best = []
    for bits in dict.fromkeys(r["bits"] for r in rows if r["bits"] != FP_BITS):
        for factor in FACTORS:
            group = sorted((r for r in rows if r["bits"] == bits and r["factor"] in ("centre", factor)),
                           key=lambda r: r[factor])
            if len(group) < 2:
                continue
            by_psnr, by_fid = max(group, key=lambda r: r["x0_psnr"]), min(group, key=lambda r: r["fid"])
            best.append({"bits": bits, "factor": factor, "values": [r[factor] for r in group],
                         "best_psnr": by_psnr[factor], "psnr": by_psnr["x0_psnr"],
                         "best_fid": by_fid[factor], "fid": by_fid["fid"]})
    return best


def format_markdown(rows: Sequence[dict[str, Any]], best: Sequence[dict[str, Any]]) -> str:
    lines = ["| bits | method | factor | lam | gamma | tau | ibc | target | calib | NER bias | FID | KID | "
             "FID allconv | prompt acc | x0 MSE | x0 PSNR dB | fit s |",
             "|---|---|---|---:|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [r["bits"], r["method"], r["factor"] or "-", *("-" if r[f] is None else r[f] for f in FACTORS)]
        scores = (format_cell(r.get(k), d) for k, d in (("fid", 3), ("kid", 5), ("fid_allconv", 3),
                                                           ("prompt_accuracy", 3), ("x0_mse", 6), ("x0_psnr", 2),
                                                           ("calib_seconds", 1)))
        lines.append("| " + " | ".join([*(str(c) for c in cells), *scores]) + " |")
    lines += ["", "Best per factor (among the centre and that factor's rows):", "",
              "| bits | factor | values | best by x0 PSNR | best by FID |", "|---|---|---|---|---|"]
    for b in best:
        lines.append(f"| {b['bits']} | {b['factor']} | {', '.join(map(str, b['values']))} | "
                     f"{b['best_psnr']} ({b['psnr']:.2f} dB) | {b['best_fid']} (FID {b['fid']:.3f}) |")
    if not best:
        lines.append("| - | (no factor has a second value) | - | - | - |")
    return "\n".join(lines)


def log(message: str) -> None:
    tqdm.write(f"[tac_sweep {time.strftime('%H:%M:%S')}] {message}")


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent)
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="reference", help="'reference', 'latent-reference' or a model or "
                        "pipeline folder")
    parser.add_argument("--guidance-scale", type=float, default=None, help="text-to-image and class-conditional "
                        "pipelines: the classifier-free guidance scale (default: the pipeline's own)")
    parser.add_argument("--weight-rounding", default="rtn", help="PTQ's weight rounding: rtn or gptq")
    parser.add_argument("--bits", nargs="+", default=["w4a8"], help="settings like w4a8, each quantized once")
    parser.add_argument("--steps", type=int, help="DDIM steps (default 50; quick 10)")
    parser.add_argument("--samples", type=int, help="validation images per row (default 256; quick 16)")
    parser.add_argument("--calib-samples", type=int,
                        help="calibration trajectories at the centre (default 128; quick 16)")
    parser.add_argument("--quant-calib-samples", type=int, default=64, help="FP trajectories for PTQ's ranges "
                        "(capped at --calib-samples, as in bench)")
    parser.add_argument("--lams", type=float, nargs="+", help="NER lam values (default 0 0.25 0.5 0.75 1)")
    parser.add_argument("--gammas", type=float, nargs="+", help="NER gamma values (default 0 0.1 1)")
    parser.add_argument("--taus", type=float, nargs="+", help="NER tau values (default 0.1 0.5 1 2)")
    parser.add_argument("--ibcs", nargs="+", help="IBC granularities (default channel element shrunk)")
    parser.add_argument("--targets", nargs="+", help="IBC targets (default state input)")
    parser.add_argument("--calib-sizes", type=int, nargs="+", help="calibration sizes (default 32 64 128 256)")
    parser.add_argument("--biases", nargs="+", choices=["no", "yes"], help="NER bias off/on (default no yes)")
    parser.add_argument("--seed", type=int, default=0, help="derives the quantize/calibrate/validate seeds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256, help="trajectories per sampling batch; samples "
                        "per network call when fitting")
    parser.add_argument("--quick", action="store_true", help="tiny lists, sample counts and steps (smoke run)")
    parser.add_argument("--quiet", dest="progress", action="store_false", help="hide progress bars")
    parser.add_argument("--json", help="write the rows, the best per factor and the run's settings here")
    parser.add_argument("--markdown", help="write the tables, machine and command here")
    args = parser.parse_args()
    base = QUICK if args.quick else FULL
    given = {"lam": args.lams, "gamma": args.gammas, "tau": args.taus, "ibc": args.ibcs, "target": args.targets,
             "calib": args.calib_sizes, "bias": None if args.biases is None else [b == "yes" for b in args.biases]}
    values = {f: given[f] if given[f] is not None else base[f] for f in FACTORS}
    for key in ("steps", "samples", "calib_samples"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    try:
        for lam in values["lam"]:
            check_ner_params(lam, DEFAULT_GAMMA, DEFAULT_TAU)
        for gamma in values["gamma"]:
            check_ner_params(DEFAULT_LAM, gamma, DEFAULT_TAU)
        for tau in values["tau"]:
            check_ner_params(DEFAULT_LAM, DEFAULT_GAMMA, tau)
        for ibc in values["ibc"]:
            check_granularity(ibc)
        if not set(values["target"]) <= set(IBC_TARGETS):
            raise ValueError(f"IBC targets must be among {IBC_TARGETS}, got {values['target']}")
    except ValueError as error:
        parser.error(str(error))

    started, began = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    code = commit()  # the code that runs, not whatever HEAD is when the sweep ends
    rows = sweep(args, values)
    best = best_per_factor(rows)
    table = format_markdown(rows, best)
    command = "OMP_NUM_THREADS=1 python " + shlex.join(sys.argv)
    guidance = "" if args.guidance_scale is None else f", guidance {args.guidance_scale}"
    header = (f"# TAC hyper-parameter sweep ({args.model}{guidance}, {args.weight_rounding.upper()} "
              f"{', '.join(args.bits)}, DDIM {args.steps}, {args.samples} validation "
              f"images, centre calibration {args.calib_samples} trajectories)\n\n"
              f"* Machine: {machine(args.device)}\n* Command (commit {code}, started {started}, "
              f"{time.perf_counter() - began:.0f} s): `{command}`\n"
              f"* Seeds: quantize / calibrate / validate streams derived from --seed {args.seed}; "
              "bench's evaluate stream is not used.\n")
    print("\n" + header + "\n" + table)
    if args.json:
        options = {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}
        record = {"command": command, "machine": machine(args.device), "started": started,
                  "seconds": time.perf_counter() - began, "options": options, "values": values, "rows": rows,
                  "best": best}
        print(f"wrote {write_json(args.json, record)}")
    if args.markdown:
        text = f"{header}\n{table}\n"
        print(f"wrote {write_text_atomically(args.markdown, text)}")


if __name__ == "__main__":
    main()
