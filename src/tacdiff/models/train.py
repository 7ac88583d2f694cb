"""Resumable epsilon-prediction DDPM training of a small diffusers UNet2DModel on Fashion-MNIST, and the
training machinery it shares with :mod:`tacdiff.models.train_latent`: the state (weights, EMA, AdamW,
generator), checkpoints as safetensors and JSON written atomically, and the step loop."""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import diffusers
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from tacdiff.data.fashion_mnist import load_fashion_mnist, to_model_space
from tacdiff.io.atomic import check_writable, write_dir_atomically, write_text_atomically

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

# A checkpoint is the folder RUN/checkpoint/, written whole (atomically): state.json (this format
# name and version, settings, step, loss, wall time, optimizer param_groups) and one safetensors
# file per entry of CHECKPOINT_TENSORS. Only safetensors and JSON are read back, never pickle.
CHECKPOINT_FORMAT = "tacdiff-train-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_STATE = "state.json"
CHECKPOINT_TENSORS = ("model", "ema", "optimizer", "generator")
RUN_FORMAT = "tacdiff-training-run"
RUN_RECORD = "training.json"
LEGACY_CHECKPOINT = "state.pt"  # torch.save format of older versions; refused, never loaded
# What the readers and load_state_dict raise on a missing, truncated or tampered file.
_READ_ERRORS = (OSError, SafetensorError, ValueError, RuntimeError, KeyError, TypeError, AttributeError)
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
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be finite and > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainState:
    """Everything that changes during training; saved whole in each checkpoint."""

    model: nn.Module
    ema: nn.Module
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
        out_dir: run folder; its ``checkpoint/`` folder (safetensors and JSON, never pickle) is
            resumed from when present. An old ``checkpoint/state.pt`` is refused, not loaded.
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
    state = resume_or_init(out_dir / "checkpoint", settings, device, build_unet)
    _check_run_folder(out_dir, checkpoint_bytes(state))
    check_steps(state, steps, out_dir / "checkpoint")
    data = to_model_space(load_fashion_mnist("train", data_dir)[0]).to(device)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    run_steps(state, lambda: _train_step(state, data, scheduler, settings), settings, steps, checkpoint_every,
              out_dir / "checkpoint", progress)
    _export(out_dir, state, scheduler, settings, data.shape[0])
    return out_dir


def build_unet(config: dict[str, Any]) -> nn.Module:
    """The pixel model: a ``UNet2DModel`` of ``config``."""
    return UNet2DModel(**config)


def check_steps(state: TrainState, steps: int, ckpt_dir: Path) -> None:
    """``ValueError`` when the resumed checkpoint is already past the ``steps`` asked for."""
    if state.step > steps:
        raise ValueError(f"checkpoint in {ckpt_dir} is at step {state.step}, past steps={steps}; pass steps >= "
                         f"{state.step} or use a new run folder")


def run_steps(state: TrainState, step: Callable[[], torch.Tensor], settings: TrainSettings, steps: int,
              checkpoint_every: int, ckpt_dir: Path, progress: bool, desc: str = "train") -> None:
    """Call ``step()`` (one optimizer step, returning its loss) from ``state.step`` to ``steps``, checkpointing
    to ``ckpt_dir`` every ``checkpoint_every`` steps and at the end."""
    smoothed = torch.tensor(state.smoothed_loss, device=state.generator.device)
    start = time.perf_counter() - state.wall_time_s
    bar = tqdm(total=steps, initial=state.step, disable=not progress, desc=desc, mininterval=5.0)
    while state.step < steps:
        loss = step()
        smoothed = torch.where(smoothed.isnan(), loss, LOSS_SMOOTHING * smoothed + (1 - LOSS_SMOOTHING) * loss)
        state.step += 1
        bar.update(1)
        if state.step % checkpoint_every == 0 or state.step == steps:
            state.smoothed_loss, state.wall_time_s = smoothed.item(), time.perf_counter() - start
            bar.set_postfix(loss=f"{state.smoothed_loss:.4f}")
            _save_checkpoint(ckpt_dir, state, settings)
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
    return optimizer_step(state, loss, settings)


def optimizer_step(state: TrainState, loss: torch.Tensor, settings: TrainSettings) -> torch.Tensor:
    """Back-propagate ``loss``, take one AdamW step (linear warm-up, gradient clipping) and update the EMA;
    return the loss, detached."""
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


