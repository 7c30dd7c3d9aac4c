"""Development benchmark of the default insertion (Harmonizer v2) against fixed-λ pastes, on the simulator.

One harmonizer (``fast`` preset unless told otherwise) is trained on ONE hrT2 slice of
simulated subject 0; the modality-A tumor of each test subject (seeds 100, 101, ...) is pasted
into its washed-out B volume and scored against the simulator's true B rendering of that very
mask (seeds 200, 201, ... by default: seeds 100-111 were used while developing the method).
Rows:

``paste λ``           the intensity-mapped paste at a fixed λ (input of the paper's method);
``blur λ``            that paste blurred in-plane (Gaussian, σ = 1 px), blended with the
                      harmonizer's blend weight: the simple baseline;
``fixed λ``           the paper's method: the paste harmonized from the default start scale;
``auto``              the default insertion (automatic level, pyramid, texture);
``auto start -k``     ablation: the default insertion from a finer start scale;
``auto -texture``     ablation: no texture injection;
``auto level, paste only``  ablation: the chosen level alone (no generators, no texture),
                      blended like the others;
``auto, tumor harmonized``  ablation: the tumor's voxels taken from the pyramid
                      (``harmonize_tumor=True``, the paper's way) instead of keeping their
                      chosen appearance;
``auto, no pyramid``  ablation: every step but the generators (what the pyramid adds);
``auto, edge cut at the mask``  ablation: the partial-volume edge in-plane only and cut to 0
                      at the mask's edge (the default before 2026-12-03) instead of reaching
                      the voxels beside it and the neighbouring slices;
``annotated``         the default insertion by the same model with its training slice's tumor
                      annotated (:mod:`singan_insert.insertion.annotation`), and its ablations:
                      ``-texture``, ``-level restore`` (the pyramid's pull toward the
                      surroundings kept), ``B's full spread`` / ``flat`` (the source's structure
                      at 1 x / 0 x B's spread instead of 0.5 x), ``start -1`` (the finest start
                      scale: the least re-synthesis), ``level, paste only`` (no generators, no
                      texture, blended like the others), ``-rim`` (without B's rim around the
                      tumor), ``tumor harmonized``, ``no pyramid`` and ``edge cut at the mask``
                      (as for ``auto``);
``oracle``            the truth itself (sanity row: errors 0, ratios 1);
``paste at the true level (bound)``  the λ = 1 paste shifted to the truth's tumor mean and
                      blended: what a perfect level choice alone would give.

The automatic appearance re-levels the tumor from its λ = 1 mapping, so its output does not
depend on the input λ: it has one row, scored against every input's truth (the same mask).

Metrics (mean over subjects; ``value_range`` = the truth's p99.5 - p0.5):
``vis``     fraction of subjects whose tumor-vs-shell contrast has the truth's sign and ≥ 0.6 of
            its magnitude; ``c_ratio`` the mean contrast ratio;
``lp_err``  low-pass tumor error: MAE inside the tumor after an in-plane Gaussian (σ = 1.5 px)
            of output and truth, / value_range;
``mae``     plain MAE inside the tumor; ``w1`` Wasserstein-1 of the tumor values; ``seam`` the
            seam ratio (all from :func:`singan_insert.evaluation.metrics.harmonization_fidelity`);
``hp``      high-pass energy ratio over the tumor's interior (mean square of ``x - G_1.5 * x``
            in-plane, voxels > 3 px from the edge; output / truth); ``seed_diff`` mean
            |output(seed 0) - output(seed 1)| inside the tumor / the truth's high-pass sd there
            (≈ 1.13 for two independent textures of the truth's strength), and ``seed_mean`` the
            relative change of the tumor mean.

Run: ``python benchmarks/dev_harmonizer.py [--subjects 8] [--preset fast]``; prints a markdown
table and writes benchmarks/results/dev_harmonizer.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
from scipy import ndimage

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import RESULTS, add_subject_arguments, development_case, development_model, machine  # noqa: E402

LAMBDAS = (0.5, 0.8, 1.0, 1.5)


def lowpass(volume, axis, sigma):
    """Gaussian of ``sigma`` voxels within slices (none along ``axis``)."""
    sig = [sigma] * 3
    sig[axis] = 0
    return ndimage.gaussian_filter(np.asarray(volume, np.float64), sig)


def interior(mask, axis, sigma=1.5):
    """Mask voxels farther than 2 sigma (in-plane) from the outside: the tumor's own edge is no texture."""
    sampling = [1.0, 1.0, 1.0]
    sampling[axis] = 1e6
    return ndimage.distance_transform_edt(np.pad(mask, 1), sampling=sampling)[1:-1, 1:-1, 1:-1] > 2 * sigma


def energy(volume, region, axis):
    return float(((volume - lowpass(volume, axis, 1.5))[region] ** 2).mean())


