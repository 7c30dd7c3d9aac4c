"""The mapping of source-tumor intensities into a target modality.

The harmonizer's own normalisation is :mod:`singan_insert.harmonizer.normalization`.

The harmonizer works in a fixed range, :math:`[-1, 1]`. Any image is mapped into it by robust
percentile scaling,

.. math::

    \\hat x = \\operatorname{clip}\\left(2\\,\\frac{x - p_{lo}}{p_{hi} - p_{lo}} - 1,\\; -1,\\; 1\\right),

where :math:`p_{lo}, p_{hi}` are the image's ``(0.5, 99.5)`` percentiles by default, and back by
the inverse affine map. The model stores the percentiles it was trained with, so that a target
volume is normalised the same way.

A source tumor (modality A) is brought into the target's units before pasting in one of two
modes, then optionally contrast-scaled by a factor :math:`\\lambda` (as in the authors'
follow-up, GBA, with :math:`\\lambda \\in \\{0.5, 0.8, 1.5\\}`):

* ``"normalized"``: both images are percentile-normalised to :math:`[0, 1]` over their TISSUE
  (in a non-negative, magnitude image: the voxels above 5 % of its 99.5th percentile, so that
  air, whose signal is noise of a few percent of the brightest tissue, does not set the dark
  end) and
  the source's normalised value is placed at the same normalised value of the target
  (``v_t = p_lo^t + u (p_hi^t - p_lo^t)``). Values beyond :math:`[0, 1]` (an enhancing tumor
  above the source's 99.5th percentile) are not clipped flat but compressed by a soft knee,
  :math:`u \\mapsto 1 + k \\tanh((u - 1)/k)` above 1 and :math:`k\\, e^{u/k - 1}` below
  :math:`k` (:math:`k = 0.1`; both continuous with slope 1 where they meet the identity): the
  mapping stays strictly increasing and positive, so the tumor keeps its internal
  structure (ranks) for the harmonizer;
* ``"matched"``: histogram (quantile) matching of the source image to the target image,
  evaluated at the tumor's values;

and then :math:`u' = \\lambda u` in the target's normalised :math:`[0, 1]` units, i.e. the
tumor is dimmed (:math:`\\lambda < 1`) or brightened (:math:`\\lambda > 1`) relative to the
target's dark reference :math:`p_{lo}^t`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from singan_insert.checks import check_finite, check_real
from singan_insert.errors import SinganInsertError

IntensityMode = Literal["normalized", "matched"]


def map_tumor_intensities(
    source_image: np.ndarray,
    source_mask: np.ndarray,
    target_image: np.ndarray,
    mode: IntensityMode = "normalized",
    contrast: float = 1.0,
    percentiles: tuple[float, float] = (0.5, 99.5),
    tissue_only: bool = True,
) -> np.ndarray:
    """Bring a source image's intensities into the target's units (see the module docstring).

    Args:
        source_image: the source (modality A) image, any shape.
        source_mask: where the tumor is in ``source_image`` (used for matching statistics only).
        target_image: the target (modality B) image whose units are wanted.
        mode: ``"normalized"`` or ``"matched"``.
        contrast: the factor :math:`\\lambda > 0` applied in the target's normalised units.
        percentiles: robust range used by both modes.
        tissue_only: fit the percentiles over each image's tissue (see :func:`tissue_values`),
            not over air too; ``False`` gives the whole-image percentiles of earlier versions.

    Returns:
        ``source_image`` mapped to the target's units, same shape, ``float32``.
    """
    contrast = check_real(contrast, "contrast", 0, open_minimum=True)
    source = np.asarray(source_image, dtype=np.float64)
    target = np.asarray(target_image, dtype=np.float64)
    check_finite(source, "source image")
    check_finite(target, "target image")
    if not np.any(np.asarray(source_mask) > 0):
        raise SinganInsertError("The source tumor mask is empty: there is no tumor to insert.")
    t_low, t_high = robust_range(target, percentiles, tissue_only)
    if t_high <= t_low:
        raise SinganInsertError("The target image is constant; cannot map intensities into it.")
    unit = INTENSITY_MODES[check_intensity_mode(mode)](source, target, (t_low, t_high), percentiles, tissue_only)
    return (t_low + contrast * unit * (t_high - t_low)).astype(np.float32)


def _normalized_unit(source, target, target_range, percentiles, tissue_only) -> np.ndarray:
    s_low, s_high = robust_range(source, percentiles, tissue_only)
    if s_high <= s_low:
        raise SinganInsertError("The source image is constant; cannot normalise it.")
    return soft_knee((source - s_low) / (s_high - s_low))


def _matched_unit(source, target, target_range, percentiles, tissue_only) -> np.ndarray:
    t_low, t_high = target_range
    return (_quantile_match(source, target) - t_low) / (t_high - t_low)


#: The intensity mapping modes: name -> ``f(source, target, (t_lo, t_hi), percentiles,
#: tissue_only)`` giving the source in the target's normalised units :math:`u` (0 = the target's
#: dark reference, 1 = its bright one). Every caller (InsertionParameters, the transforms, the
#: CLI) validates against this table, so a new mode is one entry here.
INTENSITY_MODES = {"normalized": _normalized_unit, "matched": _matched_unit}


def check_intensity_mode(mode: object, name: str = "intensity_mode") -> str:
    """``mode`` when it names an entry of :data:`INTENSITY_MODES`, else a clear error."""
    if not isinstance(mode, str) or mode not in INTENSITY_MODES:
        raise SinganInsertError(f"{name} must be one of {sorted(INTENSITY_MODES)}, got {mode!r}.")
    return mode


KNEE = 0.1


def soft_knee(unit: np.ndarray, knee: float = KNEE) -> np.ndarray:
    """Identity on :math:`[k, 1]`; smooth, strictly increasing compression into ``(0, k)`` below and ``(1, 1 + k)`` above."""
    unit = np.asarray(unit, dtype=np.float64)
    above = 1 + knee * np.tanh((np.maximum(unit, 1) - 1) / knee)
    below = knee * np.exp(np.minimum(unit, knee) / knee - 1)
    return np.where(unit > 1, above, np.where(unit < knee, below, unit))


TISSUE_THRESHOLD = 0.05


def air_level(p995: float, minimum: float, threshold: float = TISSUE_THRESHOLD) -> float | None:
    """The level at or below which a magnitude image is air: ``threshold`` times its 99.5th
    percentile ``p995``; ``None`` for an image with negative values (``minimum < 0``: already
    standardised, CT), whose air cannot be told by intensity."""
    return None if minimum < 0 else threshold * p995


def tissue_values(values: np.ndarray, threshold: float = TISSUE_THRESHOLD) -> np.ndarray:
    """The values of a magnitude image above its :func:`air_level` (tissue, not air).

    Images with negative values (already standardised, CT) and images where that would leave
    fewer than 5 % of the values are returned whole: their air cannot be told this way.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    level = None if flat.size == 0 else air_level(float(np.percentile(flat, 99.5)), float(flat.min()), threshold)
    if level is None:
        return flat
    tissue = flat[flat > level]
    return tissue if tissue.size >= max(8, flat.size // 20) else flat


def robust_range(values: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5),
                 tissue_only: bool = True) -> tuple[float, float]:
    """The ``percentiles`` of ``values`` (of their tissue with ``tissue_only``)."""
    values = tissue_values(values) if tissue_only else np.asarray(values, dtype=np.float64)
    low, high = np.percentile(values, percentiles)
    return float(low), float(high)


def _quantile_match(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Histogram matching of ``source`` to ``reference`` (quantile to quantile)."""
    from skimage.exposure import match_histograms

    return match_histograms(source, reference)


