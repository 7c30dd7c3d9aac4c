"""Run steps 1-7 in one go (each step redoes only what changed; see docs/crossmoda.md).

    python examples/crossmoda/run_all.py --synthetic --work work
    python examples/crossmoda/run_all.py --data-root /data/crossmoda --work work --profile gpu --slice 40 --case crossmoda2021_ldn_106
"""

from __future__ import annotations

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import run_step  # noqa: E402

from singan_insert.pipeline import METHOD_TITLES, METHODS  # noqa: E402


def arguments(parser) -> None:
    parser.add_argument("--case", help="hrT2 scan of the harmonizer's training slice (step 3)")
    parser.add_argument("--slice", default="auto", help="its axial slice index, or 'auto' (step 3)")
    parser.add_argument("--label", help="a rough tumor label of --case (step 3)")


def step(pipeline, args) -> None:
    print("[1/7] S_A ...", flush=True)
    pipeline.train_source_segmenter()
    print("[2/7] CycleGAN ...", flush=True)
    pipeline.train_cyclegan()
    pipeline.translate_sources()
    print("[3/7] Harmonizer ...", flush=True)
    pipeline.train_harmonizer(args.case, args.slice if args.slice == "auto" else int(args.slice), args.label)
    print("[4/7] Tumor insertion ...", flush=True)
    pipeline.insert_tumors()
    for variant in ("harmonized", "naive"):
        print(f"[5/7] pix2pix ({variant}) ...", flush=True)
        pipeline.train_pix2pix(variant)
    for method in METHODS:
        print(f"[6/7] {METHOD_TITLES[method]} ...", flush=True)
        pipeline.segment_validation(method)
    if all(pipeline.data.truth(name) for name, _ in pipeline.data.validation_images()):
        print("[7/7] Evaluation ...", flush=True)
        print(pipeline.evaluate()["table"]["markdown"])
        pipeline.segmentation_figure(pipeline.work / "evaluation" / "fig3.png")
    else:
        print("[7/7] No validation labels: predictions are in", pipeline.work / "predictions")


def main(argv=None) -> int:
    return run_step(__file__, __doc__, step, argv, arguments)


if __name__ == "__main__":
    sys.exit(main())
