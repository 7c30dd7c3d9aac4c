"""The paper's Table 1 on simulated crossMoDA-like data: does tumor insertion help cross-modal
segmentation, and how much of what an oracle insertion would give does it get?

A simulated data set in the crossMoDA layout (:func:`singan_insert.pipeline.workflow.simulate_crossmoda`):
labelled ceT1-like scans (A), unlabelled hrT2-like scans of other subjects (B), and hrT2-like
validation scans of yet other subjects with their true labels. The workflow of
:class:`singan_insert.pipeline.workflow.CrossModaPipeline` runs once per pipeline seed; then, for
EACH pix2pix seed (``--pix2pix-seeds``, two by default), pix2pix B' -> A is trained on every B'
variant (:mod:`singan_insert.pipeline.variants`) and the validation scans are segmented:

* baseline: CycleGAN's B -> A generator, then S_A (no pix2pix: one row per run);
* ours: B' = each A tumor pasted into its own CycleGAN translation and harmonized;
* naive: the very same pastes, not harmonized;
* oracle: each pasted tumor replaced by the simulator's TRUE hrT2 rendering of that subject and
  its surroundings, blended with our weight (the ceiling of any insertion);
* gba: GBA-style, the translated tumor contrast-scaled in place (lambda in {0.5, 0.8, 1.5}),
  then harmonized;
* ours_unannotated: ours replayed by the same harmonizer without its one-slice annotation (the
  simulated data set ships a training label for the harmonizer's scan, which by default also
  annotates its training slice);
* ours_no_rim: ours replayed without the annotated rim (B's band levels 0-3 mm around the
  tumor, :func:`singan_insert.insertion.annotation.render_rim`);
* ours_no_pyramid: ours replayed without the generators (level, rim and texture kept): what the
  pyramid itself adds;
* ours_tumor_harmonized: ours replayed with the tumor's voxels taken from the pyramid
  (``harmonize_tumor=True``, the paper's way) instead of keeping their chosen appearance.

Every comparison is paired (same validation cases, same pix2pix seed, same run): mean
difference with a 95 % bootstrap CI (:func:`singan_insert.evaluation.metrics.paired_bootstrap_ci`)
and a Wilcoxon p. Targets of issue 10 (item 7), per pix2pix seed: ours closes >= 50 % of the
naive -> oracle gap, the CI of ours - naive above 0, ours > gba, ours > baseline + 0.15.
Diagnostics (tumor-vs-ring contrast, the tumor's texture, i.e. its in-plane high-pass sd, and
the contrast of the cleft, the first voxel ring around the tumor, to the tissue 3-5 voxels out;
of the fake hrT2, each B', and the real validation hrT2) are all measured on the working grid. Reproducibility: seed, pix2pix seeds, torch version and
threads are recorded; ``--repeat`` runs the configuration twice in fresh folders and reports
the run-to-run spread of every per-case score.

    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py --seed 0    # full: ~1.5 h per pipeline seed (*)
    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py --seed 1 --name bench_pipeline_seed1
    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py --cases 4 4 4 --quick     # plumbing check
    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py --cases 3 3 3 --quick --repeat

(*) measured on 2026-12-02: 64 min each for seeds 0 and 1 run side by side on 2 CPU cores,
with the segmenter and CycleGAN steps already done (CycleGAN alone: about 25 min per seed
under the same load); ten pix2pix runs of about 5 min each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import RESULTS, machine, write_results  # noqa: E402

ROWS = {"ours": "harmonized", "naive": "naive", "oracle": "oracle", "gba": "gba",
        "ours_unannotated": "unannotated", "ours_no_rim": "no_rim", "ours_fixed_rim": "fixed_rim",
        "ours_no_pyramid": "no_pyramid", "ours_tumor_harmonized": "tumor_harmonized"}
#: Rows every run has: target 7 compares them.
REQUIRED_ROWS = ("ours", "naive", "oracle")
TITLES = {
    "baseline": "Baseline: CycleGAN(B->A) + S_A",
    "ours": "Ours: pix2pix(harmonized B') + S_A",
    "naive": "Ablation: naive paste",
    "oracle": "Oracle: true hrT2 tumor + surroundings, blended like ours",
    "gba": "GBA-style: translated tumor x lambda in place, harmonized",
    "ours_unannotated": "Ours without the one-slice annotation",
    "ours_no_rim": "Ours without the annotated rim",
    "ours_fixed_rim": "Ours with the annotated rim's widths in mm (not scaled by the tumor's size)",
    "ours_no_pyramid": "Ours without the generators (level, rim, texture only)",
    "ours_tumor_harmonized": "Ours with the tumor harmonized by the pyramid (paper)",
}
PAIRS = (("ours", "baseline"), ("ours", "naive"), ("oracle", "naive"), ("gba", "naive"), ("ours", "gba"),
         ("naive", "baseline"), ("ours", "ours_unannotated"), ("ours_unannotated", "naive"),
         ("ours", "ours_no_rim"), ("ours_no_rim", "naive"), ("ours", "ours_fixed_rim"), ("ours", "ours_no_pyramid"),
         ("ours", "ours_tumor_harmonized"))
GAP_FRACTION_TARGET = 0.5
BASELINE_MARGIN_TARGET = 0.15


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, nargs=3, default=[20, 20, 32], metavar=("SOURCE", "TARGET", "VALIDATION"),
                        help="simulated subjects per split (default 20 20 32, crossMoDA 2021's validation size)")
    parser.add_argument("--segmenter", choices=["small", "nnunet"], default="small")
    parser.add_argument("--seed", type=int, default=0, help="pipeline seed (data and every stage)")
    parser.add_argument("--pix2pix-seeds", type=int, nargs="+", default=[0, 1],
                        help="pix2pix seeds, each a full set of rows (default 0 1)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "singan-insert-bench-pipeline"),
                        help="work folder (re-runs resume from it)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete the work folder first (needed after a change of the library's code: "
                             "the resume checks inputs, not code)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="short schedules (plumbing check only; the numbers mean nothing)")
    parser.add_argument("--repeat", action="store_true",
                        help="run the configuration twice in fresh folders and report the run-to-run spread")
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=sorted(ROWS),
                        help="B' rows to train pix2pix for (default all; ours, naive and oracle are always run): "
                             "each row costs one pix2pix per pix2pix seed")
    parser.add_argument("--results", default=str(RESULTS), help="output folder (default benchmarks/results)")
    parser.add_argument("--name", default="bench_pipeline", help="results file name (without extension)")
    args = parser.parse_args(argv)
    if len(set(args.pix2pix_seeds)) != len(args.pix2pix_seeds):
        parser.error("--pix2pix-seeds must differ")
    args.rows = [row for row in ROWS if row in set(args.rows) | set(REQUIRED_ROWS)]

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.repeat:
        runs = []
        for attempt in (1, 2):
            folder = work / f"repeat_{attempt}"
            if folder.exists():
                shutil.rmtree(folder)
            print(f"== repeat run {attempt} in {folder}", flush=True)
            runs.append(run_once(args, folder))
        report, text = _repeat_report(args, runs)
        print(text)
        write_results(f"{args.name}_repeat", report, text, folder=Path(args.results))
        return
    if args.fresh and work.exists():
        shutil.rmtree(work)
    result = run_once(args, work)
    text = _markdown(args, result)
    print(text)
    write_results(args.name, result, text, folder=Path(args.results))


def run_once(args, work: Path) -> dict:
    """One pipeline run (one pipeline seed) with every row for every pix2pix seed."""
    import torch

    from singan_insert.evaluation.metrics import paired_bootstrap_ci, segmentation_scores, summarize, table1_report
    from singan_insert.insertion.placement import spacing_from_affine
    from singan_insert.pipeline import variants
    from singan_insert.pipeline.workflow import (CrossModaPipeline, PipelineSettings, read_volume, resample_image,
                                                 resample_labels, simulate_crossmoda, write_volume)

    settings = PipelineSettings.profile("cpu", segmenter=args.segmenter, seed=args.seed)
    if args.quick:
        settings = replace(settings, segmenter_iterations=40, cyclegan_iterations=40, pix2pix_iterations=40,
                           harmonizer_iterations=20)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def timed(step, function, *a, **k):
        t0 = time.perf_counter()
        result = function(*a, **k)
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - t0
        print(f"  {step}: {time.perf_counter() - t0:.0f} s (total {time.perf_counter() - started:.0f} s)", flush=True)
        return result

    print(f"Simulating {args.cases} subjects into {work / 'data'} ...", flush=True)
    data = timed("simulate", simulate_crossmoda, work / "data", *args.cases, seed=args.seed, source_validation=True)
    pipeline = CrossModaPipeline(data, work / "run", settings)
    timed("prepare", pipeline.prepare)
    timed("1_segmenter", pipeline.train_source_segmenter)
    timed("2_cyclegan", pipeline.train_cyclegan)
    timed("2_translate", pipeline.translate_sources)
    timed("3_harmonizer", pipeline.train_harmonizer)
    timed("4_insert", pipeline.insert_tumors)
    rows_run = {row: ROWS[row] for row in args.rows}
    for variant in rows_run.values():
        if variant not in ("harmonized", "naive"):  # the workflow writes those two
            timed(f"4_{variant}", getattr(variants, f"write_{variant}_bprime"), pipeline)
    baseline_predictions = timed("6_segment_baseline", pipeline.segment_validation, "baseline")

    validation = data.validation_images()
    truths = [read_volume(data.truth(name)) for name, _ in validation]

    def score(predictions) -> dict[str, list[float]]:
        rows = {"dice": [], "assd": []}
        for path, (truth, affine) in zip(predictions, truths):
            scores = segmentation_scores(read_volume(path)[0], truth, spacing_from_affine(affine), label=1)
            rows["dice"].append(scores["dice"])
            rows["assd"].append(scores["assd"])
        return rows

    baseline = score(baseline_predictions)
    by_seed = {}
    for pix2pix_seed in args.pix2pix_seeds:
        rows = {"baseline": baseline}
        for row, variant in rows_run.items():
            timed(f"5_pix2pix_{variant}", variants.train_pix2pix_seeded, pipeline, variant, pix2pix_seed)
            predictions = timed(f"6_segment_{variant}", variants.segment_validation_seeded, pipeline, variant,
                                pix2pix_seed)
            rows[row] = score(predictions)
        table = table1_report({TITLES[r]: v for r, v in rows.items()}, metrics=["dice", "assd"], file=None)
        paired = {}
        for a, b in (pair for pair in PAIRS if set(pair) <= set(rows)):
            paired[f"{a}-{b}"] = {metric: {**paired_bootstrap_ci(rows[a][metric], rows[b][metric], seed=0),
                                           "p_wilcoxon": _wilcoxon(rows[a][metric], rows[b][metric])}
                                  for metric in ("dice", "assd")}
        mean = {r: float(np.mean(v["dice"])) for r, v in rows.items()}
        gap = mean["oracle"] - mean["naive"]
        closed = (mean["ours"] - mean["naive"]) / gap if gap > 0 else float("nan")
        targets = {
            "7_closes_half_of_naive_to_oracle_gap": {"value": closed, "threshold": f">= {GAP_FRACTION_TARGET:g}",
                                                     "pass": bool(closed >= GAP_FRACTION_TARGET)},
            "7_ours_minus_naive_ci_above_zero": {"value": paired["ours-naive"]["dice"]["low"], "threshold": "> 0",
                                                 "pass": bool(paired["ours-naive"]["dice"]["low"] > 0)},
            "7_ours_above_baseline_plus_0.15": {"value": mean["ours"] - mean["baseline"],
                                                "threshold": f">= {BASELINE_MARGIN_TARGET:g}",
                                                "pass": bool(mean["ours"] - mean["baseline"]
                                                             >= BASELINE_MARGIN_TARGET)},
        }
        if "gba" in mean:
            targets["7_ours_above_gba"] = {"value": mean["ours"] - mean["gba"], "threshold": "> 0",
                                           "pass": bool(mean["ours"] > mean["gba"])}
        by_seed[str(pix2pix_seed)] = {"per_case": rows, "table1": table, "paired": paired, "mean_dice": mean,
                                      "targets": targets}

    diagnostics = timed("diagnostics", _diagnostics, pipeline, args.pix2pix_seeds[0], rows_run)
    figure = _figure(pipeline, args.pix2pix_seeds[0], rows_run,
                     work / "fig3.png" if args.repeat else Path(args.results) / f"{args.name}_fig3.png")

    # Reference rows: S_A in its own domain, and the working grid's resolution ceiling.
    source_validation = sorted((data.root / "source_validation").glob("*_ceT1.nii.gz"))
    grid_inputs = []
    for path in source_validation:
        image, affine = read_volume(path)
        shape, grid_affine = settings.grid.grid_for(image.shape, affine)
        grid_inputs.append(write_volume(work / "run" / "grid" / "source_validation" / path.name,
                                        resample_image(image, affine, grid_affine, shape), grid_affine))
    predictions = timed("reference_source_domain", pipeline.segment, grid_inputs,
                        work / "run" / "predictions_grid" / "source_domain")
    reference = {"source": {"dice": [], "assd": []}, "grid": {"dice": [], "assd": []}}
    for path, prediction_path in zip(source_validation, predictions):
        label_path = path.with_name(path.name.replace("_ceT1", "_Label"))
        truth, affine = read_volume(label_path)
        prediction, grid_affine = read_volume(prediction_path)
        scores = segmentation_scores(pipeline.to_native(prediction, grid_affine, label_path), truth,
                                     spacing_from_affine(affine), label=1)
        reference["source"]["dice"].append(scores["dice"])
        reference["source"]["assd"].append(scores["assd"])
    for name, _ in validation:
        truth, affine = read_volume(data.truth(name))
        shape, grid_affine = settings.grid.grid_for(truth.shape, affine)
        round_trip = resample_labels(resample_labels(truth, affine, grid_affine, shape), grid_affine, affine, truth.shape)
        scores = segmentation_scores(round_trip, truth, spacing_from_affine(affine), label=1)
        reference["grid"]["dice"].append(scores["dice"])
        reference["grid"]["assd"].append(scores["assd"])

    info = machine()
    return {
        "cases": args.cases, "seed": args.seed, "pix2pix_seeds": args.pix2pix_seeds, "quick": args.quick,
        "reproducibility": {"seed": args.seed, "pix2pix_seeds": args.pix2pix_seeds, "torch_threads": args.threads,
                            "torch": torch.__version__, "numpy": np.__version__, "cpu_count": info["cpu_count"],
                            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()},
        "segmenter": args.segmenter, "settings": settings.to_dict(), "seconds": time.perf_counter() - started,
        "timings": timings, "titles": TITLES, "validation_cases": [name for name, _ in validation],
        "figure": str(figure),
        "by_pix2pix_seed": by_seed,
        "diagnostics": {k: summarize(v) for k, v in diagnostics.items()}, "diagnostics_values": diagnostics,
        "reference": {k: {m: summarize(v[m]) for m in v} for k, v in reference.items()},
    }


def _markdown(args, result: dict) -> str:
    info = machine()
    settings = result["settings"]
    lines = [
        f"Machine: {info['cpu_count']} CPUs, torch {info['torch']} with {args.threads} thread(s), {info['date']}; "
        f"this invocation {result['seconds'] / 60:.1f} min (steps already in the work folder are reused: "
        "see the time per step)"
        f"{' (QUICK: short schedules, the numbers mean nothing)' if args.quick else ''}.",
        f"Data: simulated crossMoDA layout, {args.cases[0]} labelled ceT1 / {args.cases[1]} unlabelled hrT2 / "
        f"{args.cases[2]} hrT2 validation subjects; pipeline seed {args.seed}, pix2pix seeds {args.pix2pix_seeds}. "
        f"Harmonizer {settings['harmonizer_preset']!r}, CycleGAN {settings['cyclegan_preset']!r}, pix2pix "
        f"{settings['pix2pix_preset']!r}, S_A {args.segmenter!r}; contrast factor {settings['contrast']}.",
        "",
    ]
    for seed, entry in result["by_pix2pix_seed"].items():
        lines += [f"## pix2pix seed {seed}", "", entry["table1"]["markdown"], "",
                  "Paired per-case differences (same cases, same run): mean [95 % bootstrap CI], Wilcoxon p", "",
                  "| pair | ΔDice | p (Dice) | ΔASSD (mm) | p (ASSD) |", "|---|---|---|---|---|"]
        for pair, values in entry["paired"].items():
            d, s = values["dice"], values["assd"]
            lines.append(f"| {pair} | {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | {d['p_wilcoxon']:.3g} | "
                         f"{s['mean']:+.2f} [{s['low']:+.2f}, {s['high']:+.2f}] | {s['p_wilcoxon']:.3g} |")
        lines += ["", "| target | value | threshold | verdict |", "|---|---|---|---|"]
        for name, check in entry["targets"].items():
            lines.append(f"| {name} | {check['value']:.4g} | {check['threshold']} | "
                         f"{'PASS' if check['pass'] else 'FAIL'} |")
        lines.append("")
    lines += ["Diagnostics, all on the working grid (tumor-vs-ring contrast / robust range; pix2pix fit):", "",
              "| quantity | mean ± sd |", "|---|---|"]
    for key, summary in result["diagnostics"].items():
        lines.append(f"| {key} | {summary['mean']:.3f} ± {summary['sd']:.3f} |")
    lines += ["", f"Figure: {Path(result['figure']).name} (pix2pix seed {args.pix2pix_seeds[0]}).",
              "", "References: " + "; ".join(f"{k}: Dice {v['dice']['mean']:.3f}"
                                              for k, v in result["reference"].items()),
              "", "Time per step (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["timings"].items())]
    return "\n".join(lines)


def _repeat_report(args, runs: list[dict]) -> tuple[dict, str]:
    """Per-case score differences between two runs of the same configuration."""
    spread = {}
    for seed in runs[0]["by_pix2pix_seed"]:
        for row in runs[0]["by_pix2pix_seed"][seed]["per_case"]:
            for metric in ("dice", "assd"):
                a = np.asarray(runs[0]["by_pix2pix_seed"][seed]["per_case"][row][metric])
                b = np.asarray(runs[1]["by_pix2pix_seed"][seed]["per_case"][row][metric])
                spread[f"{row} (pix2pix seed {seed}) {metric}"] = {
                    "max_abs_difference": float(np.max(np.abs(a - b))),
                    "mean_abs_difference": float(np.mean(np.abs(a - b))),
                    "mean_difference_of_means": float(b.mean() - a.mean()), "identical": bool(np.array_equal(a, b))}
    info = machine()
    lines = [f"Run-to-run spread: the same configuration twice in fresh folders (cases {args.cases}, seed {args.seed}, "
             f"pix2pix seeds {args.pix2pix_seeds}, torch {info['torch']}, {args.threads} thread(s), "
             f"{info['date']}{', QUICK schedules' if args.quick else ''}).", "",
             "| score | max abs diff | mean abs diff | diff of means | identical |", "|---|---|---|---|---|"]
    for key, value in spread.items():
        lines.append(f"| {key} | {value['max_abs_difference']:.4g} | {value['mean_abs_difference']:.4g} | "
                     f"{value['mean_difference_of_means']:+.4g} | {value['identical']} |")
    report = {"spread": spread, "all_identical": all(v["identical"] for v in spread.values()),
              "seconds": [run["seconds"] for run in runs], "reproducibility": runs[0]["reproducibility"],
              "quick": args.quick, "cases": args.cases}
    lines += ["", f"All per-case scores identical: {report['all_identical']}."]
    return report, "\n".join(lines)


def _figure(pipeline, pix2pix_seed: int, rows: dict[str, str], path: Path, num_cases: int = 4) -> Path:
    """Fig.-3-style grid: per validation case, hrT2 with the truth, then each row's translation to A
    with its S_A prediction (contours), through the slice of largest true tumor area."""
    from singan_insert.evaluation.figures import figure_grid
    from singan_insert.pipeline.workflow import read_volume, resample_labels

    methods = {"baseline": "baseline", **{row: f"{variant}_seed{pix2pix_seed}" for row, variant in rows.items()}}

    def unit(image):
        low, high = np.percentile(image, (0.5, 99.5))
        return np.clip((image - low) / max(high - low, 1e-6), 0, 1)

    panels, contours, names = [], [], []
    for name, _ in pipeline.data.validation_images()[:num_cases]:
        hrt2, grid_affine = read_volume(pipeline.grid_validation(name))
        truth, affine = read_volume(pipeline.data.truth(name))
        truth = resample_labels((truth == 1).astype(np.uint8), affine, grid_affine, hrt2.shape) == 1
        k = int(np.argmax(truth.sum(axis=(0, 1)))) if truth.any() else hrt2.shape[2] // 2
        row, lines = [unit(hrt2[:, :, k])], [truth[:, :, k]]
        for method in methods.values():
            row.append(unit(read_volume(pipeline.translated(method, name))[0][:, :, k]))
            prediction = read_volume(pipeline.work / "predictions_grid" / method / f"{name}_ceT1.nii.gz")[0]
            lines.append(prediction[:, :, k] == 1)
        panels.append(row)
        contours.append(lines)
        names.append(name)
    titles = ["hrT2 + truth"] + [f"{row} (A + S_A)" for row in methods]
    return figure_grid(panels, path, titles, row_titles=names, contours=contours, window=[(0.0, 1.0)] * len(panels))


def _diagnostics(pipeline, pix2pix_seed: int, rows: dict[str, str], num_fit: int = 8) -> dict[str, list[float]]:
    """Tumor contrast of the fake hrT2, of each B' variant and of the real validation hrT2, ALL on the
    working grid; how well pix2pix reproduces its own training pairs (S_A Dice on pix2pix(B'))."""
    from singan_insert.evaluation.metrics import dice
    from singan_insert.pipeline import variants
    from singan_insert.pipeline.workflow import read_volume, resample_labels, write_volume
    from singan_insert.stages.pix2pix import MODEL_NAME, Pix2Pix

    values: dict[str, list[float]] = {}
    records = sorted(pipeline.bprime_dir("harmonized").glob("*_aug*.json"))
    for record in records:
        stem = record.name[:-len(".json")]
        mask = read_volume(record.with_name(f"{stem}_label.nii.gz"))[0] == 1
        name = json.loads(record.read_text())["case"]["name"]
        values.setdefault("tumor contrast in fake hrT2 (CycleGAN), before insertion", []).append(
            _tumor_contrast(read_volume(pipeline.grid_source(name, "fakehrT2"))[0], mask))
        for row, variant in rows.items():
            image = read_volume(pipeline.bprime_dir(variant) / f"{stem}_image.nii.gz")[0]
            values.setdefault(f"tumor contrast in {row} B'", []).append(_tumor_contrast(image, mask))
            values.setdefault(f"tumor texture (high-pass sd) in {row} B'", []).append(_tumor_texture(image, mask))
            values.setdefault(f"cleft contrast in {row} B'", []).append(_cleft_contrast(image, mask))
    for name, native in pipeline.data.validation_images():
        image, grid_affine = read_volume(pipeline.grid_validation(name))
        truth, affine = read_volume(pipeline.data.truth(name))
        mask = resample_labels((truth == 1).astype(np.uint8), affine, grid_affine, image.shape) == 1
        if mask.any():
            values.setdefault("tumor contrast in real hrT2 (validation scans, working grid)", []).append(
                _tumor_contrast(image, mask))
            values.setdefault("tumor texture (high-pass sd) in real hrT2 (validation scans, working grid)",
                              []).append(_tumor_texture(image, mask))
            values.setdefault("cleft contrast in real hrT2 (validation scans, working grid)", []).append(
                _cleft_contrast(image, mask))
    for row in ("ours", "naive"):
        variant = ROWS[row]
        model = Pix2Pix.load(variants.pix2pix_seeded_dir(pipeline, variant, pix2pix_seed) / MODEL_NAME)
        folder = pipeline.work / "diagnostics" / f"{variant}_seed{pix2pix_seed}"
        translated = []
        for record in records[:num_fit]:
            stem = record.name[:-len(".json")]
            image = model.translate(pipeline.bprime_dir(variant) / f"{stem}_image.nii.gz")
            translated.append(write_volume(folder / f"{stem}_ceT1.nii.gz", np.asarray(image.dataobj), image.affine))
        predictions = pipeline.segment(translated, folder / "predictions")
        for record, prediction in zip(records[:num_fit], predictions):
            stem = record.name[:-len(".json")]
            truth = read_volume(pipeline.bprime_dir(variant) / f"{stem}_label.nii.gz")[0] == 1
            values.setdefault(f"pix2pix ({row}, seed {pix2pix_seed}) training fit: S_A Dice on pix2pix(B'_train)",
                              []).append(dice(read_volume(prediction)[0] == 1, truth))
    return values


def _in_plane_cross() -> np.ndarray:
    """4-connected structuring element within the slices (the last axis is through-plane)."""
    from scipy import ndimage

    plane = np.zeros((3, 3, 3), bool)
    plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return plane


_IN_PLANE = _in_plane_cross()


def _tumor_contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """(mean inside the tumor - mean of an in-plane ring 2-3 voxels outside) / robust range."""
    from scipy import ndimage

    ring = ndimage.binary_dilation(mask, _IN_PLANE, iterations=3) & \
        ~ndimage.binary_dilation(mask, _IN_PLANE, iterations=1)
    low, high = np.percentile(image, (0.5, 99.5))
    return float((image[mask].mean() - image[ring].mean()) / max(high - low, 1e-6))


def _tumor_texture(image: np.ndarray, mask: np.ndarray) -> float:
    """Sd of the in-plane high-pass (x - G_1.5 * x) inside the tumor eroded by 1 voxel in-plane,
    / robust range (NaN for a tumor too thin to erode)."""
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, _IN_PLANE)
    if inner.sum() < 4:
        return float("nan")
    image = image.astype(np.float64)
    low, high = np.percentile(image, (0.5, 99.5))
    return float(np.std((image - ndimage.gaussian_filter(image, (1.5, 1.5, 0)))[inner]) / max(high - low, 1e-6))


def _cleft_contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """(mean of the first in-plane voxel ring outside the tumor - mean of the ring 3-5 voxels
    out) / robust range: > 0 where the tumor is outlined by a bright cleft, as in hrT2."""
    from scipy import ndimage

    grown = [ndimage.binary_dilation(mask, _IN_PLANE, iterations=k) for k in (1, 2, 5)]
    first, outer = grown[0] & ~mask, grown[2] & ~grown[1]
    low, high = np.percentile(image, (0.5, 99.5))
    return float((image[first].mean() - image[outer].mean()) / max(high - low, 1e-6))


def _wilcoxon(a, b) -> float:
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(wilcoxon(a, b).pvalue) if np.any(a != b) else 1.0


if __name__ == "__main__":
    main()
