"""Offline augmentation of whole datasets: the engine behind ``singan-insert insert``.

A *case* is a target volume (modality B, or the CycleGAN translation of the source) plus a
source image and its tumor label (modality A). Cases come from a folder in the crossMoDA layout
(``<name>_ceT1.nii.gz``, ``<name>_Label.nii.gz`` and the target ``<name>_<suffix>.nii.gz``), or
from a CSV file with columns ``name,target,source_image,source_label`` (paths relative to the
CSV allowed). For each case, ``num`` augmentations are written::

    <out>/<name>_aug<k>_image.nii.gz   the tumor-augmented target
    <out>/<name>_aug<k>_label.nii.gz   its label map (the tumor as label_value, nothing else)
    <out>/<name>_aug<k>.json           the exact parameters (replayable), the files' sizes and
                                       SHA-256 - written last
    <out>/<name>_aug<k>.png            optional before/after panel

**Targets.** In a crossMoDA folder, the subject's own hrT2 already shows the tumor that its
ceT1 holds (the tumor keeps its physical position), so by default the target is a translation
of the ceT1: the first of ``<name>_cyclegan_hrT2``, ``<name>_fakehrT2`` (the pipeline's) and
``<name>_hrT2_washed_out`` (the demo's) that exists. ``--target-suffix`` names another one.
Label files that belong to another case's outputs (``<case>_<kind>_..._Label``, e.g. the demo's
``<case>_hrT2_augmented_Label``) are not cases; every other incomplete case (``<case>_rescan``
too) is reported, counted in the summary, and makes the exit status 1.

**Safety.** A case name must be a plain file-name prefix (no folder part, no ``..``): a name
that would write outside the output folder is refused, and so is every row of a name given
twice. The output folder is locked (``fcntl.flock`` on ``<out>/.singan-insert.lock``): a second
concurrent ``insert`` into it stops with a clear error. One failing case (unreadable input, a
tumor that cannot be placed, any exception) is recorded and the others go on; the command ends
with a summary and exit status 1. A full disk stops the batch (every later output would fail
too; with workers, or the background writers of ``--batch-cases``, the outputs already started
end first); finished outputs are kept and a failed one leaves no file behind. Workers
(``--workers``) die with their parent, and Ctrl-C cancels the queue and stops them at once.
With ``--target``, outputs of the same name made from other input files are not replaced
(``--name``).

**Resume.** The JSON holds a *fingerprint* of everything that decides the output: the model
file's SHA-256, the settings, the augmentation index and the input files (path, size,
modification time); and the size and SHA-256 of each file it vouches for. A re-run skips an
output only when its record's fingerprint matches and its files are those; an output whose
parameters or inputs changed, or whose files were deleted or damaged, is redone. A redo
writes its files in full (temporary files) before the previous ones are touched, then removes
the previous record, renames the files into place and the record last: a redo that fails keeps
the previous output with its record. Outputs of a case beyond this run's ``num`` that an earlier
run left are checked too: those this run would not make as they are (other settings, inputs or
model) are listed, left in place, and make the exit status 1, as a folder read as one dataset
would mix them in. Options no case could run with (a start scale out of the
model's range) are refused before any output is touched. The random parameters of each
output are drawn from a seed derived from (``--seed``, name, k) only, so the result does not
depend on the number of workers or on the order in which cases finish.
"""

from __future__ import annotations

import argparse
import csv
import errno
import hashlib
import json
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from singan_insert.checks import MAX_SEED
from singan_insert.errors import SinganInsertError
from singan_insert.io import file_digest, file_unchanged
from singan_insert.insertion.intensity import INTENSITY_MODES, check_intensity_mode
from singan_insert.insertion.sampling import (
    InsertionRanges,
    check_contrast_applies,
    check_integer,
    check_non_negative,
    check_seed,
    parse_contrast,
    parse_start_scale,
)

#: Targets tried in a crossMoDA folder when ``--target-suffix`` is not given, in this order:
#: translations of the ceT1 scan (CycleGAN as in docs/crossmoda.md, the pipeline's, the demo's).
TRANSLATED_SUFFIXES = ("cyclegan_hrT2", "fakehrT2", "hrT2_washed_out")
LOCK_NAME = ".singan-insert.lock"
#: Part of every output's fingerprint: raised whenever the same settings give another result
#: (2: the annotated rim's widths follow the tumor's size; 3: the result is kept to the target's
#: value range, insert_tumor step 6; 4: the partial-volume edge reaches past the mask and across
#: slices; 5: an annotated model sets the tumor's outermost pixels apart from its interior, as the
#: annotated tumor's; 6: the tumor's own texture is measured over its interior), so that a resume
#: redoes old outputs.
FINGERPRINT_VERSION = 6


@dataclass(frozen=True)
class Case:
    """One target volume and the source tumor to insert into it."""

    name: str
    target: Path
    source_image: Path
    source_label: Path


@dataclass(frozen=True)
class Problem:
    """A case that was refused or could not be found complete, and why."""

    name: str
    message: str


