"""The default insertion on targets acquired otherwise than the model's training scan.

A user's target volumes differ from the ONE scan the harmonizer was trained on: another
resolution, more noise, a stronger intensity inhomogeneity (bias field). Here the development
model (one hrT2 slice of simulated subject 0, the fast preset) and the same model with that
slice's tumor annotated insert each test subject's ceT1 tumor into its washed-out hrT2, simulated
under each condition below, and are scored against the simulator's truth as in ``bench_quality``.

Conditions (everything else as :func:`~singan_insert.datasets.phantom.simulate_subject`'s defaults:
0.4 x 0.4 x 1.0 mm, noise 0.03, bias 0.2):

``as trained``           the defaults;
``coarser``              0.8 x 0.8 x 1.5 mm (64 x 64 x 32 voxels, the same field of view);
``noisier``              Rician noise 0.08 of the brightest tissue;
``no bias``, ``bias 0.4``, ``bias 0.6``   the log bias field's amplitude (0.6: a factor 0.55-1.8
                         across the head, an uncorrected scan's worst);
``in white matter``, ``at a CSF voxel``   the tumor centred on a random voxel (seeded) of that
                         tissue instead of where it grew, as ``RandomTumorInsertion`` with a
                         placement region does; the truth is the simulator's render of the tumor
                         there (a schwannoma's tissue inside the brain: no fluid cleft around it).

Rows: ``default`` (unannotated model), ``annotated`` (its defaults: since 2026-12-07 the rim is
off for a tumor moved to a location, i.e. in the two placed conditions), ``annotated, rim``
(``rim=True``: with the annotated slice's fluid cleft around the tumor, the default everywhere
before), ``annotated, no rim`` (``rim=False``) and, as the simplest alternative, the mapped
paste at a fixed contrast factor of 0.5 (the best fixed lambda of ``bench_quality``), harmonized;
and the oracle bound ``truth level`` (a flat tumor at the truth's own mean level, as in
``bench_quality``'s ``oracle_level``).
Columns: tumors with a contrast ratio >= 0.6 (target 2's "visible"), the median contrast ratio,
and the mean low-pass tumor error (target 3's measure).

Run: ``python benchmarks/dev_target_conditions.py [--subjects 8]``; writes
benchmarks/results/dev_target_conditions.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import add_subject_arguments, development_model, table, write_results  # noqa: E402

#: Per condition: simulate_subject's keyword arguments, and the tissue the tumor is placed in
#: (None: where it grew).
CONDITIONS: dict[str, tuple[dict, str | None]] = {
    "as trained": ({}, None),
    "coarser": ({"shape": (64, 64, 32), "spacing_b": (0.8, 0.8, 1.5)}, None),
    "noisier": ({"noise_level": 0.08}, None),
    "no bias": ({"bias_strength": 0.0}, None),
    "bias 0.4": ({"bias_strength": 0.4}, None),
    "bias 0.6": ({"bias_strength": 0.6}, None),
    "in white matter": ({}, "WHITE_MATTER"),
    "at a CSF voxel": ({}, "CSF"),
}


def prepare(name, subject, model, tissue, seed):
    """The quality case of ``subject``: where its tumor grew, or centred on a random voxel (seeded)
    of ``tissue`` where the whole tumor fits in the volume."""
    from singan_insert.datasets.phantom import Tissue
    from singan_insert.errors import SinganInsertError
    from singan_insert.evaluation.experiments import QualitySubject
    from singan_insert.insertion import Placement

    if tissue is None:
        return QualitySubject.prepare(name, subject, model)
    voxels = np.argwhere((subject.tissue_b == Tissue[tissue]) & (subject.label_b == 0))
    for voxel in np.random.default_rng(seed).permutation(voxels)[:50]:
        try:
            return QualitySubject.prepare(name, subject, model, placement=Placement(tuple(int(v) for v in voxel)))
        except SinganInsertError:  # the tumor would leave the volume there
            continue
    raise SinganInsertError(f"{name}: no voxel of {tissue} found where the tumor fits.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(parser, first_seed=100, subjects=8)
    parser.add_argument("--name", default="dev_target_conditions")
    args = parser.parse_args(argv)

    from singan_insert.datasets.phantom import simulate_subject
    from singan_insert.insertion import InsertionParameters, UnannotatedModelWarning

    started = time.perf_counter()
    model, training_subject, index = development_model(args.model_dir)
    annotated = model.copy().annotate(np.take(training_subject.label_b, index, axis=2) == 1)
    methods = {
        "default": (model, InsertionParameters(seed=0)),
        "annotated": (annotated, InsertionParameters(seed=0)),
        "annotated, rim": (annotated, InsertionParameters(seed=0, rim=True)),
        "annotated, no rim": (annotated, InsertionParameters(seed=0, rim=False)),
        "fixed 0.5": (model, InsertionParameters(seed=0, appearance="fixed", contrast=0.5)),
    }
    seeds = list(range(args.first_seed, args.first_seed + args.subjects))
    rows, per_subject = [], {}
    for condition, (settings, tissue) in CONDITIONS.items():
        scores: dict[str, list[dict]] = {name: [] for name in (*methods, "truth level")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnannotatedModelWarning)  # the unannotated row is meant
            for seed in seeds:
                case = prepare(f"subject {seed}", simulate_subject(seed, **settings), model, tissue, seed)
                for name, (harmonizer, parameters) in methods.items():
                    scores[name].append(case.score(case.insert(harmonizer, parameters)))
                scores["truth level"].append(case.score(case.flat_at_truth_level()))
        for name, values in scores.items():
            ratios = [v["contrast_ratio"] for v in values if np.isfinite(v["contrast_ratio"])]
            rows.append({"condition": condition, "method": name,
                         # of the tumors whose truth has a contrast (>= 0.02 of the range) to keep
                         "visible": f"{sum(r >= 0.6 for r in ratios)}/{len(ratios)}",
                         "median contrast ratio": float(np.median(ratios)),
                         "low-pass error": float(np.mean([v["lowpass_nmae_tumor"] for v in values]))})
            per_subject[f"{condition} / {name}"] = values
            print(rows[-1], flush=True)
    markdown = (f"Development model (fast preset, one hrT2 slice of subject 0) and the same model annotated; "
                f"test subjects {seeds[0]}..{seeds[-1]} simulated under each condition; "
                f"{(time.perf_counter() - started) / 60:.1f} min.\n\n"
                + table(rows, ["condition", "method", "visible", "median contrast ratio", "low-pass error"]))
    print(markdown)
    write_results(args.name, {"rows": rows, "per_subject": per_subject, "seeds": seeds,
                              "conditions": {k: {"simulation": {n: list(v) if isinstance(v, tuple) else v
                                                                for n, v in s.items()}, "placed_in": t}
                                             for k, (s, t) in CONDITIONS.items()}}, markdown)


if __name__ == "__main__":
    main()
