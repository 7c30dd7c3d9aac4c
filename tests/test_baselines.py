"""Insertion baselines: naive paste, intensity-matched paste, Poisson blending, blended baselines."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from singan_insert.evaluation.baselines import (
    blurred_paste,
    intensity_matched_paste,
    naive_paste,
    oracle_paste,
    poisson_blend,
    slice_blend_weight,
    weighted_blend,
)
from singan_insert.harmonizer.model import blend_weight
from singan_insert.errors import SinganInsertError
from singan_insert.insertion.intensity import map_tumor_intensities


def _case(shape=(32, 36), seed=0):
    rng = np.random.default_rng(seed)
    target = ndimage.gaussian_filter(rng.normal(100, 20, shape), 1.5).astype(np.float32)
    source = (300 + ndimage.gaussian_filter(rng.normal(0, 40, shape), 1.0)).astype(np.float32)
    grid = np.mgrid[tuple(slice(0, n) for n in shape)]
    center = [n / 2 for n in shape]
    mask = sum(((g - c) / (n / 5)) ** 2 for g, c, n in zip(grid, center, shape)) <= 1
    return target, source, mask


def _second_differences(image, axes, spacing):
    """sum over axes of (f[p+1] - 2 f[p] + f[p-1]) / h^2, with scipy's 1D Laplacian kernel."""
    return sum(
        ndimage.correlate1d(image, [1.0, -2.0, 1.0], axis=a, mode="nearest") / spacing[a] ** 2 for a in axes
    )


@pytest.mark.parametrize("blend", [naive_paste, intensity_matched_paste, poisson_blend])
@pytest.mark.parametrize("shape", [(32, 36), (20, 24, 6)])
def test_outside_the_mask_is_bit_identical(blend, shape):
    target, source, mask = _case(shape)
    output = blend(target, source, mask)
    assert output.dtype == target.dtype
    assert np.array_equal(output[~mask], target[~mask])
    assert not np.array_equal(output[mask], target[mask])


def test_naive_paste_copies_the_source():
    target, source, mask = _case()
    output = naive_paste(target, source, mask)
    assert np.array_equal(output[mask], source[mask])
    integer = naive_paste(target.astype(np.int16), source, mask)
    assert integer.dtype == np.float32
    assert np.array_equal(integer[~mask], target.astype(np.int16)[~mask])


def test_intensity_matched_paste_uses_the_shared_mapping():
    target, source, mask = _case()
    for mode, contrast in (("normalized", 1.0), ("matched", 1.0), ("normalized", 0.5)):
        output = intensity_matched_paste(target, source, mask, mode=mode, contrast=contrast)
        expected = map_tumor_intensities(source, mask, target, mode=mode, contrast=contrast)
        assert np.array_equal(output[mask], expected[mask])
    dimmed = intensity_matched_paste(target, source, mask, contrast=0.5)
    full = intensity_matched_paste(target, source, mask)
    assert dimmed[mask].mean() < full[mask].mean()
    # Mapped into the target's range: far below the raw source values.
    assert full[mask].max() <= np.percentile(target, 99.5) + 1e-3


def test_poisson_solves_the_discrete_poisson_equation_2d():
    target, source, mask = _case()
    output = poisson_blend(target.astype(np.float64), source.astype(np.float64), mask)
    lap_out = _second_differences(output, (0, 1), (1.0, 1.0))
    lap_source = _second_differences(source.astype(np.float64), (0, 1), (1.0, 1.0))
    assert np.allclose(lap_out[mask], lap_source[mask], atol=1e-6)
    reference = ndimage.laplace(source.astype(np.float64))
    assert np.allclose(ndimage.laplace(output)[mask], reference[mask], atol=1e-6)


def test_poisson_removes_a_constant_offset_and_reproduces_the_target():
    target, _, mask = _case()
    target = target.astype(np.float64)
    assert np.allclose(poisson_blend(target, target + 250.0, mask), target, atol=1e-8)
    # A source whose gradients are the target's gives back the target, seamlessly.
    assert np.allclose(poisson_blend(target, target, mask), target, atol=1e-8)


def test_poisson_per_slice_equals_2d_solves():
    target, source, mask = _case((20, 24, 6), seed=1)
    volume = poisson_blend(target, source, mask)
    for k in range(target.shape[2]):
        if mask[:, :, k].any():
            expected = poisson_blend(target[:, :, k], source[:, :, k], mask[:, :, k])
            assert np.allclose(volume[:, :, k], expected, atol=1e-4)
    along_first = poisson_blend(target, source, mask, slice_axis=0)
    assert not np.allclose(along_first, volume)


def test_poisson_3d_with_anisotropic_spacing():
    target, source, mask = _case((18, 20, 12), seed=2)
    spacing = (0.5, 0.5, 1.5)
    target, source = target.astype(np.float64), source.astype(np.float64)
    output = poisson_blend(target, source, mask, slice_axis=None, spacing=spacing)
    lap_out = _second_differences(output, (0, 1, 2), spacing)
    lap_source = _second_differences(source, (0, 1, 2), spacing)
    assert np.allclose(lap_out[mask], lap_source[mask], atol=1e-6)


