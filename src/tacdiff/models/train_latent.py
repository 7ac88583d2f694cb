"""``tacdiff train-latent``: a small text-to-image latent diffusion pipeline trained on Fashion-MNIST.

Stage 1 trains an ``AutoencoderKL`` (4 latent channels, 4x spatial downsampling of the images padded
to 32x32) on reconstruction (MSE plus a small KL term); the standard deviation of its latents sets
``scaling_factor``. Stage 2 encodes every training image once (posterior mean) and trains a
text-conditioned ``UNet2DConditionModel`` jointly with a small ``CLIPTextModel`` on class captions
(:func:`tacdiff.data.prompts.fashion_captions`, about 10% empty so classifier-free guidance works),
predicting the noise on Stable Diffusion's noise schedule, with a word-level tokenizer over the
captions' vocabulary (:func:`tacdiff.models.text.word_tokenizer`). Each stage resumes from its own
checkpoint (safetensors and JSON, as :mod:`tacdiff.models.train`); the EMA weights are exported as a
``StableDiffusionPipeline`` folder ``OUT/pipeline`` (no safety checker).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from tacdiff.data.fashion_mnist import load_fashion_mnist, to_canvas, to_model_space
from tacdiff.data.prompts import PIPELINE_PROMPTS, fashion_captions, fashion_prompts, fashion_vocabulary
from tacdiff.io.atomic import check_writable, write_dir_atomically, write_text_atomically
from tacdiff.models.pipelines import SD_SCHEDULER_CONFIG, stable_diffusion
from tacdiff.models.text import word_tokenizer
from tacdiff.models.train import (RUN_FORMAT, RUN_RECORD, TrainSettings, TrainState, in_run, is_checkpoint,
                                  check_steps, checkpoint_bytes, optimizer_step, resume_or_init,
                                  run_steps)
from tacdiff.sampling.batching import derive_seed

IMAGE_SIZE = 32  # Fashion-MNIST's 28x28, padded with background
TEXT_TOKENS = 16
KL_WEIGHT = 1e-6
NOISE_SCHEDULE = {key: SD_SCHEDULER_CONFIG[key] for key in ("beta_start", "beta_end", "beta_schedule")}
DEFAULT_CONFIGS: dict[str, dict[str, Any]] = {
    "autoencoder": dict(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 64], layers_per_block=1,
                        latent_channels=4, norm_num_groups=16, sample_size=IMAGE_SIZE),
    "unet": dict(sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, block_out_channels=[64, 128],
                 layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=64,
                 attention_head_dim=8, norm_num_groups=32),
    "text_encoder": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}


def train_latent(out_dir: str | Path, *, autoencoder_steps: int, unet_steps: int, batch_size: int = 128,
                 lr: float = 3e-4, seed: int = 0, ema_decay: float = 0.999, checkpoint_every: int = 500,
                 device: str | torch.device = "cpu", data_dir: str | Path | None = None,
                 configs: dict[str, dict[str, Any]] | None = None, warmup_steps: int = 200,
                 progress: bool = True) -> Path:
    """Train (or resume) both stages and write ``out_dir/pipeline`` and ``out_dir/training.json``.

    ``configs`` replaces :data:`DEFAULT_CONFIGS` (``autoencoder``, ``unet``, ``text_encoder``); the other
    arguments are as in :func:`tacdiff.models.train.train`, shared by both stages.
    """
    for name, value in (("autoencoder_steps", autoencoder_steps), ("unet_steps", unet_steps),
                        ("checkpoint_every", checkpoint_every)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    out_dir, device, configs = Path(out_dir), torch.device(device), configs or DEFAULT_CONFIGS
    _check_outputs(out_dir)
    images, labels = load_fashion_mnist("train", data_dir)
    data = to_canvas(to_model_space(images), IMAGE_SIZE).to(device)
    stage = dict(batch_size=batch_size, lr=lr, seed=seed, ema_decay=ema_decay, warmup_steps=warmup_steps)
    ae = _train_autoencoder(out_dir, data, TrainSettings(**stage, model_config={"autoencoder": configs["autoencoder"]}),
                            autoencoder_steps, checkpoint_every, progress)
    latents = encode_latents(ae, data)
    scaling = 1.0 / float(latents.std())
    ae.register_to_config(scaling_factor=scaling)
    tokenizer = word_tokenizer(fashion_vocabulary(), TEXT_TOKENS)
    unet_config = {"unet": configs["unet"], "text_encoder": _text_config(configs["text_encoder"], tokenizer),
                   "scaling_factor": scaling}
    state = _train_unet(out_dir, latents * scaling, labels.to(device), tokenizer,
                        TrainSettings(**stage, model_config=unet_config), unet_steps, checkpoint_every, progress)
    _export(out_dir, ae, state, tokenizer, configs, data_dir, seed)
    return out_dir


def _train_autoencoder(out_dir: Path, data: Tensor, settings: TrainSettings, steps: int, checkpoint_every: int,
                       progress: bool) -> AutoencoderKL:
    """Stage 1; returns the EMA autoencoder in eval mode."""
    state = resume_or_init(out_dir / "checkpoint-autoencoder", settings, data.device,
                           lambda config: AutoencoderKL(**config["autoencoder"]))
    _check_room(out_dir / "checkpoint-autoencoder", state)

    def step() -> Tensor:
        x = _batch(state, data, settings.batch_size)
        posterior = state.model.encode(x).latent_dist
        recon = state.model.decode(posterior.sample(generator=state.generator)).sample
        loss = nn.functional.mse_loss(recon, x) + KL_WEIGHT * posterior.kl().mean()
        return optimizer_step(state, loss, settings)

    check_steps(state, steps, out_dir / "checkpoint-autoencoder")
    run_steps(state, step, settings, steps, checkpoint_every, out_dir / "checkpoint-autoencoder", progress,
              desc="autoencoder")
    return state.ema.eval()


def _train_unet(out_dir: Path, latents: Tensor, labels: Tensor, tokenizer: PreTrainedTokenizerFast,
                settings: TrainSettings, steps: int, checkpoint_every: int, progress: bool) -> TrainState:
    """Stage 2: the UNet and the text encoder together, on scaled latents and per-step captions."""
    state = resume_or_init(out_dir / "checkpoint-unet", settings, latents.device, lambda c: nn.ModuleDict({
        "unet": UNet2DConditionModel(**c["unet"]), "text_encoder": CLIPTextModel(CLIPTextConfig(**c["text_encoder"]))}))
    _check_room(out_dir / "checkpoint-unet", state)
    scheduler = DDPMScheduler(**NOISE_SCHEDULE)

    def step() -> Tensor:
        gen, n = state.generator, settings.batch_size
        index = torch.randint(0, latents.shape[0], (n,), generator=gen, device=gen.device)
        captions = fashion_captions(labels[index].tolist(), derive_seed(settings.seed, "captions", state.step))
        ids = tokenizer(captions, padding="max_length", max_length=TEXT_TOKENS, truncation=True,
                        return_tensors="pt").input_ids.to(gen.device)
        z, t = latents[index], torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=gen,
                                             device=gen.device)
        noise = torch.randn(z.shape, generator=gen, device=gen.device)
        text = state.model["text_encoder"](ids)[0]
        pred = state.model["unet"](scheduler.add_noise(z, noise, t), t, encoder_hidden_states=text).sample
        return optimizer_step(state, nn.functional.mse_loss(pred, noise), settings)

    check_steps(state, steps, out_dir / "checkpoint-unet")
    run_steps(state, step, settings, steps, checkpoint_every, out_dir / "checkpoint-unet", progress, desc="unet")
    return state


def _batch(state: TrainState, data: Tensor, size: int) -> Tensor:
    gen = state.generator
    return data[torch.randint(0, data.shape[0], (size,), generator=gen, device=gen.device)]


@torch.no_grad()
def encode_latents(ae: AutoencoderKL, data: Tensor, batch: int = 1000) -> Tensor:
    """The posterior means of ``data`` (unscaled latents)."""
    return torch.cat([ae.encode(data[i:i + batch]).latent_dist.mean for i in range(0, data.shape[0], batch)])


def _text_config(config: dict[str, Any], tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """A ``CLIPTextConfig``'s fields for ``tokenizer``'s vocabulary and prompt length."""
    return {**config, "vocab_size": len(tokenizer), "max_position_embeddings": TEXT_TOKENS,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def _check_outputs(out_dir: Path) -> None:
    """Before any work: every output can be written and replaces only what this command wrote."""
    for name in ("checkpoint-autoencoder", "checkpoint-unet"):
        check_writable(out_dir / name, overwrite=True, recognise=is_checkpoint, what="training checkpoint",
                       folder=True)
    check_writable(out_dir / "pipeline", overwrite=True, recognise=in_run, what="training run's pipeline",
                   folder=True)
    check_writable(out_dir / RUN_RECORD, overwrite=True, recognise=in_run, what="training run's record")


def _check_room(ckpt_dir: Path, state: TrainState) -> None:
    """Free space for the checkpoint swaps of ``state``, before its stage starts."""
    check_writable(ckpt_dir, overwrite=True, recognise=is_checkpoint, what="training checkpoint", folder=True,
                   need_bytes=checkpoint_bytes(state))


@torch.no_grad()
def _reconstruction_psnr(ae: AutoencoderKL, data_dir: str | Path | None) -> float:
    """PSNR (dB, images in [-1, 1]) of the autoencoder's reconstructions of the Fashion-MNIST test set."""
    images = to_canvas(to_model_space(load_fashion_mnist("test", data_dir)[0]), IMAGE_SIZE).to(ae.device)
    error = sum(float((ae.decode(ae.encode(x).latent_dist.mean).sample.clamp(-1, 1) - x).pow(2).sum())
                for x in images.split(1000))
    return 10 * math.log10(4 / (error / images.numel()))


