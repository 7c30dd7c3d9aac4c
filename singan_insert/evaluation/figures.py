"""Figures people would rather look at than numbers: before/after panels, Fig.-2-style grids.

matplotlib is an optional extra (``pip install 'singan-insert[plot]'``); every function here
raises :class:`~singan_insert.errors.MissingExtraError` with that hint when it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from singan_insert.errors import MissingExtraError


def require_matplotlib():
    """Import matplotlib with the Agg backend, or explain how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("matplotlib", "plot", "Writing PNG figures") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tumor_center_slice(mask: np.ndarray, axis: int) -> int:
    """Index along ``axis`` of the slice with the largest mask area."""
    areas = (mask > 0).sum(axis=tuple(a for a in range(mask.ndim) if a != axis))
    return int(np.argmax(areas))


def figure_grid(
    panels: Sequence[Sequence[np.ndarray]],
    path: str | os.PathLike,
    column_titles: Sequence[str],
    row_titles: Sequence[str] | None = None,
    contours: Sequence[Sequence[np.ndarray | None]] | None = None,
    window: Sequence[tuple[float, float]] | None = None,
) -> Path:
    """Save a grid of grayscale 2D images (rows x columns) as a PNG.

    Args:
        panels: ``panels[row][column]`` 2D arrays.
        path: output PNG.
        column_titles, row_titles: labels.
        contours: optional mask per panel, drawn as a contour.
        window: optional (low, high) display range per row (default: per-row 1-99 %).
    """
    plt = require_matplotlib()
    rows, cols = len(panels), len(panels[0])
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), squeeze=False)
    for r, row in enumerate(panels):
        low, high = window[r] if window else np.percentile(np.concatenate([p.ravel() for p in row]), (1, 99))
        for c, image in enumerate(row):
            ax = axes[r][c]
            ax.imshow(np.asarray(image).T, cmap="gray", vmin=low, vmax=high, origin="lower")
            if contours is not None and contours[r][c] is not None:
                ax.contour(np.asarray(contours[r][c]).T, levels=[0.5], colors="tab:red", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column_titles[c], fontsize=9)
            if c == 0 and row_titles:
                ax.set_ylabel(row_titles[r], fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def before_after_panel(before: np.ndarray, after: np.ndarray, mask: np.ndarray, path: str | os.PathLike,
                       axis: int = 2, title: str = "") -> Path:
    """Before | after | after with the tumor contour, through the tumor's largest slice."""
    index = tumor_center_slice(mask, axis)
    pick = lambda volume: np.take(volume, index, axis=axis)  # noqa: E731
    return figure_grid([[pick(before), pick(after), pick(after)]], path,
                       ["before", f"after {title}".strip(), "tumor label"],
                       contours=[[None, None, pick(mask)]])
