"""The ``tacdiff`` command line: every command is a thin shell over a Python function."""

from __future__ import annotations

import typer

app = typer.Typer(help="Quantize diffusers models and correct their error over the sampling trajectory.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """tacdiff: low-bit diffusers models with timestep-aware correction."""


@app.command()
def train(
    out_dir: str = typer.Argument(..., help="Run folder; resumes from OUT_DIR/checkpoint/ when present."),
    steps: int = typer.Option(6000, help="Total optimizer steps (6000 built the bundled model)."),
    batch_size: int = typer.Option(256, help="Images per step."),
    lr: float = typer.Option(3e-4, help="AdamW learning rate after warm-up."),
    seed: int = typer.Option(0, help="Seed for the initial weights and every random draw."),
    ema_decay: float = typer.Option(0.9995, help="Decay of the weight EMA that is exported."),
    checkpoint_every: int = typer.Option(1000, help="Steps between checkpoints."),
    device: str = typer.Option("auto", help="torch device; 'auto' picks cuda when available."),
    data_dir: str = typer.Option(None, help="Folder with the Fashion-MNIST *-ubyte.gz files."),
    quiet: bool = typer.Option(False, help="Hide the progress bar."),
) -> None:
    """Train the reference DDPM (UNet2DModel, epsilon prediction) on Fashion-MNIST."""
    import torch

    from tacdiff.models.train import train as train_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = train_model(out_dir, steps=steps, batch_size=batch_size, lr=lr, seed=seed, ema_decay=ema_decay,
                      checkpoint_every=checkpoint_every, device=device, data_dir=data_dir, progress=not quiet)
    typer.echo(f"wrote {out / 'unet'}, {out / 'scheduler'} and {out / 'training.json'}")
