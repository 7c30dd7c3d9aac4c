"""Harmonization speed: a batch of 30 slices of 128^2 (target <= 0.3 s on CPU).

The timing depends on the architecture, not the weights, so the model is a ``fast``-preset
pyramid trained for a few iterations on a simulated 128^2 hrT2 slice. Reports the median of
repeated calls per start scale, on the CPU and (when available) on CUDA, then the whole
insertion of a 30-slice tumor (``insert_tumor``, every appearance mode) into the phantom's
128 x 128 x 48 volume and into that volume padded to a whole-head scan's 512 x 512 x 120 voxels
(the same spacing: the crop the harmonizer sees is the same, the whole-volume steps read 40
times more). Writes benchmarks/results/bench_harmonize.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import table, write_results  # noqa: E402

TARGET_S = 0.3
#: A whole-head hrT2 scan's grid (voxels), for the insertion timing on a clinical-size target.
CLINICAL_SHAPE = (512, 512, 120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=30)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from singan_insert import TrainingConfig, train_harmonizer
    from singan_insert.evaluation.experiments import training_slice_from_subject
    from singan_insert.datasets.phantom import simulate_subject

    subject = simulate_subject(0)
    image, spacing, index = training_slice_from_subject(subject)
    model = train_harmonizer(image, replace(TrainingConfig.preset("fast"), iterations=2), seed=0,
                             spacing=spacing, device="cpu", progress=False, sample_figures=False)
    # 30 consecutive 128^2 slices around the tumor, with a pasted disk as the "tumor".
    volume = subject.render_b_washed_out()
    k0 = max(0, min(index - args.batch // 2, volume.shape[2] - args.batch))
    background = np.stack([volume[:args.size, :args.size, k] for k in range(k0, k0 + args.batch)]).astype(np.float32)
    yy, xx = np.mgrid[:args.size, :args.size]
    disk = ((yy - args.size / 2) ** 2 + (xx - args.size / 2) ** 2 < (args.size / 6) ** 2).astype(np.float32)
    mask = np.repeat(disk[None], args.batch, 0)
    composite = np.where(mask > 0, np.percentile(background, 60), background).astype(np.float32)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        model.to(device)
        for scale in sorted({model.default_start_scale, model.num_scales - 2, model.num_scales - 1}):
            model.harmonize(background, composite, mask, scale, seed=0)  # warm-up
            times = []
            for repeat in range(args.repeats):
                if device == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                model.harmonize(background, composite, mask, scale, seed=repeat)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            median = statistics.median(times)
            rows.append({"device": device, "batch": f"{args.batch}x{args.size}^2", "start_scale": scale,
                         "generators run": model.num_scales - scale, "median (s)": median,
                         "min (s)": min(times), "target (s)": TARGET_S,
                         "meets target": median <= TARGET_S if device == "cpu" else "-"})
            print(rows[-1], flush=True)
    insert_rows = insertion_times(model, subject, volume, subject.affine_b, args.batch, args.repeats,
                                  "x".join(map(str, volume.shape)) + " (phantom)")
    clinical, clinical_affine = clinical_size(volume, subject.affine_b)
    insert_rows += insertion_times(model, subject, clinical, clinical_affine, args.batch, args.repeats,
                                   "x".join(map(str, clinical.shape)) + " (clinical size, padded)")
    markdown = table(rows, list(rows[0])) + "\n\n" + (
        f"Whole insertion (insert_tumor) of a {args.batch}-slice tumor into the subject's B volume, and into "
        "that volume padded to a clinical scan's size at the same spacing, including the automatic "
        "appearance's choice (CPU):\n\n") + table(insert_rows, list(insert_rows[0]))
    print(markdown)
    write_results("bench_harmonize", {"rows": rows, "insert_rows": insert_rows, "num_scales": model.num_scales,
                                       "default_start_scale": model.default_start_scale}, markdown)


def clinical_size(volume: np.ndarray, affine: np.ndarray, shape=CLINICAL_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` padded (reflected) to a clinical scan's size at the same spacing, and its affine.

    A clinical hrT2 covers the whole head (e.g. 512 x 512 x 120 voxels): the tumor and its
    harmonization crop stay the same size in voxels, but every whole-volume step (checks,
    quantiles, the output and label copies) reads 40 times more voxels than the phantom's.
    """
    pad = [((n - v) // 2, n - v - (n - v) // 2) for n, v in zip(shape, volume.shape)]
    padded = np.pad(volume, pad, mode="reflect")
    moved = np.array(affine, dtype=float, copy=True)
    moved[:3, 3] -= moved[:3, :3] @ np.array([before for before, _ in pad], dtype=float)
    return padded, moved


def insertion_times(model, subject, volume: np.ndarray, affine: np.ndarray, slices: int, repeats: int,
                    target: str) -> list[dict]:
    """insert_tumor of a ``slices``-slice cylinder tumor (radius 8 px), per appearance mode."""
    from singan_insert.evaluation.experiments import training_slice_from_subject
    from singan_insert.insertion.insert import InsertionParameters, insert_tumor
    from singan_insert.insertion.placement import SourceTumor

    model.to("cpu")
    mask = np.zeros(volume.shape, np.uint8)
    yy, xx = np.mgrid[:volume.shape[0], :volume.shape[1]]
    disk = (yy - volume.shape[0] / 2) ** 2 + (xx - volume.shape[1] / 2) ** 2 < 8 ** 2
    k0 = (volume.shape[2] - slices) // 2
    mask[:, :, k0:k0 + slices] = disk[..., None]
    source = SourceTumor.from_arrays((volume * 1.5).astype(np.float32), mask, affine, label_value=1)
    _, _, index = training_slice_from_subject(subject)
    annotated = model.copy().annotate(np.take(subject.label_b, index, axis=2) == 1)
    rows = []
    for name, appearance, harmonizer in (("auto", "auto", model), ("auto, annotated model", "auto", annotated),
                                         ("fixed", "fixed", model)):
        parameters = InsertionParameters(appearance=appearance, contrast=0.5 if appearance == "fixed" else 1.0)
        insert_tumor(volume, affine, source, harmonizer, parameters)  # warm-up
        times, cpu = [], []
        for repeat in range(repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            insert_tumor(volume, affine, source, harmonizer,
                         replace(parameters, seed=repeat))
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        median = statistics.median(times)
        # CPU time of this process beside the wall time: on a shared machine the wall time also
        # counts other processes' work.
        rows.append({"target": target, "appearance": name, "tumor slices": slices, "median (s)": median,
                     "min (s)": min(times), "median CPU (s)": statistics.median(cpu), "target (s)": TARGET_S,
                     "meets target": median <= TARGET_S, "load average": round(os.getloadavg()[0], 1)})
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
