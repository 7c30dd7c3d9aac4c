"""Insertion baselines beside the SinGAN harmonizer, all in the target grid.

Every function takes the ``target`` image (modality B), the ``source`` image already resampled
onto the target grid by the paste geometry (modality A, the *whole* image, not only the tumor)
and the pasted tumor ``mask`` on that grid; 2D slices and 3D volumes alike. Voxels outside the
mask (for the blended baselines: outside the blend weight's support) are bit-identical to the
target (the output has the target's dtype when it is floating point, else float32).

* :func:`naive_paste`: the source's raw intensities inside the mask.
* :func:`intensity_matched_paste`: the source mapped into the target's units first
  (:func:`singan_insert.insertion.intensity.map_tumor_intensities`: percentile normalisation or histogram
  matching, then the contrast factor :math:`\\lambda`).
* :func:`poisson_blend`: gradient-domain (seamless) cloning (Pérez, Gangnet & Blake, 2003).
  Inside the mask :math:`\\Omega` it solves

  .. math::

      \\sum_{q \\in N(p)} w_{pq} (f_p - f_q) = \\sum_{q \\in N(p)} w_{pq}\\, v_{pq}, \\qquad
      f_q = t_q \\text{ for } q \\notin \\Omega,

  the discrete Poisson equation :math:`\\Delta f = \\operatorname{div} v` with Dirichlet values
  from the target, where the guidance :math:`v_{pq} = s_p - s_q` is the source's gradient (or,
  with ``mixed_gradients``, whichever of the source's and the target's is stronger),
  :math:`w_{pq} = 1/h^2` for the voxel size h along that axis, and neighbours outside the array
  are dropped (zero flux). It keeps the source's internal contrast but shifts its level to
  fit the target's border: a bright ceT1 tumor pasted into bright CSF stays bright.

  Solver: the system is sparse, symmetric positive definite, one row per tumor voxel. Per
  slice (the default) it is block-diagonal with 2D blocks, and a direct sparse LU
  (``scipy.sparse.linalg.spsolve``, SuperLU) is exact to round-off, deterministic, needs no
  tolerance or iteration count, and is fast: 0.4 s for a 4.6 cm³ tumor (28,600 voxels, all its
  slices at once) on the 2-core development machine. Coupled in 3D (``slice_axis=None``) the
  LU fills in badly (8 s for the same tumor), so 3D problems use Jacobi-preconditioned
  conjugate gradients to a relative residual of 1e-10 (2.6 s; the two solutions agreed to 1e-6).

Blended baselines use the harmonizer's own blend weight :math:`w`
(:func:`singan_insert.harmonizer.model.blend_weight`, per slice along ``axis``: 1 on the mask
and within ``dilation_mm`` of it, a smoothstep to 0 over ``feather_mm``), so they differ from
the harmonized result only in what is blended in:

* :func:`weighted_blend`: :math:`(1 - w)\\, t + w\\, g` for any image g on the target grid;
* :func:`blurred_paste`: g is the paste (the source inside the mask, e.g. the mapped paste)
  smoothed within each slice by a Gaussian of sd ``sigma_px`` voxels: the "does the harmonizer
  beat a blur?" baseline;
* :func:`oracle_paste`: g is the true image with the tumor (the simulator's rendering of
  modality B with that very tumor), so the blend region, the tumor AND the 1-3 mm of B around
  it, is exactly right: an upper bound no insertion can beat on its own blend weight.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypedDict

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import LinearOperator, cg, spsolve

from singan_insert.errors import SinganInsertError
from singan_insert.insertion.intensity import IntensityMode, map_tumor_intensities
from singan_insert.checks import check_finite, check_spacing

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

__all__ = [
    "BlendWeight",
    "blurred_paste",
    "intensity_matched_paste",
    "naive_paste",
    "oracle_paste",
    "poisson_blend",
    "slice_blend_weight",
    "weighted_blend",
]


def naive_paste(target: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The target with the source's raw intensities inside ``mask`` (non-zero = tumor)."""
    target, source, mask = _check_inputs(target, source, mask)
    output = target.astype(_output_dtype(target), copy=True)
    output[mask] = source[mask]
    return output


