"""Plots for benchmark reports (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from tacdiff.io.atomic import write_file_atomically

if TYPE_CHECKING:
    from tacdiff.correction.tables import CorrectionTables

METHOD_STYLE = {"ptq": ("tab:red", "-"), "ptqd": ("tab:orange", "--"), "ner": ("tab:blue", ":"),
                "ibc": ("tab:purple", "-."), "tac": ("tab:green", "-")}


def pyplot():
    """matplotlib's pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:  # noqa: ANN001 - a matplotlib Figure
    """Write ``fig`` to ``path`` atomically (format from the suffix, else PNG) and close it."""
    plt = pyplot()
    fmt = Path(path).suffix[1:] or "png"  # the temporary name has no usable suffix
    try:
        return write_file_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))
    finally:
        plt.close(fig)


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
    plt = pyplot()
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
    return save_figure(fig, path)


def plot_tables(tables: CorrectionTables, path: str | Path, *, title: str | None = None) -> Path:
    """Correction tables at a glance: a heat map of the output scales (NER's ``K_t``, PTQD's ``1/(1+k_t)``) over
    sampling steps × channels, and the size of IBC's input bias (root mean square over its elements) per step.

    Per-branch tables (``guidance_fit="branch"``) show the unconditional then the conditional channels.
    ``path`` (.png, .pdf, ...) is written atomically; returns it.
    """
    plt = pyplot()
    scale = tables.out_scale.double()
    labels = [f"c{c}" for c in range(scale.shape[-1])]
    if scale.ndim == 3:  # (T, 2, C): one row per branch and channel
        labels = [f"{branch} c{c}" for branch in ("uncond", "cond") for c in range(scale.shape[-1])]
        scale = scale.flatten(1)
    bias_rms = tables.input_bias.double().flatten(1).pow(2).mean(1).sqrt()
    steps = range(1, scale.shape[0] + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.2), sharex=True, height_ratios=(max(1, len(labels)), 2.5))
    deviation = max(float((scale - 1).abs().max()), 1e-6)
    image = top.imshow(scale.T.numpy(), aspect="auto", cmap="coolwarm", vmin=1 - deviation, vmax=1 + deviation,
                       extent=(0.5, scale.shape[0] + 0.5, len(labels) - 0.5, -0.5), interpolation="nearest")
    top.set_yticks(range(len(labels)), labels)
    top.set_title(f"{tables.method}: output scale per step and channel (1 = no change)")
    fig.colorbar(image, ax=top, pad=0.01)
    bottom.plot(list(steps), bias_rms.tolist(), color="tab:purple")
    bottom.set_ylabel("IBC input bias (RMS)")
    bottom.set_xlabel(f"sampling step (of {tables.num_inference_steps}; t from {tables.timesteps[0]:.0f} down to "
                      f"{tables.timesteps[-1]:.0f})")
    bottom.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
