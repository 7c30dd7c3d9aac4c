"""Insertion in the model's own orientation: the same anatomy gives the same tumor, however it is stored.

A harmonizer learns from ONE slice as its voxels were stored: its generators' kernels and the
patches that choose a tumor's level (:class:`~singan_insert.insertion.appearance.PatchBank`) see
anatomy the way round it lay in that file. The same scan stored another way round (LPS instead
of RAS, or its in-plane axes swapped: both common, and NIfTI says which in the affine) shows
the model mirrored or transposed slices, which it has never seen: on 8 simulated subjects,
mirroring the target anterior-posterior moved the unannotated insertion's mean contrast ratio
from 1.26 to 1.54 and one tumor's mean by 12.8 %, for the very same voxels; with an annotation
the changes were small (0.16 % of a tumor's mean) but no output stayed the same
(``benchmarks/dev_orientation.py``).

So when the model knows the orientation of its training volume (:attr:`~singan_insert.harmonizer.model.Harmonizer.orientation`, the axis codes ``"RAS"``, ``"LPS"``...
recorded by :func:`~singan_insert.harmonizer.training_slice.load_training_slice`), the target is
brought into it before insertion and the results are brought back: flips and permutations of
the voxel axes only (:mod:`nibabel.orientations`), exact and lossless, nothing resampled. The
insertion's own voxel quantities (the slice axis, a placement in voxel units, the record's box,
slices and crop) are given and returned in the target's own voxel frame, so a record replays on
the target as stored. A model without a recorded orientation (trained from a bare array) is
used as before, on the target as stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from singan_insert.errors import SinganInsertError

__all__ = ["Reorientation", "axis_direction", "check_orientation_codes", "in_model_frame", "reorientation_to"]

#: The world axes x, y, z of the RAS+ convention, each as (positive, negative) direction code.
AXIS_CODE_PAIRS = ("RL", "AP", "SI")


def _world_axis(code: str) -> int:
    return next((i for i, pair in enumerate(AXIS_CODE_PAIRS) if code in pair), -1)


def axis_direction(code: str) -> str:
    """The line a voxel axis of code ``code`` runs along, e.g. ``"L"`` -> ``"L-R"``."""
    pair = AXIS_CODE_PAIRS[_world_axis(code)]
    return f"{code}-{pair[1] if code == pair[0] else pair[0]}"


def check_orientation_codes(codes: Any, what: str = "orientation") -> str:
    """``codes`` as three axis codes, one of R/L, A/P, S/I each (case-insensitive); a clear error otherwise."""
    text = codes.upper() if isinstance(codes, str) else ""
    if sorted(_world_axis(c) for c in text) != [0, 1, 2]:
        raise SinganInsertError(
            f"The {what} {codes!r} is not three axis codes (one of R/L, one of A/P, one of S/I, "
            "e.g. 'RAS'). Retrain the model from a NIfTI volume, or correct the value.")
    return text


@dataclass(frozen=True)
class Reorientation:
    """Flips and a permutation of the voxel axes of a volume of ``shape``.

    ``transform`` is a :mod:`nibabel.orientations` array: input axis ``i`` becomes output axis
    ``transform[i, 0]``, reversed when ``transform[i, 1] == -1``.
    """

    transform: np.ndarray
    shape: tuple[int, int, int]

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.transform, [[0, 1], [1, 1], [2, 1]]))

    @property
    def output_shape(self) -> tuple[int, int, int]:
        shape = [0, 0, 0]
        for axis, (out_axis, _) in enumerate(self.transform):
            shape[int(out_axis)] = self.shape[axis]
        return tuple(shape)

    def inverse(self) -> "Reorientation":
        inverse = np.zeros((3, 2))
        for axis, (out_axis, flip) in enumerate(self.transform):
            inverse[int(out_axis)] = (axis, flip)
        return Reorientation(inverse, self.output_shape)

    def array(self, volume: np.ndarray) -> np.ndarray:
        """``volume`` (of :attr:`shape`) in the new voxel order, as a contiguous copy."""
        from nibabel.orientations import apply_orientation

        return np.ascontiguousarray(apply_orientation(volume, self.transform))

    def affine(self, affine: np.ndarray) -> np.ndarray:
        """The voxel-to-world affine of the reoriented volume (the world is unchanged)."""
        from nibabel.orientations import inv_ornt_aff

        return np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(self.transform, self.shape)

    def axis(self, axis: int) -> int:
        return int(self.transform[int(axis), 0])

    def source_axis(self, axis: int) -> int:
        """The input axis that becomes output ``axis``."""
        return int(np.flatnonzero(self.transform[:, 0] == int(axis))[0])

    def point(self, voxel: Sequence[float]) -> tuple[float, float, float]:
        """A (fractional) voxel position in the new voxel order."""
        out = [0.0, 0.0, 0.0]
        for axis, (out_axis, flip) in enumerate(self.transform):
            value = float(voxel[axis])
            out[int(out_axis)] = value if flip > 0 else self.shape[axis] - 1 - value
        return tuple(out)

    def interval(self, axis: int, start: int, stop: int) -> tuple[int, int, int]:
        """``(new axis, start, stop)`` of the index range ``[start, stop)`` along ``axis``."""
        out_axis, flip = self.transform[int(axis)]
        if flip > 0:
            return int(out_axis), int(start), int(stop)
        size = self.shape[int(axis)]
        return int(out_axis), size - int(stop), size - int(start)

    def indices(self, axis: int, indices: Sequence[int]) -> list[int]:
        """Indices along ``axis`` in the new voxel order (increasing)."""
        flip = self.transform[int(axis), 1]
        size = self.shape[int(axis)]
        return sorted(int(i) if flip > 0 else size - 1 - int(i) for i in indices)


def reorientation_to(affine: np.ndarray, shape: Sequence[int], codes: str) -> Reorientation:
    """The :class:`Reorientation` that brings a volume of ``shape`` with ``affine`` into ``codes``."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    wanted = axcodes2ornt(tuple(check_orientation_codes(codes)))
    current = io_orientation(np.asarray(affine, dtype=np.float64))
    return Reorientation(ornt_transform(current, wanted), tuple(int(s) for s in shape))


def in_model_frame(affine: np.ndarray, codes: str | None) -> np.ndarray:
    """``affine`` with its world axes renamed as the model's training file names its voxel axes.

    For geometry that knows its voxel axes but not their directions (nnU-Net's patches, an array
    without an affine): world axis :math:`k` of ``affine`` is taken to be voxel axis :math:`k` of
    a file stored as the model's training file, which runs along ``codes[k]``. Insertion then
    brings such a volume into the model's orientation by permuting its axes only, never by
    mirroring it (which an affine of positive signs would do for a model of an LPS file).
    ``codes=None`` (a model without a recorded orientation): ``affine`` unchanged.
    """
    if codes is None:
        return affine
    codes = check_orientation_codes(codes, "model's orientation")
    out = np.zeros((4, 4))
    out[3, 3] = 1.0
    for axis in range(3):
        file_axis = int(np.flatnonzero(affine[:3, axis])[0])
        code = codes[file_axis]
        positive = code == AXIS_CODE_PAIRS[_world_axis(code)][0]
        out[_world_axis(code), axis] = (1.0 if positive else -1.0) * abs(affine[file_axis, axis])
    out[:3, 3] = affine[:3, 3]
    return out
