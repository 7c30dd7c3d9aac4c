"""The crossMoDA folder layout: one parser of its file names, and a simulated data set in it.

A crossMoDA file is ``<name>_<kind>.nii.gz`` (or ``.nii``), where ``kind`` is the modality
(``ceT1``, ``hrT2``, or a derived one such as ``fakehrT2``) or ``Label``; the files of one case
share ``name`` and extension. A data set spreads its cases over split folders::

    <root>/source_training/crossmoda2021_ldn_<N>_ceT1.nii.gz, ..._Label.nii.gz
    <root>/target_training/crossmoda2021_ldn_<N>_hrT2.nii.gz        (unlabelled)
    <root>/target_validation/crossmoda2021_ldn_<N>_hrT2.nii.gz
    <root>/target_validation_labels/crossmoda2021_ldn_<N>_Label.nii.gz   (for scoring)
    <root>/target_training_labels/<name>_Label.nii.gz   (optional: a rough label of the
                                                          harmonizer's training scan)

:func:`find_cases` reads one folder (both :class:`CrossModaData` and
:func:`singan_insert.batch.find_crossmoda_cases` use it); names sort naturally
(``ldn_2`` before ``ldn_10``). :func:`simulate_crossmoda` writes such a data set from the
two-contrast phantom (:mod:`singan_insert.datasets.phantom`), with the ground truth that real
crossMoDA hides.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from singan_insert.errors import SinganInsertError

__all__ = [
    "LABEL",
    "NUM_CLASSES",
    "SOURCE_MODALITY",
    "TARGET_MODALITY",
    "TUMOR_LABEL",
    "CrossModaData",
    "SourceCase",
    "case_path",
    "find_cases",
    "natural_key",
    "simulate_crossmoda",
]

SOURCE_MODALITY = "ceT1"
TARGET_MODALITY = "hrT2"
LABEL = "Label"
TUMOR_LABEL = 1
NUM_CLASSES = 3  # background, vestibular schwannoma, cochlea
_EXTENSIONS = (".nii.gz", ".nii")


def natural_key(path: Path) -> list:
    """Sort key of a file name with its digit runs compared as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", Path(path).name)]


def case_path(folder: str | os.PathLike, name: str, kind: str, extension: str = ".nii.gz") -> Path:
    """``<folder>/<name>_<kind><extension>``: the crossMoDA name of a case's file."""
    return Path(folder) / f"{name}_{kind}{extension}"


def find_cases(
    folder: str | os.PathLike, kind: str, companions: Sequence[str] = ()
) -> list[tuple[str, dict[str, Path | None]]]:
    """Every ``<name>_<kind>.nii[.gz]`` of ``folder`` with the files of the same case.

    Args:
        folder: the folder to read (not searched recursively).
        kind: the file kind that defines a case (``"ceT1"``, ``"hrT2"``, ``"Label"``, ...).
        companions: other kinds to look up for each case, with the same name and extension.

    Returns:
        ``(name, {kind: path, companion: path or None, ...})`` naturally sorted by file name;
        a missing companion is ``None`` (the caller decides whether that is an error).
    """
    folder = Path(folder)
    marker = f"_{kind}"
    cases = []
    for path in sorted(folder.glob(f"*{marker}.nii*"), key=natural_key):
        extension = next((e for e in _EXTENSIONS if path.name.endswith(marker + e)), None)
        if extension is None:
            continue
        name = path.name[: -len(marker + extension)]
        files: dict[str, Path | None] = {kind: path}
        for companion in companions:
            candidate = case_path(folder, name, companion, extension)
            files[companion] = candidate if candidate.is_file() else None
        cases.append((name, files))
    return cases


@dataclass(frozen=True)
class SourceCase:
    """A labelled modality-A case: ``<name>_ceT1.nii.gz`` and ``<name>_Label.nii.gz``."""

    name: str
    image: Path
    label: Path


