"""Offline augmentation of whole datasets: the engine behind ``singan-insert insert``.

A *case* is a target volume (modality B, or the CycleGAN translation of the source) plus a
source image and its tumor label (modality A). Cases come from a folder in the crossMoDA layout
(``<name>_ceT1.nii.gz``, ``<name>_Label.nii.gz`` and the target ``<name>_<suffix>.nii.gz``), or
from a CSV file with columns ``name,target,source_image,source_label`` (paths relative to the
CSV allowed). For each case, ``num`` augmentations are written::

    <out>/<name>_aug<k>_image.nii.gz   the tumor-augmented target
    <out>/<name>_aug<k>_label.nii.gz   its label map (the tumor as label_value)
    <out>/<name>_aug<k>.json           the exact parameters (replayable) - written last
    <out>/<name>_aug<k>.png            optional before/after panel

The JSON is written last and atomically, so its presence marks a finished output: a re-run
skips finished outputs (resume) and redoes unfinished ones. The random parameters of each
output are drawn from a seed derived from (``--seed``, name, k) only, so the result does not
depend on the number of workers or on the order in which cases finish.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from singan_insert.errors import SinganInsertError


@dataclass(frozen=True)
class Case:
    """One target volume and the source tumor to insert into it."""

    name: str
    target: Path
    source_image: Path
    source_label: Path


@dataclass(frozen=True)
class InsertSettings:
    """The sampling ranges of the offline augmentation (see ``singan-insert insert --help``)."""

    num: int = 1
    contrast: tuple[float, ...] = (1.0,)
    start_scale: tuple[int, ...] | None = None
    intensity_mode: str = "normalized"
    label_value: int = 1
    source_label_value: int | None = 1
    axis: int | None = None
    context_mm: float = 20.0
    seed: int = 0
    panels: bool = False


def add_insert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="harmonizer model file or training folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-root", help="folder in crossMoDA layout (<name>_ceT1, <name>_Label, target)")
    source.add_argument("--csv", help="CSV with columns name,target,source_image,source_label")
    source.add_argument("--target", help="one target volume (with --source-image and --source-label)")
    parser.add_argument("--source-image", help="source (modality A) volume, with --target")
    parser.add_argument("--source-label", help="source tumor label, with --target")
    parser.add_argument("--target-suffix", default="hrT2",
                        help="suffix of the target volumes in --data-root (default: hrT2; e.g. the "
                             "CycleGAN output's suffix)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num", type=int, default=1, help="augmentations per case (default: 1)")
    parser.add_argument("--contrast", type=float, nargs="+", default=[1.0],
                        help="contrast factors lambda to draw from (GBA: 0.5 0.8 1.5)")
    parser.add_argument("--start-scale", type=int, nargs="+",
                        help="start scales to draw from (default: the model's default)")
    parser.add_argument("--intensity-mode", choices=["normalized", "matched"], default="normalized")
    parser.add_argument("--label-value", type=int, default=1, help="label written for the tumor")
    parser.add_argument("--source-label-value", type=int, default=1,
                        help="tumor value in the source label (default: 1, crossMoDA's schwannoma)")
    parser.add_argument("--axis", type=int, choices=[0, 1, 2], help="slicing axis (default: through-plane)")
    parser.add_argument("--context-mm", type=float, default=20.0, help="in-plane context around the tumor")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--panels", action="store_true", help="write before/after PNG panels (needs matplotlib)")


def check_writable_folder(folder: Path) -> None:
    """Create ``folder`` if needed; a clear error when that fails or it is not writable."""
    import os

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SinganInsertError(f"Cannot create the output folder {folder}: {error}.") from error
    if not os.access(folder, os.W_OK):
        raise SinganInsertError(f"The output folder {folder} is not writable.")


def find_crossmoda_cases(data_root: str | os.PathLike, target_suffix: str = "hrT2") -> list[Case]:
    """Cases of a crossMoDA-layout folder: every ``<name>_Label.nii.gz`` with its ceT1 and target."""
    from singan_insert.datasets.crossmoda import LABEL, SOURCE_MODALITY, find_cases

    root = Path(data_root)
    if not root.is_dir():
        raise SinganInsertError(f"--data-root {root} is not a folder.")
    cases = [Case(name, files[target_suffix], files[SOURCE_MODALITY], files[LABEL])
             for name, files in find_cases(root, LABEL, (SOURCE_MODALITY, target_suffix))
             if files[SOURCE_MODALITY] and files[target_suffix]]
    if not cases:
        raise SinganInsertError(
            f"No complete case in {root}: each needs <name>_Label.nii.gz, <name>_ceT1.nii.gz and "
            f"<name>_{target_suffix}.nii.gz (set --target-suffix for another target name).")
    return cases


def read_cases_csv(path: str | os.PathLike) -> list[Case]:
    """Cases from a CSV with columns ``name,target,source_image,source_label``."""
    path = Path(path)
    if not path.is_file():
        raise SinganInsertError(f"CSV file {path} does not exist.")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    required = {"name", "target", "source_image", "source_label"}
    if not rows or not required <= set(rows[0]):
        raise SinganInsertError(f"{path} must have a header with columns {sorted(required)} and rows.")
    cases = []
    for row in rows:
        paths = [Path(row[key]) if Path(row[key]).is_absolute() else path.parent / row[key]
                 for key in ("target", "source_image", "source_label")]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise SinganInsertError(f"{path}, case {row['name']!r}: missing file(s) {missing}.")
        cases.append(Case(row["name"], *paths))
    return cases


def output_paths(out_dir: Path, case: Case, index: int) -> dict[str, Path]:
    stem = out_dir / f"{case.name}_aug{index}"
    return {"image": Path(f"{stem}_image.nii.gz"), "label": Path(f"{stem}_label.nii.gz"),
            "record": Path(f"{stem}.json"), "panel": Path(f"{stem}.png")}


def derived_seed(seed: int, name: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def augment_case(case: Case, index: int, model: str, settings: InsertSettings, out_dir: Path,
                 torch_threads: int | None = None) -> dict[str, Any]:
    """Write augmentation ``index`` of ``case``; return its record. Safe to run in a worker."""
    import nibabel as nib
    import torch

    from singan_insert.io import write_nifti
    from singan_insert.io import atomic_write_bytes
    from singan_insert.insertion.placement import SourceTumor
    from singan_insert.integrations.torchio import load_harmonizer
    from singan_insert.insertion.insert import InsertionParameters, insert_tumor

    if torch_threads:
        torch.set_num_threads(torch_threads)
    paths = output_paths(out_dir, case, index)
    seed = derived_seed(settings.seed, case.name, index)
    rng = np.random.default_rng(seed)
    harmonizer = load_harmonizer(model)
    start_scale = None if not settings.start_scale else int(rng.choice(settings.start_scale))
    parameters = InsertionParameters(
        intensity_mode=settings.intensity_mode, contrast=float(rng.choice(settings.contrast)),
        start_scale=start_scale, axis=settings.axis, context_mm=settings.context_mm,
        seed=int(rng.integers(0, 2**31 - 1)), label_value=settings.label_value)
    target = nib.load(str(case.target))
    target_data = np.asarray(target.dataobj, dtype=np.float32)
    source = SourceTumor.from_files(case.source_image, case.source_label,
                                    label_value=settings.source_label_value)
    result = insert_tumor(target_data, target.affine, source, harmonizer, parameters)
    write_nifti(paths["image"], result.image.astype(np.float32), target.affine)
    write_nifti(paths["label"], result.label, target.affine)
    record = {**result.record, "case": {k: str(v) for k, v in case.__dict__.items()}, "augmentation": index,
              "source_label_value": settings.source_label_value, "model_file": str(model)}
    if settings.panels:
        from singan_insert.evaluation.figures import before_after_panel

        before_after_panel(target_data, result.image, result.mask, paths["panel"],
                           title=f"{case.name} aug {index} (lambda={parameters.contrast})")
    atomic_write_bytes(paths["record"], json.dumps(record, indent=2, default=str).encode())
    return record


def run_insert(args: argparse.Namespace) -> int:
    """``singan-insert insert``: augment every case, skipping finished outputs."""
    from tqdm.auto import tqdm

    if args.target:
        if not (args.source_image and args.source_label):
            raise SinganInsertError("--target needs --source-image and --source-label.")
        name = Path(args.target).name.split(".nii")[0]
        cases = [Case(name, Path(args.target), Path(args.source_image), Path(args.source_label))]
        for path in cases[0].__dict__.values():
            if isinstance(path, Path) and not path.exists():
                raise SinganInsertError(f"{path} does not exist.")
    elif args.csv:
        cases = read_cases_csv(args.csv)
    else:
        cases = find_crossmoda_cases(args.data_root, args.target_suffix)
    if args.num < 1 or args.workers < 1:
        raise SinganInsertError("--num and --workers must be >= 1.")
    if any(c <= 0 for c in args.contrast):
        raise SinganInsertError("--contrast factors must be > 0.")
    out_dir = Path(args.out)
    check_writable_folder(out_dir)
    from singan_insert.harmonizer.model import Harmonizer

    Harmonizer.load(args.model)  # fail early, in the main process, on a bad model file
    settings = InsertSettings(
        num=args.num, contrast=tuple(args.contrast), start_scale=tuple(args.start_scale) if args.start_scale else None,
        intensity_mode=args.intensity_mode, label_value=args.label_value,
        source_label_value=args.source_label_value, axis=args.axis, context_mm=args.context_mm,
        seed=args.seed, panels=args.panels)
    if settings.panels:
        from singan_insert.evaluation.figures import require_matplotlib

        require_matplotlib()
    jobs = [(case, k) for case in cases for k in range(settings.num)
            if not output_paths(out_dir, case, k)["record"].exists()]
    skipped = len(cases) * settings.num - len(jobs)
    if skipped:
        print(f"Resuming: {skipped} finished output(s) skipped.")
    failures = _run_jobs(jobs, args.model, settings, out_dir, args.workers, tqdm)
    print(f"Wrote {len(jobs) - len(failures)} augmentation(s) to {out_dir}.")
    for (case, k), error in failures:
        print(f"  failed: {case.name} aug {k}: {error}")
    return 1 if failures else 0


def _run_jobs(jobs: Sequence[tuple[Case, int]], model, settings, out_dir, workers, tqdm):
    failures = []
    bar = tqdm(total=len(jobs), desc="insert", unit="volume")
    if workers == 1:
        for case, k in jobs:
            try:
                augment_case(case, k, model, settings, out_dir)
            except SinganInsertError as error:
                failures.append(((case, k), error))
            bar.update(1)
    else:
        import multiprocessing

        # spawn: safe with torch's thread pools (fork after torch has started threads can hang).
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(augment_case, case, k, model, settings, out_dir, 1): (case, k)
                       for case, k in jobs}
            for future in as_completed(futures):
                try:
                    future.result()
                except SinganInsertError as error:
                    failures.append((futures[future], error))
                bar.update(1)
    bar.close()
    return failures
