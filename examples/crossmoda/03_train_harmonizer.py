"""Step 3: train the harmonizer on ONE hrT2 training slice that shows a tumor.

crossMoDA's hrT2 scans are unlabelled, but every one contains a tumor: pick a scan and the
axial slice through its tumor (``--case``, ``--slice`` as seen in a viewer), or give a rough
label of that scan (``--label``) and the slice of largest tumor area is taken. With
``--synthetic``, the simulated label of the first target scan plays that role. The slice is
cut from the working-grid volume, so the model works at the pipeline's pixel size. Equivalent
CLI (on the working-grid volume)::

    singan-insert train <work>/grid/target/<case>_hrT2.nii.gz --slice <k> --modality hrT2 --out <work>/harmonizer

    python examples/crossmoda/03_train_harmonizer.py --data-root /data/crossmoda --work work --case crossmoda2021_ldn_106 --slice 40
    python examples/crossmoda/03_train_harmonizer.py --synthetic --work work
"""

from __future__ import annotations

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import run_step  # noqa: E402


def arguments(parser) -> None:
    parser.add_argument("--case", help="hrT2 training scan (default: the first with a label, else the first)")
    parser.add_argument("--slice", default="auto",
                        help="axial slice index in the scan's own grid, or 'auto' (largest label area)")
    parser.add_argument("--label", help="a rough tumor label of --case, on its own grid")


def step(pipeline, args) -> None:
    index = args.slice if args.slice == "auto" else int(args.slice)
    print(f"[3/7] Training the harmonizer ({pipeline.settings.harmonizer_preset} preset) ...", flush=True)
    harmonizer = pipeline.train_harmonizer(args.case, index, args.label)
    print(f"Harmonizer: {harmonizer!r}, trained on {harmonizer.provenance}")


def main(argv=None) -> int:
    return run_step(__file__, __doc__, step, argv, arguments)


if __name__ == "__main__":
    sys.exit(main())
