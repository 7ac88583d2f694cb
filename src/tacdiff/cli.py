"""The ``tacdiff`` command line: every command is a thin shell over a Python function.

Errors: one catch-all (:class:`_Commands`) turns every exception a command raises into one line
``error: ...`` on stderr and exit status 2; ``tacdiff --debug ...`` or ``TACDIFF_DEBUG=1`` shows
the traceback instead. Warnings print as one ``warning: ...`` line each.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperCommand, TyperGroup

from tacdiff import distributed, interrupts
from tacdiff.io.atomic import check_writable, report_file

if TYPE_CHECKING:
    from tacdiff.sampling.conditioning import PromptOptions

DEBUG_ENV = "TACDIFF_DEBUG"
TRUE_WORDS = ("1", "true", "yes", "on")
EXPECTED = (ValueError, TypeError, OSError)
"""Errors of input or environment, reported by their message alone; others also name their type."""


class _Commands(TyperGroup):
    """The command group with the one error boundary of the command line."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _warning_line
                return super().invoke(ctx)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):  # an interrupt is reported by tacdiff.__main__
            raise
        except typer.TyperException as error:  # bad usage: the same one line as any other error
            _report(error.format_message())
            raise typer.Exit(2) from None
        except Exception as error:  # noqa: BLE001 - the boundary: one clear line, not a traceback
            if interrupts.INTERRUPTED.is_set():  # e.g. numpy refusing a second import after Ctrl-C broke the first
                raise KeyboardInterrupt from None
            if _debug(ctx):
                raise
            _report(_in_flags(_message(error), self._subcommand(ctx)))
            raise typer.Exit(2) from None
        finally:
            distributed.shutdown()

    def _subcommand(self, ctx: typer.Context) -> TyperCommand | None:
        return self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None