def intensity_matched_paste(
    target: np.ndarray,
    source: np.ndarray,
    mask: np.ndarray,
    *,
    source_mask: np.ndarray | None = None,
    mode: IntensityMode = "normalized",
    contrast: float = 1.0,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> np.ndarray:
    """Naive paste of the source after mapping its intensities into the target's units.

    Args:
        target, source, mask: as in :func:`naive_paste`; ``source`` must be the whole source
            image on the target grid, since its percentiles define the mapping.
        source_mask: the tumor in ``source`` (default ``mask``); only checked to be non-empty.
        mode: ``"normalized"`` (percentile-range to percentile-range) or ``"matched"``
            (histogram matching of the source to the target).
        contrast: the factor :math:`\\lambda > 0` (< 1 dims the tumor, as in the authors' GBA).
        percentiles: robust range used by the mapping.
    """
    target, source, mask = _check_inputs(target, source, mask)
    mapped = map_tumor_intensities(
        source,
        mask if source_mask is None else source_mask,
        target,
        mode=mode,
        contrast=contrast,
        percentiles=percentiles,
    )
    return naive_paste(target, mapped, mask)


class BlendWeight(TypedDict, total=False):
    """The keyword arguments (``**blend``) of the blended baselines: what defines w besides the mask.

    Those of :func:`slice_blend_weight`, each optional, with the default given there.
    """

    axis: int
    spacing: Sequence[float] | None
    dilation_mm: float | None
    feather_mm: float | None


def slice_blend_weight(
    mask: np.ndarray,
    *,
    axis: int = 2,
    spacing: Sequence[float] | None = None,
    dilation_mm: float | None = None,
    feather_mm: float | None = None,
) -> np.ndarray:
    """The harmonizer's blend weight of ``mask``, slice by slice along ``axis`` (float32, [0, 1]).

    Args:
        mask: the tumor (non-zero = tumor), 2D or 3D; a 2D mask is one slice (``axis`` ignored).
        axis: for 3D masks, the axis the slices are cut along (0, 1 or 2).
        spacing: voxel size per axis in mm (default 1); only the in-plane ones are used.
        dilation_mm, feather_mm: as in :meth:`singan_insert.harmonizer.model.Harmonizer.harmonize`
            (>= 0); ``None`` takes its defaults, the insertion's too.
    """
    from singan_insert.harmonizer.model import Harmonizer, blend_weight

    mask = np.asarray(mask).astype(np.float32)
    if mask.ndim not in (2, 3):
        raise SinganInsertError(f"Expected a 2D slice or a 3D volume mask, got shape {mask.shape}.")
    defaults = inspect.signature(Harmonizer.harmonize).parameters
    dilation_mm = defaults["dilation_mm"].default if dilation_mm is None else float(dilation_mm)
    feather_mm = defaults["feather_mm"].default if feather_mm is None else float(feather_mm)
    if not (dilation_mm >= 0 and feather_mm >= 0):
        raise SinganInsertError(f"dilation_mm and feather_mm must be >= 0, got {dilation_mm}, {feather_mm}.")
    spacing = (1.0,) * mask.ndim if spacing is None else check_spacing(spacing, mask.ndim)
    if mask.ndim == 2:
        return blend_weight(mask[None], spacing, dilation_mm, feather_mm)[0]
    if axis not in (0, 1, 2):
        raise SinganInsertError(f"axis must be 0, 1 or 2 for a 3D mask, got {axis!r}.")
    plane = tuple(s for a, s in enumerate(spacing) if a != axis)
    slices = np.moveaxis(mask, axis, 0)
    return np.moveaxis(blend_weight(slices, plane, dilation_mm, feather_mm), 0, axis)


def weighted_blend(target: np.ndarray, image: np.ndarray, mask: np.ndarray,
                   **blend: Unpack[BlendWeight]) -> np.ndarray:
    """:math:`(1 - w)\\, t + w\\, g` with the harmonizer's blend weight (:func:`slice_blend_weight`).

    Args:
        target: the background t (modality B).
        image: what is blended in, g, on the same grid.
        mask: the tumor.
        **blend: ``axis``, ``spacing``, ``dilation_mm``, ``feather_mm``: define w as in
            :func:`slice_blend_weight` (:class:`BlendWeight`).
    """
    target, image, mask = _check_inputs(target, image, mask)
    weight = slice_blend_weight(mask, **blend)
    output = target.astype(_output_dtype(target), copy=True)
    region = weight > 0  # beyond the weight's support the target is kept bit for bit
    w = weight[region].astype(np.float64)
    output[region] = ((1 - w) * target[region] + w * image[region]).astype(output.dtype)
    return output


def blurred_paste(target: np.ndarray, source: np.ndarray, mask: np.ndarray, sigma_px: float,
                  **blend: Unpack[BlendWeight]) -> np.ndarray:
    """The paste of ``source`` inside ``mask``, blurred within slices, blended like the harmonizer.

    :math:`(1 - w)\\, t + w\\, G_\\sigma * p` where p is :func:`naive_paste` of ``source`` (pass
    the intensity-mapped source, or the composite itself, for the "blurred mapped paste") and
    :math:`G_\\sigma` a Gaussian of sd ``sigma_px`` voxels along the two in-plane axes (none
    across slices, as the harmonizer works slice by slice).

    Args:
        target, source, mask: as in :func:`naive_paste`.
        sigma_px: blur sd in voxels (>= 0; 0 is the paste blended with w).
        **blend: ``axis``, ``spacing``, ``dilation_mm``, ``feather_mm``: as in
            :func:`slice_blend_weight`; the blur is within the slices of ``axis``.
    """
    if not (np.isfinite(sigma_px) and sigma_px >= 0):
        raise SinganInsertError(f"sigma_px must be >= 0 (voxels), got {sigma_px}.")
    pasted = naive_paste(target, source, mask).astype(np.float64)
    sigma = [float(sigma_px)] * pasted.ndim
    if pasted.ndim == 3:
        sigma[blend.get("axis", inspect.signature(slice_blend_weight).parameters["axis"].default)] = 0.0
    blurred = ndimage.gaussian_filter(pasted, sigma) if sigma_px > 0 else pasted
    return weighted_blend(target, blurred, mask, **blend)


def oracle_paste(target: np.ndarray, truth: np.ndarray, mask: np.ndarray,
                 **blend: Unpack[BlendWeight]) -> np.ndarray:
    """The true image with the tumor, blended into ``target`` with the harmonizer's weight.

    Args:
        target: the image the tumor is inserted into (e.g. a washed-out or translated B).
        truth: the true modality-B image with this tumor at ``mask`` (e.g.
            ``SimulatedSubject.render_b(mask)``), on the same grid.
        mask, **blend: as in :func:`weighted_blend`.
    """
    return weighted_blend(target, truth, mask, **blend)


def poisson_blend(
    target: np.ndarray,
    source: np.ndarray,
    mask: np.ndarray,
    *,
    slice_axis: int | None = 2,
    spacing: Sequence[float] | None = None,
    mixed_gradients: bool = False,
) -> np.ndarray:
    """Gradient-domain blending of the source into the target inside ``mask`` (see the module).

    Args:
        target, source, mask: as in :func:`naive_paste`. Every connected part of the mask must
            touch at least one target voxel (in the blended plane) to anchor the solution.
        slice_axis: for 3D input, the axis slices are stacked along: each slice is blended on
            its own (default 2, the k axis of a NIfTI volume). ``None`` solves one 3D problem.
            Ignored for 2D input.
        spacing: voxel size per axis (weights :math:`1/h^2`); default isotropic.
        mixed_gradients: use the stronger of the source's and the target's gradient as the
            guidance (keeps target structures that cross the tumor).
    """
    target, source, mask = _check_inputs(target, source, mask)
    output = target.astype(_output_dtype(target), copy=True)
    if not mask.any():
        return output
    ndim = mask.ndim
    spacing = (1.0,) * ndim if spacing is None else check_spacing(spacing, ndim)
    if ndim == 3 and slice_axis is not None:
        if slice_axis not in (0, 1, 2, -1, -2, -3):
            raise SinganInsertError(f"slice_axis must be 0, 1, 2 or None for a 3D volume, got {slice_axis}.")
        coupled = [axis for axis in range(3) if axis != slice_axis % 3]
    else:
        coupled = list(range(ndim))
    _check_anchored(mask, coupled)

    t = target.astype(np.float64)
    s = source.astype(np.float64)
    unknown = np.full(mask.shape, -1, np.int64)
    count = int(mask.sum())
    unknown[mask] = np.arange(count)
    coordinates = np.nonzero(mask)
    diagonal = np.zeros(count)
    rhs = np.zeros(count)
    rows, columns, values = [], [], []
    for axis in coupled:
        weight = 1.0 / spacing[axis] ** 2
        for step in (-1, 1):
            neighbour = list(coordinates)
            neighbour[axis] = coordinates[axis] + step
            valid = (neighbour[axis] >= 0) & (neighbour[axis] < mask.shape[axis])
            p = np.nonzero(valid)[0]
            here = tuple(c[valid] for c in coordinates)
            there = tuple(c[valid] for c in neighbour)
            guidance = s[here] - s[there]
            if mixed_gradients:
                target_gradient = t[here] - t[there]
                guidance = np.where(np.abs(target_gradient) > np.abs(guidance), target_gradient, guidance)
            diagonal[p] += weight
            rhs[p] += weight * guidance
            inside = mask[there]
            rows.append(p[inside])
            columns.append(unknown[there][inside])
            values.append(np.full(int(inside.sum()), -weight))
            rhs[p[~inside]] += weight * t[there][~inside]  # Dirichlet values from the target
    diagonal_index = np.arange(count)
    system = sparse.csc_matrix(
        (
            np.concatenate([diagonal, *values]),
            (np.concatenate([diagonal_index, *rows]), np.concatenate([diagonal_index, *columns])),
        ),
        shape=(count, count),
    )
    if len(coupled) < 3:
        solution = spsolve(system, rhs)
    else:
        solution = _conjugate_gradients(system, rhs, diagonal)
    output[mask] = solution.astype(output.dtype)
    return output


def _conjugate_gradients(system, rhs: np.ndarray, diagonal: np.ndarray) -> np.ndarray:
    """Jacobi-preconditioned CG for 3D systems, where a direct LU fills in badly."""
    preconditioner = LinearOperator(system.shape, matvec=lambda v: v / diagonal, dtype=np.float64)
    solution, info = cg(system, rhs, rtol=1e-10, atol=0.0, maxiter=20 * system.shape[0], M=preconditioner)
    if info != 0:  # cannot happen for this SPD system; say so rather than return a wrong image
        raise SinganInsertError(f"Poisson blending did not converge ({info}); blend per slice instead.")
    return solution


def _check_inputs(target, source, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    target = np.asarray(target)
    source = np.asarray(source)
    mask = np.asarray(mask)
    if target.ndim not in (2, 3):
        raise SinganInsertError(f"Expected a 2D slice or a 3D volume, got an array of shape {target.shape}.")
    if not (target.shape == source.shape == mask.shape):
        raise SinganInsertError(
            f"target {target.shape}, source {source.shape} and mask {mask.shape} must share the target grid; "
            "resample the source and its mask onto the target first (paste geometry)."
        )
    check_finite(target, "target image")
    check_finite(source, "source image")
    return target, source, mask.astype(bool)


def _output_dtype(target: np.ndarray) -> np.dtype:
    return target.dtype if np.issubdtype(target.dtype, np.floating) else np.dtype(np.float32)


def _check_anchored(mask: np.ndarray, coupled: list[int]) -> None:
    """Every connected part of the mask (along the coupled axes) must touch a target voxel."""
    structure = np.zeros((3,) * mask.ndim, bool)
    center = (1,) * mask.ndim
    structure[center] = True
    for axis in coupled:
        for offset in (0, 2):
            index = list(center)
            index[axis] = offset
            structure[tuple(index)] = True
    labels, count = ndimage.label(mask, structure)
    anchored = np.unique(labels[ndimage.binary_dilation(~mask, structure) & mask])
    if np.setdiff1d(np.arange(1, count + 1), anchored).size:
        raise SinganInsertError(
            "Part of the mask has no target voxel next to it in the blended plane (it fills a whole "
            "slice), so Poisson blending has no boundary values there; crop less tightly or blend in 3D "
            "(slice_axis=None)."
        )
