"""Segmentation scores, harmonization fidelity and the Table-1 report."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist
from skimage.metrics import hausdorff_distance
from skimage.segmentation import find_boundaries

from singan_insert.errors import SinganInsertError
from singan_insert.evaluation.metrics import (
    EMPTY_DISTANCE_MM,
    assd,
    dice,
    harmonization_fidelity,
    hd95,
    paired_bootstrap_ci,
    seed_difference,
    segmentation_scores,
    summarize,
    surface_distances,
    table1_report,
)


def _blob(shape, seed, threshold=0.6):
    """A random smooth interior blob (away from the array border)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5)
    blob = field > threshold * field.std()
    border = np.zeros(shape, bool)
    border[(slice(2, -2),) * len(shape)] = True
    return blob & border


# ----------------------------------------------------------------------------------------------
# Dice and surface distances
# ----------------------------------------------------------------------------------------------
def test_dice_known_values():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[2:6, 2:6] = True  # 16 px
    b[4:8, 2:6] = True  # 16 px, 8 overlap
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_single_voxels_with_anisotropic_spacing():
    prediction = np.zeros((9, 9, 12), bool)
    truth = np.zeros_like(prediction)
    prediction[4, 4, 3] = True
    truth[4, 4, 6] = True
    spacing = (0.5, 0.5, 2.0)
    assert assd(prediction, truth, spacing) == pytest.approx(6.0)
    assert hd95(prediction, truth, spacing) == pytest.approx(6.0)
    assert assd(prediction, prediction, spacing) == 0.0


def test_assd_averages_the_two_directed_means():
    # A 3x3x3 cube against its centre voxel: 26 cube-surface voxels at distances 1, sqrt2, sqrt3
    # from the centre, and the centre at distance 1 from the cube's surface.
    cube = np.zeros((7, 7, 7), bool)
    cube[2:5, 2:5, 2:5] = True
    centre = np.zeros_like(cube)
    centre[3, 3, 3] = True
    cube_to_centre = (6 * 1 + 12 * np.sqrt(2) + 8 * np.sqrt(3)) / 26
    assert assd(cube, centre) == pytest.approx((cube_to_centre + 1.0) / 2)
    pooled = np.concatenate([[1.0] * 6 + [np.sqrt(2)] * 12 + [np.sqrt(3)] * 8, [1.0]])
    assert hd95(cube, centre) == pytest.approx(np.percentile(pooled, 95))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surface_distances_match_brute_force_and_skimage(seed):
    shape = (24, 20, 14)
    spacing = (0.4, 0.7, 1.5)
    prediction, truth = _blob(shape, seed), _blob(shape, seed + 100)
    to_truth, to_prediction = surface_distances(prediction, truth, spacing)

    surfaces = [find_boundaries(m, mode="inner", connectivity=1) & m for m in (prediction, truth)]
    points = [np.argwhere(s) * np.asarray(spacing) for s in surfaces]
    reference = cdist(points[0], points[1])
    assert np.allclose(np.sort(to_truth), np.sort(reference.min(axis=1)))
    assert np.allclose(np.sort(to_prediction), np.sort(reference.min(axis=0)))
    expected_assd = (reference.min(axis=1).mean() + reference.min(axis=0).mean()) / 2
    assert assd(prediction, truth, spacing) == pytest.approx(expected_assd)
    expected_hd95 = np.percentile(np.concatenate([reference.min(axis=1), reference.min(axis=0)]), 95)
    assert hd95(prediction, truth, spacing) == pytest.approx(expected_hd95)
    # Isotropic: the maximum of both directions is scikit-image's Hausdorff distance.
    iso = surface_distances(prediction, truth)
    assert max(iso[0].max(), iso[1].max()) == pytest.approx(hausdorff_distance(*surfaces))


