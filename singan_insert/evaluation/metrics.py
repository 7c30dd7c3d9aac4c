"""Segmentation scores and harmonization fidelity, and the paper's Table-1 report.

Segmentation (crossMoDA's scores)
    * Dice :math:`2|P \\cap T| / (|P| + |T|)`.
    * Surface distances: the surface of a mask is its voxels with a 6-connected (3D; 4 in 2D)
      background neighbour, or on the array border; distances are Euclidean in mm between
      voxel centres, honouring anisotropic ``spacing`` (``scipy.ndimage.distance_transform_edt``).
      With :math:`d(p, T)` the distance from a surface voxel of P to T's surface,

      .. math::

          \\text{ASSD} = \\tfrac12\\big(\\operatorname{mean}_{p \\in \\partial P} d(p, T)
          + \\operatorname{mean}_{t \\in \\partial T} d(t, P)\\big), \\qquad
          \\text{HD95} = \\operatorname{percentile}_{95}\\big(\\{d(p, T)\\} \\cup \\{d(t, P)\\}\\big),

      the definitions of ``medpy.metric`` that crossMoDA's evaluation code calls.
    * Empty masks: both empty gives Dice 1 and distances 0 (perfect agreement; medpy would
      give Dice 0); exactly one empty gives Dice 0 and distances of ``empty_distance_mm``,
      350 mm by default, which is what crossMoDA assigns to an empty prediction.

Harmonization fidelity (a harmonized image against the true image, inside a tumor mask M and a
shell S of voxels outside M within ``shell_mm`` of it; intensities divided by the truth's robust
range :math:`r = p_{99.5} - p_{0.5}`)
    * normalised MAE :math:`\\operatorname{mean}_R |x - y| / r` for R = M and R = S;
    * Wasserstein-1 distance between the intensity distributions of x and y over R, divided by r
      (``scipy.stats.wasserstein_distance``; insensitive to where texture sits);
    * contrast ratio :math:`C(x) / C(y)` with :math:`C = \\operatorname{mean}_M - \\operatorname{mean}_S`:
      1 is the true tumor-to-surround contrast, 0 a vanished tumor, negative an inverted one
      (NaN when the truth itself has :math:`|C(y)| < 0.02\\, r`);
    * seam ratio: mean gradient magnitude (mm⁻¹, all axes) on the mask border (voxels on either
      side of it) of x over that of y: > 1 a visible seam, < 1 edges softer than the truth's
      (so "within [0.9, 1.1] of the truth's seam" is this ratio in [0.9, 1.1]);
    * low-pass tumor error :math:`\\operatorname{mean}_M |G_\\sigma * x - G_\\sigma * y| / r`, both
      images smoothed by the same Gaussian (``sigma_px``, 1.5 voxels by default) before the
      masked MAE: a texture of the right statistics but another phase is not penalised, a wrong
      level, a wrong shape or a missing structure larger than ~σ is;
    * contrast :math:`C(x) / r` and the truth's :math:`C(y) / r` themselves (the ratio above is
      their quotient);
    * high-pass energy ratio :math:`E(x) / E(y)` with
      :math:`E(z) = \\operatorname{mean}_{M^\\circ} (z - G_\\sigma * z)^2` over the tumor's
      interior :math:`M^\\circ` (mask voxels farther than :math:`2\\sigma` voxels from the outside,
      along the smoothed axes), so that the tumor's own edge does not count as texture:
      1 the truth's texture energy, < 1 smoother, > 1 noisier (NaN when the interior is
      empty or the truth has no texture).

Between two noise seeds (:func:`seed_difference`, same input, outputs :math:`x_0, x_1`)
    * texture difference :math:`\\operatorname{mean}_M |x_0 - x_1| / \\tau` with
      :math:`\\tau = \\sqrt{E(y)}`, the truth's local texture sd: 0 for identical outputs, about
      :math:`2/\\sqrt\\pi \\approx 1.13` for two independent textures of the truth's strength;
    * mean-level difference :math:`|\\operatorname{mean}_M x_0 - \\operatorname{mean}_M x_1| / r`.

Paired comparisons (:func:`paired_bootstrap_ci`): the mean of per-case differences
:math:`d_i = a_i - b_i` with a percentile bootstrap confidence interval (cases resampled with
replacement, seeded, so the interval is reproducible).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TextIO

import numpy as np
from scipy import ndimage
from scipy.stats import wasserstein_distance

from singan_insert.errors import SinganInsertError
from singan_insert.checks import check_finite, check_spacing

__all__ = [
    "EMPTY_DISTANCE_MM",
    "Fidelity",
    "assd",
    "dice",
    "harmonization_fidelity",
    "hd95",
    "paired_bootstrap_ci",
    "seed_difference",
    "segmentation_scores",
    "summarize",
    "surface_distances",
    "table1_report",
]

EMPTY_DISTANCE_MM = 350.0
_METRIC_TITLES = {"dice": "DSC", "assd": "ASSD (mm)", "hd95": "HD95 (mm)"}


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two binary masks (non-zero = inside); 1.0 when both are empty."""
    prediction, truth = _binary_pair(prediction, truth)
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def surface_distances(
    prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``prediction`` to ``truth``'s surface, and back.

    Both masks must be non-empty. ``spacing`` is the voxel size per axis (default 1).
    """
    prediction, truth = _binary_pair(prediction, truth)
    if not prediction.any() or not truth.any():
        raise SinganInsertError(
            "Surface distances need two non-empty masks; use assd/hd95 for the empty-mask convention."
        )
    spacing = _spacing(spacing, prediction.ndim)
    prediction_surface = _surface(prediction)
    truth_surface = _surface(truth)
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=spacing)[prediction_surface]
    to_prediction = ndimage.distance_transform_edt(~prediction_surface, sampling=spacing)[truth_surface]
    return to_truth, to_prediction


def assd(
    prediction: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
    empty_distance_mm: float = EMPTY_DISTANCE_MM,
) -> float:
    """Average symmetric surface distance in mm (see the module docstring for empty masks)."""
    return _surface_score(prediction, truth, spacing, empty_distance_mm,
                          lambda to_truth, to_prediction: (to_truth.mean() + to_prediction.mean()) / 2)


def hd95(
    prediction: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
    empty_distance_mm: float = EMPTY_DISTANCE_MM,
) -> float:
    """95th percentile of the pooled symmetric surface distances in mm."""
    return _surface_score(prediction, truth, spacing, empty_distance_mm,
                          lambda to_truth, to_prediction: np.percentile(np.concatenate([to_truth, to_prediction]), 95))


def segmentation_scores(
    prediction: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
    label: int | None = None,
    empty_distance_mm: float = EMPTY_DISTANCE_MM,
) -> dict[str, float]:
    """``{"dice", "assd", "hd95"}`` of one structure; ``label`` selects it from label maps."""
    if label is not None:
        prediction = np.asarray(prediction) == label
        truth = np.asarray(truth) == label
    return {
        "dice": dice(prediction, truth),
        "assd": assd(prediction, truth, spacing, empty_distance_mm),
        "hd95": hd95(prediction, truth, spacing, empty_distance_mm),
    }


@dataclass(frozen=True)
class Fidelity:
    """How closely a harmonized tumor matches the truth (see the module docstring)."""

    nmae_tumor: float
    nmae_shell: float
    wasserstein_tumor: float
    wasserstein_shell: float
    contrast_ratio: float
    seam_ratio: float
    lowpass_nmae_tumor: float
    contrast: float
    truth_contrast: float
    highpass_ratio: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def harmonization_fidelity(
    result: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float] | None = None,
    shell_mm: float = 2.0,
    value_range: float | None = None,
    sigma_px: float | Sequence[float] = 1.5,
) -> Fidelity:
    """Compare a harmonized (or pasted) image with the true image around a tumor.

    Args:
        result: the image under test, 2D or 3D.
        truth: the true image with the tumor (e.g. ``SimulatedSubject.render_b(mask)``).
        mask: where the tumor is (non-zero = tumor), same shape.
        spacing: voxel size per axis in mm (default 1), for the shell and the gradients.
        shell_mm: width of the surrounding shell in mm (> 0); it must hold at least one voxel.
        value_range: intensity unit for normalisation (> 0); default the truth's
            :math:`p_{99.5} - p_{0.5}` over the whole array.
        sigma_px: sd in voxels of the Gaussian of the low-pass error and the high-pass energy,
            one number for every axis or one per axis (>= 0, at least one > 0; 0 leaves an
            axis unsmoothed, e.g. ``(1.5, 1.5, 0)`` for texture within slices only).
    """
    result = np.asarray(result, np.float64)
    truth = np.asarray(truth, np.float64)
    mask = np.asarray(mask).astype(bool)
    if not (result.shape == truth.shape == mask.shape):
        raise SinganInsertError(
            "result, truth and mask must have the same shape, got "
            f"{result.shape}, {truth.shape}, {mask.shape}."
        )
    check_finite(result, "result image")
    check_finite(truth, "truth image")
    if not mask.any():
        raise SinganInsertError("The tumor mask is empty: there is no tumor to measure.")
    if not shell_mm > 0:
        raise SinganInsertError(f"shell_mm must be positive, got {shell_mm}.")
    spacing = _spacing(spacing, mask.ndim)
    sigma = _sigma(sigma_px, mask.ndim)
    value_range = _value_range(truth, value_range)

    distance_outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    shell = (distance_outside > 0) & (distance_outside <= shell_mm)
    if not shell.any():
        raise SinganInsertError(
            f"The {shell_mm} mm shell around the mask holds no voxel (the mask fills the image or the "
            "voxels are larger than the shell); pass a larger shell_mm or a larger image."
        )

    def nmae(region):
        return float(np.abs(result[region] - truth[region]).mean() / value_range)

    def wasserstein(region):
        return float(wasserstein_distance(result[region], truth[region]) / value_range)

    truth_contrast = truth[mask].mean() - truth[shell].mean()
    result_contrast = result[mask].mean() - result[shell].mean()
    has_contrast = abs(truth_contrast) >= 0.02 * value_range
    contrast_ratio = float(result_contrast / truth_contrast) if has_contrast else math.nan

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    border = ndimage.binary_dilation(mask, structure) & ~ndimage.binary_erosion(mask, structure)
    truth_edges = _gradient_magnitude(truth, spacing)[border].mean()
    result_edges = _gradient_magnitude(result, spacing)[border].mean()
    seam_ratio = float(result_edges / truth_edges) if truth_edges > 0 else math.nan

    lowpass_error = np.abs(ndimage.gaussian_filter(result, sigma) - ndimage.gaussian_filter(truth, sigma))
    interior = _interior(mask, sigma)
    truth_energy = _highpass_energy(truth, sigma, interior)
    result_energy = _highpass_energy(result, sigma, interior)
    highpass_ratio = result_energy / truth_energy if truth_energy > 0 else math.nan

    return Fidelity(
        nmae_tumor=nmae(mask),
        nmae_shell=nmae(shell),
        wasserstein_tumor=wasserstein(mask),
        wasserstein_shell=wasserstein(shell),
        contrast_ratio=contrast_ratio,
        seam_ratio=seam_ratio,
        lowpass_nmae_tumor=float(lowpass_error[mask].mean() / value_range),
        contrast=float(result_contrast / value_range),
        truth_contrast=float(truth_contrast / value_range),
        highpass_ratio=float(highpass_ratio),
    )


def seed_difference(
    result_seed0: np.ndarray,
    result_seed1: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    *,
    value_range: float | None = None,
    sigma_px: float | Sequence[float] = 1.5,
) -> dict[str, float]:
    """How much two noise seeds change a result inside the tumor (see the module docstring).

    Args:
        result_seed0, result_seed1: the same insertion run with two noise seeds, same shape.
        truth: the true image, whose local texture sd :math:`\\tau` is the unit of the texture
            difference (and whose robust range the unit of the mean-level difference).
        mask: the tumor (non-zero = tumor).
        value_range, sigma_px: as in :func:`harmonization_fidelity`.

    Returns:
        ``{"texture_difference": mean_M |x0 - x1| / tau, "mean_level_difference":
        |mean_M x0 - mean_M x1| / r}``; the first is NaN when the tumor has no interior or the
        truth no texture there.
    """
    first = np.asarray(result_seed0, np.float64)
    second = np.asarray(result_seed1, np.float64)
    truth = np.asarray(truth, np.float64)
    mask = np.asarray(mask).astype(bool)
    if not (first.shape == second.shape == truth.shape == mask.shape):
        raise SinganInsertError(
            "Both results, the truth and the mask must have the same shape, got "
            f"{first.shape}, {second.shape}, {truth.shape}, {mask.shape}."
        )
    for image, name in ((first, "first result"), (second, "second result"), (truth, "truth image")):
        check_finite(image, name)
    if not mask.any():
        raise SinganInsertError("The tumor mask is empty: there is no tumor to measure.")
    sigma = _sigma(sigma_px, mask.ndim)
    value_range = _value_range(truth, value_range)
    texture_sd = math.sqrt(_highpass_energy(truth, sigma, _interior(mask, sigma)))
    difference = float(np.abs(first[mask] - second[mask]).mean())
    return {
        "texture_difference": difference / texture_sd if texture_sd > 0 else math.nan,
        "mean_level_difference": float(abs(first[mask].mean() - second[mask].mean()) / value_range),
    }


def paired_bootstrap_ci(
    a: Sequence[float],
    b: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 10000,
    seed: int = 0,
) -> dict[str, float | int]:
    """Mean paired difference ``a - b`` with a percentile bootstrap confidence interval.

    Cases are resampled with replacement ``resamples`` times (numpy's ``default_rng(seed)``);
    the interval is the :math:`(1 \\pm c)/2` quantiles of the resampled means.

    Args:
        a, b: per-case scores of two methods on the SAME cases, in the same order.
        confidence: coverage :math:`c` in (0, 1).
        resamples: bootstrap resamples (>= 100).
        seed: seed of the resampling.

    Returns:
        ``{"mean", "low", "high", "n", "confidence", "excludes_zero"}`` (``excludes_zero`` is
        1 when the whole interval lies on one side of 0, else 0).
    """
    a = np.asarray(list(a), np.float64).ravel()
    b = np.asarray(list(b), np.float64).ravel()
    if a.shape != b.shape:
        raise SinganInsertError(f"Paired scores need the same number of cases, got {a.size} and {b.size}.")
    if a.size < 2:
        raise SinganInsertError("A bootstrap interval needs at least two paired cases.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise SinganInsertError("Paired scores must be finite; drop the cases without a score first.")
    if not 0 < confidence < 1:
        raise SinganInsertError(f"confidence must be in (0, 1), got {confidence}.")
    if int(resamples) != resamples or resamples < 100:
        raise SinganInsertError(f"resamples must be an integer >= 100, got {resamples}.")
    difference = a - b
    rng = np.random.default_rng(seed)
    means = difference[rng.integers(0, difference.size, (int(resamples), difference.size))].mean(axis=1)
    low, high = np.quantile(means, ((1 - confidence) / 2, (1 + confidence) / 2))
    return {
        "mean": float(difference.mean()),
        "low": float(low),
        "high": float(high),
        "n": int(difference.size),
        "confidence": float(confidence),
        "excludes_zero": int(low > 0 or high < 0),
    }


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, sample sd (ddof 1; 0 for one value), quartiles and counts of the finite values.

    Non-finite values (NaN, inf) are left out and counted under ``"n_missing"``.
    """
    array = np.asarray(list(values), np.float64).ravel()
    finite = array[np.isfinite(array)]
    summary: dict[str, float | int | None] = {
        "n": int(finite.size),
        "n_missing": int(array.size - finite.size),
    }
    if finite.size == 0:
        summary.update(mean=None, sd=None, q25=None, q50=None, q75=None)
        return summary
    q25, q50, q75 = np.percentile(finite, (25, 50, 75))
    summary.update(
        mean=float(finite.mean()),
        sd=float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
        q25=float(q25),
        q50=float(q50),
        q75=float(q75),
    )
    return summary


def table1_report(
    results: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    metrics: Sequence[str] | None = None,
    dice_key: str = "dice",
    dice_threshold: float = 0.8,
    decimals: int = 2,
    file: TextIO | None = sys.stdout,
) -> dict:
    """Print the paper's Table 1: ``mean ± sd (25%, 50%, 75%)`` per method and metric.

    The paper lists ASSD's quartiles in descending order; here every column is ascending,
    (q25, q50, q75), and says so in its header.

    Args:
        results: ``{method: {metric: per-case values}}``, e.g.
            ``{"Baseline": {"dice": [...], "assd": [...]}, "Ours": {...}}``.
        metrics: columns, in order; default the metrics of the first method.
        dice_key: the metric counted against ``dice_threshold`` (the "DSC > 0.8" column);
            the column is left out when no method has it.
        dice_threshold: cases with a score strictly above it are counted.
        decimals: digits after the point in the printed table.
        file: where to print the markdown table; ``None`` prints nothing.

    Returns:
        A JSON-ready dict: ``{"methods": {method: {"n_cases", metric: summarize(...) ...,
        "dice_above_threshold"}}, "dice_threshold", "metrics", "markdown"}``.
    """
    if not results:
        raise SinganInsertError("No results to report: pass {method: {metric: values}}.")
    if metrics is None:
        metrics = list(next(iter(results.values())).keys())
    metrics = list(metrics)
    with_count = any(dice_key in scores for scores in results.values())

    header = ["Method"] + [f"{_METRIC_TITLES.get(m, m)} (25%/50%/75%)" for m in metrics]
    if with_count:
        header.append(f"{_METRIC_TITLES.get(dice_key, dice_key)} > {dice_threshold:g}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    report: dict = {"dice_threshold": dice_threshold, "metrics": metrics, "methods": {}}
    for method, scores in results.items():
        entry: dict = {"n_cases": max((len(list(v)) for v in scores.values()), default=0)}
        cells = [str(method)]
        for metric in metrics:
            if metric not in scores:
                cells.append("–")
                continue
            summary = summarize(scores[metric])
            entry[metric] = summary
            cells.append(_format_summary(summary, decimals))
        if with_count:
            if dice_key in scores:
                values = np.asarray(list(scores[dice_key]), np.float64)
                above = int(np.sum(values > dice_threshold))
                entry["dice_above_threshold"] = above
                cells.append(f"{above}/{values.size}")
            else:
                cells.append("–")
        report["methods"][str(method)] = entry
        lines.append("| " + " | ".join(cells) + " |")
    report["markdown"] = "\n".join(lines)
    if file is not None:
        print(report["markdown"], file=file)
    return report


def _format_summary(summary: Mapping, decimals: int) -> str:
    if summary["n"] == 0:
        return "–"
    mean, sd, q25, q50, q75 = (f"{summary[key]:.{decimals}f}" for key in ("mean", "sd", "q25", "q50", "q75"))
    text = f"{mean} ± {sd} ({q25}, {q50}, {q75})"
    if summary["n_missing"]:
        text += f" [{summary['n_missing']} n/a]"
    return text


def _binary_pair(prediction, truth) -> tuple[np.ndarray, np.ndarray]:
    prediction = np.asarray(prediction).astype(bool)
    truth = np.asarray(truth).astype(bool)
    if prediction.shape != truth.shape:
        raise SinganInsertError(
            f"Prediction {prediction.shape} and truth {truth.shape} must be on the same grid; "
            "resample one first."
        )
    return prediction, truth


def _surface_score(prediction, truth, spacing, empty_distance_mm: float,
                   reduce: Callable[[np.ndarray, np.ndarray], float]) -> float:
    """``reduce(to_truth, to_prediction)`` of :func:`surface_distances`, or, when a mask is
    empty, the convention of the module docstring (0 for two empty masks, else ``empty_distance_mm``)."""
    binary_prediction, binary_truth = _binary_pair(prediction, truth)
    has_prediction, has_truth = bool(binary_prediction.any()), bool(binary_truth.any())
    if not (has_prediction and has_truth):
        return 0.0 if not (has_prediction or has_truth) else float(empty_distance_mm)
    return float(reduce(*surface_distances(prediction, truth, spacing)))


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
    return (1.0,) * ndim if spacing is None else check_spacing(spacing, ndim)


def _sigma(sigma_px, ndim: int) -> tuple[float, ...]:
    values = (float(sigma_px),) * ndim if np.isscalar(sigma_px) else tuple(float(s) for s in sigma_px)
    if len(values) != ndim or not all(s >= 0 and math.isfinite(s) for s in values) or max(values) <= 0:
        raise SinganInsertError(
            f"sigma_px must be one number or {ndim} numbers >= 0 (voxels), at least one > 0; got {sigma_px}."
        )
    return values


def _value_range(truth: np.ndarray, value_range: float | None) -> float:
    if value_range is None:
        low, high = np.percentile(truth, (0.5, 99.5))
        value_range = float(high - low)
    if not (value_range > 0 and math.isfinite(value_range)):
        raise SinganInsertError(
            "The truth image is constant (or value_range is not positive); nothing to normalise by."
        )
    return float(value_range)


def _interior(mask: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    # Distances count only along smoothed axes (an unsmoothed axis gets a huge voxel size), so
    # with sigma (1.5, 1.5, 0) the interior is taken slice by slice.
    sampling = [1.0 if s > 0 else 1e6 for s in sigma]
    padded = np.pad(mask, 1)  # the array border counts as outside
    distance = ndimage.distance_transform_edt(padded, sampling=sampling)[(slice(1, -1),) * mask.ndim]
    return distance > 2 * max(sigma)


def _highpass_energy(image: np.ndarray, sigma: Sequence[float], region: np.ndarray) -> float:
    if not region.any():
        return math.nan
    return float(((image - ndimage.gaussian_filter(image, sigma))[region] ** 2).mean())


def _gradient_magnitude(image: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    # Axes of length 1 (a single slice stored as 3D) have no gradient; skip them.
    axes = [axis for axis in range(image.ndim) if image.shape[axis] > 1]
    squared = np.zeros(image.shape)
    for axis in axes:
        squared += np.gradient(image, spacing[axis], axis=axis) ** 2
    return np.sqrt(squared)
