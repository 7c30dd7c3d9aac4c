"""Source-to-target tumor geometry: where a source tumor lands in a target volume.

A source tumor (an image of modality A and its label) is described by a :class:`SourceTumor`:
a crop around the tumor, the crop's voxel-to-world affine (mm, the NIfTI/RAS convention) and a
compact table of the whole source image's intensity quantiles (so intensities can later be
mapped into the target without keeping the whole source volume around).

Geometry
--------
Let :math:`A_s` and :math:`A_t` be the source and target voxel-to-world affines, :math:`c` the
tumor's centroid in source world coordinates (centre of mass of its mask) and :math:`p` the
chosen location in target world coordinates. A :class:`Placement` defines the rigid-plus-scale
map of source world points to target world points

.. math::

    x_t = p + M\\,(x_s - c), \\qquad M = R_z R_y R_x\\, S\\, F,

where :math:`F = \\operatorname{diag}(\\pm 1)` flips world axes, :math:`S` scales them and
:math:`R_x, R_y, R_z` rotate about the world axes (angles in degrees, applied x first). Without a
location, :math:`p = c`: with no flip/rotation/scale the tumor is simply resampled to where it
physically is (the case of co-registered images, or of a tumor re-inserted in place, as in GBA).
A target voxel :math:`i_t` therefore reads the source at the voxel

.. math:: i_s = A_s^{-1}\\,\\bigl(c + M^{-1}(A_t\\, i_t - p)\\bigr),

an affine map of voxel indices. It is evaluated with :func:`scipy.ndimage.affine_transform`
(i.e. ``map_coordinates`` on an affine grid) rather than :func:`torch.nn.functional.grid_sample`
because it works in voxel indices directly (no ``align_corners`` normalisation to get wrong), in
float64 (so an identity placement reproduces the source exactly), deterministically on any CPU,
and only on the output bounding box of the placed tumor, so its cost does not grow with the size
of either volume. Intensities are interpolated linearly (no overshoot outside the source's
range); the mask is interpolated linearly and thresholded at 0.5, which gives smoother outlines
than nearest-neighbour when the tumor is rotated or scaled.

Validation
----------
Affines must be finite, 4x4, with last row ``(0, 0, 0, 1)`` and an invertible (well conditioned)
3x3 part; an image and its label must share a grid; spacings must not be more anisotropic than
``max_anisotropy``; the source label must hold a single tumor value (or ``label_value`` must pick
one) with integer values; the placed tumor must lie inside the target's field of view and keep
``border_margin`` voxels away from its border (unless ``clip_to_fov``).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
from scipy import ndimage

from singan_insert.errors import SinganInsertError
from singan_insert.checks import check_finite

LocationUnits = Literal["voxel", "mm"]

#: Default limit on ``max(spacing) / min(spacing)``. crossMoDA scans are about 0.4 x 0.4 x 1.5 mm
#: (ratio ~4); beyond ~8 a tumor spans so few slices that resampling it is guesswork.
DEFAULT_MAX_ANISOTROPY = 8.0

#: Number of evenly spaced quantiles kept of a whole image (see :func:`intensity_quantiles`).
NUM_QUANTILES = 8193
#: At most this many voxels (a regular stride through the volume) are used for the quantiles.
MAX_QUANTILE_SAMPLES = 2**18

_AFFINE_MAX_CONDITION = 1e8

# Only InsertionParameters and TumorInsertion have clip_to_fov (a random placement or a batch
# never cuts a tumor), so the advice names them.
_CLIP_ADVICE = (", or cut the tumor at the border with clip_to_fov=True (InsertionParameters "
                "or TumorInsertion)")


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------
def check_affine(affine: np.ndarray, name: str = "affine") -> np.ndarray:
    """Return ``affine`` as a float64 4x4 array after checking that it is a usable affine.

    Raises:
        SinganInsertError: if it is not 4x4, not finite, its last row is not ``(0, 0, 0, 1)``
            or its 3x3 part is singular or badly conditioned (condition number > 1e8).
    """
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise SinganInsertError(
            f"The {name} must be a 4x4 voxel-to-world matrix, got shape {matrix.shape}."
        )
    if not np.isfinite(matrix).all():
        raise SinganInsertError(f"The {name} holds NaN or infinite values; fix the file header.")
    if not np.allclose(matrix[3], (0, 0, 0, 1), atol=1e-6):
        raise SinganInsertError(
            f"The last row of the {name} is {matrix[3].tolist()}, not (0, 0, 0, 1): "
            "it is not an affine voxel-to-world matrix."
        )
    linear = matrix[:3, :3]
    singular_values = np.linalg.svd(linear, compute_uv=False)
    if singular_values[-1] <= 0 or singular_values[0] / singular_values[-1] > _AFFINE_MAX_CONDITION:
        raise SinganInsertError(
            f"The {name} is not invertible (its 3x3 part has singular values "
            f"{singular_values.tolist()}): a voxel size is zero or two axes coincide. "
            "Fix the image header (e.g. with nibabel, setting a valid qform/sform)."
        )
    return matrix


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (the norms of the affine's columns)."""
    matrix = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.linalg.norm(matrix[:3, :3], axis=0))