def test_empty_conventions():
    truth = np.zeros((8, 8, 8), bool)
    truth[3:5, 3:5, 3:5] = True
    empty = np.zeros_like(truth)
    assert assd(empty, truth) == EMPTY_DISTANCE_MM == 350.0
    assert hd95(truth, empty) == 350.0
    assert assd(empty, truth, empty_distance_mm=99.0) == 99.0
    assert assd(empty, empty) == 0.0 and hd95(empty, empty) == 0.0
    with pytest.raises(SinganInsertError):
        surface_distances(empty, truth)


def test_segmentation_scores_selects_a_label():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:5, 2:5, 2:5] = 1
    labels[6:8, 6:8, 6:8] = 2
    scores = segmentation_scores(labels, labels, (0.5, 0.5, 1.0), label=2)
    assert scores == {"dice": 1.0, "assd": 0.0, "hd95": 0.0}
    missing = segmentation_scores(np.where(labels == 1, 0, labels), labels, label=1)
    assert missing["dice"] == 0.0 and missing["assd"] == 350.0


def test_shape_mismatch_raises():
    with pytest.raises(SinganInsertError, match="same grid"):
        dice(np.ones((3, 3)), np.ones((3, 4)))
    with pytest.raises(SinganInsertError, match="spacing"):
        assd(np.ones((3, 3)), np.ones((3, 3)), spacing=(1.0,))


# ----------------------------------------------------------------------------------------------
# Harmonization fidelity
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def disk_case():
    """Truth: 100 everywhere, a disk of 50 (robust range exactly 50)."""
    yy, xx = np.mgrid[:40, :40]
    mask = (yy - 20) ** 2 + (xx - 20) ** 2 <= 36
    truth = np.where(mask, 50.0, 100.0)
    return truth, mask


def test_perfect_result(disk_case):
    truth, mask = disk_case
    fidelity = harmonization_fidelity(truth, truth, mask)
    assert fidelity.nmae_tumor == fidelity.nmae_shell == 0.0
    assert fidelity.wasserstein_tumor == fidelity.wasserstein_shell == 0.0
    assert fidelity.contrast_ratio == 1.0 and fidelity.seam_ratio == 1.0


def test_vanished_tumor(disk_case):
    truth, mask = disk_case
    fidelity = harmonization_fidelity(np.full_like(truth, 100.0), truth, mask)
    assert fidelity.nmae_tumor == pytest.approx(1.0)
    assert fidelity.wasserstein_tumor == pytest.approx(1.0)
    assert fidelity.nmae_shell == 0.0
    assert fidelity.contrast_ratio == pytest.approx(0.0)
    assert fidelity.seam_ratio == pytest.approx(0.0)


def test_half_contrast_and_shuffled_texture(disk_case):
    truth, mask = disk_case
    half = np.where(mask, 75.0, 100.0)
    fidelity = harmonization_fidelity(half, truth, mask)
    assert fidelity.contrast_ratio == pytest.approx(0.5)
    assert fidelity.nmae_tumor == pytest.approx(0.5)
    assert fidelity.seam_ratio == pytest.approx(0.5)
    # Same values in another order: no distribution distance, but a voxel-wise error.
    rng = np.random.default_rng(0)
    textured = truth.copy()
    textured[mask] = 50 + rng.normal(0, 5, mask.sum())
    shuffled = textured.copy()
    shuffled[mask] = rng.permutation(textured[mask])
    fidelity = harmonization_fidelity(shuffled, textured, mask, value_range=50.0)
    assert fidelity.wasserstein_tumor == pytest.approx(0.0, abs=1e-12)
    assert fidelity.nmae_tumor > 0.1


def test_seam_score_flags_a_hard_edge():
    yy, xx = np.mgrid[:48, :48]
    mask = (yy - 24) ** 2 + (xx - 24) ** 2 <= 64
    truth = ndimage.gaussian_filter(np.where(mask, 50.0, 100.0), 1.5)
    pasted = np.where(mask, 50.0, truth)  # the right values inside, a cut at the border
    assert harmonization_fidelity(pasted, truth, mask).seam_ratio > 1.3


