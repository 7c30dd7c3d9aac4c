"""Step 5: pix2pix B' -> A on the pairs (B' volume, the ceT1 scan it was made from).

``--variant harmonized`` trains the method's translator; ``naive`` the ablation's (on the
naive pastes); ``both`` (default) trains the two, one after the other.

    python examples/crossmoda/05_pix2pix.py --synthetic --work work
"""

from __future__ import annotations

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import run_step  # noqa: E402


def arguments(parser) -> None:
    parser.add_argument("--variant", choices=["harmonized", "naive", "both"], default="both")


def step(pipeline, args) -> None:
    variants = ["harmonized", "naive"] if args.variant == "both" else [args.variant]
    config = pipeline.settings.pix2pix_config()
    for variant in variants:
        print(f"[5/7] Training pix2pix on {variant} B' ({config.total_iterations} iterations) ...", flush=True)
        pipeline.train_pix2pix(variant)
        print(f"pix2pix ({variant}): {pipeline.pix2pix_path(variant)}")


def main(argv=None) -> int:
    return run_step(__file__, __doc__, step, argv, arguments)


if __name__ == "__main__":
    sys.exit(main())