def check_anisotropy(
    spacing: Sequence[float], max_anisotropy: float = DEFAULT_MAX_ANISOTROPY, name: str = "image"
) -> None:
    """Raise when ``max(spacing) / min(spacing)`` exceeds ``max_anisotropy``."""
    ratio = max(spacing) / min(spacing)
    if ratio > max_anisotropy:
        raise SinganInsertError(
            f"The {name} is extremely anisotropic (spacing {tuple(round(s, 4) for s in spacing)} "
            f"mm, ratio {ratio:.1f} > {max_anisotropy:g}): a tumor would span only a few slices "
            "and resampling it would be guesswork. Resample the image to a less anisotropic grid "
            "first, or raise max_anisotropy if you know what you are doing."
        )


def check_same_grid(
    shape_a: Sequence[int],
    affine_a: np.ndarray,
    shape_b: Sequence[int],
    affine_b: np.ndarray,
    name_a: str,
    name_b: str,
) -> None:
    """Raise when two images do not share shape and affine (up to header rounding)."""
    if tuple(shape_a) != tuple(shape_b):
        raise SinganInsertError(
            f"The {name_a} has shape {tuple(shape_a)} but the {name_b} has shape "
            f"{tuple(shape_b)}; they must be on the same voxel grid."
        )
    if not np.allclose(affine_a, affine_b, rtol=1e-5, atol=1e-4):
        raise SinganInsertError(
            f"The affines of the {name_a} and the {name_b} differ:\n{np.round(affine_a, 4)}\nvs\n"
            f"{np.round(affine_b, 4)}\nThey must be on the same voxel grid; resample the label "
            "onto the image (nearest neighbour) or fix the header."
        )


def binary_tumor_mask(
    label: np.ndarray, label_value: int | None = None, name: str = "source label"
) -> np.ndarray:
    """Turn a label map into the boolean mask of one tumor.

    Args:
        label: a label map. Float dtypes are accepted when every value is an integer (NIfTI
            labels are often stored as floats); boolean maps are used as they are.
        label_value: the value of the tumor. Required when the map holds several non-zero
            values (e.g. crossMoDA: 1 = schwannoma, 2 = cochlea); ``None`` accepts a map with a
            single non-zero value.
        name: how the map is called in error messages.

    Raises:
        SinganInsertError: non-finite or non-integer values, several labels and no
            ``label_value``, or an empty tumor.
    """
    values = np.asarray(label)
    if values.dtype == bool:
        if label_value not in (None, 1, True):
            raise SinganInsertError(f"The {name} is boolean; label_value must be None or 1.")
        mask = values
    else:
        check_finite(values, name)
        if np.issubdtype(values.dtype, np.floating):
            fractional = values != np.round(values)
            if fractional.any():
                example = float(values[fractional].flat[0])
                raise SinganInsertError(
                    f"The {name} holds non-integer values (e.g. {example:g}): it looks like a "
                    "probability map or a label resampled with linear interpolation. Threshold "
                    "it (e.g. label > 0.5) or resample it with nearest-neighbour interpolation."
                )
        if label_value is None:
            present = np.unique(values[values != 0]) if values.any() else np.array([])
            if present.size > 1:
                shown = ", ".join(f"{v:g}" for v in present[:10].astype(float))
                raise SinganInsertError(
                    f"The {name} holds several labels ({shown}); choose the tumor's value: "
                    "label_value= here, source_label_value= in the transforms, "
                    "--source-label-value in the CLI (1 for the schwannoma in crossMoDA)."
                )
            mask = values != 0
        else:
            if float(label_value) != round(float(label_value)):
                raise SinganInsertError(f"label_value must be an integer, got {label_value}.")
            mask = values == label_value
            if not mask.any() and values.any():
                present = np.unique(values[values != 0])[:10].astype(float)
                raise SinganInsertError(
                    f"No voxel of the {name} has the value {label_value}; it holds "
                    f"{', '.join(f'{v:g}' for v in present)}. Pass one of those as the tumor's value "
                    "(label_value here, source_label_value in the transforms, --source-label-value on "
                    "the command line)."
                )
    if not mask.any():
        raise SinganInsertError(f"The {name} is empty: there is no tumor to insert.")
    return mask