@dataclass(frozen=True)
class InsertSettings:
    """The sampling ranges of the offline augmentation (see ``singan-insert insert --help``).

    Args:
        num: augmentations per case, >= 1.
        appearance: ``"auto"`` (default: the model chooses each tumor's level in the target
            modality, :mod:`singan_insert.insertion.appearance`; a ``contrast`` other than 1 is then refused) or
            ``"fixed"`` (the paper's method with the drawn :math:`\\lambda`).
        contrast: :math:`\\lambda` (> 0), used with ``appearance="fixed"``, in any spelling of
            :func:`~singan_insert.insertion.sampling.parse_contrast`: a number, a ``set`` of
            values (GBA's ``{0.5, 0.8, 1.5}``), a range ``(low, high)``, or the command line's
            tokens (``["0.5", "0.8"]``: a set; ``["0.5:1.5"]``: a range).
        start_scale: ``None`` (the model's default) or start scales, spelled likewise
            (:func:`~singan_insert.insertion.sampling.parse_start_scale`).
        intensity_mode: ``"normalized"`` or ``"matched"``.
        label_value: the tumor's value in the written label (>= 1).
        source_label_value: the tumor's value in the source label (``None``: its only value).
        axis: slicing axis (0, 1, 2) or ``None`` (through-plane).
        context_mm: in-plane context around the tumor, >= 0 mm.
        seed: base seed, in :math:`[0, 2^{63})`.
        rim, rim_scale: the annotated rim (:class:`~singan_insert.insertion.insert.InsertionParameters`):
            ``None`` for the defaults; ``rim=False`` keeps the targets' own surroundings.
        panels: also write before/after PNG panels.
        image_compression: gzip level (0-9) of the written images. Default 0: noisy float
            volumes compress by ~10 % only, and at crossMoDA size level 1 costs ~4 s of the ~7 s
            one augmentation takes on a CPU core (benchmarks/bench_batch.py). Labels use level 1.
    """

    num: int = 1
    appearance: str = "auto"
    contrast: Any = 1.0
    start_scale: Any = None
    intensity_mode: str = "normalized"
    label_value: int = 1
    source_label_value: int | None = 1
    axis: int | None = None
    context_mm: float = 20.0
    seed: int = 0
    rim: bool | None = None
    rim_scale: float | None = None
    panels: bool = False
    image_compression: int = 0

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("num", check_integer(self.num, "num", 1))
        if self.appearance not in ("auto", "fixed"):
            raise SinganInsertError(f"appearance must be 'auto' or 'fixed', got {self.appearance!r}.")
        check_contrast_applies(self.contrast, self.appearance,
                               fixed_spelling="appearance='fixed' (command line: --appearance fixed)")
        set_("contrast", parse_contrast(self.contrast, "contrast"))
        set_("start_scale", parse_start_scale(self.start_scale, "start_scale"))
        check_intensity_mode(self.intensity_mode)
        set_("label_value", check_integer(self.label_value, "label_value", 1))
        if self.source_label_value is not None:
            set_("source_label_value", check_integer(self.source_label_value, "source_label_value"))
        if self.axis is not None:
            set_("axis", check_integer(self.axis, "axis", 0, 2))
        set_("context_mm", check_non_negative(self.context_mm, "context_mm"))
        set_("seed", check_seed(self.seed))
        from singan_insert.insertion.insert import InsertionParameters

        InsertionParameters(rim=self.rim, rim_scale=self.rim_scale)  # their checks, here, not in a worker
        set_("panels", bool(self.panels))
        set_("image_compression", check_integer(self.image_compression, "image_compression", 0, 9))

    def ranges(self) -> InsertionRanges:
        """The sampler of the random parameters (the batch keeps the tumor's pose)."""
        return InsertionRanges(contrast=self.contrast, start_scale=self.start_scale)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["contrast"] = self.contrast.to_dict()
        data["start_scale"] = None if self.start_scale is None else self.start_scale.to_dict()
        return data


def add_insert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="harmonizer model file or training folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-root", help="folder in crossMoDA layout (<name>_ceT1, <name>_Label, target)")
    source.add_argument("--csv", help="CSV with columns name,target,source_image,source_label (UTF-8, "
                                      "with or without Excel's byte-order mark)")
    source.add_argument("--target", help="one target volume (with --source-image and --source-label)")
    parser.add_argument("--source-image", help="source (modality A) volume (required with --target)")
    parser.add_argument("--source-label", help="source tumor label (required with --target)")
    parser.add_argument("--name", help="with --target: the name of its outputs, <name>_aug<k> (default: "
                                       "the target's file name without .nii/.nii.gz)")
    parser.add_argument("--target-suffix",
                        help="suffix of the target volumes in --data-root (default: the first of "
                             f"{', '.join(TRANSLATED_SUFFIXES)} that exists: a translation of the "
                             "ceT1; 'hrT2' inserts into the subject's own hrT2, which already "
                             "shows the tumor)")
    parser.add_argument("--out", required=True, help="output folder (re-running on it resumes)")
    parser.add_argument("--num", type=int, default=1, help="augmentations per case (default: 1)")
    parser.add_argument("--appearance", choices=["auto", "fixed"], default="auto",
                        help="auto (default): the model chooses each tumor's level in the target "
                             "modality; fixed: the paper's method with --contrast")
    parser.add_argument("--contrast", nargs="+", default=["1.0"],
                        help="with --appearance fixed: contrast factors lambda to draw from (GBA: "
                             "0.5 0.8 1.5), or one range LOW:HIGH drawn uniformly (default: 1.0)")
    parser.add_argument("--start-scale", nargs="+",
                        help="start scales to draw from, or one range LOW:HIGH (write "
                             "--start-scale=-3:-1 for negative ranges; default: the model's)")
    parser.add_argument("--rim", choices=["auto", "on", "off"], default="auto",
                        help="B's rim around each tumor, from the model's one-slice annotation: auto "
                             "(default: on with an annotated model), on, or off (keep the target's own "
                             "surroundings, e.g. a target that already shows B's cleft)")
    parser.add_argument("--rim-scale", type=float,
                        help="factor on the rim's widths (default: the tumor's size over the annotated "
                             "tumor's; 1 keeps the annotated widths in mm)")
    parser.add_argument("--intensity-mode", choices=sorted(INTENSITY_MODES), default="normalized",
                        help="how the tumor's intensities are brought into the target's units "
                             "(default: normalized)")
    parser.add_argument("--label-value", type=int, default=1,
                        help="label written for the tumor (default: 1)")
    parser.add_argument("--source-label-value", type=int, default=1,
                        help="tumor value in the source label (default: 1, crossMoDA's schwannoma)")
    parser.add_argument("--axis", type=int, choices=[0, 1, 2], help="slicing axis (default: through-plane)")
    parser.add_argument("--context-mm", type=float, default=20.0,
                        help="in-plane context around the tumor, in mm (default: 20)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default: 1)")
    parser.add_argument("--device", default="cpu",
                        help="where the model runs: cpu (default), cuda[:n] or auto. On a GPU one "
                             "process batches the tumor slices of --batch-cases outputs per forward "
                             "pass, reading and writing in background threads")
    parser.add_argument("--batch-cases", type=int, default=None,
                        help="outputs per forward pass in the single-process batched path (default: "
                             "8 on a GPU; on the CPU the per-case path unless given)")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"base seed of every output's random draws, 0..{MAX_SEED} (default: 0)")
    parser.add_argument("--panels", action="store_true",
                        help="write before/after PNG panels (needs matplotlib; default: off)")
    parser.add_argument("--image-compression", type=int, default=0, choices=range(10), metavar="0-9",
                        help="gzip level of the written images (default 0: float images barely "
                             "compress and level 1 takes most of the time; labels use 1)")