def test_shell_honours_anisotropic_spacing():
    mask = np.zeros((30, 30, 10), bool)
    mask[12:18, 12:18, 4:6] = True
    truth = np.where(mask, 1.0, 0.0)
    result = truth.copy()
    # A change 2 slices above the mask: inside a 2.5 mm shell at 1 mm slices, outside at 2 mm slices.
    result[12:18, 12:18, 7] = 1.0
    near = harmonization_fidelity(result, truth, mask, spacing=(0.5, 0.5, 1.0), shell_mm=2.5, value_range=1.0)
    far = harmonization_fidelity(result, truth, mask, spacing=(0.5, 0.5, 2.0), shell_mm=2.5, value_range=1.0)
    assert near.nmae_shell > 0 and far.nmae_shell == 0.0


def test_fidelity_input_errors(disk_case):
    truth, mask = disk_case
    with pytest.raises(SinganInsertError, match="empty"):
        harmonization_fidelity(truth, truth, np.zeros_like(mask))
    with pytest.raises(SinganInsertError, match="same shape"):
        harmonization_fidelity(truth[:-1], truth, mask)
    bad = truth.copy()
    bad[0, 0] = np.nan
    with pytest.raises(SinganInsertError, match="NaN"):
        harmonization_fidelity(bad, truth, mask)
    with pytest.raises(SinganInsertError, match="constant"):
        harmonization_fidelity(truth, np.ones_like(truth), mask)


def test_contrast_ratio_is_nan_without_true_contrast():
    mask = np.zeros((20, 20), bool)
    mask[8:12, 8:12] = True
    # A ramp symmetric about the mask: tumor and shell have the same mean, no contrast to keep.
    truth = 100 + 5 * (np.mgrid[:20, :20][1] - 9.5)
    assert np.isnan(harmonization_fidelity(truth + 50 * mask, truth, mask).contrast_ratio)


def _checkerboard(shape, amplitude):
    return amplitude * np.where(np.indices(shape).sum(axis=0) % 2 == 0, 1.0, -1.0)


@pytest.fixture
def big_disk():
    """A 60x60 image, a disk of radius 15 (large interior), truth 100 outside and 50 inside."""
    yy, xx = np.mgrid[:60, :60]
    mask = (yy - 30) ** 2 + (xx - 30) ** 2 <= 225
    return np.where(mask, 50.0, 100.0), mask


def test_lowpass_error_ignores_texture_phase_but_not_level(big_disk):
    truth, mask = big_disk
    # A texture at the finest scale (checkerboard, +-10): the voxel-wise error is 10/50 = 0.2
    # everywhere in the tumor, but after smoothing by sigma = 1.5 px almost nothing is left.
    textured = truth + np.where(mask, _checkerboard(truth.shape, 10.0), 0.0)
    fidelity = harmonization_fidelity(textured, truth, mask, value_range=50.0)
    assert fidelity.nmae_tumor == pytest.approx(0.2)
    assert fidelity.lowpass_nmae_tumor < 0.02
    # A level error of 10 survives smoothing in the interior (and is halved at the border).
    offset = truth + 10.0 * mask
    fidelity = harmonization_fidelity(offset, truth, mask, value_range=50.0)
    assert fidelity.nmae_tumor == pytest.approx(0.2)
    assert 0.14 < fidelity.lowpass_nmae_tumor < 0.2


def test_contrast_values_and_their_ratio(big_disk):
    truth, mask = big_disk
    half = np.where(mask, 75.0, 100.0)
    fidelity = harmonization_fidelity(half, truth, mask, value_range=50.0)
    assert fidelity.truth_contrast == pytest.approx(-1.0)
    assert fidelity.contrast == pytest.approx(-0.5)
    assert fidelity.contrast_ratio == pytest.approx(fidelity.contrast / fidelity.truth_contrast)