#: Largest |intensity| accepted: float32 holds 3.4e38, and an image near it overflows inside
#: the harmonizer (an image reaching 1e37 did; one reaching 1e33 did not), which would surface
#: as a puzzling "NaN" error.
MAX_ABS_INTENSITY = 1e33


def intensity_quantiles(image: np.ndarray, num: int = NUM_QUANTILES, name: str = "image") -> np.ndarray:
    """Evenly spaced quantiles (probabilities ``0, 1/(num-1), ..., 1``) of a whole image.

    This compact table stands in for the whole image when its intensities are mapped with
    :func:`singan_insert.insertion.intensity.map_tumor_intensities`, whose mappings depend on the image
    only through its distribution. Volumes of more than ``MAX_QUANTILE_SAMPLES`` voxels are
    read with a regular stride, which keeps the cost bounded and deterministic; the minimum
    and maximum are always exact (``table[0]`` and ``table[-1]`` are the image's own), and the
    image is checked to be finite (``name`` is the error's word for it).
    """
    values = np.asarray(image)
    # One pass over the whole volume: a finite minimum and maximum prove every value finite (NaN
    # propagates through both, an infinity shows in one), and only the strided sample is
    # converted to float32 (a clinical scan read as float64 is 250 MB).
    low, high = _min_max(values)
    if not (math.isfinite(low) and math.isfinite(high)):
        check_finite(values, name)  # raises, with the message every other check gives
    if max(abs(low), abs(high)) > MAX_ABS_INTENSITY:
        raise SinganInsertError(
            f"The {name} holds values up to {max(abs(low), abs(high)):.3g}: beyond {MAX_ABS_INTENSITY:g}, the "
            "harmonizer's float32 arithmetic can overflow. Rescale the image (any linear scaling: the "
            "insertion does not depend on the intensity unit).")
    flat = values.reshape(-1)
    step = max(1, math.ceil(flat.size / MAX_QUANTILE_SAMPLES))
    sample = (flat[::step] if step > 1 else flat).astype(np.float32)
    table = _sorted_quantiles(np.sort(sample), num)
    table[0], table[-1] = low, high
    return table


#: dtypes whose minimum and maximum torch finds in one (threaded) pass; numpy takes two.
_TORCH_MIN_MAX = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.int16,
                                                  np.int32, np.int64, np.uint8))


def _min_max(values: np.ndarray) -> tuple[float, float]:
    """The minimum and maximum (NaN if any value is NaN) of an array, in one pass where torch can.

    ``torch.aminmax`` reads a 512 x 512 x 120 float32 volume once, on every thread (4.6 ms against
    numpy's 12.7 ms for ``min`` and ``max`` on this project's 2-core machine), C- or
    Fortran-ordered (nibabel's arrays); other dtypes, read-only arrays (torch would warn), strided
    views and non-native byte orders take numpy's two passes.
    """
    if (values.dtype in _TORCH_MIN_MAX and values.dtype.isnative and values.flags.writeable
            and (values.flags.c_contiguous or values.flags.f_contiguous) and values.size):  # nibabel's: F
        import torch

        low, high = torch.aminmax(torch.from_numpy(values))
        return float(low), float(high)
    return float(np.min(values)), float(np.max(values))