def test_poisson_mixed_gradients_keep_strong_target_edges():
    target = np.zeros((30, 30))
    target[:, 15:] = 100.0  # a strong edge crossing the mask
    source = np.full((30, 30), 50.0)  # flat source: no gradient to import
    mask = np.zeros((30, 30), bool)
    mask[8:22, 8:22] = True
    plain = poisson_blend(target, source, mask)
    mixed = poisson_blend(target, source, mask, mixed_gradients=True)
    assert np.allclose(mixed, target, atol=1e-8)
    assert np.abs(plain[15, 12] - plain[15, 17]) < 50  # the plain blend smooths the edge away


def test_empty_mask_returns_the_target():
    target, source, mask = _case()
    output = poisson_blend(target, source, np.zeros_like(mask))
    assert np.array_equal(output, target) and output is not target


def test_input_errors():
    target, source, mask = _case()
    with pytest.raises(SinganInsertError, match="target grid"):
        naive_paste(target, source[:-1], mask[:-1])
    with pytest.raises(SinganInsertError, match="2D slice or a 3D volume"):
        poisson_blend(target[0], source[0], mask[0])
    bad = source.copy()
    bad[0, 0] = np.inf
    with pytest.raises(SinganInsertError, match="NaN or infinite"):
        poisson_blend(target, bad, mask)
    with pytest.raises(SinganInsertError, match="fills a whole slice"):
        poisson_blend(target, source, np.ones_like(mask))
    with pytest.raises(SinganInsertError, match="spacing"):
        poisson_blend(target, source, mask, spacing=(1.0,))


# ----------------------------------------------------------------------------------------------
# Blended baselines (the harmonizer's blend weight)
# ----------------------------------------------------------------------------------------------
def test_slice_blend_weight_is_the_harmonizers_weight_per_slice():
    mask = np.zeros((20, 9, 16), bool)
    mask[8:12, 3:6, 6:10] = True
    spacing = (0.4, 1.0, 0.5)
    weight = slice_blend_weight(mask, axis=1, spacing=spacing)
    for j in range(mask.shape[1]):
        expected = blend_weight(mask[:, j][None].astype(np.float32), (0.4, 0.5), 1.0, 2.0)[0]
        np.testing.assert_array_equal(weight[:, j], expected)
    # By hand: 1 mm from the mask with dilation 0.5 mm, feather 2 mm: t = 0.75, smoothstep 0.84375.
    line = np.zeros((1, 12), bool)
    line[0, :3] = True
    weight = slice_blend_weight(line)
    assert weight[0, 2] == 1.0 and weight[0, 3] == 1.0  # on the mask, and 1 mm away
    assert slice_blend_weight(line, dilation_mm=0.5)[0, 3] == pytest.approx(0.84375)
    assert weight[0, 6] == 0.0  # 4 mm > dilation + feather
    assert np.all(slice_blend_weight(mask, axis=1)[:, [0, 1, 2, 6, 7, 8]] == 0)  # no leak across slices
    with pytest.raises(SinganInsertError, match="axis"):
        slice_blend_weight(mask, axis=3)
    with pytest.raises(SinganInsertError, match=">= 0"):
        slice_blend_weight(mask, feather_mm=-1)


def test_weighted_blend_and_oracle():
    target, source, mask = _case((40, 40))
    weight = slice_blend_weight(mask)
    output = weighted_blend(target, source, mask)
    np.testing.assert_array_equal(output[weight == 0], target[weight == 0])
    np.testing.assert_allclose(output[weight == 1], source[weight == 1], rtol=1e-6)
    ramp = (weight > 0) & (weight < 1)
    low, high = np.minimum(target, source)[ramp], np.maximum(target, source)[ramp]
    assert np.all((output[ramp] >= low - 1e-4) & (output[ramp] <= high + 1e-4))
    # A truth that differs from the target only on the mask comes back exactly.
    truth = target + 25.0 * mask
    np.testing.assert_allclose(oracle_paste(target, truth, mask), truth, rtol=1e-6)


def test_blurred_paste():
    target, source, mask = _case((12, 40, 40))
    mask[:, :, :3] = False  # slices without tumor
    volume_mask = np.moveaxis(mask, 0, 2)
    target, source = np.moveaxis(target, 0, 2), np.moveaxis(source, 0, 2)
    unblurred = blurred_paste(target, source, volume_mask, 0.0)
    np.testing.assert_array_equal(unblurred, weighted_blend(target, naive_paste(target, source, volume_mask),
                                                            volume_mask))
    blurred = blurred_paste(target, source, volume_mask, 2.0)
    np.testing.assert_array_equal(blurred[..., :3], target[..., :3])  # within slices only
    # A texture at the finest scale inside a flat surround is smoothed away.
    flat = np.full_like(target, 300.0)
    textured = flat + 20.0 * np.where(np.indices(flat.shape).sum(axis=0) % 2 == 0, 1.0, -1.0)
    assert blurred_paste(flat, textured, volume_mask, 2.0)[volume_mask].std() < 1.0
    # A constant image stays constant: the blur moves no level.
    np.testing.assert_allclose(blurred_paste(flat, flat, volume_mask, 2.0), flat, rtol=1e-6)
    with pytest.raises(SinganInsertError, match="sigma_px"):
        blurred_paste(target, source, volume_mask, -1.0)
