"""The ``tacdiff`` command line: every command is a thin shell over a Python function."""

from __future__ import annotations

import typer

app = typer.Typer(help="Quantize diffusers models and correct their error over the sampling trajectory.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """tacdiff: low-bit diffusers models with timestep-aware correction."""
