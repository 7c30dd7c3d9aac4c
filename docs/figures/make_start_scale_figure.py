"""Draw docs/figures/start_scales.png: one pasted tumor harmonized from every start scale.

On the built-in simulator (ground truth known): a harmonizer is trained on the hrT2-like slice
of subject 0 that shows the most tumor (the ``fast`` preset shortened to 100 iterations per
scale, about a minute on 2 CPU cores), then subject 1's ceT1 tumor is pasted into its washed-out
hrT2 volume (contrast factor 0.5) and harmonized from every start scale the model offers, with
:func:`singan_insert.evaluation.experiments.run_case`. Columns: the ceT1 source, the washed-out target, the
naive paste, one column per start scale, and the simulator's truth; the second row zooms on the
tumor. It also writes ``start_scales.md``, the fidelity of each column against the truth
(:func:`singan_insert.evaluation.experiments.fidelity_markdown`), which ``docs/concepts.md`` includes.

Run from the repository root::

    OMP_NUM_THREADS=1 python docs/figures/make_start_scale_figure.py
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from singan_insert import TrainingConfig, train_harmonizer
from singan_insert.evaluation.experiments import fidelity_markdown, run_case, summarize_fidelity, training_slice_from_subject
from singan_insert.evaluation.figures import figure_grid
from singan_insert.datasets.phantom import simulate_subject
from singan_insert.insertion.insert import InsertionParameters

HERE = Path(__file__).resolve().parent
ITERATIONS = 100
CONTRAST = 0.5
ZOOM_MM = 9.0


def main() -> None:
    started = time.perf_counter()
    train_subject = simulate_subject(0)
    image, spacing, index = training_slice_from_subject(train_subject)
    config = replace(TrainingConfig.preset("fast"), iterations=ITERATIONS)
    with tempfile.TemporaryDirectory() as scratch:
        harmonizer = train_harmonizer(image, config, out_dir=scratch, seed=0, spacing=spacing, device="cpu",
                                      progress=False, sample_figures=False,
                                      provenance={"axis": 2, "slice_index": index, "modality": "hrT2"})
    trained = time.perf_counter() - started
    scales = list(harmonizer.valid_start_scales)
    case = run_case("subject 1", simulate_subject(1), harmonizer, scales,
                    InsertionParameters(appearance="fixed", contrast=CONTRAST, seed=0))
    methods = ["naive_mapped", *[f"singan_s{s}" for s in scales]]
    row = case.panel_row(methods)

    # Zoom: a square of +-ZOOM_MM around the tumor's centre in the displayed slice.
    plane = np.take(case.mask, case.center_slice(), axis=case.axis)
    center = np.argwhere(plane).mean(axis=0).round().astype(int)
    plane_spacing = [s for a, s in enumerate(case.spacing) if a != case.axis]
    half = [int(ZOOM_MM / s) for s in plane_spacing]
    window = tuple(slice(max(c - h, 0), c + h) for c, h in zip(center, half))
    zoom = [panel[window] for panel in row]
    contours = [[None] * len(row), [None, None, plane[window], *[None] * (len(row) - 4), plane[window]]]

    titles = ["A source (ceT1)", "B washed out", "naive paste",
              *[f"start scale {s}" + (" (default)" if s == harmonizer.default_start_scale else "")
                for s in scales], "truth (hrT2)"]
    figure_grid([row, zoom], HERE / "start_scales.png", titles, row_titles=["slice", "zoom on the tumor"],
                contours=contours)
    table = fidelity_markdown(summarize_fidelity([case]))
    seconds = time.perf_counter() - started
    (HERE / "start_scales.md").write_text(
        f"{table}\n\n*One subject, {harmonizer.num_scales} scales (start scales {scales[0]}..{scales[-1]}), "
        f"preset `fast` with {ITERATIONS} iterations per scale, contrast factor {CONTRAST}: "
        f"training {trained:.0f} s, whole script {seconds:.0f} s on {os.cpu_count()} CPU cores "
        f"({platform.machine()}). Produced by `docs/figures/make_start_scale_figure.py`.*\n")
    print(f"Wrote {HERE / 'start_scales.png'} and {HERE / 'start_scales.md'} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
