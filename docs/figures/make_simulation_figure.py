"""Draw docs/figures/simulation.png: simulated subjects in both contrasts, axial and through-plane.

Run from the repository root: ``python docs/figures/make_simulation_figure.py``. It also prints
how long each subject took to simulate (both modalities, default 128x128x48 grid).
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from singan_insert.datasets.phantom import simulate_subject  # noqa: E402

SEEDS = (0, 1, 3, 6)
OUTPUT = Path(__file__).with_name("simulation.png")


def _tumor_center(label: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(round(idx.mean())) for idx in np.nonzero(label == 1))


def _show(axis, image, label, spacing, title, window):
    """Display a 2D (first axis horizontal) slice with its physical aspect and the tumor outline."""
    axis.imshow(image.T, cmap="gray", origin="lower", vmin=window[0], vmax=window[1],
                aspect=spacing[1] / spacing[0], interpolation="nearest")
    if (label == 1).any():
        axis.contour((label == 1).T.astype(float), levels=[0.5], colors="red", linewidths=0.6)
    axis.set_title(title, fontsize=8)
    axis.set_xticks([])
    axis.set_yticks([])


def main() -> None:
    columns = ["ceT1 axial", "ceT1 coronal", "hrT2 axial", "hrT2 coronal", "hrT2 washed out"]
    figure, axes = plt.subplots(len(SEEDS), len(columns), figsize=(2.4 * len(columns), 2.5 * len(SEEDS)))
    for row, seed in enumerate(SEEDS):
        start = time.perf_counter()
        subject = simulate_subject(seed)
        elapsed = time.perf_counter() - start
        print(f"seed {seed}: simulated in {elapsed:.2f} s, tumor {subject.tumor_volume_cm3:.2f} cm3")
        washed = subject.render_b_washed_out()
        panels = []
        for image, label, spacing, name in (
            (subject.image_a, subject.label_a, subject.spacing_a, "ceT1"),
            (subject.image_b, subject.label_b, subject.spacing_b, "hrT2"),
        ):
            i, j, k = _tumor_center(label)
            window = np.percentile(image, (0.5, 99.5))
            panels.append((image[:, :, k], label[:, :, k], spacing[:2], window))
            panels.append((image[:, j, :], label[:, j, :], (spacing[0], spacing[2]), window))
        i, j, k = _tumor_center(subject.label_b)
        no_label = np.zeros_like(subject.label_b[:, :, k])
        panels.append((washed[:, :, k], no_label, subject.spacing_b[:2], panels[2][3]))
        for column, (image, label, spacing, window) in enumerate(panels):
            title = columns[column]
            if column == 0:
                title += f" (seed {seed}, {subject.tumor_volume_cm3:.2f} cm³)"
            _show(axes[row, column], image, label, spacing, title, window)
    figure.suptitle("singan_insert.datasets.phantom: one anatomy, two contrasts (red: tumor, label 1)", fontsize=10)
    figure.tight_layout()
    figure.savefig(OUTPUT, dpi=110)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
