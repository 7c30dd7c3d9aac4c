"""``singan-insert demo``: the whole job on the built-in simulator, no user data needed.

1. simulate a training subject and take its modality-B (hrT2-like) slice with the largest
   tumor area (the ONE training slice);
2. train a harmonizer on it (``fast`` preset; re-running resumes or reuses the model);
3. simulate ``num_subjects`` other subjects, paste each one's modality-A (ceT1-like) tumor into
   its washed-out modality-B volume with the library's DEFAULT insertion (the automatic
   appearance: no contrast factor to choose) and harmonize every tumor slice;
4. write the NIfTI files (crossMoDA layout plus the augmented ``B'`` volumes), a Fig.-2-style
   panel and a metrics summary against the simulator's ground truth.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from singan_insert.io import orientation_codes, write_nifti
from singan_insert.evaluation.experiments import (CASE_BLUR_SIGMA_PX, FIDELITY_LEGEND, fidelity_markdown, run_case,
                                                   summarize_fidelity, training_slice_from_subject)
from singan_insert.devices import select_device
from singan_insert.datasets.phantom import simulate_subject, write_crossmoda
from singan_insert.harmonizer.training import TrainingConfig, train_harmonizer
from singan_insert.insertion.insert import InsertionParameters, insert_tumor
from singan_insert.insertion.placement import SourceTumor

#: The demo inserts with the library's defaults (``appearance="auto"``): what a user gets first.
DEMO_PARAMETERS = InsertionParameters()

#: What the demo's targets are, said under its table: they favour the methods that leave the
#: surroundings alone, which a real CycleGAN translation does not.
DEMO_CAVEAT = (
    "In this demo the target is the truth minus the tumor: its surroundings are already B's own "
    "(up to the tumor's partial volume), so the pastes that leave them alone (raw, auto-level, "
    "Poisson) get a shell error that no insertion into a real translation could, and the default "
    "insertion (which gives the surroundings B's rim and regenerates them with the pyramid) pays "
    "for it in nmae_shell. What this table cannot show, the effect downstream on a segmentation "
    "trained on the augmented images, is measured by benchmarks/bench_pipeline.py (docs/benchmarks.md)."
)


def run_demo(
    out_dir: str | Path = "demo_output",
    num_subjects: int = 3,
    preset: str = "fast",
    iterations: int | None = None,
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """Run the demo and return the metrics summary (also written to ``out_dir``)."""
    started = time.perf_counter()
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    config = TrainingConfig.preset(preset, iterations=iterations or None)

    print(f"[1/4] Simulating the training subject (seed {seed}) ...")
    train_subject = simulate_subject(seed)
    image, spacing, index = training_slice_from_subject(train_subject)
    # The training subject's tumor label on that slice is the one-slice annotation, as
    # `singan-insert train --label` gives it by default.
    annotation = np.take(train_subject.label_b, index, axis=2) == 1
    print(f"[2/4] Training the harmonizer on hrT2 slice {index} ({image.shape[0]}x{image.shape[1]} px, "
          f"preset {preset!r}, tumor annotated) -> {out / 'model'}")
    harmonizer = train_harmonizer(image, config, out_dir=out / "model", seed=seed, spacing=spacing,
                                  device=select_device(device), annotation=annotation, provenance={
                                      "source": f"simulated subject seed {seed}", "axis": 2,
                                      "slice_index": index, "modality": "hrT2",
                                      "orientation": orientation_codes(train_subject.affine_b)})
    harmonizer.to("cpu")
    scales = sorted({harmonizer.default_start_scale, harmonizer.num_scales - 2, harmonizer.num_scales - 1})
    print(f"[3/4] Inserting tumors into {num_subjects} simulated subjects (start scales {scales}) ...")
    cases = []
    for i in range(num_subjects):
        subject = simulate_subject(seed + 1 + i)
        name = f"demo_{i + 1:03d}"
        write_crossmoda(subject, out / "data", name)
        parameters = replace(DEMO_PARAMETERS, seed=seed + i)
        case = run_case(name, subject, harmonizer, scales, parameters)
        # The raw paste (the source's own normalised intensities, no level chosen): what the
        # default replaces. run_case's "naive_mapped" is the default's own composite here.
        source = SourceTumor.from_arrays(subject.image_a, subject.label_a, subject.affine_a, label_value=1)
        case.outputs["naive_raw"] = insert_tumor(
            case.washed_out, subject.affine_b, source, harmonizer,
            replace(parameters, appearance="fixed", contrast=1.0), return_composite=True).composite
        cases.append(case)
        default = case.outputs[f"singan_s{harmonizer.default_start_scale}"]
        write_nifti(out / "data" / f"{name}_hrT2_washed_out.nii.gz", case.washed_out, subject.affine_b)
        write_nifti(out / "data" / f"{name}_hrT2_augmented.nii.gz", default, subject.affine_b)
        write_nifti(out / "data" / f"{name}_hrT2_augmented_Label.nii.gz", case.label, subject.affine_b)
        write_nifti(out / "data" / f"{name}_hrT2_truth.nii.gz", case.truth, subject.affine_b)

    print("[4/4] Writing the panel and the metrics ...")
    summary = summarize_fidelity(cases)
    order = ["naive_raw", "naive_mapped", "blurred_mapped", "poisson",
             *[f"singan_s{s}" for s in scales]]
    summary = {method: summary[method] for method in order}
    labels = {
        "naive_raw": "raw paste (source intensities, no level chosen)",
        "naive_mapped": "auto-level paste (the default's own composite, no pyramid)",
        "blurred_mapped": f"auto-level paste blurred (sd {CASE_BLUR_SIGMA_PX:g} px)",
        "poisson": "Poisson blend of the source mapped at lambda = 1",
        **{f"singan_s{s}": ("DEFAULT insertion" if s == harmonizer.default_start_scale else "default insertion")
           + f" (start scale {s})" for s in scales},
    }
    table = fidelity_markdown(summary, labels=labels)
    methods = ["naive_raw", "naive_mapped", f"singan_s{harmonizer.default_start_scale}"]
    try:
        from singan_insert.evaluation.figures import figure_grid

        figure_grid([case.panel_row(methods) for case in cases], out / "fig2_panel.png",
                    ["A source (ceT1)", "B washed out", "raw paste", "auto-level paste", "default insertion",
                     "truth (hrT2)"],
                    row_titles=[case.name for case in cases])
        figure = str(out / "fig2_panel.png")
    except ImportError as error:  # matplotlib is an optional extra
        print(f"      (no panel: {error})")
        figure = None
    elapsed = time.perf_counter() - started
    report = {"seconds": elapsed, "start_scales": scales, "parameters": DEMO_PARAMETERS.to_dict(),
              "default_start_scale": harmonizer.default_start_scale, "preset": preset, "annotated": True,
              "fidelity": summary, "figure": figure}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "metrics.md").write_text(f"# Demo metrics (mean over {num_subjects} subjects)\n\n{table}\n\n"
                                    f"{FIDELITY_LEGEND}\n\n{DEMO_CAVEAT}\n")
    print(table)
    print(f"(How to read it: {out / 'metrics.md'}.)")
    print(f"Done in {elapsed:.0f} s. Outputs in {out}/ (data/, model/, fig2_panel.png, metrics.md)")
    return report