def init_state(settings: TrainSettings, device: torch.device,
               build: Callable[[dict[str, Any]], nn.Module] = build_unet) -> TrainState:
    """Fresh model ``build(settings.model_config)`` (seeded init, global RNG untouched), EMA copy, AdamW and
    data generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = build(settings.model_config).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0,
                                  fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    return TrainState(model, ema, optimizer, generator)


def resume_or_init(ckpt_dir: Path, settings: TrainSettings, device: torch.device,
                   build: Callable[[dict[str, Any]], nn.Module] = build_unet) -> TrainState:
    """Load the checkpoint folder ``ckpt_dir`` when present (settings must match), else start fresh
    (:func:`init_state`)."""
    state = init_state(settings, device, build)
    if not ckpt_dir.exists():
        return state
    record = _read_record(ckpt_dir, settings)
    _load_tensors(ckpt_dir / "model.safetensors", state.model.load_state_dict)
    _load_tensors(ckpt_dir / "ema.safetensors", state.ema.load_state_dict)
    _load_tensors(ckpt_dir / "optimizer.safetensors", lambda tensors: state.optimizer.load_state_dict(
        _optimizer_state_dict(tensors, record["param_groups"], state.optimizer)))
    _load_tensors(ckpt_dir / "generator.safetensors", lambda tensors: state.generator.set_state(tensors["state"]))
    state.step, state.smoothed_loss, state.wall_time_s = (
        record["step"], float(record["smoothed_loss"]), float(record["wall_time_s"]))
    return state


def _read_record(ckpt_dir: Path, settings: TrainSettings) -> dict[str, Any]:
    """``ckpt_dir/state.json``, checked for format, version, matching settings and field types."""
    path = ckpt_dir / CHECKPOINT_STATE
    legacy = ckpt_dir / LEGACY_CHECKPOINT
    if not path.exists() and legacy.exists():
        raise ValueError(f"{legacy} is a checkpoint in the old torch.save format, which can run arbitrary code "
                         f"when loaded, so it is not read; start a new run folder, or delete {ckpt_dir} "
                         "to restart this run from step 0")
    if not path.exists():
        raise ValueError(f"{ckpt_dir} is not a tacdiff training checkpoint (it has no {CHECKPOINT_STATE}); "
                         "choose another run folder")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except _READ_ERRORS as error:
        raise _unusable(path, error) from error
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise _unusable(path, f'it does not say "format": "{CHECKPOINT_FORMAT}"')
    if record.get("version") != CHECKPOINT_VERSION:
        raise _unusable(path, f"format version {record.get('version')!r} is not {CHECKPOINT_VERSION}")
    expected = json.loads(json.dumps(asdict(settings)))
    recorded = record.get("settings")
    if recorded != expected:
        theirs = recorded if isinstance(recorded, dict) else {}
        diff = ", ".join(f"{k} {theirs.get(k)!r} (checkpoint) vs {expected.get(k)!r} (now)"
                         for k in sorted(set(theirs) | set(expected)) if theirs.get(k) != expected.get(k))
        raise ValueError(f"checkpoint {path} was made with other settings: {diff}; use the same settings "
                         "or a new out_dir")
    fields = {"step": int, "smoothed_loss": (int, float), "wall_time_s": (int, float), "param_groups": list}
    wrong = [k for k, kind in fields.items() if not isinstance(record.get(k), kind) or isinstance(record[k], bool)]
    if wrong or record["step"] < 0:
        raise _unusable(path, f"fields {wrong or ['step']} are missing or have the wrong type")
    return record


def _load_tensors(path: Path, apply: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    """Hand the tensors of the safetensors file ``path`` to ``apply``; any failure is one clear error."""
    try:
        apply(load_file(path))
    except _READ_ERRORS as error:
        raise _unusable(path, error) from error


def _unusable(path: Path, problem: object) -> ValueError:
    """The error for a missing or corrupt checkpoint file, naming it and the fix (on one line)."""
    brief = " ".join(str(problem).split())
    brief = brief if len(brief) <= 200 else brief[:197] + "..."
    return ValueError(f"checkpoint file {path} is missing or unusable ({brief}); delete {path.parent} "
                      "to restart this run from step 0, or start a new run folder")


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state tensors, keyed ``"{param_index}.{name}"`` (e.g. ``"0.exp_avg"``)."""
    return {f"{index}.{name}": value for index, values in optimizer.state_dict()["state"].items()
            for name, value in values.items()}