def check_writable_folder(folder: Path) -> None:
    """Create ``folder`` if needed; a clear error when that fails or it is not writable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SinganInsertError(f"Cannot create the output folder {folder}: {error}.") from error
    if not os.access(folder, os.W_OK):
        raise SinganInsertError(f"The output folder {folder} is not writable.")


def check_case_name(name: Any) -> str:
    """A case name as a plain file-name prefix: outputs ``<out>/<name>_aug<k>...`` stay in ``<out>``."""
    if not isinstance(name, str) or not name.strip():
        raise SinganInsertError(f"the case name is empty ({name!r}); give every row a name.")
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith(".") \
            or Path(name).name != name or Path(name).is_absolute():
        raise SinganInsertError(
            f"the case name {name!r} is not a plain file-name prefix: it would write outside the "
            "output folder or a hidden file. Use a name such as 'patient_01' (no '/', '\\', "
            "leading '.').")
    return name


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


def find_cases(data_root: str | os.PathLike, target_suffix: str | None = None
               ) -> tuple[list[Case], list[Problem]]:
    """Complete cases of a crossMoDA-layout folder, and the incomplete ones with the reason.

    With ``target_suffix=None`` each case's target is the first of :data:`TRANSLATED_SUFFIXES`
    that exists (see the module docstring).
    """
    root = Path(data_root)
    suffixes = TRANSLATED_SUFFIXES if target_suffix is None else (target_suffix,)
    found: dict[str, Case] = {}
    for suffix in suffixes:
        try:
            for case in find_crossmoda_cases(root, suffix):
                found.setdefault(case.name, case)
        except SinganInsertError:
            if not root.is_dir():
                raise
    problems = []
    names = sorted({label.name.split("_Label.nii")[0] for label in root.glob("*_Label.nii*")})
    # What may follow "<case>_" in the name of a file of that case (the demo's
    # <case>_hrT2_augmented_Label); anything else (<case>_rescan) is a case of its own.
    kinds = ("ceT1", "hrT2", "Label", *TRANSLATED_SUFFIXES, *([target_suffix] if target_suffix else []))
    for name in names:
        if name in found or any(name.startswith(f"{other}_{kind}_") for other in found for kind in kinds):
            continue
        if not list(root.glob(f"{name}_ceT1.nii*")):
            problems.append(Problem(name, f"no {name}_ceT1.nii.gz beside {name}_Label"))
        elif target_suffix is None and list(root.glob(f"{name}_hrT2.nii*")):
            problems.append(Problem(name, (
                f"no translated target ({', '.join(f'{name}_{s}' for s in TRANSLATED_SUFFIXES)}); "
                f"{name}_hrT2 already shows this tumor where it would be inserted. Write the "
                f"CycleGAN translation as {name}_cyclegan_hrT2.nii.gz, or pass --target-suffix "
                "hrT2 to insert into the hrT2 anyway")))
        else:
            wanted = " or ".join(f"{name}_{s}.nii.gz" for s in suffixes)
            problems.append(Problem(name, f"no target {wanted}"))
    cases = sorted(found.values(), key=lambda c: c.name)
    if not cases:
        details = "".join(f"\n  {p.name}: {p.message}." for p in problems[:10])
        raise SinganInsertError(
            f"No complete case in {root}: each needs <name>_Label.nii.gz, <name>_ceT1.nii.gz and "
            f"a target <name>_<suffix>.nii.gz (default suffixes {', '.join(TRANSLATED_SUFFIXES)}; "
            f"set --target-suffix for another target name).{details}")
    return cases, problems


def load_cases_csv(path: str | os.PathLike) -> tuple[list[Case], list[Problem]]:
    """Cases from a CSV with columns ``name,target,source_image,source_label``, and the rows
    refused (bad or duplicate name, a missing field or file) with the reason."""
    path = Path(path)
    if not path.is_file():
        raise SinganInsertError(f"CSV file {path} does not exist.")
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would otherwise
        # become part of the first column's name.
        with open(path, newline="", encoding="utf-8-sig") as handle:
            # A space after a comma (or a path pasted with one) is not part of a file name.
            rows = [{(key or "").strip(): (value or "").strip() if isinstance(value, str) else value
                     for key, value in row.items()} for row in csv.DictReader(handle)]
    except (UnicodeDecodeError, csv.Error) as error:
        raise SinganInsertError(f"{path} is not a readable CSV file: {error}.") from None
    required = ("name", "target", "source_image", "source_label")
    if not rows or not set(required) <= set(rows[0]):
        found = list(rows[0]) if rows else []
        raise SinganInsertError(f"{path} must have a header with columns {list(required)} and rows; "
                                f"its header has {found}.")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.get("name")] = counts.get(row.get("name"), 0) + 1
    cases, problems = [], []
    for line, row in enumerate(rows, start=2):
        label = row.get("name") or f"line {line}"
        try:
            name = check_case_name(row.get("name"))
            if counts[name] > 1:
                raise SinganInsertError(
                    f"the name {name!r} is given {counts[name]} times; outputs would overwrite "
                    "each other. Give every row its own name.")
            empty = [key for key in required[1:] if not (row.get(key) or "").strip()]
            if empty:
                raise SinganInsertError(f"line {line} has no {', '.join(empty)}.")
            paths = [Path(row[key]) if Path(row[key]).is_absolute() else path.parent / row[key]
                     for key in required[1:]]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise SinganInsertError(f"not found or not a file: {missing}.")
            cases.append(Case(name, *paths))
        except SinganInsertError as error:
            problems.append(Problem(label, str(error)))
    return cases, problems


def read_cases_csv(path: str | os.PathLike) -> list[Case]:
    """Cases from a CSV (see :func:`load_cases_csv`); raises on the first refused row."""
    cases, problems = load_cases_csv(path)
    if problems:
        raise SinganInsertError(f"{path}, case {problems[0].name!r}: {problems[0].message}")
    return cases


def output_paths(out_dir: Path, case: Case, index: int) -> dict[str, Path]:
    stem = Path(out_dir) / f"{check_case_name(case.name)}_aug{index}"
    return {"image": Path(f"{stem}_image.nii.gz"), "label": Path(f"{stem}_label.nii.gz"),
            "record": Path(f"{stem}.json"), "panel": Path(f"{stem}.png")}


def derived_seed(seed: int, name: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def output_fingerprint(case: Case, index: int, settings: InsertSettings, model_sha256: str) -> str:
    """A digest of everything that decides output ``index`` of ``case`` (see the module docstring)."""
    inputs = {}
    for key in ("target", "source_image", "source_label"):
        path = Path(getattr(case, key))
        try:
            stat = path.stat()
            inputs[key] = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
        except OSError:
            inputs[key] = [str(path), None, None]
    settings_dict = settings.to_dict()
    settings_dict.pop("panels")  # a missing panel is redone on its own (see _unfinished_reason)
    settings_dict.pop("num")  # output k does not depend on how many others there are
    settings_dict.pop("image_compression")  # the same voxels, however they are stored
    payload = {"version": FINGERPRINT_VERSION, "name": case.name, "augmentation": index,
               "inputs": inputs, "settings": settings_dict, "model_sha256": model_sha256}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _input_paths(case: Case) -> dict[str, str]:
    """The case's input files as absolute paths (what an output was made from, whatever the cwd)."""
    return {key: str(Path(getattr(case, key)).resolve()) for key in ("target", "source_image", "source_label")}


