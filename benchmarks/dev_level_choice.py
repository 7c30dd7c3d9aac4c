"""How well the automatic appearance finds B's tumor level, against the simplest alternatives.

The default insertion without an annotation chooses each tumor's level in B by realism
(:func:`singan_insert.insertion.appearance.choose_level`); with the one-slice annotation the
level is the annotated tumor's, in model units. Both are compared here with the simulator's
truth, in the units the choice is made in: the target's own model units (its 0.5-99.5th
percentiles mapped to [-1, 1]). The level compared is the tumor's realised mean: the mean of the
output over the inserted mask, against the mean of ``render_b`` there (both with the edge's
partial volume, which mixes a small tumor's mean with its surroundings more than a large one's).

Rows (the level of each tumor, model units):

``realism``            the unannotated default, per tumor;
``annotation``         the annotated default;
``realism, pooled``    one level for all tumors: the median of the realism's own levels over the
                       subjects (what pooling the choice over many tumors would give; no truth used);
``best constant``      one level for all tumors, chosen WITH HINDSIGHT to fit the truth (a bound).

Metrics: mean and largest |level - truth|; ``wrong side``: tumors whose level lies on the other
side of their surroundings' mean (the shell the choice compares with) than the truth's; the
correlation of the per-tumor level with the truth. The JSON also holds each tumor's chosen level
before the edge's mixing (``chosen``) and its realism score's curve (``levels``, ``scores``,
``eligible``), to see near-ties between a darker and a brighter minimum.

Run: ``python benchmarks/dev_level_choice.py [--first-seed 200] [--subjects 20]``; prints a
markdown table and writes benchmarks/results/dev_level_choice.{json,md} (``--name`` to rename).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import add_subject_arguments, development_case, development_model, table, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(parser, subjects=20)
    parser.add_argument("--name", default="dev_level_choice")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from singan_insert.harmonizer.normalization import PercentileNormalization
    from singan_insert.insertion.insert import InsertionParameters, insert_tumor
    from singan_insert.insertion.placement import intensity_quantiles

    started = time.perf_counter()
    model, training_subject, index = development_model(args.model_dir)
    annotated = model.copy().annotate(np.take(training_subject.label_b, index, axis=2) == 1)
    subjects = []
    for seed in range(args.first_seed, args.first_seed + args.subjects):
        subject, washed, source, _, _ = development_case(seed)
        # The units the insertion chooses in: the target's own normalisation (insert_tumor's default).
        units = PercentileNormalization.fit(intensity_quantiles(washed))
        to_model = lambda value: float(units.to_model(torch.tensor(float(value))))  # noqa: E731
        realism = insert_tumor(washed, subject.affine_b, source, model, InsertionParameters(seed=0))
        with_annotation = insert_tumor(washed, subject.affine_b, source, annotated, InsertionParameters(seed=0))
        truth = subject.render_b(realism.mask)
        choice = realism.record["appearance"]["choice"]
        inside = realism.mask
        subjects.append({"seed": seed, "truth": to_model(truth[inside].mean()),
                         "realism": to_model(realism.image[inside].mean()),
                         "annotation": to_model(with_annotation.image[inside].mean()), "chosen": choice["level"],
                         "shell": choice["shell"], "tumor_voxels": int(realism.mask.sum()),
                         "levels": choice["levels"], "scores": choice["scores"], "eligible": choice["eligible"]})
        print(f"subject {seed}: truth {subjects[-1]['truth']:+.3f}, realism {subjects[-1]['realism']:+.3f}, "
              f"annotation {subjects[-1]['annotation']:+.3f}, shell {choice['shell']:+.3f}", flush=True)

    truth = np.array([s["truth"] for s in subjects])
    shell = np.array([s["shell"] for s in subjects])
    realism = np.array([s["realism"] for s in subjects])
    grid = np.linspace(-1, 1, 2001)
    best_constant = float(grid[np.argmin([np.abs(c - truth).mean() for c in grid])])
    candidates = {
        "realism": realism,
        "annotation": np.array([s["annotation"] for s in subjects]),
        "realism, pooled": np.full_like(truth, float(np.median(realism))),
        "best constant (hindsight)": np.full_like(truth, best_constant),
    }
    rows = []
    for name, levels in candidates.items():
        error = np.abs(levels - truth)
        varies = np.std(levels) > 1e-6  # the annotation level is one value up to rounding
        rows.append({"row": name, "mean |error|": float(error.mean()), "max |error|": float(error.max()),
                     "wrong side": int(np.sum(np.sign(levels - shell) != np.sign(truth - shell))),
                     "correlation with truth": float(np.corrcoef(levels, truth)[0, 1]) if varies else float("nan"),
                     "level range": f"{levels.min():+.3f} .. {levels.max():+.3f}"})
    seeds = f"{subjects[0]['seed']}-{subjects[-1]['seed']}"
    markdown = (
        f"Tumor level in B (the mean over the mask, in the target's model units) on simulated subjects {seeds} ({len(subjects)}); "
        f"the truth's levels span {truth.min():+.3f} .. {truth.max():+.3f} (sd {truth.std():.3f}).\n\n"
        + table(rows, list(rows[0])))
    print(markdown)
    write_results(args.name, {"subjects": subjects, "rows": rows, "best_constant": best_constant,
                              "seconds": time.perf_counter() - started}, markdown)


if __name__ == "__main__":
    main()
