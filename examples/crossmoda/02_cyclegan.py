"""Step 2: CycleGAN ceT1 <-> hrT2 (unpaired), then every ceT1 scan translated to a fake hrT2.

The translations (``<work>/grid/source/<name>_fakehrT2.nii.gz``) are the canvases of step 4:
CycleGAN tends to wash tumors out, and step 4 puts them back. The B -> A generator is also the
baseline of step 6. Training resumes from its checkpoint when interrupted.

    python examples/crossmoda/02_cyclegan.py --data-root /data/crossmoda --work work
    python examples/crossmoda/02_cyclegan.py --synthetic --work work
"""

from __future__ import annotations

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import run_step  # noqa: E402


def step(pipeline, args) -> None:
    config = pipeline.settings.cyclegan_config()
    print(f"[2/7] Training CycleGAN ({pipeline.settings.cyclegan_preset} preset, "
          f"{config.total_iterations} iterations) ...", flush=True)
    pipeline.train_cyclegan()
    outputs = pipeline.translate_sources()
    print(f"Translated {len(outputs)} ceT1 scans to hrT2, e.g. {outputs[0]}")


def main(argv=None) -> int:
    return run_step(__file__, __doc__, step, argv)


if __name__ == "__main__":
    sys.exit(main())
