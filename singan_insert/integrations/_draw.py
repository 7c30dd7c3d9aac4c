"""Random insertion parameters for the MONAI and nnU-Net integrations.

# TODO(sampler): replace by singan_insert.insertion.sampling (the shared sampler) when it lands;
# until then this is the one place where these two integrations draw their parameters.

Every draw comes from the ``numpy.random.RandomState`` passed in: MONAI's ``self.R`` (seeded by
``set_random_state`` / ``set_determinism``) or, inside nnU-Net's augmentation workers, numpy's
global state (which batchgenerators seeds per worker, as for nnU-Net's own transforms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from singan_insert.errors import SinganInsertError
from singan_insert.insertion.insert import InsertionParameters
from singan_insert.insertion.placement import Placement, SourceTumor, placed_bounds


@dataclass(frozen=True)
class ParameterRanges:
    """Ranges the random transforms draw from (each draw is independent and uniform).

    Args:
        contrast: :math:`\\lambda \\sim U(a, b)`, ``0 < a <= b``; ``None``: the default of
            :class:`~singan_insert.insertion.insert.InsertionParameters`.
        start_scale: an integer drawn uniformly in ``[a, b]`` (both >= 0 or both < 0, counted
            from the finest); ``None``: the model's default.
        degrees: rotation about each world axis :math:`\\theta_i \\sim U(-d, d)`, ``d >= 0``.
        scale: one isotropic factor :math:`s \\sim U(1 - v, 1 + v)`, ``0 <= v < 1``.
        flip_axes: world axes (0 = x, 1 = y, 2 = z) flipped, each with ``flip_probability``.
        flip_probability: in [0, 1].
        max_attempts: location draws before giving up, >= 1 (only voxels where the tumor fits
            are drawn, so one normally suffices).
    """

    contrast: tuple[float, float] | None = None
    start_scale: tuple[int, int] | None = None
    degrees: float = 10.0
    scale: float = 0.1
    flip_axes: tuple[int, ...] = (0, 1, 2)
    flip_probability: float = 0.5
    max_attempts: int = 20

    def __post_init__(self) -> None:
        if self.contrast is not None:
            low, high = (float(v) for v in self.contrast)
            if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
                raise SinganInsertError(f"contrast must be (a, b) with 0 < a <= b, got {self.contrast!r}.")
            object.__setattr__(self, "contrast", (low, high))
        if self.start_scale is not None:
            low, high = (int(v) for v in self.start_scale)
            if low > high or (low < 0) != (high < 0):
                raise SinganInsertError(
                    f"start_scale range {self.start_scale!r} must satisfy a <= b with both >= 0 "
                    "or both < 0.")
            object.__setattr__(self, "start_scale", (low, high))
        if not (math.isfinite(self.degrees) and self.degrees >= 0):
            raise SinganInsertError(f"degrees must be >= 0, got {self.degrees!r}.")
        if not (0 <= self.scale < 1):
            raise SinganInsertError(f"scale must be in [0, 1), got {self.scale!r}.")
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise SinganInsertError(f"flip_axes must be among 0, 1, 2, got {self.flip_axes!r}.")
        if not (0 <= self.flip_probability <= 1):
            raise SinganInsertError(f"flip_probability must be in [0, 1], got {self.flip_probability!r}.")
        if int(self.max_attempts) < 1:
            raise SinganInsertError("max_attempts must be >= 1.")


def as_range(value, name: str) -> tuple[float, float] | None:
    """``None``, a number ``v`` (the fixed range ``(v, v)``) or a pair ``(a, b)``."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value, value)
    try:
        low, high = value
    except (TypeError, ValueError):
        raise SinganInsertError(f"{name} must be None, a number or (a, b), got {value!r}.") from None
    return (low, high)


def draw_parameters(
    rng: np.random.RandomState,
    source: SourceTumor,
    target_affine: np.ndarray,
    target_shape: Sequence[int],
    base: InsertionParameters,
    ranges: ParameterRanges,
    region: np.ndarray | None = None,
) -> InsertionParameters:
    """Draw one insertion: placement (inside ``region`` when given), contrast, start scale, seed.

    ``region`` is a boolean mask on the target grid where the tumor's centroid may go (each of
    its voxels equally likely); ``None`` keeps the tumor's physical position. Fields of ``base``
    that are not drawn are kept.
    """
    flips = tuple(bool(a in ranges.flip_axes and rng.random_sample() < ranges.flip_probability)
                  for a in range(3))
    rotation = tuple(float(rng.uniform(-ranges.degrees, ranges.degrees)) for _ in range(3))
    scale = (float(rng.uniform(1 - ranges.scale, 1 + ranges.scale)),) * 3
    location = None
    if region is not None:
        location = _draw_location(rng, region, source, target_affine, target_shape,
                                  flips, rotation, scale, base.border_margin, ranges.max_attempts)
    contrast = base.contrast if ranges.contrast is None else float(rng.uniform(*ranges.contrast))
    start_scale = base.start_scale if ranges.start_scale is None \
        else int(rng.randint(ranges.start_scale[0], ranges.start_scale[1] + 1))
    placement = Placement(location=location, units="voxel", flips=flips,
                          rotation_degrees=rotation, scale=scale)
    return replace(base, placement=placement, contrast=contrast, start_scale=start_scale,
                   seed=int(rng.randint(0, 2**31 - 1)))


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