def _sorted_quantiles(ordered: np.ndarray, num: int) -> np.ndarray:
    """``np.quantile(ordered, np.linspace(0, 1, num))`` (method "linear") of an already sorted 1-D
    array, as float64: the same table to the last bit (but for the sign of a zero among equal
    zeros, which numpy's partition may reorder), read straight off the sorted values.

    numpy's quantile partitions the array again even when it is sorted (6 ms for 8193
    quantiles of 2**18 values; this takes 0.2 ms). The interpolation is numpy's own: the
    virtual index :math:`(n - 1) p`, neighbours' difference in the array's dtype, and the
    lerp taken from the upper neighbour when the weight is at least one half.
    """
    virtual = np.linspace(0.0, 1.0, num) * (ordered.size - 1)
    below = np.floor(virtual)
    gamma = virtual - below
    below = below.astype(np.intp)
    a, b = ordered[below], ordered[np.minimum(below + 1, ordered.size - 1)]
    difference = b - a
    table = np.where(gamma >= 0.5, b - difference * (1 - gamma), a + difference * gamma)
    return table.astype(np.float64)


# --------------------------------------------------------------------------------------------
# Source tumor
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class SourceTumor:
    """A source tumor: a crop of the source image and mask around it, with its geometry.

    Build it with :meth:`from_arrays` or :meth:`from_files` rather than directly.

    Args:
        image: source intensities of the crop, ``float32``, shape ``(X, Y, Z)``.
        mask: the tumor in the crop, ``bool``, same shape (at least one voxel).
        affine: voxel-to-world (mm) affine of the crop.
        quantiles: :func:`intensity_quantiles` of the WHOLE source image.
        origin: a human-readable description of where it came from (for records).
    """

    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    quantiles: np.ndarray
    origin: str = "arrays"
    _checksum: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # Private read-only copies: the object is shared, never copied (see __deepcopy__).
        for name, dtype in (("image", np.float32), ("mask", bool), ("affine", np.float64),
                            ("quantiles", np.float64)):
            array = np.array(getattr(self, name), dtype=dtype, copy=True)
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        if self.image.shape != self.mask.shape or self.image.ndim != 3:
            raise SinganInsertError("SourceTumor image and mask must be 3D arrays of one shape.")
        if not self.mask.any():
            raise SinganInsertError("The source label is empty: there is no tumor to insert.")
        digest = hashlib.sha1()
        for array in (self.image, self.mask, self.affine, self.quantiles):
            digest.update(np.ascontiguousarray(array).tobytes())
        object.__setattr__(self, "_checksum", digest.hexdigest()[:16])

    @classmethod
    def from_arrays(
        cls,
        image: np.ndarray,
        label: np.ndarray,
        affine: np.ndarray,
        *,
        label_value: int | None = None,
        label_affine: np.ndarray | None = None,
        margin: int = 2,
        max_anisotropy: float = DEFAULT_MAX_ANISOTROPY,
        origin: str = "arrays",
    ) -> "SourceTumor":
        """Crop a source tumor out of a whole source image and its label map.

        Args:
            image: the whole source image, 3D (a leading or trailing singleton axis is dropped).
            label: its label map, same grid (see :func:`binary_tumor_mask`).
            affine: the image's voxel-to-world affine (mm).
            label_value: which label is the tumor when ``label`` holds several.
            label_affine: the label's affine, checked against ``affine`` when given.
            margin: voxels kept around the tumor's bounding box (>= 1, for interpolation).
            max_anisotropy: see :func:`check_anisotropy`.
            origin: description stored for records.
        """
        image = _as_3d(image, "source image")
        label = _as_3d(label, "source label")
        affine = check_affine(affine, "source image affine")
        quantiles = intensity_quantiles(image, name="source image")  # also checks it is finite
        if label_affine is not None:
            label_affine = check_affine(label_affine, "source label affine")
        check_same_grid(
            image.shape, affine, label.shape,
            affine if label_affine is None else label_affine, "source image", "source label",
        )
        check_anisotropy(spacing_from_affine(affine), max_anisotropy, "source image")
        mask = binary_tumor_mask(label, label_value, "source label")
        if margin < 1:
            raise SinganInsertError(f"margin must be at least 1 voxel, got {margin}.")
        lows, highs = _mask_bounds(mask)
        lows = np.maximum(lows - margin, 0)
        highs = np.minimum(highs + margin + 1, image.shape)
        crop = tuple(slice(int(a), int(b)) for a, b in zip(lows, highs))
        crop_affine = affine.copy()
        crop_affine[:3, 3] = affine[:3, :3] @ lows + affine[:3, 3]
        return cls(
            image=np.ascontiguousarray(image[crop], dtype=np.float32),
            mask=np.ascontiguousarray(mask[crop]),
            affine=crop_affine,
            quantiles=quantiles,
            origin=origin,
        )

    @classmethod
    def from_files(
        cls,
        image_path: str | os.PathLike,
        label_path: str | os.PathLike,
        *,
        label_value: int | None = None,
        margin: int = 2,
        max_anisotropy: float = DEFAULT_MAX_ANISOTROPY,
    ) -> "SourceTumor":
        """Load a source image and its label (any format nibabel reads, e.g. NIfTI)."""
        import nibabel as nib

        arrays = []
        affines = []
        for path, what in ((image_path, "source image"), (label_path, "source label")):
            try:
                loaded = nib.load(os.fspath(path))
            except FileNotFoundError:
                raise SinganInsertError(f"The {what} file {os.fspath(path)!r} does not exist.") from None
            except Exception as error:  # nibabel raises many types for unreadable files
                raise SinganInsertError(
                    f"Could not read the {what} {os.fspath(path)!r}: {error}"
                ) from error
            arrays.append(np.asarray(loaded.dataobj) if what == "source label" else
                          loaded.get_fdata(dtype=np.float32))
            affines.append(loaded.affine)
        return cls.from_arrays(
            arrays[0], arrays[1], affines[0], label_value=label_value, label_affine=affines[1],
            margin=margin, max_anisotropy=max_anisotropy,
            origin=f"{os.fspath(image_path)} | {os.fspath(label_path)}",
        )

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the crop's array axes."""
        return spacing_from_affine(self.affine)

    @property
    def centroid_mm(self) -> np.ndarray:
        """World coordinates (mm) of the tumor's centre of mass."""
        centroid_voxel = np.argwhere(self.mask).mean(axis=0)
        return self.affine[:3, :3] @ centroid_voxel + self.affine[:3, 3]

    @property
    def num_voxels(self) -> int:
        return int(self.mask.sum())

    @property
    def volume_mm3(self) -> float:
        return self.num_voxels * float(abs(np.linalg.det(self.affine[:3, :3])))

    @property
    def checksum(self) -> str:
        """A short digest of the arrays: two sources with the same checksum are identical."""
        return self._checksum

    def describe(self) -> dict:
        """JSON-serialisable summary, for records."""
        return {
            "origin": self.origin,
            "checksum": self.checksum,
            "crop_shape": list(self.mask.shape),
            "num_voxels": self.num_voxels,
            "volume_mm3": round(self.volume_mm3, 3),
            "centroid_mm": [round(float(v), 4) for v in self.centroid_mm],
            "spacing_mm": [round(v, 6) for v in self.spacing],
        }

    def __repr__(self) -> str:
        return (
            f"SourceTumor(origin={self.origin!r}, crop_shape={self.mask.shape}, "
            f"voxels={self.num_voxels}, checksum={self.checksum})"
        )

    def __reduce__(self):
        # Pickle the arrays only; the checksum is recomputed (and so can never go stale).
        return (_rebuild_source_tumor, (self.image, self.mask, self.affine, self.quantiles, self.origin))

    def __deepcopy__(self, memo) -> "SourceTumor":
        return self  # immutable (read-only arrays), so sharing it is safe and free


