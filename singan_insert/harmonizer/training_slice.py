"""Choosing the ONE 2D training slice: from an array, or from a NIfTI volume by axis and index.

With ``index="auto"`` and a label volume, the slice with the largest label area is taken, so
that the slice shows the tumor (every crossMoDA hrT2 scan contains one, unlabelled in the
target modality; a label from another source, e.g. a rough manual one, is enough).
An optional crop box ``(row_start, row_stop, col_start, col_stop)`` in slice pixels limits
training to a region (e.g. around the cerebellopontine angle).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from singan_insert.errors import SinganInsertError


@dataclass(frozen=True)
class TrainingSlice:
    """A 2D slice ready for :func:`~singan_insert.harmonizer.training.train_harmonizer`.

    Attributes:
        image: the slice, ``float32`` of shape ``(H, W)``.
        spacing: ``(row, col)`` pixel size in mm, or ``None`` when unknown.
        provenance: where it came from (file, axis, index, crop), stored in the model.
        label: the label volume's slice at the same place (same crop), when a label was given:
            :meth:`tumor_annotation` makes the one-slice annotation of it.
    """

    image: np.ndarray
    spacing: tuple[float, float] | None
    provenance: dict[str, Any]
    label: np.ndarray | None = None

    def tumor_annotation(self, tumor_label: int | None = None) -> np.ndarray:
        """The tumor mask of :attr:`label`: ``== tumor_label``, or by default label 1 where the
        slice has any (crossMoDA: 1 tumor, 2 cochlea), else every non-zero voxel."""
        if self.label is None:
            raise SinganInsertError("No label was given with the training slice, so there is no tumor to annotate.")
        if tumor_label is None:
            mask = self.label == 1 if np.any(self.label == 1) else self.label > 0
        else:
            mask = self.label == tumor_label
        if not mask.any():
            which = "any label" if tumor_label is None else f"label {tumor_label}"
            raise SinganInsertError(f"The training slice's label has no tumor ({which}) on slice "
                                    f"{self.provenance.get('slice_index')}: choose the slice that shows it.")
        return mask


def load_training_slice(
    path: str | os.PathLike,
    axis: int = 2,
    index: int | str = "auto",
    label_path: str | os.PathLike | None = None,
    crop: tuple[int, int, int, int] | None = None,
    modality: str | None = None,
) -> TrainingSlice:
    """Cut one slice out of a NIfTI volume, with the file's in-plane pixel size.

    Args:
        path: the modality-B volume (``.nii`` / ``.nii.gz``).
        axis: voxel axis the slice is perpendicular to (0, 1 or 2; 2 = axial in RAS-ish files).
        index: slice index along ``axis``, or ``"auto"`` (largest label area; needs ``label_path``,
            otherwise the middle slice).
        label_path: a label volume on the same grid, used by ``"auto"``.
        crop: ``(row_start, row_stop, col_start, col_stop)`` in the slice's pixels.
        modality: a name stored in the model (e.g. ``"hrT2"``).

    Raises:
        SinganInsertError: an unreadable, truncated, complex, colour or 4D volume, NaN values,
            a zero or NaN affine or voxel size (see :func:`singan_insert.io.read_nifti`), a
            label on another grid or empty, a bad axis, index or crop.
    """
    from singan_insert.io import nifti_spacing, orientation_codes, read_nifti

    if isinstance(axis, bool) or axis not in (0, 1, 2):
        raise SinganInsertError(f"axis must be 0, 1 or 2, got {axis!r}.")
    # read_nifti refuses complex, colour and 4D data, NaN values and a zero/NaN affine or
    # pixdim, so the spacing stored in the model is the file's, never an invented one.
    image = read_nifti(path, what="training volume")
    data = np.asarray(image.dataobj, dtype=np.float32)
    zooms = nifti_spacing(image)
    label = None
    if label_path is not None:
        label_image = read_nifti(label_path, what="label")
        label = np.asarray(label_image.dataobj)
        if label.shape != data.shape or not np.allclose(label_image.affine, image.affine, atol=1e-3):
            raise SinganInsertError(
                f"The label {label_path} is not on the grid of {path} (shape {label.shape} vs "
                f"{data.shape}, or different affines). Resample it to the image first.")
    if index == "auto":
        if label is not None:
            areas = (label > 0).sum(axis=tuple(a for a in range(3) if a != axis))
            if areas.max() == 0:
                raise SinganInsertError(f"The label {label_path} is empty; pass --slice explicitly.")
            index = int(np.argmax(areas))
        else:
            index = data.shape[axis] // 2
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise SinganInsertError(f"slice index must be an integer or 'auto', got {index!r}.")
    if not 0 <= index < data.shape[axis]:
        raise SinganInsertError(
            f"Slice index {index} is out of range for axis {axis} of {path} "
            f"(0..{data.shape[axis] - 1}).")
    slice_2d = np.take(data, int(index), axis=axis)
    spacing = tuple(z for a, z in enumerate(zooms) if a != axis)
    slice_2d = apply_crop(slice_2d, crop)
    label_2d = None if label is None else apply_crop(np.take(label, int(index), axis=axis), crop)
    provenance = {"source": os.path.basename(str(path)), "axis": axis, "slice_index": int(index),
                  "crop": list(crop) if crop else None, "modality": modality,
                  "orientation": orientation_codes(image.affine)}
    return TrainingSlice(slice_2d.astype(np.float32), (float(spacing[0]), float(spacing[1])), provenance, label_2d)


def apply_crop(image: np.ndarray, crop: tuple[int, int, int, int] | None) -> np.ndarray:
    """Crop ``(row_start, row_stop, col_start, col_stop)``; a clear error when outside the image."""
    if crop is None:
        return image
    if len(crop) != 4:
        raise SinganInsertError(f"A crop box has 4 numbers (row_start, row_stop, col_start, col_stop), got {crop}.")
    from singan_insert.checks import check_int

    r0, r1, c0, c1 = (check_int(v, "crop box value") for v in crop)
    height, width = image.shape
    if not (0 <= r0 < r1 <= height and 0 <= c0 < c1 <= width):
        raise SinganInsertError(
            f"The crop box {crop} is outside the {height}x{width} slice; rows must satisfy "
            f"0 <= start < stop <= {height} and columns 0 <= start < stop <= {width}.")
    return image[r0:r1, c0:c1]