def _unfinished_reason(paths: dict[str, Path], fingerprint: str, panels: bool) -> str | None:
    """``None`` when the output is finished; else why not: ``"new"`` (no record), ``"changed"``
    (its parameters, inputs or model changed) or what is wrong with its files."""
    if not paths["record"].exists():
        return "new"
    try:
        record = json.loads(paths["record"].read_text())
    except (OSError, ValueError):
        return "its record is unreadable"
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return "changed"
    files = record.get("files")
    if not isinstance(files, dict):
        return "its record holds no file sizes and digests (written by an earlier version)"
    for key in ["image", "label"] + (["panel"] if panels else []):
        expected = files.get(key)
        if not paths[key].is_file():
            return f"its {key} file is missing"
        if not isinstance(expected, dict) or not file_unchanged(paths[key], expected):
            return f"its {key} file differs from its record (size or SHA-256): damaged or changed since"
    return None


def _read_volume(path: Path, what: str):
    """A 3D real-valued NIfTI volume (float32), its affine and header, or a clear error (io.read_nifti)."""
    from singan_insert.io import read_nifti

    image = read_nifti(path, what=what)
    return np.asarray(image.dataobj, dtype=np.float32), image.affine, image.header


def augment_case(case: Case, index: int, model: str, settings: InsertSettings, out_dir: Path,
                 torch_threads: int | None = None, fingerprint: str | None = None) -> dict[str, Any]:
    """Write augmentation ``index`` of ``case``; return its record. Safe to run in a worker.

    ``fingerprint`` (:func:`output_fingerprint`) is computed when not given.
    """
    import torch

    from singan_insert.insertion.insert import insert_tumor
    from singan_insert.insertion.model_cache import load_harmonizer

    if torch_threads:
        torch.set_num_threads(torch_threads)
    job = prepare_case(case, index, model, settings, fingerprint)
    result = insert_tumor(job.target, job.affine, job.source, load_harmonizer(job.model_file), job.parameters)
    return write_case(job, result, settings, out_dir)


