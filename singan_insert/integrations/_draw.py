"""What the integrations share: the checks of their common arguments, and the random draws.

The values themselves come from :class:`~singan_insert.insertion.sampling.InsertionRanges` (one
meaning of :math:`\\lambda` and of every range, as in the TorchIO transforms and the batch); this
module adds what a transform needs on top: a location inside a placement region where the
placed tumor fits (:func:`draw_fitting`, used by the TorchIO, MONAI and nnU-Net integrations
alike), and the argument checks the TorchIO and MONAI transforms both make when built.

Every draw comes from the random source the caller passes: torch's global generator for the
TorchIO transforms, MONAI's ``self.R`` (seeded by ``set_random_state`` / ``set_determinism``)
or, inside nnU-Net's augmentation workers, numpy's global state (as nnU-Net's own transforms;
nnU-Net v2 does not seed its workers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

# Re-exported: the transforms take all their argument checks from this module.
from singan_insert.devices import check_device as check_device
from singan_insert.errors import SinganInsertError
from singan_insert.insertion.insert import InsertionParameters
from singan_insert.insertion.placement import Placement, SourceTumor, placed_bounds
from singan_insert.insertion.sampling import (
    InsertionRanges,
    SampledParameters,
    check_contrast_applies,
    check_integer,
)

#: Picks one of the candidate voxels given their weights (a 1D array), returning its index.
Pick = Callable[[np.ndarray], int]


# --------------------------------------------------------------------------------------------
# Argument checks shared by the TorchIO and MONAI transforms
# --------------------------------------------------------------------------------------------
def check_key(value: Any, name: str, optional: bool = False) -> str | None:
    """A non-empty string, e.g. a key or a modality (``None`` too when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        allowed = "a non-empty string or None" if optional else "a non-empty string"
        raise SinganInsertError(f"{name} must be {allowed}, got {value!r}.")
    return value


def check_placement(placement_key: Any, placement_values: Any,
                    label_key: str) -> tuple[str | None, tuple[int, ...] | None]:
    """``placement_key`` and ``placement_values`` (integers), checked together with ``label_key``."""
    if placement_key is not None and not isinstance(placement_key, str):
        raise SinganInsertError(f"placement_key must be an image key (str) or None, got {placement_key!r}.")
    if placement_values is not None:
        if isinstance(placement_values, (int, np.integer)):
            placement_values = (placement_values,)
        placement_values = tuple(check_integer(v, "placement_values") for v in placement_values)
        if not placement_values:
            raise SinganInsertError("placement_values must name at least one label value (or be None).")
    if placement_key is not None and placement_key == label_key and placement_values is None:
        # The map keeps all its values in the output: placing over "any non-zero" voxel would
        # write the tumor over other structures (a cochlea) and relabel them.
        raise SinganInsertError(
            f"placement_key={placement_key!r} is also the label map that receives the tumor "
            "(label_key), which keeps all its values in the output. Say which of its labels "
            "the tumor may go to with placement_values=(...), e.g. (1,) over the existing "
            "tumor; or store a placement region (a brain or CSF mask) under its own key, "
            "e.g. placement_key='region'.")
    return placement_key, placement_values


# --------------------------------------------------------------------------------------------
# Draws
# --------------------------------------------------------------------------------------------
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
    *,
    region_name: str | None = None,
) -> InsertionParameters:
    """Draw one insertion: pose and values from ``ranges``, a location inside ``region``.

    ``region`` is a boolean mask on the target grid where the tumor's centroid may go (each of
    its voxels where the tumor fits equally likely, see :func:`draw_fitting`); ``None`` keeps
    the tumor's physical position; ``region_name`` names it in errors. Fields of ``base`` that
    are not drawn are kept.
    """
    if region is None:
        drawn, location = ranges.sample(rng), None
    else:
        drawn, location = draw_fitting(
            lambda: ranges.sample(rng), lambda weights: rng.randint(weights.size), region, source,
            target_affine, target_shape, base.border_margin, max_attempts, region_name=region_name)
    placement = Placement(location=location, units="voxel", flips=drawn.flip,
                          rotation_degrees=drawn.rotation, scale=drawn.scale)
    return replace(base, placement=placement, contrast=drawn.contrast, start_scale=drawn.start_scale,
                   seed=drawn.seed)


