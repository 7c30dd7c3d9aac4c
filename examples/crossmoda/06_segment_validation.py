"""Step 6: translate the hrT2 validation scans to ceT1 and segment them with S_A.

``ours``: pix2pix trained on harmonized B'; ``naive``: pix2pix trained on naive pastes (the
ablation); ``baseline``: CycleGAN's hrT2 -> ceT1 generator. Predictions are written on each
validation scan's own grid as ``<work>/predictions/<method>/<name>_Label.nii.gz`` (crossMoDA's
submission naming).

    python examples/crossmoda/06_segment_validation.py --synthetic --work work
"""

from __future__ import annotations

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import run_step  # noqa: E402

from singan_insert.pipeline import METHOD_TITLES, METHODS  # noqa: E402


def arguments(parser) -> None:
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))


def step(pipeline, args) -> None:
    for method in args.methods:
        print(f"[6/7] {METHOD_TITLES[method]}: translating and segmenting the validation scans ...", flush=True)
        outputs = pipeline.segment_validation(method)
        print(f"  {len(outputs)} predictions in {outputs[0].parent}")


def main(argv=None) -> int:
    return run_step(__file__, __doc__, step, argv, arguments)


if __name__ == "__main__":
    sys.exit(main())
