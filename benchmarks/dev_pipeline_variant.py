"""Exploratory, downstream: one more B' variant on a work folder that is already filled.

``benchmarks/bench_pipeline.py`` costs about an hour per pipeline seed, most of it CycleGAN and
ten pix2pix runs. To judge one change downstream, this script reuses a filled work folder (its
S_A, CycleGAN, harmonizer and B'), writes one more B' variant
(:mod:`singan_insert.pipeline.variants`), trains one pix2pix per seed on it and pairs its Dice
with the other rows (a 95 % bootstrap CI), with the variant's tumor and cleft contrasts:

* ``narrow_blend``: ours with a narrower blend (``dilation_mm=0``, ``feather_mm=1``);
* ``replayed``: ours' insertions made again by the library's CURRENT code, same parameters and
  seeds, with their composites as ``replayed_naive`` (the naive paste of the current code, which
  its target-7 numbers pair against): what a change of the code does downstream.

The other rows come from the folder where their predictions are there, otherwise from
``--reference``, the results JSON of the ``bench_pipeline`` run that the folder reproduces (the
same seed on the same kind of machine: the runs are bit-identical there, benchmarks page). That
is checked, not assumed: the baseline is segmented again, and the ``--check-row`` row (default
``naive``) is trained again for the first pix2pix seed; both must give the reference's per-case
Dice exactly, or the script stops. Where the variant's own naive paste comes out voxel-identical
to the folder's ``naive`` B', case by case (a change that leaves the composite alone, on a folder
the current code filled), the folder's naive rows are used instead of training it again.

    # a narrower blend, against ours of the same folder
    OMP_NUM_THREADS=1 python benchmarks/dev_pipeline_variant.py --work /tmp/singan-insert-bench-pipeline \\
        --variant narrow_blend --name dev_pipeline_blend
    # the current code's ours on a folder made by the committed code, against that run's rows
    OMP_NUM_THREADS=1 python benchmarks/dev_pipeline_variant.py --work /tmp/sib-seed2 --variant replayed \\
        --reference benchmarks/results/bench_pipeline_seed2.json --name dev_pipeline_replayed_seed2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import RESULTS, machine, write_results  # noqa: E402
from bench_pipeline import (BASELINE_MARGIN_TARGET, GAP_FRACTION_TARGET, ROWS, _cleft_contrast,  # noqa: E402
                            _tumor_contrast, _tumor_texture)

#: The B' variants each choice trains: the variant, and the naive paste it is judged against
#: (None: the folder's or the reference's own ``naive``).
VARIANTS = {"narrow_blend": None, "replayed": "replayed_naive"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="a bench_pipeline work folder (after its run)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="narrow_blend")
    parser.add_argument("--pix2pix-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--reference", help="results JSON of the bench_pipeline run the folder reproduces")
    parser.add_argument("--check-row", default="naive", choices=sorted(ROWS) + ["none"],
                        help="row trained again to check the folder against --reference (default naive)")
    parser.add_argument("--name", default="dev_pipeline_variant")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from singan_insert.datasets.crossmoda import CrossModaData
    from singan_insert.evaluation.metrics import paired_bootstrap_ci, segmentation_scores
    from singan_insert.insertion.placement import spacing_from_affine
    from singan_insert.pipeline import variants
    from singan_insert.pipeline.workflow import CrossModaPipeline, read_volume

    work = Path(args.work)
    pipeline = CrossModaPipeline(CrossModaData(work / "data"), work / "run", None)
    reference = json.loads(Path(args.reference).read_text()) if args.reference else None
    validation = pipeline.data.validation_images()
    truths = [read_volume(pipeline.data.truth(name)) for name, _ in validation]

    def dice(predictions):
        return [segmentation_scores(read_volume(p)[0], t, spacing_from_affine(a), label=1)["dice"]
                for p, (t, a) in zip(predictions, truths)]

    def reference_dice(seed, row):
        if reference is None:
            return None
        if [name for name, _ in validation] != reference["validation_cases"]:
            raise SystemExit(f"{args.reference} was run on other validation cases than {work}.")
        return reference["by_pix2pix_seed"][str(seed)]["per_case"].get(row, {}).get("dice")

    checks = {}
    baseline = dice(pipeline.segment_validation("baseline"))
    if reference is not None:
        checks["baseline"] = _same(baseline, reference_dice(args.pix2pix_seeds[0], "baseline"), "baseline")
        if args.check_row != "none":
            seed = args.pix2pix_seeds[0]
            variants.train_pix2pix_seeded(pipeline, ROWS[args.check_row], seed)
            again = dice(variants.segment_validation_seeded(pipeline, ROWS[args.check_row], seed))
            checks[f"{args.check_row} (pix2pix seed {seed})"] = _same(again, reference_dice(seed, args.check_row),
                                                                       args.check_row)
    getattr(variants, f"write_{args.variant}_bprime")(pipeline)
    variant, own_naive = args.variant, VARIANTS[args.variant]
    naive_reused = own_naive is not None and _same_bprime(pipeline, own_naive, "naive")
    if naive_reused:  # the current code's naive paste is the folder's: its rows are reused, not trained again
        own_naive = None

    def row_dice(seed, row):
        ours = [pipeline.prediction(f"{ROWS[row]}_seed{seed}", name) for name, _ in validation]
        if all(path.is_file() for path in ours):
            return dice(ours)
        return reference_dice(seed, row)

    rows = {}
    for seed in args.pix2pix_seeds:
        scores = {"baseline": baseline}
        for trained in (variant, own_naive):
            if trained is not None:
                variants.train_pix2pix_seeded(pipeline, trained, seed)
                scores[trained] = dice(variants.segment_validation_seeded(pipeline, trained, seed))
        for row in ("ours", "naive", "oracle"):
            found = row_dice(seed, row)
            if found is not None:
                scores[row] = found
        if "ours" not in scores:
            raise SystemExit(f"{work} has no 'ours' predictions for pix2pix seed {seed} and no --reference has them.")
        naive = own_naive or "naive"
        mean = {row: float(np.mean(values)) for row, values in scores.items()}
        pairs = {f"{variant}-{other}": paired_bootstrap_ci(scores[variant], scores[other], seed=0)
                 for other in ("ours", naive, "baseline") if other in scores}
        entry = {"naive_row": naive, "mean_dice": mean, "paired": pairs, "per_case": scores}
        if naive in scores and "oracle" in scores:
            gap = mean["oracle"] - mean[naive]
            entry["gap_closed"] = {variant: (mean[variant] - mean[naive]) / gap if gap > 0 else float("nan")}
            if "naive" in scores:  # ours and the naive paste of the code that filled the folder
                entry["gap_closed"]["ours"] = (mean["ours"] - mean["naive"]) / (mean["oracle"] - mean["naive"])
            entry["targets_7"] = {
                "closes_half_of_gap": bool(entry["gap_closed"][variant] >= GAP_FRACTION_TARGET),
                "ci_above_naive": bool(pairs[f"{variant}-{naive}"]["low"] > 0),
                "above_baseline_plus_margin": bool(mean[variant] - mean["baseline"] >= BASELINE_MARGIN_TARGET)}
        rows[str(seed)] = entry
    diagnostics = _diagnostics(pipeline, args.variant)
    report = {"work": str(work), "variant": args.variant, "pipeline_seed": pipeline.settings.seed,
              "reference": args.reference, "reproduction_checks": checks, "naive_reused": naive_reused,
              "rows": rows, "diagnostics": diagnostics}
    text = _markdown(report, work)
    print(text)
    write_results(args.name, report, text, folder=RESULTS)


def _same_bprime(pipeline, variant: str, other: str) -> bool:
    """Whether two B' variants of the folder hold the same voxels and affines, case by case."""
    from singan_insert.pipeline.variants import _digest

    def images(name):
        return sorted(pipeline.bprime_dir(ROWS.get(name, name)).glob("*_image.nii.gz"))

    ours, theirs = images(variant), images(other)
    return bool(ours) and [p.name for p in ours] == [p.name for p in theirs] and \
        all(_digest([a]) == _digest([b]) for a, b in zip(ours, theirs))