@dataclass
class PreparedCase:
    """One output's inputs, read and drawn (:func:`prepare_case`), ready for the harmonizer."""

    case: Case
    index: int
    model_file: Path
    model_sha256: str
    fingerprint: str
    parameters: Any  # InsertionParameters
    target: np.ndarray
    affine: np.ndarray
    source: Any  # SourceTumor
    header: Any = None  # the target's NIfTI header: the outputs keep it (io.nifti_bytes)


def prepare_case(case: Case, index: int, model: str, settings: InsertSettings,
                 fingerprint: str | None = None) -> PreparedCase:
    """Read the volumes of output ``index`` of ``case`` and draw its parameters (seeded by name)."""
    from singan_insert.insertion.insert import InsertionParameters
    from singan_insert.insertion.model_cache import resolve_model_file
    from singan_insert.insertion.placement import SourceTumor

    model_file = resolve_model_file(model)
    model_sha256 = file_digest(model_file)
    if fingerprint is None:
        fingerprint = output_fingerprint(case, index, settings, model_sha256)
    rng = np.random.default_rng(derived_seed(settings.seed, case.name, index))
    drawn = settings.ranges().sample(rng)
    parameters = InsertionParameters(
        appearance=settings.appearance, intensity_mode=settings.intensity_mode, contrast=drawn.contrast,
        start_scale=drawn.start_scale, axis=settings.axis, context_mm=settings.context_mm,
        seed=drawn.seed, label_value=settings.label_value, rim=settings.rim, rim_scale=settings.rim_scale)
    target, affine, header = _read_volume(Path(case.target), "target")
    source = SourceTumor.from_files(case.source_image, case.source_label,
                                    label_value=settings.source_label_value)
    return PreparedCase(case, index, model_file, model_sha256, fingerprint, parameters, target, affine, source,
                        header)


def write_case(job: PreparedCase, result, settings: InsertSettings, out_dir: Path) -> dict[str, Any]:
    """Write an insertion's image, label, optional panel and its record; return the record.

    Every file is written in full (temporary files) before any previous output of the same name
    is touched; then the previous record goes, the files are renamed into place and the new
    record comes last. So a redo that fails keeps the previous output whole, with its record,
    and a record only ever vouches for files of its own run: it holds their sizes and SHA-256.
    """
    from singan_insert.io import StagedFiles, nifti_bytes

    paths = output_paths(out_dir, job.case, job.index)
    record = {**result.record, "case": {k: str(v) for k, v in job.case.__dict__.items()},
              "input_paths": _input_paths(job.case),
              "augmentation": job.index, "source_label_value": settings.source_label_value,
              "model_file": str(job.model_file), "model_sha256": job.model_sha256,
              "settings": settings.to_dict(), "fingerprint": job.fingerprint}
    contents = {
        "image": nifti_bytes(paths["image"], result.image.astype(np.float32), job.affine,
                             settings.image_compression, job.header),
        "label": nifti_bytes(paths["label"], result.label, job.affine, header=job.header),
    }
    if settings.panels:
        import tempfile

        from singan_insert.evaluation.figures import before_after_panel

        # matplotlib picks the format from the file name, so the panel is drawn outside the
        # output folder and staged from its bytes like the others.
        with tempfile.TemporaryDirectory() as scratch:
            drawn = Path(scratch) / "panel.png"
            before_after_panel(job.target, result.image, result.mask, drawn,
                               title=f"{job.case.name} aug {job.index} ({_appearance_caption(result.record)})")
            contents["panel"] = drawn.read_bytes()
    record["files"] = {key: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                       for key, data in contents.items()}
    with StagedFiles() as staged:
        for key, data in contents.items():
            record["files"][key]["mtime_ns"] = staged.write_bytes(paths[key], data)
        staged.write_bytes(paths["record"], json.dumps(record, indent=2, default=str).encode())
        # The previous record first: it must not vouch for the files being replaced (nor a
        # previous panel stay beside an output it does not show).
        staged.commit(remove_first=[paths["record"]] + ([] if settings.panels else [paths["panel"]]))
    return record


def _run_jobs_batched(jobs: Sequence[tuple[Case, int, str]], model: str, settings: InsertSettings,
                      out_dir: Path, device: str, batch_cases: int, tqdm) -> list[tuple[Any, str]]:
    """One process, the model on ``device``: the tumor slices of ``batch_cases`` outputs per
    forward pass (:func:`~singan_insert.insertion.multicase.insert_tumors`), reading and writing
    in background threads (:func:`~singan_insert.insertion.multicase.pipelined`).

    Every failure is recorded per output, as in :func:`_run_jobs`, and a full disk stops the batch
    alike: the writes already started end, nothing is read, inserted or written after them.
    """
    import threading

    from singan_insert.insertion.insert import insert_tumor
    from singan_insert.insertion.model_cache import load_harmonizer, resolve_model_file
    from singan_insert.insertion.multicase import InsertionCase, insert_tumors, pipelined

    harmonizer = load_harmonizer(resolve_model_file(model), device)
    bar = tqdm(total=len(jobs), desc="insert", unit="volume")
    # Set by the first output that meets a full disk. pipelined() reads ahead of the model and
    # writes behind it: when a write fails, later outputs are already queued at every step, and
    # each step looks first so that none of them is read, inserted or written for nothing.
    stop = threading.Event()

    def read(job):
        if stop.is_set():
            return None
        try:
            return prepare_case(job[0], job[1], model, settings, job[2])
        except Exception as error:  # recorded for this output; the others go on
            return error

    def process(prepared: list) -> list:
        """``[(prepared, result or error)]`` for a chunk: one batched call for the readable ones."""
        if stop.is_set():
            return [(None, None)] * len(prepared)
        ready = [p for p in prepared if isinstance(p, PreparedCase)]
        cases = [InsertionCase(p.target, p.affine, p.source, p.parameters) for p in ready]
        try:
            results = iter(insert_tumors(cases, harmonizer, return_exceptions=True))
        except Exception:  # not a library error: isolate the case that raised it, one by one
            results = iter([_attempt(insert_tumor, p.target, p.affine, p.source, harmonizer, p.parameters)
                            for p in ready])
        return [(p, next(results)) if isinstance(p, PreparedCase) else (None, p) for p in prepared]

    def write(job, outcome) -> str | None:
        prepared, result = outcome
        if stop.is_set() and not isinstance(result, BaseException):  # a failure keeps its own message
            return _NOT_RUN
        try:
            if not isinstance(result, BaseException):
                write_case(prepared, result, settings, out_dir)
                return None
            error = result  # reading or inserting failed
        except Exception as caught:
            error = caught
        finally:
            bar.update(1)
        if _disk_full(error):  # every later output would fail too
            stop.set()
        return _describe(error)

    messages = pipelined(jobs, read, process, write, chunk_size=batch_cases)
    bar.close()
    return _failures(jobs, dict(enumerate(messages)))