def _report(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


def _warning_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """Show a warning as one ``warning: ...`` line on stderr (not Python's two-line format)."""
    typer.secho(f"warning: {' '.join(str(message).split())}", fg=typer.colors.YELLOW, err=True)


def _debug(ctx: typer.Context) -> bool:
    return bool(ctx.meta.get("tacdiff.debug")) or os.environ.get(DEBUG_ENV, "").strip().lower() in TRUE_WORDS


def _in_flags(message: str, command: TyperCommand | None) -> str:
    """``message`` with the command's Python parameter names (those with an underscore, as library errors
    name them: ``act_block_size``, ``act_range='dynamic'``) replaced by its flags (``--act-block-size``,
    ``--act-range dynamic``)."""
    for param in command.params if command else []:
        if param.param_type_name == "option" and param.name and "_" in param.name:
            flag = max(param.opts, key=len)
            message = re.sub(rf"\b{param.name}=(?:'([^']*)'|\"([^\"]*)\"|([^\s,;)]+))",
                             lambda m: f"{flag} {next(g for g in m.groups() if g is not None)}", message)
            message = re.sub(rf"\b{param.name}\b", flag, message)
    return message


def _message(error: Exception) -> str:
    """One line: the message of an expected error, else its type and a pointer to --debug."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, EXPECTED):
        return text
    return f"{type(error).__name__}: {text} (run `tacdiff --debug ...` for the traceback)"


PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg")
REPORTS = {"JSON file": report_file(".json"), "markdown file": report_file(".md", ".markdown", ".txt"),
           "plot": report_file(*PLOT_SUFFIXES), "sample grid": report_file(".png")}
"""What an existing report path may be for ``--json``, ``--markdown``, ``--plot`` and ``--grid`` to replace it."""
IMAGE_REPORTS = {"plot": ("--plot", PLOT_SUFFIXES), "sample grid": ("--grid", (".png",))}


def _check_reports(paths: dict[str, str | None], inputs: list[str | Path]) -> None:
    """Before any work: each given report path (keys of :data:`REPORTS`) may be written, and a plot has an image
    suffix; an existing file there must look like that kind of report, and no report may replace an input."""
    for what, (option, suffixes) in IMAGE_REPORTS.items():
        path = paths.get(what)
        if path and Path(path).suffix.lower() not in suffixes:
            raise ValueError(f"{option} {path}: name a {', '.join(suffixes)} file")
    for what, path in paths.items():
        if path:
            check_writable(path, overwrite=True, recognise=REPORTS[what], what=what, inputs=inputs)


def _refuse_existing_out(out: str, overwrite: bool, *inputs: str | None) -> None:
    """Before the slow imports: an OUT that exists fails at once without --overwrite (the command checks the rest)."""
    if not overwrite:
        check_writable(out, inputs=[path for path in inputs if path])


BUNDLED = "'reference' (pixel UNet), 'latent-reference' (text-to-image) or 'dit-reference' (DiT)"
"""The bundled models, as the help texts name them."""

app = typer.Typer(help="Quantize diffusers models and correct their error over the sampling trajectory.",
                  no_args_is_help=True, add_completion=False, cls=_Commands)


def _version(value: bool) -> None:
    """Option callback: print the version and stop."""
    if value:
        from tacdiff import __version__

        typer.echo(f"tacdiff {__version__}")
        raise typer.Exit()


@app.callback()
def main(ctx: typer.Context,
         debug: bool = typer.Option(False, "--debug", help=f"Show tracebacks (also {DEBUG_ENV}=1)."),
         version: bool = typer.Option(False, "--version", help="Print the version and exit.", callback=_version,
                                      is_eager=True)) -> None:
    """tacdiff: low-bit diffusers models with timestep-aware correction."""
    ctx.meta["tacdiff.debug"] = debug
    _log_to_stderr()
    _thin_progress_in_logs()
    _join_process_group()


def _thin_progress_in_logs() -> None:
    """Progress bars redraw in place with carriage returns, which a log file keeps, one line per redraw: when
    stderr is not a terminal, bars update every 30 s instead (tqdm's ``TQDM_MININTERVAL``, unless already set;
    read when tqdm is imported, which the commands do after this)."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "30")


def _join_process_group() -> None:
    """Under ``torchrun``, join its process group (:mod:`tacdiff.distributed`); only rank 0 prints results and
    progress, every rank its errors."""
    if distributed.init_from_env() and not distributed.is_main():
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - for the rest of the process


def _progress(quiet: bool) -> bool:
    """Whether to show progress bars: unless ``--quiet``, on rank 0 only."""
    return not quiet and distributed.is_main()


class _StderrHandler(logging.Handler):
    """Writes log records to the current ``sys.stderr`` (test runners swap it per command)."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(self.format(record), err=True)


def _log_to_stderr() -> None:
    """Show the library's info lines (e.g. where a backend runs each layer) on stderr, once."""
    logger = logging.getLogger("tacdiff")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _backend(value: str) -> str:
    """Option callback: one of the execution backends."""
    from tacdiff.backends import check_backend

    try:
        check_backend(value)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    return value


def _device(value: str) -> str:
    """Option callback: a torch device this machine has; ``auto`` is cuda when available, else cpu."""
    from tacdiff.devices import check_device

    if value == "auto":
        import torch

        value = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_device(value)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    return distributed.local_device(value)


def _bit_width(value: int) -> int:
    """Option callback: a bit width the quantizer supports."""
    from tacdiff.quant.primitives import check_bits

    try:
        return check_bits(value, "a bit width")
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def _bit_width_or_off(value: int) -> int:
    """Option callback: a bit width, or 0 for off."""
    return value if value == 0 else _bit_width(value)


def _positive(value: int | None) -> int | None:
    """Option callback: a count of at least 1 (or None: not given)."""
    if value is not None and value < 1:
        raise typer.BadParameter(f"must be at least 1, got {value}")
    return value


FORCE_TABLES_HELP = ("Apply --tables fitted for another model, noise schedule or guidance scale (warns instead "
                     "of failing; another step count always fails).")
PROMPT = typer.Option([], "--prompt", help="Prompt (repeatable; image i gets prompt i mod n). Text-to-image "
                                             "pipelines only; default: a built-in list of everyday captions.")
PROMPTS_FILE = typer.Option(None, "--prompts-file", help="Text file with one prompt per line (instead of --prompt).")
NEGATIVE_PROMPT = typer.Option(None, "--negative-prompt", help="Prompt to guide away from (default: the empty one).")
TRAIN_SEED = typer.Option(0, help="Seed for the initial weights and every random draw.")
TRAIN_LR = typer.Option(3e-4, help="AdamW learning rate after warm-up (every stage).")
QUIET = typer.Option(False, help="Hide progress bars.")
TRAIN_DEVICE = typer.Option("auto", help="torch device; 'auto' picks cuda when available.", callback=_device)
DATA_DIR = typer.Option(None, help="Folder with the Fashion-MNIST *-ubyte.gz files.")
LATENT_EMA_DECAY = typer.Option(0.999, help="Decay of the weight EMA that is exported.")
LATENT_CHECKPOINT_EVERY = typer.Option(500, help="Steps between checkpoints.", callback=_positive)
BACKEND = typer.Option("fake", "--backend", callback=_backend,
                       help="How quantized layers run: fake (simulated in float), int8 (integer kernels where "
                            "exact; the rest fake) or auto (int8 only where measured faster here, at --batch-size).")
SCHEDULER_HELP = ("auto (flow for a flow-matching model, else ddim), ddim, ddpm, dpm, euler or flow (flow matching), "
                  "built from the model's scheduler config.")
SCHEDULER = typer.Option("auto", help=SCHEDULER_HELP)
GUIDANCE_SCALE = typer.Option(None, "--guidance-scale", help="Classifier-free guidance scale (default: the "
                                                             "pipeline's own: 7.5 SD, 7 SD3, 4.5 PixArt, 4 DiT; <= 1 "
                                                             "turns guidance off). Tables only fit their own scale.")
CLASS = typer.Option([], "--class", help="Class name (repeatable; image i gets class i mod n). Class-conditional "
                                         "pipelines with named classes (DiTPipeline) only; default: every class.")


def _prompt_options(prompt: list[str], prompts_file: str | None, negative_prompt: str | None,
                    guidance_scale: float | None, classes: list[str] | None = None) -> PromptOptions:
    """The :class:`~tacdiff.sampling.conditioning.PromptOptions` of the prompt options (and ``--class``)."""
    from tacdiff.data.prompts import read_prompts
    from tacdiff.sampling.conditioning import PromptOptions  # here, not at the top: it loads torch

    if prompt and prompts_file:
        raise ValueError("pass --prompt or --prompts-file, not both")
    prompts = tuple(prompt) if prompt else tuple(read_prompts(prompts_file)) if prompts_file else None
    return PromptOptions(prompts, negative_prompt, guidance_scale, tuple(classes) if classes else None)


@app.command()
def demo(
    out: str = typer.Option("tacdiff-demo", "--out", help="Folder for the sample grid."),
    samples: int = typer.Option(16, help="Images per model (paired: same noise for every model).", callback=_positive),
    steps: int = typer.Option(50, help="DDIM steps.", callback=_positive),
    seed: int = typer.Option(0, help="Seed for calibration and sampling noise."),
    quiet: bool = QUIET,
) -> None:
    """Quantize the bundled Fashion-MNIST model to W8A8 and W4A8, correct W4A8 with TAC, compare with FP."""
    from tacdiff.workflows import run_demo

    rows = run_demo(out, samples=samples, steps=steps, seed=seed, progress=_progress(quiet))
    typer.echo(f"bundled Fashion-MNIST DDPM, DDIM {steps} steps, {samples} paired samples, seed {seed}")
    typer.echo("| bits | quantize / fit s | eps SQNR dB | x0 MSE vs FP | x0 PSNR dB |")
    typer.echo("|---|---|---|---|---|")
    for r in rows:
        sqnr = "-" if r["eps_sqnr_db"] is None else f"{r['eps_sqnr_db']:.2f}"
        typer.echo(f"| {r['bits']} | {r['seconds']:.1f} | {sqnr} | {r['x0_mse']:.5f} | {r['x0_psnr_db']:.2f} |")
    typer.echo(f"wrote {out}/samples.png (rows: FP, then each setting)")


@app.command()
def quantize(
    model_dir: str = typer.Argument(..., help="A diffusers model or pipeline folder, or a bundled model "
                                               f"({BUNDLED})."),
    out: str = typer.Option(..., "--out", help="Output folder for the quantized artifact."),
    w_bits: int = typer.Option(8, "--w-bits", help="Weight bits (2-8), per output channel.", callback=_bit_width),
    a_bits: int = typer.Option(8, "--a-bits", help="Activation bits (2-8); 0 quantizes weights only.",
                               callback=_bit_width_or_off),
    weight_rounding: str = typer.Option("rtn", help="rtn (round to nearest), gptq (error-compensating, "
                                                    "seconds) or adaround (learned, minutes)."),
    weight_range: str = typer.Option("mse", help="Weight clipping: minmax, percentile or mse."),
    weight_symmetric: bool = typer.Option(False, help="Symmetric weight ranges (zero at code 2^(bits-1)): at 8 bits "
                                                      "the int8 backend then needs no zero-point channel (faster)."),
    act_range: str = typer.Option("mse", help="Activation range: minmax, percentile or mse (calibrated), or "
                                              "dynamic (min-max at run time, per token or per sample)."),
    act_block_size: int = typer.Option(0, help="With --act-range dynamic: one range per token and block of this "
                                               "many channels in every conv/linear input, for block-scaled "
                                               "int8 matmuls (e.g. 32, as in MX formats); 0 = off."),
    smooth_alpha: float = typer.Option(None, help="SmoothQuant channel balancing of the linear layers reading "
                                                  "normalised tokens (transformer blocks' attention projections "
                                                  "and first MLP layer), migration strength in [0, 1]; e.g. 0.5."),
    timestep_groups: int = typer.Option(1, help="Activation ranges per quantizer, picked by timestep.",
                                        callback=_positive),
    first_last_bits: int = typer.Option(8, help="Bits for the first and last layer; 0 treats them like the rest.",
                                        callback=_bit_width_or_off),
    quantize_embeddings: bool = typer.Option(False, help="Also quantize embedding tables (class labels; one per "
                                                         "DiT block) weight-only at --w-bits: a smaller artifact."),
    exclude: list[str] = typer.Option([], help="fnmatch pattern of module names to keep in float (repeatable)."),
    split_shortcut: bool = typer.Option(True, help="Quantize the halves of up-block skip concatenations apart."),
    adaround_iters: int = typer.Option(500, help="Learned-rounding steps per block.", callback=_positive),
    scheduler: str = typer.Option(None, help="Scheduler folder (default: the pipeline's, else linear DDPM-1000)."),
    calib_samples: int = typer.Option(64, help="Calibration trajectories.", callback=_positive),
    calib_steps: int = typer.Option(50, help="DDIM steps per calibration trajectory.", callback=_positive),
    calib_kept_steps: int = typer.Option(None, help="Steps per trajectory kept as calibration inputs [default: 25, "
                                         "or every step of shorter trajectories].", callback=_positive),
    batch_size: int = typer.Option(64, help="Calibration trajectories sampled at once (the unit of work that "
                                            "processes share under torchrun).", callback=_positive),
    seed: int = typer.Option(0, help="Seed for calibration noise and every random choice."),
    prompt: list[str] = PROMPT,
    prompts_file: str = PROMPTS_FILE,
    negative_prompt: str = NEGATIVE_PROMPT,
    guidance_scale: float = GUIDANCE_SCALE,
    quantize_text_encoder: bool = typer.Option(False, help="Also quantize the pipeline's text encoders (SD3: all "
                                                           "three; weights only, --w-bits, round to nearest)."),
    quantize_vae_decoder: bool = typer.Option(False, help="Also quantize the pipeline's autoencoder decoder "
                                                          "(weights only, --w-bits, round to nearest)."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda.", callback=_device),
    overwrite: bool = typer.Option(False, help="Replace OUT if it is an artifact tacdiff wrote (nothing else)."),
    quiet: bool = typer.Option(False, help="Hide progress bars and the layer table."),
) -> None:
    """Quantize the UNet of a diffusers model or pipeline folder; write integer weights, ranges and metadata."""
    _refuse_existing_out(out, overwrite, model_dir)
    from tacdiff.quant import QuantConfig, format_summary
    from tacdiff.workflows import CalibrationSettings, quantize_dir

    config = QuantConfig(weight_bits=w_bits, act_bits=a_bits or None, weight_rounding=weight_rounding,
                         weight_range=weight_range, weight_symmetric=weight_symmetric, act_range=act_range,
                         act_block_size=act_block_size or None, smooth_alpha=smooth_alpha,
                         timestep_groups=timestep_groups, first_last_bits=first_last_bits or None,
                         quantize_embeddings=quantize_embeddings, exclude=tuple(exclude), split_shortcut=split_shortcut,
                         adaround_iters=adaround_iters, seed=seed)
    if calib_kept_steps is None:
        calib_kept_steps = min(CalibrationSettings.kept_steps, calib_steps)
    if calib_kept_steps > calib_steps:
        raise ValueError(f"--calib-kept-steps {calib_kept_steps} is more than the {calib_steps} steps of each "
                         "calibration trajectory; pass --calib-kept-steps <= --calib-steps")
    calibration = CalibrationSettings(calib_samples, calib_steps, calib_kept_steps, seed, batch_size)
    prompts = _prompt_options(prompt, prompts_file, negative_prompt, guidance_scale)
    wanted = {"text_encoder": quantize_text_encoder, "vae_decoder": quantize_vae_decoder}
    components = tuple(name for name, on in wanted.items() if on)
    path, model, sqnr = quantize_dir(model_dir, out, config, scheduler_path=scheduler, calibration=calibration,
                                     prompts=prompts, components=components, device=device, overwrite=overwrite,
                                     progress=_progress(quiet))
    if _progress(quiet):
        typer.echo(format_summary(model))
    typer.echo(f"W{w_bits}A{a_bits or 'fp'}: output SQNR {sqnr:.2f} dB on held-out inputs; wrote {path}")


@app.command()
def train(
    out_dir: str = typer.Argument(..., help="Run folder; resumes from OUT_DIR/checkpoint/ when present."),
    steps: int = typer.Option(6000, help="Total optimizer steps (6000 built the bundled model).", callback=_positive),
    batch_size: int = typer.Option(256, help="Images per step.", callback=_positive),
    lr: float = TRAIN_LR,
    seed: int = TRAIN_SEED,
    ema_decay: float = typer.Option(0.9995, help="Decay of the weight EMA that is exported."),
    checkpoint_every: int = typer.Option(1000, help="Steps between checkpoints.", callback=_positive),
    device: str = TRAIN_DEVICE,
    data_dir: str = DATA_DIR,
    quiet: bool = QUIET,
) -> None:
    """Train the reference DDPM (UNet2DModel, epsilon prediction) on Fashion-MNIST."""
    from tacdiff.models.train import train as train_model

    out = train_model(out_dir, steps=steps, batch_size=batch_size, lr=lr, seed=seed, ema_decay=ema_decay,
                      checkpoint_every=checkpoint_every, device=device, data_dir=data_dir, progress=_progress(quiet))
    typer.echo(f"wrote {out / 'unet'}, {out / 'scheduler'} and {out / 'training.json'}")


@app.command("train-latent")
def train_latent(
    out_dir: str = typer.Argument(..., help="Run folder; each stage resumes from its checkpoint there."),
    autoencoder_steps: int = typer.Option(3000, help="Autoencoder steps (stage 1).", callback=_positive),
    unet_steps: int = typer.Option(20000, help="UNet and text-encoder steps (stage 2).", callback=_positive),
    batch_size: int = typer.Option(128, help="Images per step.", callback=_positive),
    lr: float = TRAIN_LR,
    seed: int = TRAIN_SEED,
    ema_decay: float = LATENT_EMA_DECAY,
    checkpoint_every: int = LATENT_CHECKPOINT_EVERY,
    device: str = TRAIN_DEVICE,
    data_dir: str = DATA_DIR,
    quiet: bool = QUIET,
) -> None:
    """Train a small text-to-image latent diffusion pipeline (AutoencoderKL, text-conditioned UNet, CLIP text
    encoder) on Fashion-MNIST class captions; writes OUT_DIR/pipeline (a StableDiffusionPipeline folder)."""
    from tacdiff.models.train_latent import train_latent as run

    out = run(out_dir, autoencoder_steps=autoencoder_steps, unet_steps=unet_steps, batch_size=batch_size, lr=lr,
              seed=seed, ema_decay=ema_decay, checkpoint_every=checkpoint_every, device=device, data_dir=data_dir,
              progress=_progress(quiet))
    typer.echo(f"wrote {out / 'pipeline'} and {out / 'training.json'}")


@app.command("train-dit")
def train_dit(
    out_dir: str = typer.Argument(..., help="Run folder; training resumes from its checkpoint there."),
    steps: int = typer.Option(8000, help="Optimizer steps.", callback=_positive),
    batch_size: int = typer.Option(128, help="Latents per step.", callback=_positive),
    lr: float = TRAIN_LR,
    seed: int = TRAIN_SEED,
    ema_decay: float = LATENT_EMA_DECAY,
    checkpoint_every: int = LATENT_CHECKPOINT_EVERY,
    device: str = TRAIN_DEVICE,
    data_dir: str = DATA_DIR,
    quiet: bool = QUIET,
) -> None:
    """Train a small class-conditional DiT on the latent reference's autoencoder latents of Fashion-MNIST;
    writes OUT_DIR/pipeline (a DiTPipeline folder with the class names)."""
    from tacdiff.models.train_dit import train_dit as run

    out = run(out_dir, steps=steps, batch_size=batch_size, lr=lr, seed=seed, ema_decay=ema_decay,
              checkpoint_every=checkpoint_every, device=device, data_dir=data_dir, progress=_progress(quiet))
    typer.echo(f"wrote {out / 'pipeline'} and {out / 'training.json'}")


@app.command()
def eval(  # noqa: A001 - the command is `tacdiff eval`
    model: str = typer.Argument(..., help="FP diffusers model or pipeline folder, quantized artifact "
                               f"folder, or a bundled model ({BUNDLED})."),
    fp_model: str = typer.Option(None, "--fp-model", help="FP model to pair with for x0 MSE/PSNR/SSIM "
                                                           f"(folder, or {BUNDLED}); omit to skip them."),
    scheduler: str = SCHEDULER,
    steps: int = typer.Option(50, help="Sampling steps.", callback=_positive),
    samples: int = typer.Option(1000, help="Images to sample.", callback=_positive),
    seed: int = typer.Option(0, help="Seed of the starting and per-step noise."),
    batch_size: int = typer.Option(256, help="Trajectories sampled at once.", callback=_positive),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda.", callback=_device),
    tables: str = typer.Option(None, "--tables", help="Correction tables (tacdiff calibrate --out) to apply to MODEL; "
                                                      "calibrated for this scheduler and step count."),
    force_tables: bool = typer.Option(False, "--force-tables", help=FORCE_TABLES_HELP),
    json_path: str = typer.Option(None, "--json", help="Write the results here as JSON (atomically)."),
    prompt: list[str] = PROMPT,
    prompts_file: str = PROMPTS_FILE,
    negative_prompt: str = NEGATIVE_PROMPT,
    guidance_scale: float = GUIDANCE_SCALE,
    class_: list[str] = CLASS,
    backend: str = BACKEND,
    quiet: bool = QUIET,
) -> None:
    """Sample a model or pipeline and report FID/KID (grayscale, 28x28 or larger) and, with --fp-model, paired
    x0 MSE/PSNR/SSIM (on decoded images for latent pipelines)."""
    from tacdiff.evaluation import evaluate, format_table
    from tacdiff.report.json import write_json
    from tacdiff.models.loading import input_paths

    _check_reports({"JSON file": json_path}, inputs=input_paths(model, fp_model, tables, prompts_file))
    result = evaluate(model, fp_model=fp_model, scheduler=scheduler, steps=steps, samples=samples, seed=seed,
                      batch_size=batch_size, device=device, tables=tables, force_tables=force_tables,
                      prompts=_prompt_options(prompt, prompts_file, negative_prompt, guidance_scale, class_),
                      backend=backend, progress=_progress(quiet))
    typer.echo(format_table(result))
    if json_path:
        typer.echo(f"wrote {write_json(json_path, result)}")


@app.command()
def sample(
    model: str = typer.Argument(..., help="FP diffusers model or pipeline folder, quantized artifact "
                               f"folder, or a bundled model ({BUNDLED})."),
    out: str = typer.Option(..., "--out", help="Folder for the PNG files, grid.png and samples.json."),
    tables: str = typer.Option(None, "--tables", help="Correction tables (tacdiff calibrate --out) for MODEL."),
    force_tables: bool = typer.Option(False, "--force-tables", help=FORCE_TABLES_HELP),
    num_samples: int = typer.Option(16, "--num-samples", help="Images to write.", callback=_positive),
    steps: int = typer.Option(50, help="Sampling steps.", callback=_positive),
    scheduler: str = SCHEDULER,
    seed: int = typer.Option(0, help="Image i starts from noise seeded by (seed, i) alone."),
    batch_size: int = typer.Option(16, help="Images sampled at once.", callback=_positive),
    prompt: list[str] = PROMPT,
    prompts_file: str = PROMPTS_FILE,
    negative_prompt: str = NEGATIVE_PROMPT,
    guidance_scale: float = GUIDANCE_SCALE,
    class_: list[str] = CLASS,
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda.", callback=_device),
    backend: str = BACKEND,
    overwrite: bool = typer.Option(False, help="Replace OUT if it is a samples folder tacdiff wrote."),
    quiet: bool = QUIET,
) -> None:
    """Sample a model or pipeline (FP, quantized or corrected) and write one PNG per image and a grid."""
    _refuse_existing_out(out, overwrite, model, tables)
    from tacdiff.workflows import sample_dir

    prompts = _prompt_options(prompt, prompts_file, negative_prompt, guidance_scale, class_)
    path = sample_dir(model, out, tables=tables, force_tables=force_tables, prompts=prompts,
                      num_samples=num_samples, steps=steps, scheduler=scheduler, seed=seed, batch_size=batch_size,
                      device=device, backend=backend, overwrite=overwrite, progress=_progress(quiet))
    typer.echo(f"wrote {num_samples} images, grid.png and samples.json to {path}")


# TAC's hyper-parameters (calibrate and bench); the defaults are tacdiff.correction.calibrate's DEFAULT_*
LAM = typer.Option(0.5, help="NER: weight of the relative-distortion term (0..1).")
GAMMA = typer.Option(0.0, help="NER: pull of the scales towards 1.")
TAU = typer.Option(2.0, help="NER: mask |r| > tau * mean|r| for the relative term.")
IBC = typer.Option("element", help="IBC granularity: channel, element or shrunk (per element, James-Stein shrunk "
                                   "towards the channel mean).")
IBC_TARGET = typer.Option("state", help="IBC shifts the sampler 'state' (tacdiff's loop and load_pipeline) or only "
                                        "the network 'input' (a plain UNet wrapper).")
GUIDANCE_FIT = typer.Option("guided", help="With guidance (tac, ner, ibc): fit NER on the 'guided' estimate, or one "
                                           "scale per 'branch' (unconditional and conditional).")
NER_BIAS = typer.Option(False, help="NER also fits a per-channel bias, K (q - b) (not in the paper).")


@app.command()
def calibrate(
    quant_artifact: str = typer.Argument(..., help="Quantized artifact folder (tacdiff quantize --out)."),
    fp_model: str = typer.Option(..., "--fp-model", help="The FP model it was quantized from (folder, "
                                  f"or {BUNDLED})."),
    out: str = typer.Option(..., "--out", help="Correction tables file to write (.safetensors)."),
    method: str = typer.Option("tac", help="tac (IBC+NER), ner, ibc or ptqd."),
    steps: int = typer.Option(50, help="Sampling steps; the tables only fit this step count.", callback=_positive),
    scheduler: str = typer.Option("auto", help=f"{SCHEDULER_HELP} The tables only fit this sampler."),
    samples: int = typer.Option(256, help="Calibration trajectories (advanced together).", callback=_positive),
    batch_size: int = typer.Option(64, help="Samples per network call.", callback=_positive),
    seed: int = typer.Option(0, help="Seed of the starting and per-step noise."),
    lam: float = LAM,
    gamma: float = GAMMA,
    tau: float = TAU,
    ibc: str = IBC,
    ibc_target: str = IBC_TARGET,
    prompt: list[str] = PROMPT,
    prompts_file: str = PROMPTS_FILE,
    negative_prompt: str = NEGATIVE_PROMPT,
    guidance_scale: float = GUIDANCE_SCALE,
    guidance_fit: str = GUIDANCE_FIT,
    ner_bias: bool = NER_BIAS,
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda.", callback=_device),
    backend: str = typer.Option("fake", "--backend", callback=_backend,
                                help="How the quantized model runs while fitting: fake, int8 or auto. The tables "
                                     "apply on any backend but fit the one they were fitted on best: fit on the "
                                     "backend you sample with."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it is a tables file tacdiff wrote (nothing else)."),
    plot: str = typer.Option(None, "--plot", help="Also draw the tables here (e.g. .png): a heat map of the output "
                                                  "scales over steps x channels, and IBC's bias size per step."),
    quiet: bool = QUIET,
) -> None:
    """Fit per-timestep correction tables (TAC, its ablations or PTQD) for a quantized model."""
    _refuse_existing_out(out, overwrite, quant_artifact, fp_model)
    from tacdiff.correction.workflow import calibrate_artifact
    from tacdiff.models.loading import input_paths
    from tacdiff.report.plots import plot_tables

    _check_reports({"plot": plot}, inputs=input_paths(quant_artifact, fp_model, prompts_file, out))
    path, tables = calibrate_artifact(quant_artifact, fp_model, out, method=method, scheduler=scheduler,
                                      steps=steps, samples=samples, batch_size=batch_size, seed=seed, lam=lam,
                                      gamma=gamma, tau=tau, ibc=ibc, ibc_target=ibc_target, guidance_fit=guidance_fit,
                                      ner_bias=ner_bias,
                                      prompts=_prompt_options(prompt, prompts_file, negative_prompt, guidance_scale),
                                      device=device, backend=backend, overwrite=overwrite,
                                      progress=_progress(quiet))
    typer.echo(f"{tables.method}: {tables.describe()}; wrote {path}")
    if plot:
        title = f"{Path(quant_artifact).name}, {tables.scheduler_class} {steps}"
        typer.echo(f"wrote {plot_tables(tables, plot, title=title)}")


@app.command()
def bench(
    json_path: str = typer.Option(None, "--json", help="Write the rows here as a JSON list (atomically)."),
    markdown: str = typer.Option(None, "--markdown", help="Write the table here as markdown (atomically)."),
    plot: str = typer.Option(None, "--plot", help="Write the per-timestep error plot here (e.g. .png)."),
    grid: str = typer.Option(None, "--grid", help="Write a .png grid of each row's first images here (the same "
                                                  "noise and prompts for every method)."),
    samples: int = typer.Option(1000, help="Evaluation images per method (paired: the same noise for all).",
                                callback=_positive),
    calib_samples: int = typer.Option(256, help="Calibration trajectories for the correction tables.",
                                      callback=_positive),
    bits: list[str] = typer.Option(["w8a8", "w4a8", "w3a8"], "--bits",
                                   help="Setting like w4a8, or w8a8-sym for symmetric weights (repeatable)."),
    steps: list[int] = typer.Option([50, 100], "--steps", help="DDIM step count (repeatable)."),
    method: list[str] = typer.Option(["fp", "ptq", "ptqd", "ner", "ibc", "tac"], "--method",
                                     help="Rows to report (repeatable): fp, ptq, ptqd, ner, ibc, tac."),
    seed: int = typer.Option(0, help="Derives the quantization, calibration and (distinct) evaluation seeds."),
    batch_size: int = typer.Option(256, help="Trajectories per sampling batch; samples per calibration call.",
                                   callback=_positive),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda.", callback=_device),
    weight_rounding: str = typer.Option("rtn", help="PTQ's weight rounding: rtn, gptq or adaround (learned: "
                                        "minutes per bit setting on a CPU)."),
    act_range: str = typer.Option("mse", help="PTQ's activation ranges: minmax, percentile, mse or dynamic."),
    smooth_alpha: float = typer.Option(None, help="PTQ's SmoothQuant channel balancing strength (see quantize)."),
    timestep_groups: int = typer.Option(1, help="PTQ's activation ranges per quantizer, picked by timestep.",
                                        callback=_positive),
    model: str = typer.Option("reference", "--model", help="FP model or pipeline folder, or a bundled model "
                                                           f"({BUNDLED})."),
    prompt: list[str] = PROMPT,
    prompts_file: str = PROMPTS_FILE,
    negative_prompt: str = NEGATIVE_PROMPT,
    guidance_scale: float = GUIDANCE_SCALE,
    lam: float = LAM,
    gamma: float = GAMMA,
    tau: float = TAU,
    ibc: str = IBC,
    ibc_target: str = IBC_TARGET,
    guidance_fit: str = GUIDANCE_FIT,
    ner_bias: bool = NER_BIAS,
    backend: str = BACKEND,
    quiet: bool = QUIET,
) -> None:
    """Benchmark FP, PTQ, PTQD and TAC (with NER/IBC ablations) on one model: FID, KID, x0 error, time. The TAC
    options apply to the tac, ner and ibc rows."""
    from tacdiff.bench import bench as run
    from tacdiff.bench import format_markdown, format_settings
    from tacdiff.io.atomic import write_text_atomically
    from tacdiff.report.json import write_json
    from tacdiff.models.loading import input_paths
    from tacdiff.report.plots import plot_step_errors

    _check_reports({"JSON file": json_path, "markdown file": markdown, "plot": plot, "sample grid": grid},
                   inputs=input_paths(model, prompts_file))
    result = run(bits=tuple(bits), steps=tuple(steps), methods=tuple(method), samples=samples,
                 calib_samples=calib_samples, seed=seed, batch_size=batch_size, device=device,
                 weight_rounding=weight_rounding, model=model, act_range=act_range, smooth_alpha=smooth_alpha,
                 timestep_groups=timestep_groups,
                 prompts=_prompt_options(prompt, prompts_file, negative_prompt, guidance_scale), backend=backend,
                 tac_options=dict(lam=lam, gamma=gamma, tau=tau, ibc=ibc, ibc_target=ibc_target,
                                  guidance_fit=guidance_fit, ner_bias=ner_bias),
                 progress=_progress(quiet))
    table = f"{format_settings(result.settings)}\n\n{format_markdown(result.rows)}"
    typer.echo(table)
    if json_path:
        typer.echo(f"wrote {write_json(json_path, {'settings': result.settings, 'rows': result.rows})}")
    if markdown:
        path = write_text_atomically(markdown, table + "\n")
        typer.echo(f"wrote {path}")
    if plot and result.step_errors:
        typer.echo(f"wrote {plot_step_errors(result.step_errors, result.timesteps, plot)}")
    if grid:
        typer.echo(f"wrote {result.save_grid(grid)}")


@app.command("bench-speed")
def bench_speed(
    model: list[str] = typer.Option(["reference"], "--model", help=f"Model to time (repeatable): {BUNDLED}, a "
                                    "diffusers model or pipeline folder, or a folder holding only a model "
                                    "config.json (random weights)."),
    batch: list[int] = typer.Option([1, 8, 64], "--batch", help="Batch size per call (repeatable)."),
    bits: list[str] = typer.Option(["w8a8", "w8a8-sym", "w4a8"], "--bits", help="Quantized setting like w4a8; "
                                   "-sym for symmetric weights, e.g. w8a8-sym (repeatable)."),
    repeats: int = typer.Option(3, help="Least timed calls per variant and batch size (the fastest counts; short "
                                        "calls repeat for 2 s).", callback=_positive),
    json_path: str = typer.Option(None, "--json", help="Write the report here as JSON (atomically)."),
    markdown: str = typer.Option(None, "--markdown", help="Write the tables here as markdown (atomically)."),
    quantize_embeddings: bool = typer.Option(False, help="Also quantize embedding tables (as tacdiff quantize "
                                                         "--quantize-embeddings)."),
    quiet: bool = QUIET,
) -> None:
    """Time FP32, bf16, fake-quant and int8 per denoiser call side by side; weight and activation memory,
    artifact size against the FP32 file, load time (CPU)."""
    from tacdiff.devices import machine_line
    from tacdiff.io.atomic import write_text_atomically
    from tacdiff.quant.config import parse_setting
    from tacdiff.report.json import write_json
    from tacdiff.speed import format_speed_markdown, measure_speed, model_for_speed, timed_config

    for setting in bits:
        parse_setting(setting)
    for spec in model:
        timed_config(spec)
    if any(b < 1 for b in batch):
        raise typer.BadParameter("batch sizes must be >= 1", param_hint="--batch")
    _check_reports({"JSON file": json_path, "markdown file": markdown}, inputs=[])
    report: dict[str, list] = {"calls": [], "artifacts": []}
    for spec in model:
        part = measure_speed(spec, model_for_speed(spec), bits=tuple(bits), batches=tuple(batch), repeats=repeats,
                             quantize_embeddings=quantize_embeddings, progress=_progress(quiet))
        for key in report:
            report[key] += part[key]
    machine = machine_line()
    table = f"Machine: {machine}. Speed-ups are against FP32 at the same batch size.\n\n{format_speed_markdown(report)}"
    typer.echo(table)
    if json_path:
        typer.echo(f"wrote {write_json(json_path, {'machine': machine, **report})}")
    if markdown:
        typer.echo(f"wrote {write_text_atomically(markdown, table + chr(10))}")
