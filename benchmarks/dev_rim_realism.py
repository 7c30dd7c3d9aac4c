"""Development check: can the realism score choose B's rim around a tumor without an annotation?

Without a one-slice annotation the insertion has no rim to copy
(:func:`singan_insert.insertion.annotation.render_rim`). The lead tried here: choose the level
of the first band (0-1 mm outside the tumor, where hrT2 shows the bright CSF cleft) by the same
patch nearest-neighbour score that chooses the tumor's level without an annotation
(:class:`singan_insert.insertion.appearance.PatchBank`), over candidate levels in model units.
The unannotated default insertion of each subject is scored with its first band shifted to
each candidate (other bands and the tumor unchanged), over the tumor and 3 mm around it, and
the chosen level is compared with the simulator's truth (whose first band is the cleft).

One harmonizer (``fast`` preset) is trained on ONE hrT2 slice of simulated subject 0, as in
``dev_harmonizer.py``; subjects are seeds 200, 201, ...

Run: ``python benchmarks/dev_rim_realism.py [--subjects 8] [--model-dir DIR]``; prints a
markdown table and writes benchmarks/results/dev_rim_realism.{json,md}.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import add_subject_arguments, development_case, development_model, machine, table, write_results  # noqa: E402

CANDIDATES = np.linspace(-0.6, 1.0, 17)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(parser)  # the model in --model-dir is reused when there
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from singan_insert.harmonizer.normalization import PercentileNormalization
    from singan_insert.insertion.annotation import RIM_EDGES_MM, render_rim, rim_profile
    from singan_insert.insertion.appearance import PatchBank, inplane_distance
    from singan_insert.insertion.insert import InsertionParameters, _model_grid, insert_tumor
    from singan_insert.insertion.placement import intensity_quantiles

    model = development_model(args.model_dir)[0]
    bank = PatchBank.of(model)
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.subjects):
        subject, washed, source, spacing, axis = development_case(seed)
        result = insert_tumor(washed, subject.affine_b, source, model, InsertionParameters(seed=0))
        truth = subject.render_b(result.mask)
        normalization = PercentileNormalization.fit(intensity_quantiles(washed))
        picked = result.record["tumor"]["slices"]

        def slices(volume):
            return np.moveaxis(volume, axis, 0)[picked]

        mask, output = slices(result.mask), slices(result.image)
        plane = tuple(spacing[a] for a in range(3) if a != axis)
        distance = inplane_distance(mask, plane)

        def model_units(values):
            return normalization.to_model(torch.tensor(np.asarray(values, np.float64))).numpy()

        truth_bands = model_units(rim_profile(slices(truth), mask, plane, RIM_EDGES_MM, distance))
        candidates = []
        for level in CANDIDATES:
            shifted, _ = render_rim(output, mask, plane, (float(level), float("nan"), float("nan")),
                                    normalization, RIM_EDGES_MM, distance)
            candidates.append(normalization.to_model(_model_grid(shifted, plane, model)))
        region = _model_grid((distance <= RIM_EDGES_MM[-1]).astype(np.float32), plane, model) > 0.5
        score = bank.score(torch.stack(candidates), region).numpy()
        chosen = float(CANDIDATES[int(np.argmin(score))])
        rows.append({"seed": seed, "truth_band0": float(truth_bands[0]),
                     "output_band0": float(model_units(rim_profile(output, mask, plane, RIM_EDGES_MM, distance))[0]),
                     "chosen_band0": chosen, "error_chosen": abs(chosen - float(truth_bands[0])),
                     "score_truth_minus_best": float(np.interp(truth_bands[0], CANDIDATES, score) - score.min()),
                     "scores": score.tolist()})
        print(f"seed {seed}: truth {truth_bands[0]:+.2f}, chosen {chosen:+.2f}", flush=True)
    darkest = sum(r["chosen_band0"] == CANDIDATES[0] for r in rows)
    summary = {"mean_error_chosen": float(np.mean([r["error_chosen"] for r in rows])),
               "mean_error_kept": float(np.mean([abs(r["output_band0"] - r["truth_band0"]) for r in rows])),
               "chosen_darkest_candidate": darkest, "subjects": len(rows),
               "chosen_below_truth": sum(r["chosen_band0"] < r["truth_band0"] for r in rows)}
    markdown = "\n".join([
        f"Machine: {machine()['cpu_count']} CPUs, {machine()['date']}. Seeds {rows[0]['seed']}..{rows[-1]['seed']}; "
        f"candidates {CANDIDATES[0]:+.1f}..{CANDIDATES[-1]:+.1f} (model units) for the 0-1 mm band.",
        "",
        table(rows, ["seed", "truth_band0", "output_band0", "chosen_band0", "error_chosen", "score_truth_minus_best"]),
        "",
        f"Mean |chosen - truth| {summary['mean_error_chosen']:.3f} (the band as the insertion leaves it: "
        f"{summary['mean_error_kept']:.3f}); chosen below the truth in {summary['chosen_below_truth']}/{len(rows)}, "
        f"the darkest candidate in {darkest}/{len(rows)}.",
    ])
    print(markdown)
    write_results("dev_rim_realism", {"candidates": CANDIDATES.tolist(), "rows": rows,
                                      "summary": summary}, markdown)


if __name__ == "__main__":
    main()