def _optimizer_state_dict(tensors: dict[str, torch.Tensor], param_groups: list[dict[str, Any]],
                          optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Rebuild ``optimizer.state_dict()`` from :func:`_optimizer_tensors` and the JSON ``param_groups``.

    Lists are turned back into tuples where ``optimizer``'s own groups hold tuples (AdamW's betas).
    """
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if isinstance(own.get(k), tuple) else v for k, v in group.items()}
              for group, own in zip(param_groups, optimizer.param_groups, strict=True)]
    expected = {index for group in groups for index in group.get("params", [])}
    if state and set(state) != expected:  # a partial state would silently restart some moments
        raise ValueError(f"it holds state for {len(state)} of {len(expected)} parameters")
    return {"state": state, "param_groups": groups}


def _save_checkpoint(ckpt_dir: Path, state: TrainState, settings: TrainSettings) -> None:
    """Write the whole training state as the folder ``ckpt_dir``, atomically (temp folder, then rename)."""
    write_dir_atomically(ckpt_dir, lambda tmp: _fill_checkpoint(tmp, state, settings), overwrite=True,
                         recognise=is_checkpoint, what="training checkpoint")


def _fill_checkpoint(folder: Path, state: TrainState, settings: TrainSettings) -> None:
    """Write the checkpoint's safetensors files and ``state.json`` into the empty ``folder``."""
    tensors = {"model": state.model.state_dict(), "ema": state.ema.state_dict(),
               "optimizer": _optimizer_tensors(state.optimizer), "generator": {"state": state.generator.get_state()}}
    for name in CHECKPOINT_TENSORS:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors[name].items()},
                  str(folder / f"{name}.safetensors"))
    record = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "settings": asdict(settings),
        "step": state.step, "smoothed_loss": state.smoothed_loss, "wall_time_s": state.wall_time_s,
        "param_groups": state.optimizer.state_dict()["param_groups"],
    }
    (folder / CHECKPOINT_STATE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint folder written here (its ``state.json`` names the format)."""
    return _json_field(path / CHECKPOINT_STATE, "format") == CHECKPOINT_FORMAT


def in_run(path: Path) -> bool:
    """Whether ``path`` lies in a run folder that a finished ``train`` wrote (its ``training.json`` says so),
    so that its ``unet/``, ``scheduler/`` and ``training.json`` may be replaced."""
    return _json_field(path.parent / RUN_RECORD, "format") == RUN_FORMAT


def checkpoint_bytes(state: TrainState) -> int:
    """Room a checkpoint swap needs: the old and the new checkpoint (weights, EMA, two Adam moments each)."""
    return 2 * 4 * sum(p.numel() * p.element_size() for p in state.model.parameters())


def _check_run_folder(out_dir: Path, need_bytes: int = 0) -> None:
    """Before any work: every output of the run can be written, and replaces only what ``train`` wrote."""
    check_writable(out_dir / "checkpoint", overwrite=True, recognise=is_checkpoint, what="training checkpoint",
                   folder=True, need_bytes=need_bytes)
    for name, folder in (("unet", True), ("scheduler", True), (RUN_RECORD, False)):
        check_writable(out_dir / name, overwrite=True, recognise=in_run, what=f"training run's {name}",
                       folder=folder)


def _json_field(path: Path, key: str) -> Any:
    """``key`` of the JSON object in the file ``path``; None when it is unreadable or absent."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get(key) if isinstance(record, dict) else None


def _export(out_dir: Path, state: TrainState, scheduler: DDPMScheduler, settings: TrainSettings,
            n_images: int) -> None:
    """Write ``training.json`` (first: it marks the folder as this run's), ``unet/`` (EMA weights) and
    ``scheduler/`` into ``out_dir``; ``ValueError`` if the weights are not finite (training diverged)."""
    if not all(bool(torch.isfinite(p).all()) for p in state.ema.parameters()):
        raise ValueError(f"training diverged: the EMA weights at step {state.step} hold NaN or inf, so no model "
                         "was exported; lower --lr or start a new run folder")
    record = {
        "format": RUN_FORMAT, **asdict(settings), "steps": state.step, "final_loss": state.smoothed_loss,
        "final_loss_note": f"epsilon MSE of the trained (non-EMA) weights, EMA-smoothed ({LOSS_SMOOTHING})",
        "wall_time_s": round(state.wall_time_s, 1), "device": _device_name(state.generator.device),
        "parameters": sum(p.numel() for p in state.ema.parameters()),
        "data": {"dataset": "Fashion-MNIST", "split": "train", "images": n_images,
                 "range": [-1, 1], "augment": "random horizontal flip"},
        "objective": "epsilon-prediction MSE, t ~ U{0..999}", "optimizer": "AdamW, weight_decay=0",
        "grad_clip_norm": GRAD_CLIP_NORM, "scheduler": SCHEDULER_CONFIG,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    write_text_atomically(out_dir / RUN_RECORD, json.dumps(record, indent=2) + "\n")
    write_dir_atomically(out_dir / "unet", lambda tmp: state.ema.save_pretrained(tmp, safe_serialization=True),
                         overwrite=True, recognise=in_run, what="training run's unet")
    write_dir_atomically(out_dir / "scheduler", scheduler.save_pretrained, overwrite=True, recognise=in_run,
                         what="training run's scheduler")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
