"""Step 7: score the predictions (tumor Dice and ASSD) in the format of the paper's Table 1.

Writes ``<work>/evaluation/table1.{md,json}`` (mean ± sd and quartiles per method, and the
count of cases with Dice > 0.8) and a Fig.-3-style panel ``<work>/evaluation/fig3.png``.
Needs the validation labels (``target_validation_labels/<name>_Label.nii.gz``).

    python examples/crossmoda/07_evaluate.py --synthetic --work work
"""

from __future__ import annotations

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import run_step  # noqa: E402

from singan_insert.pipeline import METHODS  # noqa: E402


def arguments(parser) -> None:
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--no-figure", action="store_true", help="skip the PNG (no matplotlib needed)")


def step(pipeline, args) -> None:
    print("[7/7] Evaluating ...", flush=True)
    report = pipeline.evaluate(args.methods)
    print(report["table"]["markdown"])
    if not args.no_figure:
        figure = pipeline.segmentation_figure(pipeline.work / "evaluation" / "fig3.png", args.methods)
        print(f"Figure: {figure}")


def main(argv=None) -> int:
    return run_step(__file__, __doc__, step, argv, arguments)


if __name__ == "__main__":
    sys.exit(main())