def scores(output, truth, mask, spacing, axis, value_range):
    from singan_insert.evaluation.metrics import harmonization_fidelity

    fid = harmonization_fidelity(output, truth, mask, spacing, value_range=value_range)
    lp = np.abs(lowpass(output, axis, 1.5) - lowpass(truth, axis, 1.5))[mask].mean() / value_range
    core = interior(mask, axis)
    return {"c_ratio": fid.contrast_ratio, "vis": float(fid.contrast_ratio >= 0.6),
            "lp_err": float(lp), "mae": fid.nmae_tumor, "w1": fid.wasserstein_tumor,
            "seam": fid.seam_ratio, "hp": energy(output, core, axis) / energy(truth, core, axis)}


def blend(composite, background, mask, axis, spacing):
    """The harmonizer's blend (1 mm dilation, 2 mm feather) of ``composite`` into ``background``."""
    from singan_insert.harmonizer.model import blend_weight

    planes = tuple(s for a, s in enumerate(spacing) if a != axis)
    weight = np.moveaxis(blend_weight(np.moveaxis(mask, axis, 0).astype(np.float32), planes, 1.0, 2.0), 0, axis)
    return background * (1 - weight) + composite * weight


def blurred_paste(composite, background, mask, axis, spacing):
    return blend(lowpass(composite, axis, 1.0), background, mask, axis, spacing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(parser)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--name", default="dev_harmonizer")
    parser.add_argument("--arch", default=None, help="generator architecture (default: the preset's)")
    parser.add_argument("--restoration-weight", type=float, default=None,
                        help="weight of the self-supervised restoration loss (needs --arch singan-mask)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from singan_insert.insertion.insert import InsertionParameters, insert_tumor

    started = time.perf_counter()
    model, training_subject, index = development_model(args.model_dir, reuse=False, preset=args.preset,
                                                       arch=args.arch, restoration_weight=args.restoration_weight)
    train_seconds = time.perf_counter() - started
    log, config = model.metadata["training"]["log"], model.metadata["training"]["config"]
    from singan_insert.insertion import insert as insertion_module

    annotated = model.copy().annotate(np.take(training_subject.label_b, index, axis=2) == 1)

    rows: dict[str, list[dict]] = {}
    # Wall time is what a user waits; CPU time of this process is what it costs (on a shared
    # machine the wall time also counts other people's work).
    timing: dict[str, list[float]] = {"auto": [], "fixed": [], "auto_cpu": [], "fixed_cpu": [], "slices": []}
    per_subject = []
    for seed in range(args.first_seed, args.first_seed + args.subjects):
        subject, washed, source, spacing, axis = development_case(seed)
        base = InsertionParameters(seed=0)

        def run(params, key=None, harmonizer=model, **switches):
            saved = {name: getattr(insertion_module, name) for name in switches}
            for name, value in switches.items():  # the ablations' module switches
                setattr(insertion_module, name, value)
            t, cpu = time.perf_counter(), time.process_time()
            try:
                result = insert_tumor(washed, subject.affine_b, source, harmonizer, params, return_composite=True)
            finally:
                for name, value in saved.items():
                    setattr(insertion_module, name, value)
            if key:
                timing[key].append(time.perf_counter() - t)
                timing[f"{key}_cpu"].append(time.process_time() - cpu)
                if key == "auto":
                    timing["slices"].append(len(result.record["tumor"]["slices"]))
            return result

        auto = run(base, "auto")
        mask = auto.mask
        truth = subject.render_b(mask)
        value_range = float(np.subtract(*np.percentile(truth, (99.5, 0.5))))

        def add(name, volume):
            rows.setdefault(name, []).append(scores(volume, truth, mask, spacing, axis, value_range))

        add("oracle", truth)
        add("auto", auto.image)
        other = run(replace(base, seed=1))
        texture_sd = np.sqrt(energy(truth, interior(mask, axis), axis))
        rows["auto"][-1]["seed_diff"] = float(np.abs(auto.image - other.image)[mask].mean() / texture_sd)
        rows["auto"][-1]["seed_mean"] = float(abs(auto.image[mask].mean() - other.image[mask].mean())
                                              / abs(auto.image[mask].mean()))
        no_texture = run(replace(base, texture=False))
        add("auto -texture", no_texture.image)
        # the chosen level alone: the composite the generators receive, blended like the others
        add("auto level, paste only", blend(no_texture.composite, washed, mask, axis, spacing))
        add("auto, tumor harmonized", run(replace(base, harmonize_tumor=True)).image)
        add("auto, no pyramid", run(base, _ABLATE_PYRAMID=True).image)
        add("auto, edge cut at the mask", run(base, _ABLATE_EDGE=True).image)
        for start in (-2, -1):
            add(f"auto start {start}", run(replace(base, start_scale=start)).image)
        with_annotation = run(base, harmonizer=annotated)
        add("annotated", with_annotation.image)
        other = run(replace(base, seed=1), harmonizer=annotated)
        rows["annotated"][-1]["seed_diff"] = float(np.abs(with_annotation.image - other.image)[mask].mean()
                                                   / texture_sd)
        rows["annotated"][-1]["seed_mean"] = float(abs(with_annotation.image[mask].mean() - other.image[mask].mean())
                                                   / abs(with_annotation.image[mask].mean()))
        plain = run(replace(base, texture=False), harmonizer=annotated)
        add("annotated -texture", plain.image)
        add("annotated -level restore", run(base, harmonizer=annotated, RESTORE_ANNOTATED_LEVEL=False).image)
        add("annotated, B's full spread", run(base, harmonizer=annotated, STRUCTURE_SHRINK=1.0).image)
        add("annotated, flat", run(base, harmonizer=annotated, STRUCTURE_SHRINK=0.0).image)
        add("annotated start -1", run(replace(base, start_scale=-1), harmonizer=annotated).image)
        add("annotated level, paste only", blend(plain.composite, washed, mask, axis, spacing))
        add("annotated -rim", run(replace(base, rim=False), harmonizer=annotated).image)
        add("annotated, tumor harmonized", run(replace(base, harmonize_tumor=True), harmonizer=annotated).image)
        add("annotated, no pyramid", run(base, harmonizer=annotated, _ABLATE_PYRAMID=True).image)
        add("annotated, edge cut at the mask", run(base, harmonizer=annotated, _ABLATE_EDGE=True).image)
        # Upper bound of any level chooser: the lambda = 1 paste moved to the truth's mean level.
        raw = run(replace(base, appearance="fixed", contrast=1.0))
        oracle_level = raw.composite.astype(np.float64)
        oracle_level[mask] = raw.composite[mask] - raw.composite[mask].mean() + truth[mask].mean()
        add("paste at the true level (bound)", blend(oracle_level, washed, mask, axis, spacing))
        for lam in LAMBDAS:
            fixed = run(replace(base, appearance="fixed", contrast=lam), "fixed")
            add(f"paste λ={lam}", fixed.composite)
            add(f"blur λ={lam}", blurred_paste(fixed.composite, washed, mask, axis, spacing))
            add(f"fixed λ={lam} (paper)", fixed.image)
        per_subject.append({"seed": seed, "lambda_auto": auto.record["appearance"].get("lambda"),
                            "level": auto.record["appearance"].get("level"),
                            "truth_tumor_mean": float(truth[mask].mean()),
                            "texture": auto.record["appearance"].get("texture")})

    summary = {name: {k: float(np.nanmean([r[k] for r in values if k in r]))
                      for k in values[0]} for name, values in rows.items()}
    blur_rows = [n for n in summary if n.startswith("blur")]
    best_blur = min(blur_rows, key=lambda n: summary[n]["lp_err"])
    keys = ["vis", "c_ratio", "lp_err", "mae", "w1", "seam", "hp", "seed_diff", "seed_mean"]
    lines = [f"Machine: {machine()['cpu_count']} CPUs, {machine()['date']}. {args.subjects} subjects, "
             f"{args.preset} preset, arch {config['arch']}, restoration weight {config['restoration_weight']:g} "
             f"({train_seconds:.0f} s training this run). Best fixed-λ blur "
             f"(hindsight): {best_blur}.", "",
             "| method | " + " | ".join(keys) + " | lp_err / best blur |", "|" + "---|" * (len(keys) + 2)]
    for name, values in summary.items():
        cells = [f"{values[k]:.3f}" if k in values else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {values['lp_err'] / summary[best_blur]['lp_err']:.2f} |")
    lines += ["", f"Insertion time per tumor (s, mean; {np.mean(timing['slices']):.0f} slices on average, "
              f"max {np.max(timing['slices'])}): wall auto {np.mean(timing['auto']):.3f} (max "
              f"{np.max(timing['auto']):.3f}), fixed {np.mean(timing['fixed']):.3f}; CPU auto "
              f"{np.mean(timing['auto_cpu']):.3f} (max {np.max(timing['auto_cpu']):.3f}), fixed "
              f"{np.mean(timing['fixed_cpu']):.3f}. Load average at the end: {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs.",
              "Training health: " + ", ".join(
                  f"s{e['scale']} rec {e['reconstruction_rmse']:.3f} vs input {e['upsampled_input_rmse']:.3f}"
                  for e in log)]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text + "\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"machine": machine(), "summary": summary, "rows": rows, "per_subject": per_subject,
         "timing": timing, "best_blur": best_blur, "training_log": log,
         "training_seconds_this_run": train_seconds}, indent=2, default=float))


if __name__ == "__main__":
    main()
