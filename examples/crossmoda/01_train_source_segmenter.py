"""Step 1: train the source segmenter S_A on the labelled ceT1 scans.

S_A is nnU-Net v2 in the paper (``--segmenter nnunet``, needs ``pip install
'singan-insert[nnunet]'``; trained on fold ``all`` of the working-grid volumes), or the small
built-in U-Net (``--segmenter small``, the default of the ``cpu`` profile: minutes on a CPU).

    python examples/crossmoda/01_train_source_segmenter.py --data-root /data/crossmoda --work work --segmenter nnunet
    python examples/crossmoda/01_train_source_segmenter.py --synthetic --work work
"""

from __future__ import annotations

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import run_step  # noqa: E402


def step(pipeline, args) -> None:
    kind = pipeline.settings.segmenter
    print(f"[1/7] Training S_A ({kind}) on {len(pipeline.data.source_cases())} ceT1 scans ...", flush=True)
    print(f"S_A: {pipeline.train_source_segmenter()}")


def main(argv=None) -> int:
    return run_step(__file__, __doc__, step, argv)


if __name__ == "__main__":
    sys.exit(main())