def _rebuild_source_tumor(image, mask, affine, quantiles, origin) -> SourceTumor:
    return SourceTumor(image, mask, affine, quantiles, origin)


# --------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """Where and how the source tumor is placed in the target (see the module docstring).

    Args:
        location: target position of the tumor's centroid, or ``None`` to keep the tumor where
            it physically is (resampling through the affines only).
        units: ``"voxel"`` (target array indices, may be fractional) or ``"mm"`` (world).
        flips: flip the tumor along world axes x, y, z (about its centroid).
        rotation_degrees: rotation about world axes x, y, z (applied in that order), degrees.
        scale: scale factor per world axis (> 0), applied before the rotation.
    """

    location: tuple[float, float, float] | None = None
    units: LocationUnits = "voxel"
    flips: tuple[bool, bool, bool] = (False, False, False)
    rotation_degrees: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.location is not None:
            location = _triple(self.location, "location", float)
            if not all(math.isfinite(v) for v in location):
                raise SinganInsertError(f"The location must be finite, got {location}.")
            object.__setattr__(self, "location", location)
        if self.units not in ("voxel", "mm"):
            raise SinganInsertError(f"units must be 'voxel' or 'mm', got {self.units!r}.")
        object.__setattr__(self, "flips", _triple(self.flips, "flips", bool))
        rotation = _triple(self.rotation_degrees, "rotation_degrees", float)
        if not all(math.isfinite(v) for v in rotation):
            raise SinganInsertError(f"rotation_degrees must be finite, got {rotation}.")
        object.__setattr__(self, "rotation_degrees", rotation)
        scale = _triple(self.scale, "scale", float)
        if not all(math.isfinite(v) and v > 0 for v in scale):
            raise SinganInsertError(f"scale factors must be positive numbers, got {scale}.")
        object.__setattr__(self, "scale", scale)

    def matrix(self) -> np.ndarray:
        """The 3x3 map :math:`M = R_z R_y R_x S F` of source offsets to target offsets (mm)."""
        flips = np.diag([-1.0 if f else 1.0 for f in self.flips])
        scale = np.diag(self.scale)
        ax, ay, az = (math.radians(a) for a in self.rotation_degrees)
        rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
        ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
        rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx @ scale @ flips

    def to_dict(self) -> dict:
        return {
            "location": None if self.location is None else list(self.location),
            "units": self.units,
            "flips": list(self.flips),
            "rotation_degrees": list(self.rotation_degrees),
            "scale": list(self.scale),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Placement":
        return cls(
            location=None if data.get("location") is None else tuple(data["location"]),
            units=data.get("units", "voxel"),
            flips=tuple(data.get("flips", (False,) * 3)),
            rotation_degrees=tuple(data.get("rotation_degrees", (0.0,) * 3)),
            scale=tuple(data.get("scale", (1.0,) * 3)),
        )


# --------------------------------------------------------------------------------------------
# Pasting
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PastedTumor:
    """The source tumor resampled onto the target grid, inside a bounding box.

    Args:
        image: source intensities (source units) on the target grid, ``float32``.
        mask: the tumor on the target grid, ``bool``, same shape, not empty.
        start: target voxel index of ``image[0, 0, 0]``.
        target_to_source: 4x4 map of target voxel indices to source-crop voxel indices.
    """

    image: np.ndarray
    mask: np.ndarray
    start: tuple[int, int, int]
    target_to_source: np.ndarray

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Index of the bounding box in the target array."""
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.mask.shape))

    def full_mask(self, shape: Sequence[int]) -> np.ndarray:
        """The tumor mask on the whole target grid of ``shape``."""
        full = np.zeros(tuple(shape), dtype=bool)
        full[self.slices] = self.mask
        return full