def test_highpass_ratio_measures_texture_energy(big_disk):
    truth, mask = big_disk
    texture = _checkerboard(truth.shape, 5.0)
    textured_truth = truth + texture
    # The same level structure, twice the texture amplitude: four times the energy; no texture: 0.
    doubled = harmonization_fidelity(truth + 2 * texture, textured_truth, mask, value_range=50.0)
    smooth = harmonization_fidelity(truth, textured_truth, mask, value_range=50.0)
    same = harmonization_fidelity(textured_truth, textured_truth, mask, value_range=50.0)
    assert same.highpass_ratio == pytest.approx(1.0)
    assert doubled.highpass_ratio == pytest.approx(4.0, rel=0.05)
    assert smooth.highpass_ratio < 0.05


def test_highpass_ratio_is_nan_without_interior():
    mask = np.zeros((20, 20), bool)
    mask[9:12, 9:12] = True  # 3 px wide: no voxel is more than 2 sigma = 3 px inside
    truth = np.where(mask, 1.0, 0.0) + _checkerboard(mask.shape, 0.1)
    assert np.isnan(harmonization_fidelity(truth, truth, mask).highpass_ratio)


def test_sigma_per_axis_smooths_only_within_slices():
    # Texture that alternates between slices only: invisible to an in-plane high-pass.
    mask = np.zeros((24, 24, 12), bool)
    mask[4:20, 4:20, 1:11] = True
    rng = np.random.default_rng(0)
    truth = np.where(mask, 1.0, 0.0) + 0.05 * rng.standard_normal(mask.shape)
    stripes = truth + 0.2 * np.where(np.arange(12) % 2 == 0, 1.0, -1.0)[None, None, :] * mask
    in_plane = harmonization_fidelity(stripes, truth, mask, sigma_px=(1.5, 1.5, 0), value_range=1.0)
    in_3d = harmonization_fidelity(stripes, truth, mask, sigma_px=1.5, value_range=1.0)
    assert in_plane.highpass_ratio == pytest.approx(1.0, abs=0.02)
    assert in_3d.highpass_ratio > 2
    with pytest.raises(SinganInsertError, match="sigma_px"):
        harmonization_fidelity(truth, truth, mask, sigma_px=(1.5, 1.5))
    with pytest.raises(SinganInsertError, match="sigma_px"):
        harmonization_fidelity(truth, truth, mask, sigma_px=0)


def test_seed_difference(big_disk):
    _, mask = big_disk
    flat = np.full(mask.shape, 50.0)  # no edge, whose blur would leak into the texture estimate
    weak = flat + _checkerboard(mask.shape, 2.0)
    strong = flat + _checkerboard(mask.shape, 4.0)
    same = seed_difference(weak, weak, weak, mask, value_range=50.0)
    assert same == {"texture_difference": 0.0, "mean_level_difference": 0.0}
    # A level shift of 1 inside the tumor: mean level 1/50; texture difference 1 / tau, and
    # tau doubles with the truth's texture amplitude.
    shifted = weak + 1.0 * mask
    against_weak = seed_difference(weak, shifted, weak, mask, value_range=50.0)
    against_strong = seed_difference(weak, shifted, strong, mask, value_range=50.0)
    assert against_weak["mean_level_difference"] == pytest.approx(0.02)
    assert against_weak["texture_difference"] == pytest.approx(2 * against_strong["texture_difference"])
    # Symmetric in the two seeds, NaN when the truth has no texture to compare with.
    assert seed_difference(shifted, weak, weak, mask, value_range=50.0) == against_weak
    assert np.isnan(seed_difference(weak, shifted, flat, mask, value_range=50.0)["texture_difference"])
    with pytest.raises(SinganInsertError, match="same shape"):
        seed_difference(weak, shifted[:-1], weak, mask)
    with pytest.raises(SinganInsertError, match="empty"):
        seed_difference(weak, shifted, weak, np.zeros_like(mask))


