"""Scale check on the real Stable Diffusion 1.5 UNet config (random weights) inside a StableDiffusionPipeline
folder with a random 768-wide CLIP text encoder and a small autoencoder: calibration inputs with prompts and
classifier-free guidance, `tacdiff quantize` (W8A8) and `tacdiff calibrate` (TAC) on the folder, at 64x64
latents, with seconds per stage and the process's peak resident memory.

Usage: python benchmarks/sd_scale.py [--config ../shared/configs/sd-1.5-unet] [--latent 64] [--samples 2]
       [--steps 2] [--batch-size 1] [--guidance-scale 7.5] [--device cpu] [--markdown benchmarks/results/sd_scale.md]

Nothing is downloaded: the UNet is built from its config with seeded random weights, the tokenizer from a
character vocabulary (:mod:`tacdiff.models.text`), and the pipeline is saved with ``save_pretrained`` and
run through the same functions as the command line (``quantize_dir``, ``calibrate_artifact``), prompts from
the built-in default list. Peak memory is ``ru_maxrss`` after each stage (a running maximum), so it shows
what each stage added on top of the stages before it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

import tacdiff
from tacdiff.correction.workflow import calibrate_artifact
from tacdiff.io.atomic import write_text_atomically
from tacdiff.models.loading import load_any_model
from tacdiff.models.pipelines import SD_SCHEDULER_CONFIG, stable_diffusion
from tacdiff.models.text import character_tokenizer, random_text_encoder
from tacdiff.sampling.conditioning import PromptOptions, conditioning_for
from tacdiff.workflows import CalibrationSettings, calibrate_inputs, quantize_dir

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "configs" / "sd-1.5-unet"


def peak_rss_gib() -> float:
    """The process's peak resident set size so far, in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_gpu_gib() -> float | None:
    """The peak GPU memory PyTorch has allocated so far, in GiB (None when CUDA was not used)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_initialized() else None


class Stages:
    """Seconds, seconds per step, peak RSS and peak GPU memory of each stage of a scale check, printed as
    they finish."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float | None, float, float | None]] = []

    def done(self, name: str, started: float, per_step: int | None = None) -> None:
        seconds = time.perf_counter() - started
        self.rows.append((name, seconds, None if per_step is None else seconds / per_step, peak_rss_gib(),
                          peak_gpu_gib()))
        gpu = "" if self.rows[-1][4] is None else f", peak GPU {self.rows[-1][4]:.2f} GiB"
        print(f"{name}: {seconds:.1f} s, peak RSS {self.rows[-1][3]:.2f} GiB{gpu}", flush=True)

    def report(self, model: str, args: argparse.Namespace) -> None:
        """Print the table titled by ``model`` and the run's batch, device and machine; write it to
        ``args.markdown`` when given."""
        device = args.device
        if device.startswith("cuda"):
            device += f" ({torch.cuda.get_device_name(torch.device(device))})"
        text = self.markdown(f"{model}, batch {args.batch_size}, {device}, torch {torch.__version__}, "
                             f"{torch.get_num_threads()} threads, {platform.machine()}")
        print(text)
        if args.markdown:
            write_text_atomically(args.markdown, text + "\n")

    def markdown(self, title: str) -> str:
        gpu = any(row[4] is not None for row in self.rows)
        lines = [title, "", "| stage | seconds | seconds per step | peak RSS GiB |" + (" peak GPU GiB |" * gpu),
                 "|---|---|---|---|" + "---|" * gpu]
        lines += [f"| {name} | {sec:.1f} | {'-' if per is None else f'{per:.1f}'} | {rss:.2f} |"
                  + (f" {gpu_gib or 0:.2f} |" if gpu else "") for name, sec, per, rss, gpu_gib in self.rows]
        return "\n".join(lines)


def scale_parser(doc: str) -> argparse.ArgumentParser:
    """The options every scale check takes: calibration trajectories and steps, batch size, device, output."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", type=Path)
    return parser


def quantize_and_calibrate(stages: Stages, folder: Path, work: Path, settings: CalibrationSettings,
                           args: argparse.Namespace, *, inputs: str, trajectories: str,
                           prompts: PromptOptions = PromptOptions()) -> None:
    """Time ``tacdiff quantize`` (W8A8, MSE ranges, into ``work/w8a8``) and ``tacdiff calibrate`` (TAC) on
    ``folder`` as stages; ``inputs`` and ``trajectories`` describe the calibration work in the stage names."""
    started = time.perf_counter()
    quantize_dir(folder, work / "w8a8", tacdiff.QuantConfig(weight_bits=8, act_bits=8), calibration=settings,
                 prompts=prompts, device=args.device, progress=False)
    stages.done(f"tacdiff quantize W8A8 ({inputs}, MSE ranges, held-out SQNR, artifact)", started)

    started = time.perf_counter()
    calibrate_artifact(work / "w8a8", folder, work / "tac.safetensors", steps=args.steps, samples=args.samples,
                       batch_size=args.batch_size, prompts=prompts, device=args.device, progress=False)
    stages.done(f"tacdiff calibrate TAC ({args.samples} paired {trajectories}, {args.steps} steps)", started,
                args.steps)


def save_pipeline(config_dir: Path, latent: int, folder: Path) -> int:
    """Save the scale-check pipeline to ``folder``; return the UNet's parameter count."""
    config = json.loads((config_dir / "config.json").read_text())
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**config, "sample_size": latent}).eval()
    tokenizer = character_tokenizer(folder.parent / "vocab")
    text_encoder = random_text_encoder(tokenizer, unet.config.cross_attention_dim, heads=12)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32)
    stable_diffusion(unet, vae, text_encoder, tokenizer).save_pretrained(folder)
    return sum(p.numel() for p in unet.parameters())


def main() -> None:
    parser = scale_parser(__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    args = parser.parse_args()
    stages = Stages()
    stage = stages.done

    prompts = PromptOptions(guidance_scale=args.guidance_scale)
    settings = CalibrationSettings(args.samples, args.steps, args.steps, 0)
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "sd"
        started = time.perf_counter()
        params = save_pipeline(args.config, args.latent, folder)
        stage(f"build and save the pipeline (UNet {params / 1e6:.0f}M parameters)", started)

        started = time.perf_counter()
        loaded = load_any_model(folder, args.device)
        calibrate_inputs(loaded.model, DDIMScheduler(**SD_SCHEDULER_CONFIG), settings,
                         conditioning_for(loaded, prompts), progress=False)
        del loaded
        stage(f"load + calibration inputs ({args.samples} x {args.steps} guided DDIM steps)", started,
              args.samples * args.steps)
        quantize_and_calibrate(stages, folder, Path(work), settings, args, inputs="inputs",
                               trajectories="guided trajectories", prompts=prompts)

    stages.report(f"SD 1.5 UNet config, random weights, {args.latent}x{args.latent} latents, guidance "
                  f"{args.guidance_scale}", args)


if __name__ == "__main__":
    main()
