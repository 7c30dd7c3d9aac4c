"""Exploratory, downstream: does a narrower blend of the harmonized tumor help pix2pix?

On the simulator's quality benchmark the pyramid changes the tumor's surroundings (shell error
0.047 against 0.014 without it) and a narrower blend (``dilation_mm=0``, ``feather_mm=1``)
keeps them. This script measures the same change downstream, on a work folder that
``benchmarks/bench_pipeline.py`` has already filled (it reuses its S_A, CycleGAN, harmonizer
and the ``ours`` predictions): the ``narrow_blend`` B' variant
(:func:`singan_insert.pipeline.variants.write_narrow_blend_bprime`), one pix2pix per seed, and
the paired Dice difference to ``ours`` with a 95 % bootstrap CI.

    OMP_NUM_THREADS=1 python benchmarks/dev_pipeline_blend.py --work /tmp/singan-insert-bench-pipeline --name dev_pipeline_blend
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import RESULTS, machine, write_results  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="a bench_pipeline work folder (after its run)")
    parser.add_argument("--pix2pix-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--name", default="dev_pipeline_blend")
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
    variants.write_narrow_blend_bprime(pipeline)
    validation = pipeline.data.validation_images()
    truths = [read_volume(pipeline.data.truth(name)) for name, _ in validation]

    def dice(predictions):
        return [segmentation_scores(read_volume(p)[0], t, spacing_from_affine(a), label=1)["dice"]
                for p, (t, a) in zip(predictions, truths)]

    rows = {}
    for seed in args.pix2pix_seeds:
        ours = [pipeline.prediction(f"harmonized_seed{seed}", name) for name, _ in validation]
        if not all(path.is_file() for path in ours):
            raise SystemExit(f"{work} has no 'ours' predictions for pix2pix seed {seed}: run bench_pipeline first.")
        variants.train_pix2pix_seeded(pipeline, "narrow_blend", seed)
        narrow = dice(variants.segment_validation_seeded(pipeline, "narrow_blend", seed))
        base = dice(ours)
        rows[str(seed)] = {"ours": float(np.mean(base)), "narrow_blend": float(np.mean(narrow)),
                           "narrow_minus_ours": paired_bootstrap_ci(narrow, base, seed=0)}
    lines = [f"Machine: {machine()['cpu_count']} CPUs, {machine()['date']}. Work folder {work} "
             f"(pipeline seed {pipeline.settings.seed}).", "",
             "| pix2pix seed | ours Dice | narrow blend Dice | narrow - ours [95 % CI] |", "|---|---|---|---|"]
    for seed, row in rows.items():
        ci = row["narrow_minus_ours"]
        lines.append(f"| {seed} | {row['ours']:.3f} | {row['narrow_blend']:.3f} | "
                     f"{ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}] |")
    text = "\n".join(lines)
    print(text)
    write_results(args.name, {"work": str(work), "pipeline_seed": pipeline.settings.seed, "rows": rows}, text,
                  folder=RESULTS)


if __name__ == "__main__":
    main()