def _same(now, then, row) -> dict:
    if then is None:
        raise SystemExit(f"The reference has no per-case Dice for {row!r}.")
    difference = float(np.max(np.abs(np.asarray(now) - np.asarray(then))))
    if difference > 1e-9:
        raise SystemExit(f"{row}: this folder does not reproduce the reference (max per-case Dice difference "
                         f"{difference:.3g}); its other rows cannot be reused. Run bench_pipeline on it instead.")
    return {"cases": len(now), "max_abs_difference": difference}


def _diagnostics(pipeline, variant: str) -> dict[str, float]:
    """Mean tumor contrast, texture and cleft contrast of the variant's B' and of ours' (working grid)."""
    from singan_insert.pipeline.workflow import read_volume

    values: dict[str, list[float]] = {}
    for record in sorted(pipeline.bprime_dir("harmonized").glob("*_aug*.json")):
        stem = record.name[:-len(".json")]
        mask = read_volume(record.with_name(f"{stem}_label.nii.gz"))[0] == 1
        for name in ("ours", variant, VARIANTS[variant]):
            if name is None:
                continue
            folder = ROWS.get(name, name)
            image = read_volume(pipeline.bprime_dir(folder) / f"{stem}_image.nii.gz")[0]
            for what, measure in (("tumor contrast", _tumor_contrast), ("tumor texture", _tumor_texture),
                                  ("cleft contrast", _cleft_contrast)):
                values.setdefault(f"{what} in {name} B'", []).append(measure(image, mask))
    return {key: float(np.nanmean(v)) for key, v in values.items()}


