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
      side of it) of x over that of y: > 1 a visible seam, < 1 edges softer than the truth's.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TextIO

import numpy as np
from scipy import ndimage
from scipy.stats import wasserstein_distance

from singan_insert.errors import SinganInsertError
from singan_insert.checks import check_finite

__all__ = [
    "EMPTY_DISTANCE_MM",
    "Fidelity",
    "assd",
    "dice",
    "harmonization_fidelity",
    "hd95",
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
    empty = _empty_case(prediction, truth, empty_distance_mm)
    if empty is not None:
        return empty
    to_truth, to_prediction = surface_distances(prediction, truth, spacing)
    return float((to_truth.mean() + to_prediction.mean()) / 2)


def hd95(
    prediction: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
    empty_distance_mm: float = EMPTY_DISTANCE_MM,
) -> float:
    """95th percentile of the pooled symmetric surface distances in mm."""
    empty = _empty_case(prediction, truth, empty_distance_mm)
    if empty is not None:
        return empty
    to_truth, to_prediction = surface_distances(prediction, truth, spacing)
    return float(np.percentile(np.concatenate([to_truth, to_prediction]), 95))


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

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def harmonization_fidelity(
    result: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float] | None = None,
    shell_mm: float = 2.0,
    value_range: float | None = None,
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
    if value_range is None:
        low, high = np.percentile(truth, (0.5, 99.5))
        value_range = float(high - low)
    if not (value_range > 0 and math.isfinite(value_range)):
        raise SinganInsertError(
            "The truth image is constant (or value_range is not positive); nothing to normalise by."
        )

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

    return Fidelity(
        nmae_tumor=nmae(mask),
        nmae_shell=nmae(shell),
        wasserstein_tumor=wasserstein(mask),
        wasserstein_shell=wasserstein(shell),
        contrast_ratio=contrast_ratio,
        seam_ratio=seam_ratio,
    )


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


def _empty_case(prediction, truth, empty_distance_mm: float) -> float | None:
    prediction, truth = _binary_pair(prediction, truth)
    has_prediction, has_truth = bool(prediction.any()), bool(truth.any())
    if has_prediction and has_truth:
        return None
    return 0.0 if not (has_prediction or has_truth) else float(empty_distance_mm)


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise SinganInsertError(f"spacing must hold {ndim} positive numbers (mm per voxel), got {spacing}.")
    return spacing


def _gradient_magnitude(image: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    # Axes of length 1 (a single slice stored as 3D) have no gradient; skip them.
    axes = [axis for axis in range(image.ndim) if image.shape[axis] > 1]
    squared = np.zeros(image.shape)
    for axis in axes:
        squared += np.gradient(image, spacing[axis], axis=axis) ** 2
    return np.sqrt(squared)
