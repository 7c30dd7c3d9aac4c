"""Speed of RandomTumorInsertion next to TorchIO's own transforms, on a 256x256x64 volume.

In the same run, on the same subject: per-call time of ``RandomTumorInsertion`` (fast-preset
architecture), ``tio.RandomAffine``, ``tio.RandomMotion`` and ``tio.RandomBiasField``
(target: no slower than RandomMotion); the same for ``RandomTumorInsertion`` and
``tio.RandomAffine`` on a real crossMoDA-size hrT2 volume (448x448x80 at 0.4x0.4x1 mm; target:
insertion no slower than the affine); the throughput of a ``tio.SubjectsLoader`` with 2
workers; and the time of one 30-slice tumor's batched harmonization (target <= 0.3 s).
Timings depend on the architecture, not the weights: the model is a ``fast``-preset pyramid
trained for 2 iterations per scale. Writes benchmarks/results/bench_transform.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import table, write_results  # noqa: E402


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loader-subjects", type=int, default=8)
    args = parser.parse_args()

    import torchio as tio

    from singan_insert import TrainingConfig, train_harmonizer
    from singan_insert.evaluation.experiments import training_slice_from_subject
    from singan_insert.insertion.placement import SourceTumor
    from singan_insert.datasets.phantom import simulate_subject
    from singan_insert.integrations.torchio import RandomTumorInsertion

    work = Path(tempfile.mkdtemp())
    image, spacing, _ = training_slice_from_subject(simulate_subject(0))
    train_harmonizer(image, replace(TrainingConfig.preset("fast"), iterations=2), out_dir=work / "model",
                     seed=0, spacing=spacing, progress=False, sample_figures=False,
                     provenance={"axis": 2, "modality": "hrT2"})
    target = simulate_subject(1, shape=(256, 256, 64))
    donor = simulate_subject(2)
    source = SourceTumor.from_arrays(donor.image_a, donor.label_a, donor.affine_a, label_value=1)
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(target.render_b_washed_out()[None]),
                                                affine=target.affine_b),
                          brain=tio.LabelMap(tensor=torch.from_numpy((target.tissue_b > 0)[None].astype(np.uint8)),
                                             affine=target.affine_b))
    insertion = RandomTumorInsertion(str(work / "model"), sources=[source], placement_key="brain",
                                     include=["image"])
    torch.manual_seed(0)
    insertion(subject)  # loads the model once (as each DataLoader worker does)
    transforms = {"RandomTumorInsertion": insertion, "tio.RandomAffine": tio.RandomAffine(),
                  "tio.RandomMotion": tio.RandomMotion(), "tio.RandomBiasField": tio.RandomBiasField()}
    rows = []
    for name, transform in transforms.items():
        times = timed(lambda: transform(subject), args.repeats)
        rows.append({"transform": name, "volume": "256x256x64", "median (s)": statistics.median(times),
                     "min (s)": min(times)})
        print(rows[-1], flush=True)
    motion = next(r for r in rows if r["transform"] == "tio.RandomMotion")["median (s)"]
    ours = rows[0]["median (s)"]

    # The same two transforms on a real-size volume (simulating it takes about a minute).
    large = simulate_subject(3, shape=(448, 448, 80))
    large_subject = tio.Subject(
        image=tio.ScalarImage(tensor=torch.from_numpy(large.image_b[None]), affine=large.affine_b),
        brain=tio.LabelMap(tensor=torch.from_numpy((large.tissue_b > 0)[None].astype(np.uint8)),
                           affine=large.affine_b))
    for name in ("RandomTumorInsertion", "tio.RandomAffine"):
        times = timed(lambda: transforms[name](large_subject), args.repeats)
        rows.append({"transform": name, "volume": "448x448x80", "median (s)": statistics.median(times),
                     "min (s)": min(times)})
        print(rows[-1], flush=True)
    large_ratio = rows[-2]["median (s)"] / rows[-1]["median (s)"]
    del large, large_subject

    # DataLoader throughput with 2 workers
    dataset = tio.SubjectsDataset([subject] * args.loader_subjects, transform=insertion)
    loader = tio.SubjectsLoader(dataset, batch_size=1, num_workers=2)
    started = time.perf_counter()
    count = sum(1 for _ in loader)
    loader_seconds = time.perf_counter() - started

    # One 30-slice tumor, harmonized in one batched call (the crop the volume code cuts).
    from singan_insert.integrations.torchio import load_harmonizer

    model = load_harmonizer(str(work / "model"))
    background = np.stack([target.render_b_washed_out()[64:192, 64:192, k] for k in range(17, 47)]).astype(np.float32)
    yy, xx = np.mgrid[:128, :128]
    mask = np.repeat((((yy - 64) ** 2 + (xx - 64) ** 2) < 20 ** 2)[None], 30, 0).astype(np.float32)
    composite = np.where(mask > 0, np.percentile(background, 50), background).astype(np.float32)
    model.harmonize(background, composite, mask, seed=0, spacing=spacing)
    harmonize_times = timed(lambda: model.harmonize(background, composite, mask, seed=0, spacing=spacing), args.repeats)

    markdown = table(rows, list(rows[0])) + "\n\n" + table([
        {"measure": "RandomTumorInsertion / RandomMotion", "value": ours / motion, "target": "<= 1"},
        {"measure": "RandomTumorInsertion / tio.RandomAffine, 448x448x80", "value": large_ratio,
         "target": "<= 1"},
        {"measure": f"SubjectsLoader, 2 workers: subjects/s ({count} subjects)", "value": count / loader_seconds,
         "target": "-"},
        {"measure": "30-slice 128^2 tumor harmonization, median s", "value": statistics.median(harmonize_times),
         "target": "<= 0.3"},
    ], ["measure", "value", "target"])
    print(markdown)
    write_results("bench_transform", {"rows": rows, "ratio_to_motion": ours / motion,
                                       "ratio_to_affine_448x448x80": large_ratio,
                                       "loader_subjects_per_s": count / loader_seconds,
                                       "harmonize_30_slices_s": harmonize_times}, markdown)


if __name__ == "__main__":
    main()