def draw_fitting(
    sample: Callable[[], SampledParameters],
    pick: Pick,
    region: np.ndarray,
    source: SourceTumor,
    affine: np.ndarray,
    shape: Sequence[int],
    margin: int,
    max_attempts: int,
    *,
    centre: Sequence[float] | None = None,
    region_name: str | None = None,
) -> tuple[SampledParameters, tuple[float, float, float]]:
    """Draw the values (``sample()``) and a location where the placed tumor fits.

    The location is a voxel of ``region`` (weights >= 0 on the target grid) chosen by ``pick``
    among only those where the tumor, with the drawn flips, rotation and scale, stays
    ``margin`` voxels inside the volume (no margin across the plane of a 2D target); with
    ``centre``, that fixed location if the tumor fits there. When it fits nowhere with the drawn
    pose, everything is drawn again, ``max_attempts`` draws in all: this conditions the pose on
    fitting, which only matters for tumors that are large for the region.
    """
    shape = np.asarray([int(n) for n in shape])
    inside = shape > 1  # along a 2D target's normal the tumor is cut by the plane
    for _ in range(max_attempts):
        drawn = sample()
        bounds = _bounds_of(source, affine, drawn)
        if centre is not None:
            location = tuple(float(v) for v in centre)
            if _fits(*bounds(location), shape, margin, inside):
                return drawn, location
            continue
        location = _fitting_voxel(region, pick, bounds, shape, margin, inside)
        if location is not None:
            return drawn, location
    low, high = bounds((0.0, 0.0, 0.0))
    where = "the placement region" + ("" if region_name is None else f" {region_name!r}")
    where = f"in {where}" if centre is None else \
        f"at the centre {tuple(round(float(v), 1) for v in centre)} of {where}"
    raise SinganInsertError(
        f"The tumor ({tuple(int(n) for n in source.mask.shape)} voxel crop, placed extent "
        f"{tuple(int(v) for v in high - low + 1)} voxels at scale {drawn.scale[0]:.2f}) fits "
        f"nowhere {where} of the {tuple(int(n) for n in shape)} volume with border_margin={margin}: "
        f"no voxel of the region is far enough from the border, in {max_attempts} draw(s) of its "
        "pose. Use a larger placement region (or volume), smaller scales or smaller source "
        "tumors, or a smaller border_margin; max_attempts sets how many poses are drawn.")


def _bounds_of(source: SourceTumor, affine: np.ndarray, drawn: SampledParameters):
    def bounds(location):
        placement = Placement(location=location, units="voxel", flips=drawn.flip,
                              rotation_degrees=drawn.rotation, scale=drawn.scale)
        return placed_bounds(source, affine, placement)
    return bounds


def _fits(low, high, shape, margin, inside) -> bool:
    return bool(np.all((low >= margin) | ~inside) and np.all((high <= shape - 1 - margin) | ~inside))


def _fitting_voxel(region, pick, bounds, shape, margin, inside) -> tuple[float, float, float] | None:
    """A voxel of ``region`` chosen by ``pick`` among those where the tumor fits; ``None`` if none.

    The placed bounds move with the location by whole voxels, so one probe at the origin tells
    which voxels fit: a box. Each pick is checked once more (rounding at the box's faces), and
    a voxel that fails is dropped from the candidates before picking again.
    """
    low0, high0 = bounds((0.0, 0.0, 0.0))
    start = np.where(inside, np.maximum(margin - low0, 0), 0)
    stop = np.where(inside, np.minimum(shape - margin - high0, shape), shape)  # exclusive
    if np.any(stop <= start):
        return None
    # Only the box where the tumor fits is read (this runs per sample, in data-loader workers).
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    within = np.asarray(region)[box]
    candidates = np.flatnonzero(within > 0)
    weights = within.ravel()[candidates].astype(np.float64)
    while candidates.size:
        index = int(pick(weights))
        offset = np.unravel_index(candidates[index], within.shape)
        location = tuple(float(o + b.start) for o, b in zip(offset, box))
        if _fits(*bounds(location), shape, margin, inside):
            return location
        candidates, weights = np.delete(candidates, index), np.delete(weights, index)
    return None