def test_paired_bootstrap_ci():
    constant = paired_bootstrap_ci([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])
    assert constant["mean"] == pytest.approx(0.1)
    assert constant["low"] == pytest.approx(0.1) and constant["high"] == pytest.approx(0.1)
    assert constant["excludes_zero"] == 1 and constant["n"] == 3
    # Against the normal approximation for a large sample: mean +- 1.96 sd / sqrt(n).
    rng = np.random.default_rng(1)
    a = rng.normal(0.3, 1.0, 400)
    b = rng.normal(0.0, 1.0, 400)
    ci = paired_bootstrap_ci(a, b, seed=3)
    half = 1.96 * (a - b).std(ddof=1) / np.sqrt(400)
    assert ci["mean"] == pytest.approx((a - b).mean())
    assert ci["low"] == pytest.approx(ci["mean"] - half, abs=0.1 * half)
    assert ci["high"] == pytest.approx(ci["mean"] + half, abs=0.1 * half)
    assert ci == paired_bootstrap_ci(a, b, seed=3)  # seeded: reproducible
    noise = paired_bootstrap_ci([1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0])
    assert noise["low"] < 0 < noise["high"] and noise["excludes_zero"] == 0
    with pytest.raises(SinganInsertError, match="same number"):
        paired_bootstrap_ci([1.0, 2.0], [1.0])
    with pytest.raises(SinganInsertError, match="two"):
        paired_bootstrap_ci([1.0], [0.0])
    with pytest.raises(SinganInsertError, match="finite"):
        paired_bootstrap_ci([1.0, np.nan], [0.0, 0.0])
    with pytest.raises(SinganInsertError, match="confidence"):
        paired_bootstrap_ci([1.0, 2.0], [0.0, 0.0], confidence=95)


# ----------------------------------------------------------------------------------------------
# Table 1
# ----------------------------------------------------------------------------------------------
def test_summarize_matches_numpy_and_drops_nan():
    values = [0.2, 0.9, 0.85, 0.5, float("nan")]
    summary = summarize(values)
    finite = np.array([0.2, 0.9, 0.85, 0.5])
    assert summary["n"] == 4 and summary["n_missing"] == 1
    assert summary["mean"] == pytest.approx(finite.mean())
    assert summary["sd"] == pytest.approx(finite.std(ddof=1))
    quartiles = [summary["q25"], summary["q50"], summary["q75"]]
    assert quartiles == pytest.approx(np.percentile(finite, [25, 50, 75]))
    assert summarize([3.0])["sd"] == 0.0
    assert summarize([])["mean"] is None


def test_table1_report_format_and_json():
    results = {
        "Baseline": {"dice": [0.2, 0.9, 0.85, 0.5], "assd": [10.0, 1.0, 1.5, 4.0]},
        "Ours": {"dice": [0.81, 0.9, 0.85, 0.79], "assd": [1.0, 0.5, 0.8, 1.2]},
    }
    stream = io.StringIO()
    report = table1_report(results, file=stream)
    printed = stream.getvalue()
    assert "| Method | DSC (25%/50%/75%) | ASSD (mm) (25%/50%/75%) | DSC > 0.8 |" in printed
    baseline = np.array(results["Baseline"]["dice"])
    q = np.percentile(baseline, [25, 50, 75])
    expected = f"{baseline.mean():.2f} ± {baseline.std(ddof=1):.2f} ({q[0]:.2f}, {q[1]:.2f}, {q[2]:.2f})"
    assert f"| Baseline | {expected} |" in printed
    assert report["methods"]["Baseline"]["dice_above_threshold"] == 2
    assert report["methods"]["Ours"]["dice_above_threshold"] == 3
    assert printed.strip().endswith("| 3/4 |")
    assert report["markdown"] == printed.strip()
    json.loads(json.dumps(report, allow_nan=False))


def test_table1_report_without_dice_and_silent():
    stream = io.StringIO()
    report = table1_report({"naive": {"nmae_tumor": [0.3, 0.4]}}, file=None)
    assert stream.getvalue() == ""
    assert "DSC >" not in report["markdown"]
    assert report["methods"]["naive"]["nmae_tumor"]["mean"] == pytest.approx(0.35)
    with pytest.raises(SinganInsertError):
        table1_report({})
