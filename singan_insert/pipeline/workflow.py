"""The paper's Fig. 1 workflow on crossMoDA-layout folders, one method per stage.

Modality A (ceT1) is labelled, modality B (hrT2) is not; the goal is a segmenter for B:

1. train :math:`S_A` on the A images and labels (the small built-in U-Net on a CPU, or
   nnU-Net v2);
2. train CycleGAN A <-> B (unpaired) and translate every A image to B: the "fake hrT2"
   :math:`\\varphi^0_{AB}(I)`, in which tumors tend to vanish;
3. train the harmonizer on ONE hrT2 slice that shows a tumor;
4. paste each A tumor into its own fake hrT2 and harmonize it: the volumes :math:`B'`
   (:mod:`singan_insert.batch`, the engine of ``singan-insert insert``). The naive pastes of the
   very same insertions (same placement, intensity mapping and :math:`\\lambda`, no
   harmonization) are written beside them for the ablation;
5. train pix2pix :math:`B' \\to A` on the pairs (:math:`B'`, its A image);
6. translate the hrT2 validation images to A (pix2pix; CycleGAN's :math:`B \\to A` generator
   for the baseline) and segment them with :math:`S_A`;
7. score the predictions against the validation labels (Dice, ASSD; the paper's Table 1).

**Working grid.** The slice-wise GANs see 2D slices at a fixed pixel count, so the millimetres
per pixel must agree between the domains and the scans, or a network trained on one scale is
applied to another (crossMoDA's ceT1 and hrT2 differ in voxel size and field of view). Every
input volume is therefore first resampled, along its own voxel axes (no reorientation), onto a
:class:`WorkingGrid`: voxel size :math:`(s_x, s_y, s_z)` mm, a fixed in-plane size centred on
the volume's centre, and the volume's own extent along the slice axis (axis 2). All stages run
on these grids; predictions are resampled back onto each validation scan's own grid before
scoring. Images are interpolated linearly after a Gaussian anti-aliasing blur of
:math:`\\sigma = \\max(0, (f - 1)/2)` source voxels when shrinking by :math:`f`; label maps
are resampled by linear interpolation of their one-hot maps and an argmax (nnU-Net's way),
which keeps outlines smooth.

**Work folder** (every step skips what is already there, so a re-run resumes)::

    <work>/pipeline.json                    the data root and PipelineSettings of this run
    <work>/grid/source/<name>_ceT1, _Label  A on the working grid; _fakehrT2 from step 2
    <work>/grid/target/<name>_hrT2          B training images on the working grid
    <work>/grid/validation/<name>_hrT2      B validation images on the working grid
    <work>/segmenter/                       S_A (segmenter.safetensors, or an nnU-Net workspace)
    <work>/cyclegan/, harmonizer/           the trained models (with checkpoints)
    <work>/bprime/{harmonized,naive}/       <name>_aug<k>_image / _label .nii.gz and .json
    <work>/pix2pix/{harmonized,naive}/      the pix2pix models
    <work>/translated/<method>/             validation images translated to A (working grid)
    <work>/predictions_grid/<method>/       S_A's label maps on the working grid
    <work>/predictions/<method>/            <name>_Label.nii.gz on each validation scan's grid
    <work>/evaluation/                      table1.md, table1.json
    <work>/timings.json                     seconds per step

Methods (:data:`METHODS`): ``"baseline"`` CycleGAN :math:`B \\to A` then :math:`S_A`;
``"ours"`` pix2pix trained on harmonized :math:`B'` then :math:`S_A`; ``"naive"`` pix2pix
trained on the naive pastes then :math:`S_A`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
from scipy import ndimage

from singan_insert.errors import SinganInsertError
from singan_insert.insertion.placement import spacing_from_affine

__all__ = [
    "METHODS",
    "METHOD_TITLES",
    "CrossModaData",
    "CrossModaPipeline",
    "PipelineSettings",
    "SourceCase",
    "WorkingGrid",
    "resample_image",
    "resample_labels",
    "read_volume",
    "simulate_crossmoda",
    "write_volume",
]

Method = Literal["baseline", "ours", "naive"]
METHODS: tuple[str, ...] = ("baseline", "ours", "naive")
METHOD_TITLES: dict[str, str] = {
    "baseline": "Baseline: CycleGAN(B->A) + S_A",
    "ours": "Ours: pix2pix(B'->A) + S_A",
    "naive": "Ablation: naive paste, no harmonization",
}
#: The variant of B' each pix2pix method is trained on.
_VARIANT = {"ours": "harmonized", "naive": "naive"}
FAKE_TARGET_SUFFIX = "fakehrT2"
TUMOR_LABEL = 1
NUM_CLASSES = 3  # crossMoDA: background, vestibular schwannoma, cochlea
NNUNET_DATASET_ID = 501
NNUNET_DATASET_NAME = "SourceVS"
_SLICE_AXIS = 2
_NIFTI = ".nii.gz"


# --------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------
def _voxel_map(affine: np.ndarray, target_affine: np.ndarray) -> np.ndarray:
    """The 4x4 map from target voxel indices to source voxel indices."""
    return np.linalg.inv(np.asarray(affine, float)) @ np.asarray(target_affine, float)


def resample_image(
    data: np.ndarray,
    affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: Sequence[int],
    *,
    order: int = 1,
    cval: float | None = None,
) -> np.ndarray:
    """Resample an image onto another grid (same world space), with anti-aliasing.

    Args:
        data: the 3D image.
        affine: its voxel-to-world affine (mm).
        target_affine, target_shape: the grid to resample onto.
        order: spline order (0 nearest, 1 linear).
        cval: value outside the image; default its minimum (the background of an MR scan).

    Returns:
        ``float32`` array of ``target_shape``.
    """
    data = np.asarray(data, np.float32)
    matrix = _voxel_map(affine, target_affine)
    if order > 0:
        # Source voxels travelled per target voxel, per source axis: blur when it exceeds 1.
        step = np.abs(matrix[:3, :3]).max(axis=1)
        sigma = np.maximum(0.0, (step - 1.0) / 2.0)
        if np.any(sigma > 0.05):
            data = ndimage.gaussian_filter(data, sigma, mode="nearest")
    fill = float(data.min()) if cval is None else float(cval)
    return ndimage.affine_transform(
        data, matrix[:3, :3], matrix[:3, 3], output_shape=tuple(int(n) for n in target_shape),
        order=order, mode="constant", cval=fill,
    ).astype(np.float32)


def resample_labels(
    label: np.ndarray,
    affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: Sequence[int],
) -> np.ndarray:
    """Resample a label map: linear interpolation of each value's one-hot map, then argmax.

    Outside the source grid is background (0). Returns ``uint8`` (values must fit).
    """
    label = np.asarray(label)
    values = np.unique(label)
    if values.min() < 0 or values.max() > 255 or np.any(values != np.round(values)):
        raise SinganInsertError(f"A label map must hold integers in [0, 255], found {values[:10]}.")
    values = np.union1d(values.astype(np.int64), [0])
    matrix = _voxel_map(affine, target_affine)
    shape = tuple(int(n) for n in target_shape)
    best = np.full(shape, -1.0, np.float32)
    out = np.zeros(shape, np.uint8)
    for value in values:
        indicator = ndimage.affine_transform(
            (label == value).astype(np.float32), matrix[:3, :3], matrix[:3, 3], output_shape=shape,
            order=1, mode="constant", cval=1.0 if value == 0 else 0.0,
        )
        better = indicator > best
        best[better] = indicator[better]
        out[better] = value
    return out


@dataclass(frozen=True)
class WorkingGrid:
    """The common voxel grid the stages run on (see the module docstring).

    Args:
        spacing: voxel size in mm along the volume's axes 0, 1, 2 (> 0).
        shape: voxels along each axis, or ``None`` to cover the volume's own extent along it.
            Fixed in-plane sizes (axes 0 and 1) make every slice the same size; they must suit
            the slice GANs (CycleGAN: multiples of 4; pix2pix: of :math:`2^{num\\_downs}`).
    """

    spacing: tuple[float, float, float] = (0.8, 0.8, 1.0)
    shape: tuple[int | None, int | None, int | None] = (64, 64, None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "shape", tuple(None if n is None else int(n) for n in self.shape))
        if len(self.spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in self.spacing):
            raise SinganInsertError(f"The working grid's spacing must be 3 positive mm values, got {self.spacing}.")
        if len(self.shape) != 3 or any(n is not None and n < 8 for n in self.shape):
            raise SinganInsertError(f"The working grid's shape must be 3 sizes >= 8 (or None), got {self.shape}.")

    def grid_for(self, shape: Sequence[int], affine: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
        """``(shape, affine)`` of the working grid of a volume: same axes and centre."""
        affine = np.asarray(affine, float)
        native = np.asarray(spacing_from_affine(affine))
        extent = np.asarray(shape, float) * native
        grid_shape = tuple(
            int(n) if n is not None else max(1, int(round(extent[a] / self.spacing[a])))
            for a, n in enumerate(self.shape)
        )
        directions = affine[:3, :3] / native
        linear = directions * np.asarray(self.spacing)
        centre = affine[:3, :3] @ ((np.asarray(shape, float) - 1) / 2) + affine[:3, 3]
        grid_affine = np.eye(4)
        grid_affine[:3, :3] = linear
        grid_affine[:3, 3] = centre - linear @ ((np.asarray(grid_shape, float) - 1) / 2)
        return grid_shape, grid_affine

    def to_dict(self) -> dict[str, Any]:
        return {"spacing": list(self.spacing), "shape": list(self.shape)}


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PipelineSettings:
    """Every knob of the pipeline; build one with :meth:`profile` and ``dataclasses.replace``.

    Args:
        grid: the :class:`WorkingGrid`.
        segmenter: ``"small"`` (:class:`~singan_insert.stages.segmenter.Segmenter`) or
            ``"nnunet"`` (:class:`~singan_insert.stages.nnunet.NnUNetWorkspace`, needs the
            ``[nnunet]`` extra).
        segmenter_preset: :meth:`SegmenterConfig.preset` name for ``"small"``.
        segmenter_iterations: override the preset's steps (None: keep).
        nnunet_trainer, nnunet_configuration: for ``"nnunet"`` (trained on fold ``"all"``).
        cyclegan_preset, pix2pix_preset: the stages' presets; ``image_size`` is set to None
            (the working grid already fixes the slice size).
        cyclegan_iterations, pix2pix_iterations: total iterations :math:`T` (half constant,
            half decay), or None for the preset's.
        harmonizer_preset: ``"fast"``, ``"reference"`` or ``"tiny"``.
        harmonizer_iterations: iterations per scale (None: the preset's).
        contrast: contrast factors :math:`\\lambda` the insertion draws from (> 0).
        augmentations: B' volumes per A case (>= 1).
        seed: seeds every stage.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    grid: WorkingGrid = field(default_factory=WorkingGrid)
    segmenter: Literal["small", "nnunet"] = "small"
    segmenter_preset: str = "cpu3d"
    segmenter_iterations: int | None = None
    nnunet_trainer: str = "nnUNetTrainer_SinganInsertShort"
    nnunet_configuration: str = "3d_fullres"
    cyclegan_preset: str = "cpu"
    cyclegan_iterations: int | None = None
    pix2pix_preset: str = "cpu"
    pix2pix_iterations: int | None = None
    harmonizer_preset: str = "fast"
    harmonizer_iterations: int | None = None
    contrast: tuple[float, ...] = (0.5,)
    augmentations: int = 1
    seed: int = 0
    device: str = "cpu"

    PROFILES = ("cpu", "tiny", "gpu")

    def __post_init__(self) -> None:
        if isinstance(self.grid, dict):
            object.__setattr__(self, "grid", WorkingGrid(**self.grid))
        object.__setattr__(self, "contrast", tuple(float(c) for c in self.contrast))
        if self.segmenter not in ("small", "nnunet"):
            raise SinganInsertError(f"segmenter must be 'small' or 'nnunet', got {self.segmenter!r}.")
        if not self.contrast or any(not (np.isfinite(c) and c > 0) for c in self.contrast):
            raise SinganInsertError(f"contrast factors must be positive numbers, got {self.contrast}.")
        if self.augmentations < 1:
            raise SinganInsertError(f"augmentations must be >= 1, got {self.augmentations}.")
        for name in ("segmenter_iterations", "cyclegan_iterations", "pix2pix_iterations",
                     "harmonizer_iterations"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SinganInsertError(f"{name} must be a positive integer or None, got {value!r}.")

    @classmethod
    def profile(cls, name: str, **overrides: Any) -> "PipelineSettings":
        """A named set of settings, with any field overridden by keyword.

        * ``"cpu"``: 64x64 px slices of 0.8 mm (1 mm apart), the CycleGAN and pix2pix ``cpu``
          presets run for 16000 iterations each, the harmonizer's ``fast`` preset, the small 3D
          segmenter (``cpu3d``); about 35 min on 2 CPU cores for ~70 small volumes. The
          presets' own 4000 iterations (about 4 epochs of ~1000 slices) are too few here:
          measured on the benchmark's data, pix2pix then does not even reproduce its training
          pairs (S_A finds the tumor in pix2pix(B') of training volumes with Dice 0.03; 0.81
          after 16000 iterations).
        * ``"tiny"``: 32x32 px slices of 0.8 mm (2 mm apart) and every ``tiny`` preset: a
          smoke run in about a minute (tests).
        * ``"gpu"``: 256x256 px slices of 0.8 mm (1.5 mm apart), the reference CycleGAN and
          pix2pix, nnU-Net's default trainer (``3d_fullres``) and the ``fast`` harmonizer, on
          CUDA: the paper's setting for real crossMoDA data.
        """
        profiles: dict[str, dict[str, Any]] = {
            "cpu": dict(cyclegan_iterations=16000, pix2pix_iterations=16000),
            "tiny": dict(
                grid=WorkingGrid((0.8, 0.8, 2.0), (32, 32, None)), segmenter_preset="tiny",
                cyclegan_preset="tiny", cyclegan_iterations=8, pix2pix_preset="tiny",
                pix2pix_iterations=8, harmonizer_preset="tiny", harmonizer_iterations=10,
            ),
            "gpu": dict(
                grid=WorkingGrid((0.8, 0.8, 1.5), (256, 256, None)), segmenter="nnunet",
                nnunet_trainer="nnUNetTrainer", cyclegan_preset="reference",
                pix2pix_preset="reference", device="cuda",
            ),
        }
        if name not in profiles:
            raise SinganInsertError(f"Unknown profile {name!r}; choose one of {sorted(profiles)}.")
        return cls(**{**profiles[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["grid"] = self.grid.to_dict()
        data["contrast"] = list(self.contrast)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PipelineSettings":
        data = dict(data)
        grid = data.pop("grid", None)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SinganInsertError(f"Unknown pipeline settings {sorted(unknown)}.")
        if grid is not None:
            data["grid"] = WorkingGrid(tuple(grid["spacing"]), tuple(grid["shape"]))
        return cls(**data)

    # -- stage configurations --------------------------------------------------------------
    def cyclegan_config(self, progress: bool = False):
        from singan_insert.stages.cyclegan import CycleGANConfig

        return CycleGANConfig.preset(self.cyclegan_preset, image_size=None, seed=self.seed,
                                     device=self.device, progress=progress,
                                     **_schedule(self.cyclegan_iterations))

    def pix2pix_config(self, progress: bool = False):
        from singan_insert.stages.pix2pix import Pix2PixConfig

        return Pix2PixConfig.preset(self.pix2pix_preset, image_size=None, seed=self.seed,
                                    device=self.device, progress=progress,
                                    **_schedule(self.pix2pix_iterations))

    def segmenter_config(self):
        from singan_insert.stages.segmenter import SegmenterConfig

        extra = {} if self.segmenter_iterations is None else {"iterations": self.segmenter_iterations}
        return SegmenterConfig.preset(self.segmenter_preset, num_classes=NUM_CLASSES, **extra)

    def harmonizer_config(self):
        from singan_insert.harmonizer.training import TrainingConfig

        config = TrainingConfig.preset(self.harmonizer_preset)
        return config if self.harmonizer_iterations is None else replace(config, iterations=self.harmonizer_iterations)


def _schedule(total: int | None) -> dict[str, int]:
    if total is None:
        return {}
    # Keep checkpoints within the run: at most every 500 iterations, at least once at the end.
    return {"iterations": total // 2, "decay_iterations": total - total // 2,
            "checkpoint_every": max(1, min(500, total))}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceCase:
    """A labelled modality-A case: ``<name>_ceT1.nii.gz`` and ``<name>_Label.nii.gz``."""

    name: str
    image: Path
    label: Path


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _named(folder: Path, suffix: str) -> list[tuple[str, Path]]:
    """``(name, path)`` of every ``<name>_<suffix>.nii[.gz]`` in ``folder``, naturally sorted."""
    found = [p for p in folder.glob(f"*_{suffix}.nii*") if p.name.endswith((".nii", ".nii.gz"))]
    return [(p.name.split(f"_{suffix}.nii")[0], p) for p in sorted(found, key=_natural_key)]


@dataclass(frozen=True)
class CrossModaData:
    """A dataset in the crossMoDA layout (file names as in the challenge's release)::

        <root>/source_training/crossmoda2021_ldn_<N>_ceT1.nii.gz, ..._Label.nii.gz
        <root>/target_training/crossmoda2021_ldn_<N>_hrT2.nii.gz        (unlabelled)
        <root>/target_validation/crossmoda2021_ldn_<N>_hrT2.nii.gz
        <root>/target_validation_labels/crossmoda2021_ldn_<N>_Label.nii.gz   (for scoring)
        <root>/target_training_labels/<name>_Label.nii.gz   (optional: a rough label of the
                                                              harmonizer's training scan)

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
        for name, image in _named(folder, "ceT1"):
            extension = image.name[len(name) + len("_ceT1"):]
            label = folder / f"{name}_Label{extension}"
            if not label.is_file():
                raise SinganInsertError(f"{image} has no label {label.name}; modality A must be labelled.")
            cases.append(SourceCase(name, image, label))
        if not cases:
            raise SinganInsertError(f"No <name>_ceT1.nii.gz file in {folder}.")
        return cases

    def target_images(self) -> list[tuple[str, Path]]:
        """``(name, path)`` of the unlabelled hrT2 training scans."""
        items = _named(self._folder(self.target_dir, "unlabelled hrT2 training scans"), "hrT2")
        if not items:
            raise SinganInsertError(f"No <name>_hrT2.nii.gz file in {self.root / self.target_dir}.")
        return items

    def validation_images(self) -> list[tuple[str, Path]]:
        """``(name, path)`` of the hrT2 scans to segment."""
        items = _named(self._folder(self.validation_dir, "hrT2 validation scans"), "hrT2")
        if not items:
            raise SinganInsertError(f"No <name>_hrT2.nii.gz file in {self.root / self.validation_dir}.")
        return items

    def truth(self, name: str) -> Path | None:
        """The validation label of ``name``, when the data set has it."""
        return _first_existing(self.root / self.truth_dir, f"{name}_Label")

    def target_label(self, name: str) -> Path | None:
        """A (rough) label of hrT2 training scan ``name``, when one was provided."""
        return _first_existing(self.root / self.target_label_dir, f"{name}_Label")


def _first_existing(folder: Path, stem: str) -> Path | None:
    for extension in (".nii.gz", ".nii"):
        if (folder / f"{stem}{extension}").is_file():
            return folder / f"{stem}{extension}"
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


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------
def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` of a 3D NIfTI volume (data as stored; trailing singleton axes dropped)."""
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SinganInsertError(f"{path} has shape {data.shape}; a 3D volume is expected.")
    return data, np.asarray(image.affine, float)


def write_volume(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI volume atomically (see :func:`singan_insert.io.write_nifti`)."""
    from singan_insert.io import write_nifti

    return write_nifti(path, data, affine)


class CrossModaPipeline:
    """The workflow of the module docstring on one data set and one work folder.

    Args:
        data: the :class:`CrossModaData`.
        work_dir: the work folder (created). Its ``pipeline.json`` remembers the data root and
            settings of the first call; later calls must agree (or pass ``settings=None``).
        settings: :class:`PipelineSettings`; None reuses the work folder's, else ``"cpu"``.
        progress: show progress bars while training.
    """

    def __init__(self, data: CrossModaData, work_dir: str | os.PathLike,
                 settings: PipelineSettings | None = None, *, progress: bool = False):
        self.data = data
        self.work = Path(work_dir)
        self.progress = progress
        self.work.mkdir(parents=True, exist_ok=True)
        record_path = self.work / "pipeline.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        if record is not None:
            stored = PipelineSettings.from_dict(record["settings"])
            if settings is not None and settings != stored:
                changed = sorted(k for k, v in settings.to_dict().items() if stored.to_dict()[k] != v)
                raise SinganInsertError(
                    f"{self.work} was started with other settings (differences: {changed}). Use "
                    "the same settings (omit --profile and overrides to reuse them) or another --work.")
            if Path(record["data_root"]).resolve() != data.root.resolve():
                raise SinganInsertError(
                    f"{self.work} belongs to the data set {record['data_root']}, not {data.root}; "
                    "use another --work folder.")
            settings = stored
        settings = settings or PipelineSettings.profile("cpu")
        if record is None:
            record_path.write_text(json.dumps(
                {"data_root": str(data.root.resolve()), "settings": settings.to_dict()}, indent=2))
        self.settings = settings

    # -- folders --------------------------------------------------------------------------
    @property
    def grid_dir(self) -> Path:
        return self.work / "grid"

    def grid_source(self, name: str, kind: str = "ceT1") -> Path:
        """``grid/source/<name>_<kind>.nii.gz`` (kind: ``ceT1``, ``Label``, ``fakehrT2``)."""
        return self.grid_dir / "source" / f"{name}_{kind}{_NIFTI}"

    def grid_target(self, name: str) -> Path:
        return self.grid_dir / "target" / f"{name}_hrT2{_NIFTI}"

    def grid_validation(self, name: str) -> Path:
        return self.grid_dir / "validation" / f"{name}_hrT2{_NIFTI}"

    def bprime_dir(self, variant: str) -> Path:
        return self.work / "bprime" / variant

    def translated(self, method: str, name: str) -> Path:
        return self.work / "translated" / method / f"{name}_ceT1{_NIFTI}"

    def prediction(self, method: str, name: str) -> Path:
        """The prediction of ``method`` for validation scan ``name``, on that scan's grid."""
        return self.work / "predictions" / method / f"{name}_Label{_NIFTI}"

    @contextlib.contextmanager
    def _timed(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        path = self.work / "timings.json"
        timings = json.loads(path.read_text()) if path.is_file() else {}
        timings[step] = round(timings.get(step, 0.0) + time.perf_counter() - started, 2)
        path.write_text(json.dumps(timings, indent=2))

    # -- 0. the working grid --------------------------------------------------------------
    def prepare(self) -> None:
        """Resample every input volume onto its working grid (skips those already done)."""
        grid = self.settings.grid
        jobs: list[tuple[Path, Path, bool]] = []
        for case in self.data.source_cases():
            jobs += [(case.image, self.grid_source(case.name), False),
                     (case.label, self.grid_source(case.name, "Label"), True)]
        jobs += [(path, self.grid_target(name), False) for name, path in self.data.target_images()]
        jobs += [(path, self.grid_validation(name), False) for name, path in self.data.validation_images()]
        todo = [job for job in jobs if not job[1].is_file()]
        if not todo:
            return
        with self._timed("prepare"):
            for source, destination, is_label in todo:
                data, affine = read_volume(source)
                shape, grid_affine = grid.grid_for(data.shape, affine)
                if is_label:
                    resampled = resample_labels(data, affine, grid_affine, shape)
                else:
                    resampled = resample_image(data, affine, grid_affine, shape)
                write_volume(destination, resampled, grid_affine)

    def to_native(self, label: np.ndarray, grid_affine: np.ndarray, reference: Path) -> np.ndarray:
        """A label map on a working grid, resampled onto the grid of the volume ``reference``."""
        data, affine = read_volume(reference)
        return resample_labels(label, grid_affine, affine, data.shape)

    # -- 1. S_A ---------------------------------------------------------------------------
    @property
    def segmenter_path(self) -> Path:
        return self.work / "segmenter" / "segmenter.safetensors"

    def _nnunet_workspace(self):
        from singan_insert.stages.nnunet import NnUNetWorkspace

        return NnUNetWorkspace(self.work / "segmenter" / "nnunet")

    def _nnunet_fold(self) -> Path:
        """nnU-Net's fold folder of S_A (fold ``all``), where ``checkpoint_final.pth`` lands."""
        settings = self.settings
        trainer = settings.nnunet_trainer.rsplit(".", 1)[-1]  # a dotted path names the class last
        return (self._nnunet_workspace().results / f"Dataset{NNUNET_DATASET_ID:03d}_{NNUNET_DATASET_NAME}"
                / f"{trainer}__nnUNetPlans__{settings.nnunet_configuration}" / "fold_all")

    def _nnunet_done(self) -> bool:
        return self.settings.segmenter == "nnunet" and (self._nnunet_fold() / "checkpoint_final.pth").is_file()

    def train_source_segmenter(self) -> Path:
        """Step 1: train :math:`S_A` on the ceT1 scans and labels (working grid).

        Returns the model file (``"small"``) or nnU-Net's fold folder (``"nnunet"``).
        """
        settings = self.settings
        if settings.segmenter == "nnunet":
            from singan_insert.stages.nnunet import require_nnunet

            require_nnunet("Training S_A with nnU-Net (--segmenter nnunet)")
        self.prepare()
        cases = self.data.source_cases()
        if settings.segmenter == "nnunet":
            from singan_insert.stages.nnunet import NnUNetCase

            if self._nnunet_done():
                return self._nnunet_fold()
            workspace = self._nnunet_workspace()
            with self._timed("1_segmenter"):
                dataset = workspace.export_dataset(
                    NNUNET_DATASET_ID, NNUNET_DATASET_NAME,
                    [NnUNetCase(c.name, (self.grid_source(c.name),), self.grid_source(c.name, "Label"))
                     for c in cases],
                    channel_names=("ceT1",), overwrite=True)
                workspace.plan_and_preprocess(dataset, (settings.nnunet_configuration,))
                return workspace.train(dataset, settings.nnunet_configuration, "all",
                                       trainer=settings.nnunet_trainer,
                                       device="cuda" if settings.device.startswith("cuda") else "cpu")
        if self.segmenter_path.is_file():
            return self.segmenter_path
        from singan_insert.stages.segmenter import Segmenter

        with self._timed("1_segmenter"):
            images = [read_volume(self.grid_source(c.name))[0] for c in cases]
            labels = [read_volume(self.grid_source(c.name, "Label"))[0] for c in cases]
            segmenter = Segmenter(settings.segmenter_config(), seed=settings.seed,
                                  device=_torch_device(settings.device))
            segmenter.fit(images, labels, progress=self.progress)
            segmenter.save(self.segmenter_path)
        return self.segmenter_path

    def segment(self, grid_images: Sequence[Path], out_dir: Path) -> list[Path]:
        """Segment working-grid volumes with :math:`S_A`; writes ``<out_dir>/<stem>.nii.gz``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        stems = [p.name.split(".nii")[0] for p in grid_images]
        outputs = [out_dir / f"{stem}{_NIFTI}" for stem in stems]
        if self.settings.segmenter == "nnunet":
            from singan_insert.stages.nnunet import NnUNetCase

            if not self._nnunet_done():
                raise SinganInsertError("S_A is not trained yet: run step 1 (01_train_source_segmenter.py).")
            cases = [NnUNetCase(re.sub(r"[^A-Za-z0-9_\-]", "_", stem), (path,))
                     for stem, path in zip(stems, grid_images)]
            written = self._nnunet_workspace().predict(
                NNUNET_DATASET_ID, cases, out_dir, self.settings.nnunet_configuration, ("all",),
                trainer=self.settings.nnunet_trainer,
                device="cuda" if self.settings.device.startswith("cuda") else "cpu")
            for source, destination in zip(written, outputs):
                if source != destination:
                    source.replace(destination)
            return outputs
        if not self.segmenter_path.is_file():
            raise SinganInsertError("S_A is not trained yet: run step 1 (01_train_source_segmenter.py).")
        from singan_insert.stages.segmenter import Segmenter

        segmenter = Segmenter.load(self.segmenter_path, device=_torch_device(self.settings.device))
        for path, output in zip(grid_images, outputs):
            data, affine = read_volume(path)
            write_volume(output, segmenter.predict(data.astype(np.float32)), affine)
        return outputs

    # -- 2. CycleGAN ----------------------------------------------------------------------
    @property
    def cyclegan_path(self) -> Path:
        from singan_insert.stages.cyclegan import MODEL_NAME

        return self.work / "cyclegan" / MODEL_NAME

    def train_cyclegan(self):
        """Step 2a: CycleGAN between the ceT1 and the hrT2 training scans (unpaired)."""
        from singan_insert.stages.cyclegan import CycleGAN, train_cyclegan

        self.prepare()
        if self.cyclegan_path.is_file():
            return CycleGAN.load(self.cyclegan_path)
        with self._timed("2_cyclegan_train"):
            domain_a = [self.grid_source(c.name) for c in self.data.source_cases()]
            domain_b = [self.grid_target(name) for name, _ in self.data.target_images()]
            return train_cyclegan(domain_a, domain_b, self.cyclegan_path.parent,
                                  self.settings.cyclegan_config(self.progress))

    def translate_sources(self) -> list[Path]:
        """Step 2b: each ceT1 scan translated to hrT2 (``grid/source/<name>_fakehrT2``)."""
        from singan_insert.stages.cyclegan import CycleGAN

        model = None
        outputs = []
        with self._timed("2_cyclegan_translate"):
            for case in self.data.source_cases():
                output = self.grid_source(case.name, FAKE_TARGET_SUFFIX)
                if not output.is_file():
                    if model is None:
                        model = self._require(self.cyclegan_path, "CycleGAN", "02_cyclegan.py", CycleGAN)
                    image = model.translate(self.grid_source(case.name), "a_to_b")
                    write_volume(output, np.asarray(image.dataobj, np.float32), image.affine)
                outputs.append(output)
        return outputs

    # -- 3. harmonizer --------------------------------------------------------------------
    @property
    def harmonizer_dir(self) -> Path:
        return self.work / "harmonizer"

    def train_harmonizer(self, case: str | None = None, slice_index: int | str = "auto",
                         label: str | os.PathLike | None = None):
        """Step 3: train the harmonizer on ONE hrT2 training slice (working grid).

        Args:
            case: the hrT2 training scan; default the first one with a label in
                ``target_training_labels/``, else the first one.
            slice_index: ``"auto"`` (largest label area; the middle slice without a label) or
                an axial slice index of the scan's OWN grid (as seen in a viewer).
            label: a (rough) tumor label on the scan's own grid; default the one in
                ``target_training_labels/``, if any.
        """
        from singan_insert.harmonizer.model import Harmonizer
        from singan_insert.harmonizer.training import MODEL_NAME, train_harmonizer
        from singan_insert.harmonizer.training_slice import load_training_slice

        self.prepare()
        model_file = self.harmonizer_dir / MODEL_NAME
        if model_file.is_file():
            return Harmonizer.load(model_file)
        targets = dict(self.data.target_images())
        if case is None:
            labelled = [name for name in targets if self.data.target_label(name) is not None]
            case = (labelled or list(targets))[0]
        if case not in targets:
            raise SinganInsertError(f"No hrT2 training scan named {case!r}; choose one of {sorted(targets)[:5]}...")
        label = Path(label) if label is not None else self.data.target_label(case)
        grid_path = self.grid_target(case)
        grid_data, grid_affine = read_volume(grid_path)
        grid_label = None
        if slice_index == "auto" and label is not None:
            native_label, native_affine = read_volume(label)
            tumor = (native_label == TUMOR_LABEL) if np.any(native_label == TUMOR_LABEL) else native_label > 0
            grid_label = write_volume(self.harmonizer_dir / "slice_label.nii.gz",
                               resample_labels(tumor.astype(np.uint8), native_affine, grid_affine,
                                               grid_data.shape), grid_affine)
        elif slice_index != "auto":
            slice_index = self._grid_slice(targets[case], int(slice_index), grid_affine, grid_data.shape)
        training = load_training_slice(grid_path, axis=_SLICE_AXIS, index=slice_index,
                                       label_path=grid_label, modality="hrT2")
        with self._timed("3_harmonizer"):
            return train_harmonizer(
                training.image, self.settings.harmonizer_config(), out_dir=self.harmonizer_dir,
                seed=self.settings.seed, spacing=training.spacing, device=_torch_device(self.settings.device),
                provenance={**training.provenance, "case": case}, progress=self.progress)

    def _grid_slice(self, native: Path, index: int, grid_affine: np.ndarray, grid_shape) -> int:
        data, affine = read_volume(native)
        if not 0 <= index < data.shape[_SLICE_AXIS]:
            raise SinganInsertError(f"Slice {index} is outside {native} (0..{data.shape[_SLICE_AXIS] - 1}).")
        centre = (np.asarray(data.shape, float) - 1) / 2
        centre[_SLICE_AXIS] = index
        world = affine[:3, :3] @ centre + affine[:3, 3]
        grid_index = np.linalg.inv(grid_affine)[:3] @ np.append(world, 1.0)
        return int(np.clip(round(grid_index[_SLICE_AXIS]), 0, grid_shape[_SLICE_AXIS] - 1))

    # -- 4. insertion ---------------------------------------------------------------------
    def insert_tumors(self) -> dict[str, list[Path]]:
        """Step 4: every A tumor into its own fake hrT2, harmonized (B') and naively pasted.

        The harmonized volumes come from :func:`singan_insert.batch.augment_case` (exactly what
        ``singan-insert insert --data-root <work>/grid/source --target-suffix fakehrT2`` writes);
        each naive paste replays the recorded parameters of its harmonized twin with
        ``return_composite=True``, so the two differ by the harmonization alone. A tumor that
        cannot be placed (e.g. cut by the working grid's border) is skipped with a message.

        Returns:
            ``{"harmonized": [...], "naive": [...]}``: the written image paths.
        """
        from singan_insert.batch import InsertSettings, augment_case, find_crossmoda_cases, output_paths
        from singan_insert.io import atomic_write_bytes
        from singan_insert.insertion.placement import SourceTumor
        from singan_insert.insertion.model_cache import load_harmonizer
        from singan_insert.insertion.insert import InsertionParameters, insert_tumor

        self.translate_sources()
        model = self.harmonizer_dir
        if not (model / "harmonizer.safetensors").is_file():
            raise SinganInsertError("The harmonizer is not trained yet: run step 3 (03_train_harmonizer.py).")
        settings = InsertSettings(num=self.settings.augmentations, contrast=set(self.settings.contrast),
                                  axis=_SLICE_AXIS, seed=self.settings.seed, source_label_value=TUMOR_LABEL,
                                  label_value=TUMOR_LABEL)
        harmonized_dir, naive_dir = self.bprime_dir("harmonized"), self.bprime_dir("naive")
        harmonized_dir.mkdir(parents=True, exist_ok=True)
        written: dict[str, list[Path]] = {"harmonized": [], "naive": []}
        with self._timed("4_insert"):
            for case in find_crossmoda_cases(self.grid_dir / "source", FAKE_TARGET_SUFFIX):
                for k in range(settings.num):
                    paths = output_paths(harmonized_dir, case, k)
                    naive = output_paths(naive_dir, case, k)
                    try:
                        if not paths["record"].is_file():
                            augment_case(case, k, str(model), settings, harmonized_dir)
                        if not naive["record"].is_file():
                            record = json.loads(paths["record"].read_text())
                            target, affine = read_volume(case.target)
                            source = SourceTumor.from_files(case.source_image, case.source_label,
                                                            label_value=TUMOR_LABEL)
                            result = insert_tumor(target.astype(np.float32), affine, source,
                                                  load_harmonizer(model),
                                                  InsertionParameters.from_dict(record["parameters"]),
                                                  return_composite=True)
                            write_volume(naive["image"], result.composite.astype(np.float32), affine)
                            write_volume(naive["label"], result.label, affine)
                            atomic_write_bytes(naive["record"], json.dumps(
                                {**record, "naive_paste": True}, indent=2, default=str).encode())
                    except SinganInsertError as error:
                        print(f"  skipped {case.name} aug {k}: {error}")
                        continue
                    written["harmonized"].append(paths["image"])
                    written["naive"].append(naive["image"])
        if not written["harmonized"]:
            raise SinganInsertError("No tumor could be inserted; see the messages above.")
        return written

    # -- 5. pix2pix -----------------------------------------------------------------------
    def pix2pix_path(self, variant: str) -> Path:
        from singan_insert.stages.pix2pix import MODEL_NAME

        return self.work / "pix2pix" / variant / MODEL_NAME

    def train_pix2pix(self, variant: Literal["harmonized", "naive"] = "harmonized"):
        """Step 5: pix2pix :math:`B' \\to A` on the (B', ceT1) pairs of ``variant``."""
        from singan_insert.stages.pix2pix import Pix2Pix, train_pix2pix

        if variant not in ("harmonized", "naive"):
            raise SinganInsertError(f"variant must be 'harmonized' or 'naive', got {variant!r}.")
        path = self.pix2pix_path(variant)
        if path.is_file():
            return Pix2Pix.load(path)
        records = sorted(self.bprime_dir(variant).glob("*_aug*.json"), key=_natural_key)
        if not records:
            raise SinganInsertError(f"No B' volumes in {self.bprime_dir(variant)}: run step 4 (04_insert_tumors.py).")
        pairs = []
        for record in records:
            case = json.loads(record.read_text())["case"]
            pairs.append((record.with_name(record.name[:-len(".json")] + f"_image{_NIFTI}"),
                          Path(case["source_image"])))
        with self._timed(f"5_pix2pix_{variant}"):
            return train_pix2pix(pairs, path.parent, self.settings.pix2pix_config(self.progress))

    # -- 6. translate + segment the validation scans --------------------------------------
    def translate_validation(self, method: Method) -> list[Path]:
        """Translate every validation hrT2 to ceT1 with ``method``'s generator (working grid)."""
        from singan_insert.stages.cyclegan import CycleGAN
        from singan_insert.stages.pix2pix import Pix2Pix

        _check_method(method)
        self.prepare()
        model = None
        outputs = []
        for name, _ in self.data.validation_images():
            output = self.translated(method, name)
            if not output.is_file():
                if model is None:
                    if method == "baseline":
                        cyclegan = self._require(self.cyclegan_path, "CycleGAN", "02_cyclegan.py", CycleGAN)
                        model = lambda path, m=cyclegan: m.translate(path, "b_to_a")  # noqa: E731
                    else:
                        pix2pix = self._require(self.pix2pix_path(_VARIANT[method]), "pix2pix", "05_pix2pix.py",
                                                Pix2Pix)
                        model = pix2pix.translate
                image = model(self.grid_validation(name))
                write_volume(output, np.asarray(image.dataobj, np.float32), image.affine)
            outputs.append(output)
        return outputs

    def segment_validation(self, method: Method) -> list[Path]:
        """Step 6: translate (``method``), segment with :math:`S_A`, resample to each scan's grid."""
        _check_method(method)
        validation = self.data.validation_images()
        outputs = [self.prediction(method, name) for name, _ in validation]
        if all(p.is_file() for p in outputs):
            return outputs
        with self._timed(f"6_segment_{method}"):
            translated = self.translate_validation(method)
            grid_predictions = self.segment(translated, self.work / "predictions_grid" / method)
            for (name, native), grid_prediction, output in zip(validation, grid_predictions, outputs):
                label, grid_affine = read_volume(grid_prediction)
                _, native_affine = read_volume(native)
                write_volume(output, self.to_native(label, grid_affine, native), native_affine)
        return outputs

    # -- 7. evaluation --------------------------------------------------------------------
    def evaluate(self, methods: Sequence[str] = METHODS, *, extra: dict[str, dict[str, list[float]]] | None = None,
                 write: bool = True) -> dict[str, Any]:
        """Step 7: Dice and ASSD of the tumor (label 1) per validation scan; the Table 1 report.

        Args:
            methods: methods whose predictions exist (step 6).
            extra: more rows for the table, ``{title: {"dice": [...], "assd": [...]}}``.
            write: also write ``<work>/evaluation/table1.{md,json}``.

        Returns:
            ``{"table": table1_report(...), "per_case": {method: [{case, dice, assd}...]}}``.
        """
        from singan_insert.evaluation.metrics import segmentation_scores, table1_report

        validation = self.data.validation_images()
        truths = {name: self.data.truth(name) for name, _ in validation}
        missing = [name for name, path in truths.items() if path is None]
        if missing:
            raise SinganInsertError(
                f"No validation label for {missing[:3]} in {self.data.root / self.data.truth_dir}: "
                "scoring needs <name>_Label.nii.gz for every validation scan.")
        results: dict[str, dict[str, list[float]]] = {}
        per_case: dict[str, list[dict[str, Any]]] = {}
        for method in methods:
            _check_method(method)
            rows = []
            for name, _ in validation:
                prediction_path = self.prediction(method, name)
                if not prediction_path.is_file():
                    raise SinganInsertError(f"{prediction_path} is missing: run step 6 for {method!r}.")
                prediction, _ = read_volume(prediction_path)
                truth, truth_affine = read_volume(truths[name])
                scores = segmentation_scores(prediction, truth, spacing_from_affine(truth_affine),
                                             label=TUMOR_LABEL)
                rows.append({"case": name, "dice": scores["dice"], "assd": scores["assd"]})
            per_case[method] = rows
            results[METHOD_TITLES[method]] = {"dice": [r["dice"] for r in rows],
                                              "assd": [r["assd"] for r in rows]}
        results.update(extra or {})
        table = table1_report(results, metrics=["dice", "assd"], file=None)
        report = {"table": table, "per_case": per_case, "settings": self.settings.to_dict()}
        if write:
            folder = self.work / "evaluation"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "table1.md").write_text(table["markdown"] + "\n")
            (folder / "table1.json").write_text(json.dumps(report, indent=2))
        return report

    def segmentation_figure(self, path: str | os.PathLike, methods: Sequence[str] = METHODS,
                            cases: Sequence[str] | None = None) -> Path:
        """A Fig.-3-style grid: per validation case, hrT2 with the truth, then each method's
        translation with its prediction (red contours), through the slice of largest tumor area.

        Args:
            path: the PNG to write.
            methods: methods to show (their predictions must exist).
            cases: validation cases (rows); default the first four, in name order.
        """
        from singan_insert.evaluation.figures import figure_grid

        names = list(cases) if cases is not None else [n for n, _ in self.data.validation_images()][:4]
        rows, contours = [], []
        for name in names:
            hrt2, grid_affine = read_volume(self.grid_validation(name))
            truth_path = self.data.truth(name)
            truth = None
            if truth_path is not None:
                native, native_affine = read_volume(truth_path)
                truth = resample_labels(native == TUMOR_LABEL, native_affine, grid_affine, hrt2.shape) > 0
            predictions = [read_volume(self.work / "predictions_grid" / m / f"{name}_ceT1{_NIFTI}")[0] == TUMOR_LABEL
                           for m in methods]
            reference = truth if truth is not None and truth.any() else predictions[0]
            areas = reference.sum(axis=(0, 1))
            k = int(np.argmax(areas)) if areas.any() else hrt2.shape[_SLICE_AXIS] // 2
            images = [hrt2] + [read_volume(self.translated(m, name))[0] for m in methods]
            rows.append([_display(image[:, :, k]) for image in images])
            contours.append([None if truth is None else truth[:, :, k]] + [p[:, :, k] for p in predictions])
        titles = ["hrT2 + truth"] + [METHOD_TITLES[m].split(":")[0] + " (A + S_A)" for m in methods]
        return figure_grid(rows, path, titles, row_titles=names, contours=contours,
                           window=[(0.0, 1.0)] * len(rows))

    # -- helpers --------------------------------------------------------------------------
    @staticmethod
    def _require(path: Path, what: str, script: str, model_class):
        if not path.is_file():
            raise SinganInsertError(f"The {what} model {path} does not exist yet: run {script} first.")
        return model_class.load(path)


def _display(image: np.ndarray) -> np.ndarray:
    """A slice mapped to [0, 1] by its 1st and 99th percentiles (for side-by-side panels)."""
    low, high = np.percentile(image, (1, 99))
    return np.clip((image - low) / max(high - low, 1e-6), 0, 1)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise SinganInsertError(f"Unknown method {method!r}; choose one of {list(METHODS)}.")


def _torch_device(name: str) -> str:
    if name == "auto":
        from singan_insert.devices import select_device

        return str(select_device("auto"))
    return name
