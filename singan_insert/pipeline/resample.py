"""Resampling onto the pipeline's working grid: images with anti-aliasing, label maps by one-hot.

The slice-wise GANs see 2D slices at a fixed pixel count, so the millimetres per pixel must
agree between the domains and the scans, or a network trained on one scale is applied to
another (crossMoDA's ceT1 and hrT2 differ in voxel size and field of view). Every input volume
is therefore resampled, along its own voxel axes (no reorientation), onto a
:class:`WorkingGrid`: voxel size :math:`(s_x, s_y, s_z)` mm, a fixed in-plane size centred on
the volume's centre, and the volume's own extent along the slice axis (axis 2).

Images are interpolated linearly after a Gaussian anti-aliasing blur of
:math:`\\sigma = \\max(0, (f - 1)/2)` source voxels when shrinking by :math:`f`; label maps
are resampled by linear interpolation of their one-hot maps and an argmax (nnU-Net's way),
which keeps outlines smooth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from singan_insert.errors import SinganInsertError
from singan_insert.insertion.placement import spacing_from_affine

__all__ = ["WorkingGrid", "resample_image", "resample_labels"]


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
    """The common voxel grid the pipeline's stages run on (see the module docstring).

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
