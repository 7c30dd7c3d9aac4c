"""What the numbered crossMoDA scripts share: arguments, opening the pipeline, error handling.

Every script takes the same data/work arguments, so they can be run one after the other::

    python examples/crossmoda/01_train_source_segmenter.py --data-root /data/crossmoda --work work
    python examples/crossmoda/02_cyclegan.py --data-root /data/crossmoda --work work
    ...

or, on simulated data (written to ``<work>/data`` on first use), with ``--synthetic``.
The first script fixes the settings (``--profile``, ``--segmenter``); the work folder remembers
them (``<work>/pipeline.json``), and later scripts reuse them.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from singan_insert.errors import MissingExtraError, SinganInsertError
from singan_insert.pipeline import CrossModaData, CrossModaPipeline, PipelineSettings, simulate_crossmoda

#: Simulated data set per profile: (source, target, validation) subjects and the subject size.
SYNTHETIC = {
    "cpu": {"counts": (20, 20, 32), "shape": (128, 128, 48), "tumor_volume_cm3": (0.1, 5.0)},
    "gpu": {"counts": (20, 20, 32), "shape": (128, 128, 48), "tumor_volume_cm3": (0.1, 5.0)},
    "tiny": {"counts": (3, 3, 2), "shape": (64, 64, 32), "tumor_volume_cm3": (0.05, 0.3)},
}


def build_parser(description: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data-root", help="crossMoDA folder (source_training/, target_training/, "
                                          "target_validation/, target_validation_labels/)")
    data.add_argument("--synthetic", action="store_true",
                      help="use simulated crossMoDA-like data (written to --data-root, default <work>/data)")
    data.add_argument("--synthetic-cases", type=int, nargs=3, metavar=("SOURCE", "TARGET", "VALIDATION"),
                      help="simulated subjects per split (default: by profile; cpu 20 20 32)")
    data.add_argument("--source-dir", default="source_training")
    data.add_argument("--target-dir", default="target_training")
    data.add_argument("--validation-dir", default="target_validation")
    data.add_argument("--truth-dir", default="target_validation_labels")
    parser.add_argument("--work", default="crossmoda_work", help="work folder (default: crossmoda_work)")
    settings = parser.add_argument_group("settings (fixed by the first script run on a work folder)")
    settings.add_argument("--profile", choices=PipelineSettings.PROFILES,
                          help="cpu (default), tiny (smoke test) or gpu (the paper's scale)")
    settings.add_argument("--segmenter", choices=["small", "nnunet"],
                          help="S_A: the small built-in U-Net (CPU) or nnU-Net v2 (needs singan-insert[nnunet])")
    settings.add_argument("--nnunet-trainer",
                          help="nnU-Net trainer for --segmenter nnunet (default: the profile's; e.g. "
                               "nnUNetTrainer_SinganInsertSmoke for a smoke run)")
    settings.add_argument("--nnunet-configuration", help="nnU-Net configuration (default 3d_fullres)")
    settings.add_argument("--seed", type=int, help="seed of every stage (default 0)")
    settings.add_argument("--device", help="cpu, cuda or auto (default: the profile's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def open_pipeline(args: argparse.Namespace) -> CrossModaPipeline:
    """The pipeline of ``args``; with ``--synthetic``, simulates the data set when missing."""
    given = {"segmenter": args.segmenter, "seed": args.seed, "device": args.device,
             "nnunet_trainer": args.nnunet_trainer, "nnunet_configuration": args.nnunet_configuration}
    overrides = {key: value for key, value in given.items() if value is not None}
    settings = None
    if args.profile or overrides:
        work_record = Path(args.work) / "pipeline.json"
        if args.profile is None and work_record.is_file():
            import json

            stored = PipelineSettings.from_dict(json.loads(work_record.read_text())["settings"])
            settings = replace(stored, **overrides)
        else:
            settings = PipelineSettings.profile(args.profile or "cpu", **overrides)
    layout = dict(source_dir=args.source_dir, target_dir=args.target_dir,
                  validation_dir=args.validation_dir, truth_dir=args.truth_dir)
    if args.synthetic:
        root = Path(args.data_root) if args.data_root else Path(args.work) / "data"
        if args.synthetic_cases or not (root / "simulation.json").is_file():
            recipe = SYNTHETIC[args.profile or "cpu"]
            counts = args.synthetic_cases or recipe["counts"]
            print(f"Simulating {counts[0]} source, {counts[1]} target and {counts[2]} validation "
                  f"subjects in {root} (once) ...", flush=True)
            simulate_crossmoda(root, *counts, seed=args.seed or 0, shape=recipe["shape"],
                               tumor_volume_cm3=recipe["tumor_volume_cm3"])
        data = CrossModaData(root)
    else:
        if not args.data_root:
            raise SinganInsertError("Pass --data-root (a crossMoDA folder) or --synthetic.")
        data = CrossModaData(Path(args.data_root), **layout)
    return CrossModaPipeline(data, args.work, settings, progress=not args.no_progress)


def run_step(script: str, description: str | None,
             step: Callable[[CrossModaPipeline, argparse.Namespace], None],
             argv: Sequence[str] | None = None,
             add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse ``argv``, open the pipeline and run ``step``; errors become a message and exit code 2.

    ``script`` is the calling script's ``__file__`` (its name is the program name in messages).
    """
    parser = build_parser(description, Path(script).name)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        pipeline = open_pipeline(args)
        step(pipeline, args)
    except (SinganInsertError, MissingExtraError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # callers (tests, notebooks) keep their setting
    print(f"Done in {time.perf_counter() - started:.0f} s (work folder: {args.work}).")
    return 0
