"""``tacdiff train-dit``: a class-conditional DiT (Peebles & Xie, ICCV 2023) on the latent reference's latents.

The autoencoder of the bundled text-to-image latent pipeline (``latent-reference``) encodes every
Fashion-MNIST training image once (posterior mean times its ``scaling_factor``); a
``DiTTransformer2DModel`` (adaLN-Zero, patch 2 over the 4x8x8 latents) learns to predict the noise on
the same noise schedule (Stable Diffusion's). diffusers' label embedding replaces 10% of the labels by
the null class while training, so classifier-free guidance works; since ``DiTPipeline`` uses class 1000
as the null class, the model has 1000 class embeddings and the ten Fashion-MNIST classes take 0..9.
Resumable (safetensors and JSON checkpoints, :mod:`tacdiff.models.train`); the EMA weights are exported
as a ``DiTPipeline`` folder ``OUT/pipeline`` whose ``id2label`` names the classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from torch import Tensor, nn

from tacdiff.data.fashion_mnist import load_fashion_mnist, to_canvas, to_model_space
from tacdiff.data.prompts import FASHION_NAMES
from tacdiff.io.atomic import check_writable, write_dir_atomically, write_text_atomically
from tacdiff.models.folders import quiet_loading
from tacdiff.models.pipelines import SD_SCHEDULER_CONFIG
from tacdiff.models.reference import LATENT_REFERENCE_DIR
from tacdiff.models.train import (RUN_FORMAT, RUN_RECORD, TrainSettings, TrainState, check_steps, checkpoint_bytes,
                                  in_run, is_checkpoint, optimizer_step, resume_or_init, run_steps)
from tacdiff.models.train_latent import IMAGE_SIZE, NOISE_SCHEDULE, encode_latents
from tacdiff.sampling.batching import derive_seed

NULL_CLASS = 1000  # DiTPipeline's unconditional label
DEFAULT_CONFIG: dict[str, Any] = dict(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4,
                                      num_layers=8, sample_size=IMAGE_SIZE // 4, patch_size=2,
                                      num_embeds_ada_norm=NULL_CLASS)
CHECKPOINT = "checkpoint-dit"


def train_dit(out_dir: str | Path, *, steps: int, batch_size: int = 128, lr: float = 3e-4, seed: int = 0,
              ema_decay: float = 0.999, checkpoint_every: int = 500, device: str | torch.device = "cpu",
              data_dir: str | Path | None = None, config: dict[str, Any] | None = None, warmup_steps: int = 200,
              autoencoder: str | Path = LATENT_REFERENCE_DIR, progress: bool = True) -> Path:
    """Train (or resume) the DiT and write ``out_dir/pipeline`` (a ``DiTPipeline``) and ``out_dir/training.json``.

    ``config`` replaces :data:`DEFAULT_CONFIG`; ``autoencoder`` is a pipeline folder whose ``vae/`` encodes
    the images (default: the bundled latent reference's). Other arguments as in :func:`tacdiff.models.train.train`.
    """
    for name, value in (("steps", steps), ("checkpoint_every", checkpoint_every)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    out_dir, device = Path(out_dir), torch.device(device)
    _check_outputs(out_dir)
    with quiet_loading():
        vae = AutoencoderKL.from_pretrained(Path(autoencoder) / "vae", use_safetensors=True).to(device).eval()
    images, labels = load_fashion_mnist("train", data_dir)
    latents = encode_latents(vae, to_canvas(to_model_space(images), IMAGE_SIZE).to(device))
    settings = TrainSettings(batch_size=batch_size, lr=lr, seed=seed, ema_decay=ema_decay, warmup_steps=warmup_steps,
                             model_config={"dit": config or DEFAULT_CONFIG})
    state = _train(out_dir / CHECKPOINT, latents * vae.config.scaling_factor, labels.to(device), settings, steps,
                   checkpoint_every, progress)
    _export(out_dir, state, vae, seed)
    return out_dir


def _train(ckpt_dir: Path, latents: Tensor, labels: Tensor, settings: TrainSettings, steps: int,
           checkpoint_every: int, progress: bool) -> TrainState:
    state = resume_or_init(ckpt_dir, settings, latents.device, lambda c: DiTTransformer2DModel(**c["dit"]))
    check_writable(ckpt_dir, overwrite=True, recognise=is_checkpoint, what="training checkpoint", folder=True,
                   need_bytes=checkpoint_bytes(state))
    scheduler = DDPMScheduler(**NOISE_SCHEDULE)

    def step() -> Tensor:
        gen, n = state.generator, settings.batch_size
        index = torch.randint(0, latents.shape[0], (n,), generator=gen, device=gen.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=gen, device=gen.device)
        noise = torch.randn(latents[index].shape, generator=gen, device=gen.device)
        torch.manual_seed(derive_seed(settings.seed, "label-drop", state.step))  # diffusers drops labels by torch.rand
        pred = state.model(scheduler.add_noise(latents[index], noise, t), timestep=t,
                           class_labels=labels[index]).sample
        return optimizer_step(state, nn.functional.mse_loss(pred, noise), settings)

    check_steps(state, steps, ckpt_dir)
    run_steps(state, step, settings, steps, checkpoint_every, ckpt_dir, progress, desc="dit")
    return state


def _check_outputs(out_dir: Path) -> None:
    """Before any work: every output can be written and replaces only what this command wrote."""
    check_writable(out_dir / CHECKPOINT, overwrite=True, recognise=is_checkpoint, what="training checkpoint",
                   folder=True)
    check_writable(out_dir / "pipeline", overwrite=True, recognise=in_run, what="training run's pipeline", folder=True)
    check_writable(out_dir / RUN_RECORD, overwrite=True, recognise=in_run, what="training run's record")


def _export(out_dir: Path, state: TrainState, vae: AutoencoderKL, seed: int) -> None:
    """``training.json`` (first: it marks the folder as this run's), then the ``DiTPipeline`` folder."""
    dit = state.ema.eval()
    if not all(bool(torch.isfinite(p).all()) for p in dit.parameters()):
        raise ValueError("training diverged: the EMA weights hold NaN or inf, so no pipeline was exported; lower "
                         "--lr or start a new run folder")
    record = {"format": RUN_FORMAT, "kind": "class-conditional DiT on latent-reference latents", "seed": seed,
              "config": dict(dit.config), "steps": state.step, "final_loss": state.smoothed_loss,
              "wall_time_s": state.wall_time_s, "parameters": sum(p.numel() for p in dit.parameters()),
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}}
    write_text_atomically(out_dir / RUN_RECORD, json.dumps(record, indent=2, default=str) + "\n")
    pipe = dit_pipeline(dit, vae)
    write_dir_atomically(out_dir / "pipeline", lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True),
                         overwrite=True, recognise=in_run, what="training run's pipeline")


def dit_pipeline(dit: DiTTransformer2DModel, vae: AutoencoderKL) -> DiTPipeline:
    """A ``DiTPipeline`` of these parts with Stable Diffusion's DDIM schedule and the Fashion-MNIST class names
    as ``id2label`` (each class's names comma-separated, as DiT's ImageNet labels), saved in ``model_index.json``."""
    id2label = {str(i): ", ".join(names) for i, names in enumerate(FASHION_NAMES)}
    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), id2label=id2label)
    pipe.register_to_config(id2label=id2label)
    return pipe