def _export(out_dir: Path, ae: AutoencoderKL, state: TrainState, tokenizer: PreTrainedTokenizerFast,
            configs: dict[str, dict[str, Any]], data_dir: str | Path | None, seed: int) -> None:
    """``training.json`` (first: it marks the folder as this run's), then the pipeline folder."""
    unet, text_encoder = state.ema["unet"], state.ema["text_encoder"]
    if not all(bool(torch.isfinite(p).all()) for p in state.ema.parameters()):
        raise ValueError("training diverged: the EMA weights hold NaN or inf, so no pipeline was exported; lower "
                         "--lr or start a new run folder")
    record = {"format": RUN_FORMAT, "kind": "text-to-image latent diffusion", "seed": seed, "configs": configs,
              "unet_steps": state.step, "final_unet_loss": state.smoothed_loss,
              "scaling_factor": ae.config.scaling_factor, "reconstruction_psnr_db": _reconstruction_psnr(ae, data_dir),
              "parameters": {name: sum(p.numel() for p in part.parameters())
                             for name, part in (("autoencoder", ae), ("unet", unet), ("text_encoder", text_encoder))},
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}}
    write_text_atomically(out_dir / RUN_RECORD, json.dumps(record, indent=2) + "\n")
    pipe = stable_diffusion(unet.eval(), ae.eval(), text_encoder.eval(), tokenizer)
    write_dir_atomically(out_dir / "pipeline", lambda tmp: _save_pipeline(pipe, tmp),
                         overwrite=True, recognise=in_run, what="training run's pipeline")


def _save_pipeline(pipe: DiffusionPipeline, folder: Path) -> None:
    """The diffusers pipeline folder, with the class-balanced captions runs on it default to."""
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / PIPELINE_PROMPTS).write_text("\n".join(fashion_prompts()) + "\n", encoding="utf-8")