@dataclass(frozen=True)
class CrossModaData:
    """A data set in the crossMoDA layout (see the module docstring).

    The folder names are arguments, so any arrangement works (the same folder may be given
    twice, e.g. a flat folder as ``source_dir`` and ``target_dir``).
    """

    root: Path
    source_dir: str = "source_training"
    target_dir: str = "target_training"
    validation_dir: str = "target_validation"
    truth_dir: str = "target_validation_labels"
    target_label_dir: str = "target_training_labels"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def _folder(self, name: str, what: str) -> Path:
        folder = self.root / name
        if not folder.is_dir():
            raise SinganInsertError(
                f"{folder} does not exist: it should hold the {what}. Check --data-root (the "
                "crossMoDA layout is source_training/, target_training/, target_validation/) or "
                "name the folder explicitly.")
        return folder

    def source_cases(self) -> list[SourceCase]:
        """The labelled ceT1 cases; a ceT1 without its ``_Label`` file is an error."""
        folder = self._folder(self.source_dir, "labelled ceT1 scans (<name>_ceT1, <name>_Label)")
        cases = []
        for name, files in find_cases(folder, SOURCE_MODALITY, (LABEL,)):
            image = files[SOURCE_MODALITY]
            if files[LABEL] is None:
                label = image.name.replace(f"_{SOURCE_MODALITY}.nii", f"_{LABEL}.nii")
                raise SinganInsertError(f"{image} has no label {label}; modality A must be labelled.")
            cases.append(SourceCase(name, image, files[LABEL]))
        if not cases:
            raise SinganInsertError(f"No <name>_{SOURCE_MODALITY}.nii.gz file in {folder}.")
        return cases

    def unpaired_labels(self) -> list[Path]:
        """Source ``_Label`` files without their ``_ceT1`` scan (ignored, but worth a report)."""
        folder = self._folder(self.source_dir, "labelled ceT1 scans (<name>_ceT1, <name>_Label)")
        return [files[LABEL] for _, files in find_cases(folder, LABEL, (SOURCE_MODALITY,))
                if files[SOURCE_MODALITY] is None]

    def _images(self, split: str, what: str) -> list[tuple[str, Path]]:
        folder = self._folder(split, what)
        items = [(name, files[TARGET_MODALITY]) for name, files in find_cases(folder, TARGET_MODALITY)]
        if not items:
            raise SinganInsertError(f"No <name>_{TARGET_MODALITY}.nii.gz file in {folder}.")
        return items

    def target_images(self) -> list[tuple[str, Path]]:
        """``(name, path)`` of the unlabelled hrT2 training scans."""
        return self._images(self.target_dir, "unlabelled hrT2 training scans")

    def validation_images(self) -> list[tuple[str, Path]]:
        """``(name, path)`` of the hrT2 scans to segment."""
        return self._images(self.validation_dir, "hrT2 validation scans")

    def truth(self, name: str) -> Path | None:
        """The validation label of ``name``, when the data set has it."""
        return _existing(self.root / self.truth_dir, name, LABEL)

    def target_label(self, name: str) -> Path | None:
        """A (rough) label of hrT2 training scan ``name``, when one was provided."""
        return _existing(self.root / self.target_label_dir, name, LABEL)


def _existing(folder: Path, name: str, kind: str) -> Path | None:
    for extension in _EXTENSIONS:
        path = case_path(folder, name, kind, extension)
        if path.is_file():
            return path
    return None


def simulate_crossmoda(
    root: str | os.PathLike,
    num_source: int = 20,
    num_target: int = 20,
    num_validation: int = 32,
    *,
    seed: int = 0,
    shape: tuple[int, int, int] = (128, 128, 48),
    tumor_volume_cm3: tuple[float, float] = (0.1, 5.0),
    source_validation: bool = False,
) -> CrossModaData:
    """Write a simulated crossMoDA-like data set (:func:`singan_insert.datasets.phantom.simulate_subject`).

    Subjects are distinct per split, as in crossMoDA (unpaired): case ``N`` is simulated from
    seed ``1000 * seed + N`` and named ``crossmoda2021_ldn_<N>``; sources are
    ``1..num_source``, target training scans follow, then validation scans. Only the files a
    split has in crossMoDA are kept (ceT1 + Label; hrT2; hrT2), plus the validation labels in
    ``target_validation_labels/`` and the true label of the first target training scan in
    ``target_training_labels/`` (it stands in for the rough label or slice choice a person
    makes to pick the harmonizer's training slice, which must show a tumor).
    With ``source_validation``, the ceT1 scans and labels of the validation subjects are also
    written to ``source_validation/`` (not part of crossMoDA; they measure S_A in its own domain).
    A finished data set (``simulation.json`` present with the same arguments) is reused.

    Args:
        root: the data set's folder (created).
        num_source, num_target, num_validation: subjects per split (>= 1 each).
        seed: the data set's seed (>= 0).
        shape, tumor_volume_cm3: passed to ``simulate_subject``.
        source_validation: also keep the validation subjects' ceT1 scans and labels.
    """
    from singan_insert.datasets.phantom import simulate_subject, write_crossmoda

    data = CrossModaData(Path(root))
    counts = (num_source, num_target, num_validation)
    if min(counts) < 1:
        raise SinganInsertError(f"Every split needs at least one subject, got {counts}.")
    arguments = {"num_source": num_source, "num_target": num_target, "num_validation": num_validation,
                 "seed": seed, "shape": list(shape), "tumor_volume_cm3": list(tumor_volume_cm3),
                 "source_validation": source_validation}
    marker = data.root / "simulation.json"
    if marker.is_file():
        if json.loads(marker.read_text()).get("arguments") == arguments:
            return data
        raise SinganInsertError(
            f"{data.root} already holds a simulated data set made with other arguments "
            f"({marker}); use another folder or delete it.")
    splits = ["source"] * num_source + ["target"] * num_target + ["validation"] * num_validation
    for number, split in enumerate(splits, start=1):
        subject = simulate_subject(1000 * seed + number, shape, tumor_volume_cm3=tumor_volume_cm3)
        name = f"crossmoda2021_ldn_{number}"
        if split == "source":
            written = write_crossmoda(subject, data.root / data.source_dir, name)
            written["hrT2"].unlink()
            continue
        first_target = split == "target" and number == num_source + 1
        folder = data.target_dir if split == "target" else data.validation_dir
        truth = data.truth_dir if split == "validation" else data.target_label_dir if first_target else None
        written = write_crossmoda(subject, data.root / folder, name,
                                  truth_folder=None if truth is None else data.root / truth)
        if split == "validation" and source_validation:
            extra = data.root / "source_validation"
            extra.mkdir(parents=True, exist_ok=True)
            written["ceT1"].replace(extra / written["ceT1"].name)
            written["label"].replace(extra / written["label"].name)
        else:
            written["ceT1"].unlink()
            written["label"].unlink()
    marker.write_text(json.dumps({"arguments": arguments}, indent=2))
    return data
