"""Plots for benchmark reports (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from tacdiff.io.atomic import write_file_atomically

METHOD_STYLE = {"ptq": ("tab:red", "-"), "ptqd": ("tab:orange", "--"), "ner": ("tab:blue", ":"),
                "ibc": ("tab:purple", "-."), "tac": ("tab:green", "-")}


def plot_step_errors(step_errors: Mapping[tuple[str, int], Mapping[str, Sequence[float]]],
                     timesteps: Mapping[int, Sequence[float]], path: str | Path, *, title: str | None = None) -> Path:
    """One panel per ``(bits, steps)``: mean ``‖x̂_t − x_t‖²`` against the timestep for each method (log scale).

    Args:
        step_errors: ``{(bits, steps): {method: (T,) errors}}`` in sampling order.
        timesteps: ``{steps: (T,) scheduler timesteps}`` (the x axis, decreasing left to right).
        path: output image (.png, .pdf, ...), written atomically; parent folders are created.
    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not step_errors:
        raise ValueError("nothing to plot: step_errors is empty (did the benchmark include a quantized method?)")
    keys = sorted(step_errors, key=lambda k: (k[1], k[0]))
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        bits, steps = key
        t = list(timesteps[steps])
        for method, errors in step_errors[key].items():
            color, style = METHOD_STYLE.get(method, (None, "-"))
            # the first step starts from identical noise (error 0): leave it out of the log axis
            ax.plot(t, [e if e > 0 else float("nan") for e in errors], label=method, color=color, linestyle=style)
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.set_title(f"{bits}, DDIM {steps}")
        ax.set_xlabel("timestep t (sampling runs left to right)")
        ax.set_ylabel("mean ||x̂_t − x_t||²")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fmt = Path(path).suffix[1:] or plt.rcParams["savefig.format"]  # the temporary name has no usable suffix
    try:
        return write_file_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120))
    finally:
        plt.close(fig)