def source_to_target_matrix(
    source: SourceTumor, target_affine: np.ndarray, placement: Placement | None = None
) -> np.ndarray:
    """4x4 map of target voxel indices to source-crop voxel indices (see the module docstring)."""
    placement = placement or Placement()
    target_affine = check_affine(target_affine, "target affine")
    centroid = source.centroid_mm
    if placement.location is None:
        location = centroid
    elif placement.units == "mm":
        location = np.asarray(placement.location, dtype=np.float64)
    else:
        location = target_affine[:3, :3] @ np.asarray(placement.location) + target_affine[:3, 3]
    world = np.eye(4)  # source world -> target world
    world[:3, :3] = placement.matrix()
    world[:3, 3] = location - world[:3, :3] @ centroid
    return np.linalg.inv(source.affine) @ np.linalg.inv(world) @ target_affine


def planar_axes(shape: Sequence[int]) -> tuple[int, ...]:
    """The axes of size 1 of a 2D image stored as a 3D volume (``()`` for a 3D volume)."""
    shape = tuple(int(n) for n in shape)
    return tuple(a for a, n in enumerate(shape) if n == 1) if sum(n > 1 for n in shape) == 2 else ()


def placed_bounds(
    source: SourceTumor, target_affine: np.ndarray, placement: Placement | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Conservative target-voxel bounding box ``(low, high)`` (inclusive) of the placed tumor.

    Cheap (no resampling): the corners of the source tumor's bounding box mapped to the target.
    """
    target_to_source = source_to_target_matrix(source, target_affine, placement)
    source_to_target = np.linalg.inv(target_to_source)
    lows, highs = _mask_bounds(source.mask)
    corners = np.array(
        [[x, y, z, 1.0] for x in (lows[0] - 0.5, highs[0] + 0.5)
         for y in (lows[1] - 0.5, highs[1] + 0.5) for z in (lows[2] - 0.5, highs[2] + 0.5)]
    )
    mapped = (source_to_target @ corners.T).T[:, :3]
    return np.floor(mapped.min(axis=0)).astype(int), np.ceil(mapped.max(axis=0)).astype(int)


def paste_tumor(
    source: SourceTumor,
    target_shape: Sequence[int],
    target_affine: np.ndarray,
    placement: Placement | None = None,
    *,
    border_margin: int = 1,
    clip_to_fov: bool = False,
    max_anisotropy: float = DEFAULT_MAX_ANISOTROPY,
) -> PastedTumor:
    """Resample a source tumor onto the target grid (see the module docstring).

    Args:
        source: the source tumor.
        target_shape: the target volume's 3D shape.
        target_affine: the target's voxel-to-world affine (mm).
        placement: where and how to place it; ``None`` keeps its physical position.
        border_margin: minimum number of voxels between the tumor and the target's border
            (>= 0). A tumor touching the border is rejected by default: it would be cut by the
            field of view and it starves patch samplers (``tio.LabelSampler`` cannot centre a
            patch on it). Use at least half the patch size for such samplers.
        clip_to_fov: instead of raising, cut the tumor where it leaves the field of view
            (as scanners do); an error is still raised when nothing is left.
        max_anisotropy: see :func:`check_anisotropy`.

    Returns:
        A :class:`PastedTumor`; its arrays only cover the tumor's bounding box.

    Raises:
        SinganInsertError: bad affine, extreme anisotropy, tumor outside the field of view or
            touching its border, or a tumor smaller than a target voxel.
    """
    target_shape = tuple(int(n) for n in target_shape)
    if len(target_shape) != 3 or min(target_shape) < 1:
        raise SinganInsertError(f"The target must be a 3D volume, got shape {target_shape}.")
    if isinstance(border_margin, bool) or not isinstance(border_margin, (int, np.integer)) \
            or border_margin < 0:
        raise SinganInsertError(f"border_margin must be an integer >= 0, got {border_margin!r}.")
    target_affine = check_affine(target_affine, "target affine")
    check_anisotropy(spacing_from_affine(target_affine), max_anisotropy, "target image")
    check_anisotropy(source.spacing, max_anisotropy, "source image")
    target_to_source = source_to_target_matrix(source, target_affine, placement)
    low, high = placed_bounds(source, target_affine, placement)
    low, high = low - 1, high + 1  # one voxel of slack for the interpolated outline
    if np.any(high < 0) or np.any(low >= np.array(target_shape)):
        raise _outside_error(low, high, target_shape)
    shape = tuple(int(n) for n in high - low + 1)
    linear = target_to_source[:3, :3]
    offset = linear @ low + target_to_source[:3, 3]
    mask = ndimage.affine_transform(
        source.mask.astype(np.float32), linear, offset, output_shape=shape, order=1,
        mode="constant", cval=0.0,
    ) >= 0.5
    if not mask.any():
        raise SinganInsertError(
            "The placed tumor covers no target voxel: it is smaller than a target voxel after "
            "scaling. Use a larger scale or a bigger source tumor."
        )
    lows, highs = _mask_bounds(mask)
    lows, highs = lows + low, highs + low  # tight tumor bounds in target voxels
    inside_low = np.maximum(lows, 0)
    inside_high = np.minimum(highs, np.array(target_shape) - 1)
    # Along the normal of a 2D target (an axis of size 1) the plane cuts a section of the
    # tumor: neither the field of view nor the border margin applies there.
    spatial = np.array(target_shape) > 1
    outside = np.any(((lows < 0) | (highs >= np.array(target_shape))) & spatial)
    if outside and not clip_to_fov:
        raise _outside_error(lows, highs, target_shape, partly=True)
    if not clip_to_fov and spatial.any():
        near = np.minimum(lows, np.array(target_shape) - 1 - highs)[spatial].min()
        if near < border_margin:
            raise SinganInsertError(
                f"The placed tumor (target voxels {lows.tolist()} to {highs.tolist()}) is "
                f"{int(near)} voxel(s) from the border of the {target_shape} volume, closer than "
                f"border_margin={border_margin}. Move it inward, scale it down or lower "
                f"border_margin{_CLIP_ADVICE}."
            )
    # Crop to the tumor's bounds that lie inside the volume.
    keep = tuple(slice(int(a - low[i]), int(b - low[i] + 1))
                 for i, (a, b) in enumerate(zip(inside_low, inside_high)))
    mask = np.ascontiguousarray(mask[keep])
    if not mask.any():
        raise _outside_error(lows, highs, target_shape)
    start = inside_low
    offset = linear @ start + target_to_source[:3, 3]
    shift = np.round(offset)
    if np.allclose(linear, np.eye(3), atol=1e-9) and np.allclose(offset, shift, atol=1e-6):
        # Same grid up to a whole-voxel shift (e.g. a tumor re-inserted in place): copy the
        # voxels exactly instead of interpolating them (interpolation would add ~1e-7 noise).
        image = _shifted_copy(source.image, shift.astype(int), mask.shape)
    else:
        image = ndimage.affine_transform(
            source.image, linear, offset, output_shape=mask.shape, order=1, mode="nearest",
        ).astype(np.float32)
    return PastedTumor(
        image=image,
        mask=mask,
        start=tuple(int(v) for v in start),
        target_to_source=target_to_source,
    )


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _outside_error(low, high, target_shape, partly: bool = False) -> SinganInsertError:
    where = "partly outside" if partly else "outside"
    return SinganInsertError(
        f"The placed tumor (target voxels {np.asarray(low).tolist()} to "
        f"{np.asarray(high).tolist()}) is {where} the target's field of view "
        f"(shape {tuple(target_shape)}). Choose a location inside the volume, check the units "
        "('voxel' vs 'mm') and the affines" + (f"{_CLIP_ADVICE}." if partly else ".")
    )


def _shifted_copy(image: np.ndarray, start: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``image[start : start + shape]`` with out-of-range indices clamped (like mode='nearest')."""
    indices = [np.clip(np.arange(s, s + n), 0, dim - 1) for s, n, dim in zip(start, shape, image.shape)]
    return np.ascontiguousarray(image[np.ix_(*indices)], dtype=np.float32)


def _mask_bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive index bounds of the non-zero voxels of a 3D mask."""
    lows, highs = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        indices = np.flatnonzero(mask.any(axis=other))
        lows.append(indices[0])
        highs.append(indices[-1])
    return np.array(lows), np.array(highs)


def _as_3d(array: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(array)
    if values.ndim == 4 and 1 in (values.shape[0], values.shape[-1]):
        values = values[0] if values.shape[0] == 1 else values[..., 0]
    if values.ndim != 3:
        raise SinganInsertError(
            f"The {name} must be a 3D volume (optionally with one channel), got shape "
            f"{values.shape}."
        )
    return values


def _triple(value, name: str, kind: type) -> tuple:
    if isinstance(value, (int, float, bool, np.number, np.bool_)):
        items = (value,) * 3
    else:
        items = tuple(value)
    if len(items) != 3:
        raise SinganInsertError(f"{name} must have 3 values (one per axis), got {value!r}.")
    return tuple(kind(v) for v in items)