def _attempt(function, *args):
    try:
        return function(*args)
    except Exception as error:
        return error


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir`` (a second holder gets a clear error at once).

    ``fcntl.flock`` locks are released by the kernel when their holder dies, so a killed run
    never leaves the folder locked.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    path = Path(out_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise SinganInsertError(
                f"Another `singan-insert insert` (pid {holder}) is writing to {out_dir}. Wait "
                "for it to finish, or write to another --out.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def _remove_stale_temporaries(out_dir: Path) -> int:
    """Delete the temporary files a killed run left (safe: the caller holds the lock)."""
    removed = 0
    for path in Path(out_dir).glob(".*_aug*.tmp"):
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _collect_cases(args: argparse.Namespace) -> tuple[list[Case], list[Problem], list[Problem]]:
    """(cases, refused rows, incomplete folder cases) for the command line's arguments."""
    if args.name is not None and not args.target:
        raise SinganInsertError("--name names the outputs of the one case of --target; with --csv the "
                                "names are the CSV's, with --data-root the file names'.")
    if args.target:
        if not (args.source_image and args.source_label):
            raise SinganInsertError("--target needs --source-image and --source-label.")
        name = args.name or Path(args.target).name.split(".nii")[0]
        case = Case(check_case_name(name), Path(args.target), Path(args.source_image),
                    Path(args.source_label))
        for path in (case.target, case.source_image, case.source_label):
            if not path.is_file():
                raise SinganInsertError(f"{path} does not exist or is not a file.")
        return [case], [], []
    if args.csv:
        cases, refused = load_cases_csv(args.csv)
        if not cases:
            details = "".join(f"\n  {p.name}: {p.message}" for p in refused[:10])
            raise SinganInsertError(f"{args.csv}: no usable row.{details}")
        return cases, refused, []
    cases, incomplete = find_cases(args.data_root, args.target_suffix)
    return cases, [], incomplete


def _appearance_caption(record: dict[str, Any]) -> str:
    """How the tumor's level was set, for a panel's title."""
    chosen = record.get("appearance") or {}
    mode = chosen.get("mode", "fixed")
    lam = chosen.get("lambda") if mode == "auto" else record.get("parameters", {}).get("contrast")
    return f"{mode}, lambda={lam:.3g}" if isinstance(lam, (int, float)) else str(mode)


def resolve_model(path: str | os.PathLike) -> Path:
    """The model file of ``path`` (:func:`~singan_insert.insertion.model_cache.resolve_model_file`),
    saying so when ``path`` is a training folder whose training has not finished."""
    from singan_insert.harmonizer.training import CHECKPOINT_NAME, MODEL_NAME
    from singan_insert.insertion.model_cache import resolve_model_file

    folder = Path(path)
    if folder.is_dir() and not (folder / MODEL_NAME).exists() and (folder / CHECKPOINT_NAME).is_file():
        raise SinganInsertError(
            f"The training in {folder} has not finished: it holds a checkpoint but no {MODEL_NAME} "
            "yet. Re-run the same `singan-insert train` command to finish it (it resumes from the "
            "checkpoint).")
    return resolve_model_file(path)


def check_settings_against_model(settings: InsertSettings, model) -> None:
    """Refuse, before any output is touched, the settings that no case could run with: start
    scales outside the model's range, an axis other than the model's."""
    from singan_insert.insertion.insert import check_model_provenance

    if settings.start_scale is not None:
        for value in settings.start_scale.values:
            try:
                model.geometry.resolve_start_scale(int(value), model.valid_start_scales.start)
            except SinganInsertError as error:
                raise SinganInsertError(f"--start-scale: {error}") from None
    check_model_provenance(model, settings.axis)


def check_same_inputs(out_dir: Path, case: Case) -> None:
    """Refuse to replace the outputs named like ``case`` that were made from other input files.

    A changed file at the same path is redone as usual; another path under the same name is
    another subject (``subj1/target.nii.gz``, ``subj2/target.nii.gz``) whose outputs would
    silently replace the first one's.
    """
    wanted = _input_paths(case)
    for _, path in _case_records(out_dir, case):
        try:
            record = json.loads(path.read_text())
            made_from = record.get("input_paths") or {
                key: str(Path(value).resolve()) for key, value in record["case"].items() if key in wanted}
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            continue  # an unreadable record vouches for nothing: the output is redone anyway
        different = {key: value for key, value in made_from.items() if wanted.get(key) != value}
        if different:
            shown = "; ".join(f"{key} {value}" for key, value in different.items())
            raise SinganInsertError(
                f"{path} was made from other input files ({shown}), not from this case's. These "
                f"outputs would be replaced: give this case's outputs another name with --name, or "
                f"write to another --out (delete {Path(out_dir) / case.name}_aug* to replace them).")


def _case_records(out_dir: Path, case: Case) -> list[tuple[int, Path]]:
    """``(k, path)`` of every record ``<name>_aug<k>.json`` of ``case`` in ``out_dir``, by ``k``."""
    import glob
    import re

    pattern = re.compile(rf"{re.escape(case.name)}_aug(\d+)\.json")
    found = ((pattern.fullmatch(path.name), path)
             for path in sorted(Path(out_dir).glob(f"{glob.escape(case.name)}_aug*.json")))
    return sorted((int(match.group(1)), path) for match, path in found if match is not None)


def run_insert(args: argparse.Namespace) -> int:
    """``singan-insert insert``: augment every case, skipping finished outputs."""
    from tqdm.auto import tqdm

    from singan_insert.insertion.model_cache import load_harmonizer

    from singan_insert.devices import select_device

    workers = check_integer(args.workers, "--workers", 1)
    device = select_device(args.device)
    batch_cases = args.batch_cases
    if batch_cases is not None:
        batch_cases = check_integer(batch_cases, "--batch-cases", 1)
    batched = device.type != "cpu" or batch_cases is not None
    batch_cases = batch_cases or 8
    if batched and workers > 1:
        raise SinganInsertError(
            "--workers runs several CPU processes; the batched path (--device cuda or --batch-cases) "
            "is one process that holds the model. Use one or the other.")
    settings = InsertSettings(
        num=args.num, appearance=args.appearance, contrast=args.contrast, start_scale=args.start_scale,
        intensity_mode=args.intensity_mode, label_value=args.label_value,
        source_label_value=args.source_label_value, axis=args.axis, context_mm=args.context_mm,
        seed=args.seed, rim={"auto": None, "on": True, "off": False}[args.rim], rim_scale=args.rim_scale,
        panels=args.panels, image_compression=args.image_compression)
    cases, refused, incomplete = _collect_cases(args)
    model_file = resolve_model(args.model)
    # Fail early, in the main process, on a bad model file or settings it cannot run with.
    check_settings_against_model(settings, load_harmonizer(model_file, "cpu"))
    if settings.panels:
        from singan_insert.evaluation.figures import require_matplotlib

        require_matplotlib()
    out_dir = Path(args.out)
    check_writable_folder(out_dir)
    with output_lock(out_dir):
        if args.target:
            check_same_inputs(out_dir, cases[0])
        _remove_stale_temporaries(out_dir)
        model_sha256 = file_digest(model_file)
        jobs, skipped, changed, damaged = [], 0, 0, []
        for case in cases:
            for k in range(settings.num):
                paths = output_paths(out_dir, case, k)
                fingerprint = output_fingerprint(case, k, settings, model_sha256)
                reason = _unfinished_reason(paths, fingerprint, settings.panels)
                if reason is None:
                    skipped += 1
                    continue
                if reason == "changed":
                    changed += 1
                elif reason != "new":
                    damaged.append(f"{case.name} aug {k}: {reason}")
                jobs.append((case, k, fingerprint))
        if skipped or changed or damaged:
            print(f"Resuming: {skipped} finished output(s) skipped, {changed + len(damaged)} redone "
                  f"({changed} with changed parameters, inputs or model; {len(damaged)} whose files "
                  "are missing or differ from their record).")
            _print_list("redone:", damaged)
        stale = _stale_beyond_num(out_dir, cases, settings, model_sha256)
        _report_stale(stale, settings.num)
        _print_list("incomplete case", [f"{p.name}: {p.message}" for p in incomplete])
        if batched:
            failures = _run_jobs_batched(jobs, str(model_file), settings, out_dir, str(device),
                                         batch_cases, tqdm)
        else:
            failures = _run_jobs(jobs, str(model_file), settings, out_dir, workers, tqdm)
    print(f"Wrote {len(jobs) - len(failures)} augmentation(s) to {out_dir}; "
          f"{len(failures)} failed, {len(refused)} case(s) refused, {len(incomplete)} case(s) "
          f"incomplete, {skipped} already finished.")
    kept = lambda case, k: output_paths(out_dir, case, k)["record"].exists()  # noqa: E731
    for (case, k, _), message in failures:
        print(f"  failed: {case.name} aug {k}: "
              + (f"{message.rstrip('.')}; its previous output (and record) was kept" if kept(case, k) else message))
    for problem in refused:
        print(f"  refused: {problem.name}: {problem.message}")
    # Again after the progress bar, which scrolls the first list out of view on a big dataset.
    _print_list("incomplete case", [f"{p.name}: {p.message}" for p in incomplete])
    _report_stale(stale, settings.num)
    return 1 if failures or refused or incomplete or stale else 0


def _stale_beyond_num(out_dir: Path, cases: Sequence[Case], settings: InsertSettings,
                      model_sha256: str) -> list[str]:
    """The outputs ``<name>_aug<k>`` with ``k >= num`` of this run's cases that an earlier run
    left and that this run would not make as they are (other settings, inputs or model, or
    damaged files): a folder read as one dataset would mix them in unnoticed. Those this run
    would make identically are fine and not listed."""
    stale = []
    for case in cases:
        for k, _ in _case_records(out_dir, case):
            if k < settings.num:
                continue
            reason = _unfinished_reason(output_paths(out_dir, case, k),
                                        output_fingerprint(case, k, settings, model_sha256), settings.panels)
            if reason is not None:
                stale.append(f"{case.name} aug {k}: " + ("made with other settings, inputs or model"
                                                         if reason == "changed" else reason))
    return stale


def _report_stale(stale: Sequence[str], num: int) -> None:
    if stale:
        print(f"{len(stale)} output(s) beyond --num {num} were left by an earlier run and do not match "
              "this one: delete them, or re-run with a --num that covers them to redo them. "
              "They make the exit status 1.")
        _print_list("left over:", list(stale))


def _print_list(what: str, lines: Sequence[str], limit: int = 20) -> None:
    for line in lines[:limit]:
        print(f"  {what} {line}.")
    if len(lines) > limit:
        print(f"  ... and {len(lines) - limit} more.")


class _DiskFull(SinganInsertError):
    """A full disk met in a worker process, as the parent receives it (see :func:`_in_worker`)."""


def _disk_full(error: BaseException | None) -> bool:
    # io's writers report a full disk as a SinganInsertError raised from the OSError.
    from singan_insert.io import _FULL_DISK

    while error is not None:
        if isinstance(error, _DiskFull) or (isinstance(error, OSError) and error.errno in _FULL_DISK):
            return True
        error = error.__cause__
    return False


def _describe(error: BaseException) -> str:
    if _disk_full(error):
        return ("the disk is full (no space left on device): this output was not written (no "
                "partial file is kept) and the batch stopped; free space and re-run to resume")
    if isinstance(error, SinganInsertError):
        return str(error)
    if isinstance(error, BrokenProcessPool):
        return "its worker process died (killed, or out of memory); re-run to resume"
    return f"{type(error).__name__}: {error}"


#: In a worker process: set by the parent when the batch stops (the disk is full).
_STOP = None
#: What a worker or writer returns for an output it did not start because the batch had stopped.
_NOT_RUN = "not run"
#: The failure message of an output the batch did not try because the disk is full.
_NOT_RUN_DISK_FULL = "not run: the disk is full"


def _failures(jobs: Sequence[tuple[Case, int, str]], messages: dict[int, str | None]
              ) -> list[tuple[Any, str]]:
    """``[(job, message)]`` in job order for the outputs that were not written, from each job's
    message by position (``None``: written; :data:`_NOT_RUN`: not tried, the disk being full).

    Every path reports the batch alike through it, however its outputs finished.
    """
    return [(jobs[position], _NOT_RUN_DISK_FULL if message == _NOT_RUN else message)
            for position, message in sorted(messages.items()) if message is not None]


def _worker_init(parent_pid: int, stop=None) -> None:
    """Tie a worker's life to its parent's (the kernel kills it when the parent dies)."""
    import signal

    global _STOP
    _STOP = stop

    # Ctrl-C reaches the whole process group. The parent alone handles it (cancels the queue,
    # stops the workers): a worker would catch it per job, report it as that job's result and
    # go on with the next one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def _in_worker(function, *args):
    """``function(*args)`` in a worker, unless the batch has stopped (then :data:`_NOT_RUN`)."""
    if _STOP is not None and _STOP.is_set():
        return _NOT_RUN
    try:
        function(*args)
    except Exception as error:
        # An exception reaches the parent pickled, without its __cause__: the OSError that
        # tells a full disk from another write error would be lost on the way.
        if _disk_full(error):
            raise _DiskFull(str(error)) from None
        raise
    return None


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued jobs and end the worker processes (SIGTERM) without waiting for them."""
    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        if process.is_alive():
            process.terminate()
    for process in workers:
        process.join(5)


def _run_jobs(jobs: Sequence[tuple[Case, int, str]], model, settings, out_dir, workers, tqdm):
    """Run every job; return ``[(job, message)]`` for those that failed (any exception)."""
    messages: dict[int, str | None] = {}
    bar = tqdm(total=len(jobs), desc="insert", unit="volume")
    if workers == 1 or len(jobs) <= 1:
        for position, (case, k, fingerprint) in enumerate(jobs):
            try:
                augment_case(case, k, model, settings, out_dir, fingerprint=fingerprint)
            except Exception as error:  # one bad case must not stop the batch...
                messages[position] = _describe(error)
                if _disk_full(error):  # ...but a full disk fails every later one too
                    messages.update(dict.fromkeys(range(position + 1, len(jobs)), _NOT_RUN))
                    break
            bar.update(1)
    else:
        import multiprocessing

        # spawn: safe with torch's thread pools (fork after torch has started threads can hang).
        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                   initargs=(os.getpid(), stop))
        try:
            futures = {pool.submit(_in_worker, augment_case, case, k, model, settings, out_dir, 1, fingerprint):
                       position for position, (case, k, fingerprint) in enumerate(jobs)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        messages[futures[future]] = future.result()  # None or _NOT_RUN
                    except Exception as error:
                        messages[futures[future]] = _describe(error)
                        if _disk_full(error) and not stop.is_set():
                            # As with one worker: the outputs already started end as they would
                            # alone and no other one starts (those the workers' queue holds
                            # return _NOT_RUN; wait() would not report the cancelled ones).
                            stop.set()
                            cancelled = {queued for queued in pending if queued.cancel()}
                            messages.update((futures[queued], _NOT_RUN) for queued in cancelled)
                            pending -= cancelled
                    bar.update(1)
        except BaseException:
            # Ctrl-C (or any error here): drop the queue and stop the workers now rather than
            # wait for every queued output. An output cut short leaves only a temporary file,
            # which the next run removes; its previous version, if any, is kept.
            _stop_pool(pool)
            raise
        pool.shutdown(wait=True)
    bar.close()
    return _failures(jobs, messages)
