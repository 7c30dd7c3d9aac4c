"""Step 4: paste every ceT1 tumor into its own CycleGAN translation and harmonize it -> B'.

This is ``singan-insert insert`` (:func:`singan_insert.batch.augment_case`) on the working grid,
with the fake hrT2 as target::

    singan-insert insert --model <work>/harmonizer --data-root <work>/grid/source \
        --target-suffix fakehrT2 --axis 2 --out <work>/bprime/harmonized

For the ablation, the naive paste of each very insertion (same placement, intensity mapping
and contrast factor, no harmonization) is written to ``<work>/bprime/naive``.

    python examples/crossmoda/04_insert_tumors.py --synthetic --work work
"""

from __future__ import annotations

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import run_step  # noqa: E402


def step(pipeline, args) -> None:
    settings = pipeline.settings
    how = ("the model chooses each tumor's level" if settings.appearance == "auto"
           else f"the paper's fixed contrast factors {settings.contrast}")
    print(f"[4/7] Inserting tumors ({how}) ...", flush=True)
    written = pipeline.insert_tumors()
    print(f"B': {len(written['harmonized'])} harmonized volumes in {pipeline.bprime_dir('harmonized')}, "
          f"{len(written['naive'])} naive pastes in {pipeline.bprime_dir('naive')}")


def main(argv=None) -> int:
    return run_step(__file__, __doc__, step, argv)


if __name__ == "__main__":
    sys.exit(main())