def _markdown(report: dict, work: Path) -> str:
    variant = report["variant"]
    lines = [f"Machine: {machine()['cpu_count']} CPUs, {machine()['date']}. Work folder {work} (pipeline seed "
             f"{report['pipeline_seed']}); variant {variant!r}."]
    if report["reproduction_checks"]:
        lines.append("Reproduces " + str(report["reference"]) + ": " + "; ".join(
            f"{row} per-case Dice identical ({check['cases']} cases, max |difference| {check['max_abs_difference']:.1g})"
            for row, check in report["reproduction_checks"].items()) + ".")
    naive = next(iter(report["rows"].values()))["naive_row"]
    if report.get("naive_reused"):
        lines.append(f"The variant's own naive paste ({VARIANTS[variant]}) is voxel-identical to the folder's "
                     "naive B', case by case: the folder's naive rows are used.")
    lines += ["", f"| pix2pix seed | rows (mean Dice) | {variant} - ours [95 % CI] | {variant} - {naive} [95 % CI] | "
                  f"gap closed: {variant} (against {naive}) / ours (against naive) | target 7 |",
              "|---|---|---|---|---|---|"]

    def ci(pairs, key):
        if key not in pairs:
            return "–"
        c = pairs[key]
        return f"{c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"

    for seed, entry in report["rows"].items():
        means = ", ".join(f"{row} {value:.3f}" for row, value in entry["mean_dice"].items())
        gap = entry.get("gap_closed")
        closed = (f"{gap[variant]:.2f} / " + (f"{gap['ours']:.2f}" if "ours" in gap else "–")) if gap else "–"
        met = entry.get("targets_7")
        verdict = ("met" if all(met.values()) else "not met: " + ", ".join(k for k, v in met.items() if not v)) \
            if met else "–"
        lines.append(f"| {seed} | {means} | {ci(entry['paired'], f'{variant}-ours')} | "
                     f"{ci(entry['paired'], f'{variant}-{naive}')} | {closed} | {verdict} |")
    lines += ["", "| diagnostic (mean over the B' cases) | value |", "|---|---|"]
    lines += [f"| {key} | {value:+.3f} |" for key, value in report["diagnostics"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
