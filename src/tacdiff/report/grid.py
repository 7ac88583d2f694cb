"""Sample grids: one labelled row of images per model, saved as PNG with matplotlib."""

from __future__ import annotations

from pathlib import Path

import torch

from tacdiff.report.plots import pyplot, save_figure


def save_grid(rows: dict[str, torch.Tensor], path: str | Path, columns: int = 8) -> Path:
    """Save ``{label: images (N, C, H, W) in [-1, 1]}`` as a PNG grid, one row per label.

    The file is written atomically (:func:`~tacdiff.io.atomic.write_file_atomically`), so a failed
    save leaves nothing behind.
    """
    fig, axes = pyplot().subplots(len(rows), columns, figsize=(columns * 0.9, len(rows) * 1.0), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(columns):
            ax = axes[r][c]
            ax.axis("off")
            if c < images.shape[0]:
                ax.imshow(_to_hwc(images[c]), cmap="gray", vmin=0.0, vmax=1.0)
        axes[r][0].set_title(label, fontsize=8, loc="left")
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def _to_hwc(image: torch.Tensor):
    """``(C, H, W)`` in [-1, 1] to a numpy image in [0, 1] (``(H, W)`` for one channel)."""
    image = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0)
    return image[..., 0].numpy() if image.shape[-1] == 1 else image.numpy()
