"""Resumable epsilon-prediction DDPM training of a small diffusers UNet2DModel on Fashion-MNIST."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from tacdiff.data.fashion_mnist import load_fashion_mnist, to_model_space
from tacdiff.io.atomic import write_dir_atomically, write_file_atomically, write_text_atomically

# ~2.8M parameters, 11 MB of fp32 weights; attention at 14x14 and 7x7 so attention
# quantization gets exercised.
DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "sample_size": 28,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 128],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 32,
    "norm_num_groups": 8,
}

# Same schedule as google/ddpm-cifar10-32.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
}

CHECKPOINT_NAME = "state.pt"
GRAD_CLIP_NORM = 1.0
LOSS_SMOOTHING = 0.99


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters that a resumed run must share with the checkpoint it resumes."""

    batch_size: int
    lr: float
    seed: int
    ema_decay: float
    warmup_steps: int
    model_config: dict[str, Any]

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainState:
    """Everything that changes during training; saved whole in each checkpoint."""

    model: UNet2DModel
    ema: UNet2DModel
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    smoothed_loss: float = float("nan")
    wall_time_s: float = 0.0


def train(out_dir: str | Path, *, steps: int, batch_size: int = 256, lr: float = 3e-4,
          seed: int = 0, ema_decay: float = 0.9995, checkpoint_every: int = 1000,
          device: str | torch.device = "cpu", data_dir: str | Path | None = None,
          model_config: dict[str, Any] | None = None, warmup_steps: int = 500,
          progress: bool = True) -> Path:
    """Train (or resume training) the DDPM and write a diffusers model directory.

    Args:
        out_dir: run folder; ``checkpoint/`` inside it is resumed from when present.
        steps: total optimizer steps (counting steps done before a resume).
        batch_size: images per step, drawn with replacement from the 60000 training images.
        lr: AdamW learning rate, reached after ``warmup_steps`` linear warm-up steps.
        seed: seeds the initial weights and every random draw (images, flips, noise, timesteps).
        ema_decay: decay of the weight EMA (warmed up as ``min(decay, (1+k)/(10+k))``).
        checkpoint_every: steps between checkpoints; one is also written at the end.
        device: torch device to train on.
        data_dir: folder with the Fashion-MNIST ``*-ubyte.gz`` files (default: Debian's).
        model_config: ``UNet2DModel`` config (default :data:`DEFAULT_MODEL_CONFIG`).
        progress: show a tqdm bar.

    Returns:
        ``out_dir``, holding ``unet/`` (EMA weights), ``scheduler/`` and ``training.json``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    settings = TrainSettings(batch_size, lr, seed, ema_decay, warmup_steps,
                             dict(model_config or DEFAULT_MODEL_CONFIG))
    out_dir, device = Path(out_dir), torch.device(device)
    data = to_model_space(load_fashion_mnist("train", data_dir)[0]).to(device)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    state = _resume_or_init(out_dir / "checkpoint", settings, device)
    if state.step > steps:
        raise ValueError(f"checkpoint in {out_dir / 'checkpoint'} is at step {state.step}, "
                         f"past steps={steps}; pass steps >= {state.step} or use a new out_dir")
    _run(state, data, scheduler, settings, steps, checkpoint_every, out_dir, progress)
    _export(out_dir, state, scheduler, settings, data.shape[0])
    return out_dir


def _run(state: TrainState, data: torch.Tensor, scheduler: DDPMScheduler, settings: TrainSettings,
         steps: int, checkpoint_every: int, out_dir: Path, progress: bool) -> None:
    """Step from ``state.step`` to ``steps``, checkpointing on the way and at the end."""
    smoothed = torch.tensor(state.smoothed_loss, device=data.device)
    start = time.perf_counter() - state.wall_time_s
    bar = tqdm(total=steps, initial=state.step, disable=not progress, desc="train", mininterval=5.0)
    while state.step < steps:
        loss = _train_step(state, data, scheduler, settings)
        smoothed = torch.where(smoothed.isnan(), loss, LOSS_SMOOTHING * smoothed + (1 - LOSS_SMOOTHING) * loss)
        state.step += 1
        bar.update(1)
        if state.step % checkpoint_every == 0 or state.step == steps:
            state.smoothed_loss, state.wall_time_s = smoothed.item(), time.perf_counter() - start
            bar.set_postfix(loss=f"{state.smoothed_loss:.4f}")
            _save_checkpoint(out_dir / "checkpoint", state, settings)
    bar.close()


def _train_step(state: TrainState, data: torch.Tensor, scheduler: DDPMScheduler,
                settings: TrainSettings) -> torch.Tensor:
    """One AdamW step on the epsilon-prediction MSE plus an EMA update; returns the loss (scalar)."""
    gen, n = state.generator, settings.batch_size
    x0 = data[torch.randint(0, data.shape[0], (n,), generator=gen, device=gen.device)]
    flip = torch.rand(n, generator=gen, device=gen.device) < 0.5
    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=gen, device=gen.device)
    noise = torch.randn(x0.shape, generator=gen, device=gen.device)
    loss = torch.nn.functional.mse_loss(state.model(scheduler.add_noise(x0, noise, t), t).sample, noise)
    for group in state.optimizer.param_groups:
        group["lr"] = settings.lr * min(1.0, (state.step + 1) / max(1, settings.warmup_steps))
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), GRAD_CLIP_NORM)
    state.optimizer.step()
    decay = min(settings.ema_decay, (1 + state.step) / (10 + state.step))
    with torch.no_grad():
        torch._foreach_lerp_(list(state.ema.parameters()), list(state.model.parameters()), 1.0 - decay)
    return loss.detach()


def _init_state(settings: TrainSettings, device: torch.device) -> TrainState:
    """Fresh model (seeded init, global RNG untouched), EMA copy, AdamW and data generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = UNet2DModel(**settings.model_config).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0,
                                  fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    return TrainState(model, ema, optimizer, generator)


