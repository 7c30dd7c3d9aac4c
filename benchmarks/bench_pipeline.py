"""The paper's Table 1 on simulated crossMoDA-like data: does tumor insertion help cross-modal
segmentation?

A simulated data set in the crossMoDA layout (:func:`singan_insert.pipeline.workflow.simulate_crossmoda`):
labelled ceT1-like scans (A), unlabelled hrT2-like scans of other subjects (B), and hrT2-like
validation scans of yet other subjects with their true labels. The whole workflow of
:class:`singan_insert.pipeline.workflow.CrossModaPipeline` runs once, and three ways of segmenting the
validation scans are scored on the tumor (label 1):

* baseline: CycleGAN's B -> A generator, then S_A;
* ours: pix2pix trained on (B', A), B' = each A tumor pasted into its own CycleGAN translation
  and harmonized by the SinGAN pyramid (trained on ONE hrT2 slice), then S_A;
* ablation: the same pix2pix trained on the naive pastes of the very same insertions (same
  placement and intensity mapping, no harmonization).

Two reference rows frame the numbers: S_A on the validation subjects' own ceT1 scans (its
in-domain score, the ceiling of any translation) and the validation labels resampled onto the
working grid and back (what the grid's resolution alone costs). Reported per method: Dice and
ASSD as mean ± sd with quartiles, the count of Dice > 0.8, paired differences with a Wilcoxon
signed-rank test, and a Fig.-3-style panel. Writes benchmarks/results/bench_pipeline.{json,md}
and benchmarks/results/bench_pipeline_fig3.png.

Target (issue 5): ours - baseline >= +0.12 mean Dice with a lower mean ASSD, and ours above the
naive-paste ablation. Settings are the ``cpu`` profile (harmonizer ``fast`` preset, CycleGAN and
pix2pix ``cpu`` presets, the small 3D U-Net as S_A); nothing is tuned per method.

    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py                 # the full run (~35 min)
    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py --cases 4 4 4 --quick   # plumbing check
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

DICE_GAIN_TARGET = 0.12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, nargs=3, default=[20, 20, 32], metavar=("SOURCE", "TARGET", "VALIDATION"),
                        help="simulated subjects per split (default 20 20 32, crossMoDA 2021's validation size)")
    parser.add_argument("--segmenter", choices=["small", "nnunet"], default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "singan-insert-bench-pipeline"),
                        help="work folder (re-runs resume from it)")
    parser.add_argument("--fresh", action="store_true", help="delete the work folder first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="short schedules (plumbing check only; the numbers mean nothing)")
    parser.add_argument("--name", default="bench_pipeline", help="results file name (without extension)")
    args = parser.parse_args()

    import torch

    from singan_insert.evaluation.metrics import segmentation_scores, summarize, table1_report
    from singan_insert.pipeline.workflow import (METHOD_TITLES, METHODS, CrossModaPipeline, PipelineSettings,
                                        read_volume, resample_image, resample_labels, simulate_crossmoda,
                                        write_volume)
    from singan_insert.insertion.placement import spacing_from_affine

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.fresh and work.exists():
        shutil.rmtree(work)
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
    for variant in ("harmonized", "naive"):
        timed(f"5_pix2pix_{variant}", pipeline.train_pix2pix, variant)
    for method in METHODS:
        timed(f"6_segment_{method}", pipeline.segment_validation, method)

    diagnostics = timed("diagnostics", _diagnostics, pipeline)

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
        native = pipeline.to_native(prediction, grid_affine, label_path)
        scores = segmentation_scores(native, truth, spacing_from_affine(affine), label=1)
        reference["source"]["dice"].append(scores["dice"])
        reference["source"]["assd"].append(scores["assd"])
    for name, native_path in data.validation_images():
        truth, affine = read_volume(data.truth(name))
        shape, grid_affine = settings.grid.grid_for(truth.shape, affine)
        round_trip = resample_labels(resample_labels(truth, affine, grid_affine, shape), grid_affine, affine, truth.shape)
        scores = segmentation_scores(round_trip, truth, spacing_from_affine(affine), label=1)
        reference["grid"]["dice"].append(scores["dice"])
        reference["grid"]["assd"].append(scores["assd"])
    reference_titles = {"source": "Reference: S_A on the subjects' own ceT1",
                        "grid": "Reference: truth through the working grid"}
    report = pipeline.evaluate(METHODS, extra={reference_titles[k]: v for k, v in reference.items()})
    pipeline.segmentation_figure(RESULTS / f"{args.name}_fig3.png")

    per_case = report["per_case"]
    dice = {m: np.array([r["dice"] for r in per_case[m]]) for m in METHODS}
    assd = {m: np.array([r["assd"] for r in per_case[m]]) for m in METHODS}
    paired = {}
    for a, b in (("ours", "baseline"), ("ours", "naive"), ("naive", "baseline")):
        paired[f"{a}-{b}"] = {"dice": _paired(dice[a], dice[b]), "assd": _paired(assd[a], assd[b])}
    gain = float(dice["ours"].mean() - dice["baseline"].mean())
    verdict = {
        "dice_gain_ours_vs_baseline": gain,
        "meets_dice_gain": gain >= DICE_GAIN_TARGET,
        "assd_lower_than_baseline": bool(assd["ours"].mean() < assd["baseline"].mean()),
        "dice_above_naive_ablation": bool(dice["ours"].mean() > dice["naive"].mean()),
    }
    verdict["meets_target"] = all(verdict[k] for k in ("meets_dice_gain", "assd_lower_than_baseline",
                                                        "dice_above_naive_ablation"))
    total = time.perf_counter() - started
    segmenter = {"small": f"small built-in 3D U-Net (SegmenterConfig preset {settings.segmenter_preset!r})",
                 "nnunet": f"nnU-Net v2 ({settings.nnunet_trainer}, {settings.nnunet_configuration})"}[args.segmenter]
    info = machine()
    markdown = [
        f"Machine: {info['cpu_count']} CPUs, torch threads {args.threads}, {info['date']}; "
        f"whole benchmark {total / 60:.1f} min{' (QUICK: short schedules, numbers meaningless)' if args.quick else ''}.",
        f"Data: simulated crossMoDA layout, {args.cases[0]} labelled ceT1 / {args.cases[1]} unlabelled hrT2 / "
        f"{args.cases[2]} hrT2 validation subjects (seed {args.seed}). Working grid "
        f"{settings.grid.spacing} mm, {settings.grid.shape[0]}x{settings.grid.shape[1]} px in plane.",
        f"S_A: {segmenter}. Harmonizer: {settings.harmonizer_preset!r} preset; CycleGAN "
        f"{settings.cyclegan_preset!r}, pix2pix {settings.pix2pix_preset!r} presets; contrast factor "
        f"{settings.contrast}.",
        "",
        "Tumor (label 1) on the validation scans' own grids; quartiles ascending (the paper lists ASSD's descending).",
        "",
        report["table"]["markdown"],
        "",
        "Paired per-case differences (mean, median, Wilcoxon signed-rank p):",
        "",
        "| pair | ΔDice mean | ΔDice median | p (Dice) | ΔASSD mean (mm) | ΔASSD median | p (ASSD) |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair, values in paired.items():
        d, s = values["dice"], values["assd"]
        markdown.append(f"| {pair} | {d['mean']:+.3f} | {d['median']:+.3f} | {d['p_wilcoxon']:.3g} | "
                        f"{s['mean']:+.2f} | {s['median']:+.2f} | {s['p_wilcoxon']:.3g} |")
    markdown += ["", "Diagnostics (what the stages did; no validation data involved except the real-hrT2 row):", "",
                 "| quantity | mean ± sd |", "|---|---|"]
    for key, values in diagnostics.items():
        markdown.append(f"| {key} | {np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f} |")
    markdown += ["", "Verdict: " + ", ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}"
                                          for k, v in verdict.items()),
                 "", "Time per step (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    text = "\n".join(markdown)
    print(text)
    write_results(args.name, {
        "cases": args.cases, "seed": args.seed, "quick": args.quick, "segmenter": segmenter,
        "settings": settings.to_dict(), "seconds": total, "timings": timings, "verdict": verdict,
        "paired": paired, "table1": report["table"], "per_case": per_case,
        "diagnostics": {k: summarize(v) for k, v in diagnostics.items()},
        "diagnostics_values": diagnostics,
        "reference": {reference_titles[k]: {m: summarize(v[m]) for m in v} for k, v in reference.items()},
        "methods": METHOD_TITLES, "figure": str(RESULTS / f"{args.name}_fig3.png"),
    }, text)


def _diagnostics(pipeline, num_fit: int = 8) -> dict[str, list[float]]:
    """Tumor contrast in the fake hrT2, the naive and the harmonized B' (and in real hrT2), and
    how well each pix2pix reproduces its own training pairs (S_A Dice on pix2pix(B'))."""
    from singan_insert.evaluation.metrics import dice
    from singan_insert.pipeline.workflow import read_volume, write_volume

    values: dict[str, list[float]] = {}
    records = sorted(pipeline.bprime_dir("harmonized").glob("*_aug*.json"))
    for record in records:
        stem = record.name[:-len(".json")]
        mask = read_volume(record.with_name(f"{stem}_label.nii.gz"))[0] == 1
        name = json.loads(record.read_text())["case"]["name"]
        images = {"fake hrT2 (CycleGAN), before insertion": read_volume(pipeline.grid_source(name, "fakehrT2"))[0],
                  "naive B'": read_volume(pipeline.bprime_dir("naive") / f"{stem}_image.nii.gz")[0],
                  "harmonized B'": read_volume(pipeline.bprime_dir("harmonized") / f"{stem}_image.nii.gz")[0]}
        for key, image in images.items():
            values.setdefault(f"tumor contrast in {key}", []).append(_tumor_contrast(image, mask))
    for name, path in pipeline.data.validation_images():
        image, _ = read_volume(path)
        mask = read_volume(pipeline.data.truth(name))[0] == 1
        values.setdefault("tumor contrast in real hrT2 (validation scans)", []).append(_tumor_contrast(image, mask))
    for variant in ("harmonized", "naive"):
        from singan_insert.stages.pix2pix import Pix2Pix

        model = Pix2Pix.load(pipeline.pix2pix_path(variant))
        folder = pipeline.work / "diagnostics" / variant
        translated = []
        for record in records[:num_fit]:
            stem = record.name[:-len(".json")]
            source = pipeline.bprime_dir(variant) / f"{stem}_image.nii.gz"
            image = model.translate(source)
            translated.append(write_volume(folder / f"{stem}_ceT1.nii.gz", np.asarray(image.dataobj), image.affine))
        predictions = pipeline.segment(translated, folder / "predictions")
        for record, prediction in zip(records[:num_fit], predictions):
            stem = record.name[:-len(".json")]
            truth = read_volume(pipeline.bprime_dir(variant) / f"{stem}_label.nii.gz")[0] == 1
            values.setdefault(f"pix2pix ({variant}) training fit: S_A Dice on pix2pix(B'_train)", []).append(
                dice(read_volume(prediction)[0] == 1, truth))
    return values


def _tumor_contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """(mean inside the tumor - mean of an in-plane ring 2-3 voxels outside) / robust range."""
    from scipy import ndimage

    plane = np.zeros((3, 3, 3), bool)
    plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    ring = ndimage.binary_dilation(mask, plane, iterations=3) & ~ndimage.binary_dilation(mask, plane, iterations=1)
    low, high = np.percentile(image, (0.5, 99.5))
    return float((image[mask].mean() - image[ring].mean()) / max(high - low, 1e-6))


def _paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    from scipy.stats import wilcoxon

    difference = a - b
    p = float(wilcoxon(a, b).pvalue) if np.any(difference != 0) else 1.0
    return {"mean": float(difference.mean()), "median": float(np.median(difference)), "p_wilcoxon": p}


if __name__ == "__main__":
    main()
