"""Random insertion parameters for the MONAI and nnU-Net integrations, drawn by the shared sampler.

The values themselves come from :class:`~singan_insert.insertion.sampling.InsertionRanges` (one
meaning of :math:`\\lambda` and of every range, as in the TorchIO transforms and the batch); this
module adds what a patch-level transform needs on top: a location inside a placement region
where the placed tumor fits.

Every draw comes from the ``numpy.random.RandomState`` passed in: MONAI's ``self.R`` (seeded by
``set_random_state`` / ``set_determinism``) or, inside nnU-Net's augmentation workers, numpy's
global state (which batchgenerators seeds per worker, as for nnU-Net's own transforms).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from singan_insert.errors import SinganInsertError
from singan_insert.insertion.insert import InsertionParameters
from singan_insert.insertion.placement import Placement, SourceTumor, placed_bounds
from singan_insert.insertion.sampling import InsertionRanges, check_contrast_applies


def patch_ranges(base: InsertionParameters, contrast: Any = None, start_scale: Any = None,
                 degrees: Any = 10.0, scale: Any = 0.1, flip_axes: Sequence[int] = (0, 1, 2),
                 flip_probability: float = 0.5) -> InsertionRanges:
    """The sampler of a random patch-level insertion (``None``: keep ``base``'s value).

    ``contrast`` and ``start_scale`` take every spelling of
    :func:`~singan_insert.insertion.sampling.parse_contrast` (a number, ``(a, b)`` for a range, a
    ``set``); ``degrees`` :math:`d` gives :math:`\\theta_i \\sim U(-d, d)`; ``scale`` :math:`v`
    one isotropic factor :math:`s \\sim U(1 - v, 1 + v)`.
    """
    contrast = base.contrast if contrast is None else contrast
    check_contrast_applies(contrast, base.appearance)
    return InsertionRanges(
        contrast=contrast,
        start_scale=base.start_scale if start_scale is None else start_scale,
        flip_axes=flip_axes, flip_probability=flip_probability,
        degrees=degrees, scales=scale, isotropic=True)


def draw_parameters(
    rng: np.random.RandomState,
    source: SourceTumor,
    target_affine: np.ndarray,
    target_shape: Sequence[int],
    base: InsertionParameters,
    ranges: InsertionRanges,
    region: np.ndarray | None = None,
    max_attempts: int = 20,
) -> InsertionParameters:
    """Draw one insertion: pose and values from ``ranges``, a location inside ``region``.

    ``region`` is a boolean mask on the target grid where the tumor's centroid may go (each of
    its voxels equally likely); ``None`` keeps the tumor's physical position. Fields of ``base``
    that are not drawn are kept.
    """
    drawn = ranges.sample(rng)
    location = None
    if region is not None:
        location = _draw_location(rng, region, source, target_affine, target_shape,
                                  drawn.flip, drawn.rotation, drawn.scale, base.border_margin, max_attempts)
    placement = Placement(location=location, units="voxel", flips=drawn.flip,
                          rotation_degrees=drawn.rotation, scale=drawn.scale)
    return replace(base, placement=placement, contrast=drawn.contrast, start_scale=drawn.start_scale,
                   seed=drawn.seed)


def _draw_location(rng, region, source, affine, shape, flips, rotation, scale, margin, attempts):
    """A voxel of ``region`` where the placed tumor fits ``margin`` voxels inside the volume.

    The placed bounds move with the location by whole voxels, so one probe at the origin tells
    which voxels of the region fit; the draw is uniform among those (and checked once more).
    """
    def bounds(location):
        placement = Placement(location=location, units="voxel", flips=flips,
                              rotation_degrees=rotation, scale=scale)
        return placed_bounds(source, affine, placement)

    shape = np.asarray(shape)
    low0, high0 = bounds((0.0, 0.0, 0.0))
    fits = np.zeros(region.shape, dtype=bool)
    start = np.maximum(margin - low0, 0)
    stop = np.minimum(shape - margin - high0, shape)  # exclusive: L + high0 <= shape - 1 - margin
    if np.all(stop > start):
        fits[tuple(slice(int(a), int(b)) for a, b in zip(start, stop))] = True
    candidates = np.flatnonzero(np.asarray(region, dtype=bool) & fits)
    for _ in range(attempts if candidates.size else 0):
        location = tuple(float(v) for v in np.unravel_index(candidates[rng.randint(candidates.size)], region.shape))
        low, high = bounds(location)
        if np.all(low >= margin) and np.all(high <= shape - 1 - margin):
            return location
    raise SinganInsertError(
        f"The tumor ({source.mask.shape} crop, scale {scale[0]:.2f}, placed extent "
        f"{tuple(int(v) for v in high0 - low0 + 1)} voxels) fits nowhere in the placement region "
        f"of the {tuple(int(s) for s in shape)} volume with border_margin={margin}. Use a larger "
        "placement region or volume, smaller scales or a smaller border_margin.")