def _resume_or_init(ckpt_dir: Path, settings: TrainSettings, device: torch.device) -> TrainState:
    """Load ``ckpt_dir/state.pt`` when present (settings must match), else start fresh."""
    state = _init_state(settings, device)
    path = ckpt_dir / CHECKPOINT_NAME
    if not path.is_file():
        return state
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt["settings"] != asdict(settings):
        raise ValueError(f"checkpoint {path} was made with other settings {ckpt['settings']}, "
                         f"not {asdict(settings)}; use the same settings or a new out_dir")
    state.model.load_state_dict(ckpt["model"])
    state.ema.load_state_dict(ckpt["ema"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.generator.set_state(ckpt["generator"])
    state.step, state.smoothed_loss, state.wall_time_s = ckpt["step"], ckpt["smoothed_loss"], ckpt["wall_time_s"]
    return state


def _save_checkpoint(ckpt_dir: Path, state: TrainState, settings: TrainSettings) -> None:
    """Write the whole training state atomically (temp file, then rename)."""
    payload = {
        "settings": asdict(settings), "step": state.step, "smoothed_loss": state.smoothed_loss,
        "wall_time_s": state.wall_time_s, "model": state.model.state_dict(),
        "ema": state.ema.state_dict(), "optimizer": state.optimizer.state_dict(),
        "generator": state.generator.get_state(),
    }
    write_file_atomically(ckpt_dir / CHECKPOINT_NAME, lambda tmp: torch.save(payload, tmp))


def _export(out_dir: Path, state: TrainState, scheduler: DDPMScheduler, settings: TrainSettings,
            n_images: int) -> None:
    """Write ``unet/`` (EMA weights), ``scheduler/`` and ``training.json`` into ``out_dir``."""
    write_dir_atomically(out_dir / "unet", lambda tmp: state.ema.save_pretrained(tmp, safe_serialization=True),
                         overwrite=True)
    write_dir_atomically(out_dir / "scheduler", scheduler.save_pretrained, overwrite=True)
    record = {
        **asdict(settings), "steps": state.step, "final_loss": state.smoothed_loss,
        "final_loss_note": f"epsilon MSE of the trained (non-EMA) weights, EMA-smoothed ({LOSS_SMOOTHING})",
        "wall_time_s": round(state.wall_time_s, 1), "device": _device_name(state.generator.device),
        "parameters": sum(p.numel() for p in state.ema.parameters()),
        "data": {"dataset": "Fashion-MNIST", "split": "train", "images": n_images,
                 "range": [-1, 1], "augment": "random horizontal flip"},
        "objective": "epsilon-prediction MSE, t ~ U{0..999}", "optimizer": "AdamW, weight_decay=0",
        "grad_clip_norm": GRAD_CLIP_NORM, "scheduler": SCHEDULER_CONFIG,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    write_text_atomically(out_dir / "training.json", json.dumps(record, indent=2) + "\n")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
