"""Source-to-target geometry (singan_insert.insertion.placement): no harmonizer involved."""

from __future__ import annotations

import copy
import pickle

import nibabel as nib
import numpy as np
import pytest

from singan_insert.errors import SinganInsertError
from singan_insert.insertion.placement import (
    Placement,
    SourceTumor,
    binary_tumor_mask,
    check_affine,
    intensity_quantiles,
    paste_tumor,
    placed_bounds,
    planar_axes,
)

SPACING = (0.5, 0.5, 1.5)
SHAPE = (48, 48, 20)


def ellipsoid(shape, center, radii):
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii)) <= 1


def source_volume(seed=0, center=(24, 24, 10), radii=(8, 5, 3), shape=SHAPE, spacing=SPACING):
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 10, shape).astype(np.float32)
    mask = ellipsoid(shape, center, radii)
    image[mask] += 80
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 2.0)
    return image, mask.astype(np.uint8), affine


def world_centroid(mask, affine):
    return affine[:3, :3] @ np.argwhere(mask).mean(axis=0) + affine[:3, 3]


def central_moments(mask, affine, order):
    points = (affine[:3, :3] @ np.argwhere(mask).T).T
    centred = points - points.mean(axis=0)
    return (centred ** order).mean(axis=0)


@pytest.fixture(scope="module")
def source():
    image, label, affine = source_volume()
    return SourceTumor.from_arrays(image, label, affine), image, label, affine


# ---------------------------------------------------------------- resampling through affines
def test_identity_paste_reproduces_the_source_exactly(source):
    tumor, image, label, affine = source
    pasted = paste_tumor(tumor, SHAPE, affine)
    assert np.array_equal(pasted.full_mask(SHAPE), label > 0)
    assert np.array_equal(pasted.image[pasted.mask], image[pasted.slices][pasted.mask])


def test_resampling_into_another_orientation_and_spacing_keeps_position_and_volume(source):
    tumor, _, label, affine = source
    # Target: axes permuted (z first), x flipped, 0.8 mm isotropic, shifted origin.
    target_affine = np.array([
        [0.0, -0.8, 0.0, 20.0],
        [0.0, 0.0, 0.8, -5.0],
        [0.8, 0.0, 0.0, -6.0],
        [0.0, 0.0, 0.0, 1.0],
    ])
    target_shape = (60, 60, 60)
    pasted = paste_tumor(tumor, target_shape, target_affine)
    full = pasted.full_mask(target_shape)
    shift = world_centroid(full, target_affine) - world_centroid(label, affine)
    assert np.linalg.norm(shift) < 0.4  # half a target voxel
    source_mm3 = label.sum() * np.prod(SPACING)
    target_mm3 = full.sum() * 0.8**3
    assert abs(target_mm3 / source_mm3 - 1) < 0.1
    # Intensities are the source's (tumor ~180, background ~100).
    assert 160 < pasted.image[pasted.mask].mean() < 200


def test_location_in_voxels_and_mm_agree_and_centre_the_tumor(source):
    tumor, _, _, affine = source
    target_affine = np.diag([0.6, 0.6, 1.2, 1.0])
    target_affine[:3, 3] = (3.0, -2.0, 1.0)
    location = (20.0, 30.0, 12.0)
    by_voxel = paste_tumor(tumor, (50, 50, 25), target_affine, Placement(location, "voxel"))
    location_mm = tuple(target_affine[:3, :3] @ np.array(location) + target_affine[:3, 3])
    by_mm = paste_tumor(tumor, (50, 50, 25), target_affine, Placement(location_mm, "mm"))
    assert np.array_equal(by_voxel.full_mask((50, 50, 25)), by_mm.full_mask((50, 50, 25)))
    centroid = np.argwhere(by_voxel.full_mask((50, 50, 25))).mean(axis=0)
    assert np.allclose(centroid, location, atol=0.5)


def test_flip_mirrors_the_tumor_about_its_centroid():
    rng = np.random.default_rng(1)
    image = rng.normal(100, 5, SHAPE).astype(np.float32)
    # An asymmetric tumor: a big blob with a small one to its +x side.
    mask = ellipsoid(SHAPE, (20, 24, 10), (6, 5, 3)) | ellipsoid(SHAPE, (30, 24, 10), (3, 3, 2))
    affine = np.diag([*SPACING, 1.0])
    tumor = SourceTumor.from_arrays(image, mask, affine)
    plain = paste_tumor(tumor, SHAPE, affine, Placement((24, 24, 10)))
    flipped = paste_tumor(tumor, SHAPE, affine, Placement((24, 24, 10), flips=(True, False, False)))
    skew_plain = central_moments(plain.full_mask(SHAPE), affine, 3)
    skew_flipped = central_moments(flipped.full_mask(SHAPE), affine, 3)
    assert skew_plain[0] > 0.1
    assert skew_flipped[0] == pytest.approx(-skew_plain[0], rel=0.1)
    assert plain.mask.sum() == pytest.approx(flipped.mask.sum(), rel=0.05)


def test_rotation_and_scale():
    image, label, affine = source_volume(radii=(8, 3, 1.5), spacing=(0.5, 0.5, 0.5), shape=(48, 48, 48),
                                         center=(24, 24, 24))
    tumor = SourceTumor.from_arrays(image, label, affine)
    shape = (48, 48, 48)
    rotated = paste_tumor(tumor, shape, affine, Placement((24, 24, 24), rotation_degrees=(0, 0, 90)))
    before = central_moments(label > 0, affine, 2)
    after = central_moments(rotated.full_mask(shape), affine, 2)
    assert after[1] == pytest.approx(before[0], rel=0.1)  # long x axis became y
    assert after[0] == pytest.approx(before[1], rel=0.15)
    image, label, affine = source_volume(radii=(6, 5, 4), spacing=(0.5, 0.5, 0.5), shape=(48, 48, 48),
                                         center=(24, 24, 24))
    tumor = SourceTumor.from_arrays(image, label, affine)
    larger = paste_tumor(tumor, shape, affine, Placement((24, 24, 24), scale=1.7))
    assert larger.mask.sum() / label.sum() == pytest.approx(1.7**3, rel=0.1)


def test_paste_cost_follows_the_tumor_not_the_volume(source):
    tumor, *_ = source
    big = paste_tumor(tumor, (512, 512, 200), np.diag([*SPACING, 1.0]), Placement((256, 256, 100)))
    assert all(n <= 24 for n in big.mask.shape)  # the tumor's bounding box, not the volume


def test_placed_bounds_contain_the_pasted_tumor(source):
    tumor, *_ = source
    placement = Placement((24, 24, 10), rotation_degrees=(20, -10, 35), scale=(1.1, 0.9, 1.0))
    low, high = placed_bounds(tumor, np.diag([*SPACING, 1.0]), placement)
    pasted = paste_tumor(tumor, SHAPE, np.diag([*SPACING, 1.0]), placement)
    voxels = np.argwhere(pasted.full_mask(SHAPE))
    assert np.all(voxels.min(axis=0) >= low) and np.all(voxels.max(axis=0) <= high)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("affine, message", [
    (np.diag([0.5, 0.0, 1.5, 1.0]), "not invertible"),
    (np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float), "not invertible"),
    (np.full((4, 4), np.nan), "NaN"),
    (np.eye(3), "4x4"),
    (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], float), "last row"),
])
def test_bad_affines_are_rejected(affine, message):
    with pytest.raises(SinganInsertError, match=message):
        check_affine(affine)
    image, label, _ = source_volume()
    with pytest.raises(SinganInsertError, match=message):
        SourceTumor.from_arrays(image, label, affine)


def test_mismatched_image_and_label_grids_are_rejected():
    image, label, affine = source_volume()
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    with pytest.raises(SinganInsertError, match="affines of the source image and the source label differ"):
        SourceTumor.from_arrays(image, label, affine, label_affine=shifted)
    with pytest.raises(SinganInsertError, match="same voxel grid"):
        SourceTumor.from_arrays(image, label[:, :, :-1], affine)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_source_that_is_not_finite_is_refused(bad):
    image, label, affine = source_volume()
    image = image.astype(np.float32)
    image[0, 0, 0] = bad  # outside the tumor's crop: the quantiles read the whole image
    with pytest.raises(SinganInsertError, match="source image contains NaN or infinite"):
        SourceTumor.from_arrays(image, label, affine)


def test_bad_target_affine_is_rejected(source):
    tumor, *_ = source
    with pytest.raises(SinganInsertError, match="not invertible"):
        paste_tumor(tumor, SHAPE, np.diag([0.5, 0.5, 0.0, 1.0]))


def test_empty_source_label_is_rejected():
    image, label, affine = source_volume()
    with pytest.raises(SinganInsertError, match="empty"):
        SourceTumor.from_arrays(image, np.zeros_like(label), affine)


def test_float_and_multi_label_sources():
    image, label, affine = source_volume()
    multi = label.astype(np.float32)
    multi[5:8, 5:8, 5:8] = 2.0  # a second structure (e.g. a cochlea)
    with pytest.raises(SinganInsertError, match="several labels.*label_value"):
        SourceTumor.from_arrays(image, multi, affine)
    chosen = SourceTumor.from_arrays(image, multi, affine, label_value=1)
    assert chosen.num_voxels == label.sum()
    assert SourceTumor.from_arrays(image, multi, affine, label_value=2).num_voxels == 27
    with pytest.raises(SinganInsertError, match="value 3"):
        SourceTumor.from_arrays(image, multi, affine, label_value=3)
    probabilities = label * 0.7
    with pytest.raises(SinganInsertError, match="non-integer"):
        SourceTumor.from_arrays(image, probabilities, affine)
    assert binary_tumor_mask(label.astype(bool)).sum() == label.sum()


def test_extreme_anisotropy_is_rejected_unless_allowed():
    image, label, affine = source_volume(spacing=(0.4, 0.4, 6.0))
    with pytest.raises(SinganInsertError, match="anisotropic"):
        SourceTumor.from_arrays(image, label, affine)
    tumor = SourceTumor.from_arrays(image, label, affine, max_anisotropy=20)
    with pytest.raises(SinganInsertError, match="anisotropic"):
        paste_tumor(tumor, SHAPE, np.diag([*SPACING, 1.0]))  # the source side is checked too
    _, _, iso_affine = source_volume()
    iso = SourceTumor.from_arrays(*source_volume()[:2], iso_affine)
    with pytest.raises(SinganInsertError, match="target image is extremely anisotropic"):
        paste_tumor(iso, SHAPE, np.diag([0.3, 0.3, 5.0, 1.0]))


def test_tumor_outside_the_field_of_view(source):
    tumor, _, _, affine = source
    with pytest.raises(SinganInsertError, match="is outside the target's field of view"):
        paste_tumor(tumor, SHAPE, affine, Placement((200, 10, 10)))
    with pytest.raises(SinganInsertError, match="partly outside.*clip_to_fov"):
        paste_tumor(tumor, SHAPE, affine, Placement((2, 24, 10)))
    clipped = paste_tumor(tumor, SHAPE, affine, Placement((2, 24, 10)), clip_to_fov=True)
    assert clipped.start[0] == 0 and 0 < clipped.mask.sum() < tumor.num_voxels


def test_tumor_touching_the_border(source):
    tumor, _, _, affine = source
    # x radius 8 voxels: centred at 8 the tumor reaches index 0.
    with pytest.raises(SinganInsertError, match="from the border"):
        paste_tumor(tumor, SHAPE, affine, Placement((8, 24, 10)))
    touching = paste_tumor(tumor, SHAPE, affine, Placement((8, 24, 10)), border_margin=0)
    assert touching.start[0] == 0
    with pytest.raises(SinganInsertError, match="from the border"):
        paste_tumor(tumor, SHAPE, affine, Placement((12, 24, 10)), border_margin=6)


def test_tumor_smaller_than_a_voxel_is_rejected(source):
    tumor, _, _, affine = source
    with pytest.raises(SinganInsertError, match="smaller than a target voxel"):
        paste_tumor(tumor, SHAPE, np.diag([30.0, 30.0, 30.0, 1.0]), Placement((1.5, 1.5, 1.5)))


def test_placement_validation_and_round_trip():
    placement = Placement((1, 2.5, 3), "mm", (True, False, True), (10, 0, -5), 1.2)
    assert Placement.from_dict(placement.to_dict()) == placement
    assert placement.scale == (1.2, 1.2, 1.2)
    with pytest.raises(SinganInsertError, match="positive"):
        Placement(scale=(1, -1, 1))
    with pytest.raises(SinganInsertError, match="units"):
        Placement((1, 2, 3), units="cm")
    with pytest.raises(SinganInsertError, match="3 values"):
        Placement((1, 2))


# ---------------------------------------------------------------- files and objects
def test_from_files_reads_float_multilabel_nifti(tmp_path):
    image, label, affine = source_volume()
    multi = label.astype(np.float64)
    multi[3:6, 3:6, 3:6] = 2
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image(multi, affine), tmp_path / "label.nii.gz")
    tumor = SourceTumor.from_files(tmp_path / "image.nii.gz", tmp_path / "label.nii.gz", label_value=1)
    assert tumor.num_voxels == label.sum()
    assert "image.nii.gz" in tumor.origin
    with pytest.raises(SinganInsertError, match="does not exist"):
        SourceTumor.from_files(tmp_path / "missing.nii.gz", tmp_path / "label.nii.gz")


def test_source_tumor_is_compact_immutable_and_cheap_to_copy(source):
    tumor, image, *_ = source
    assert tumor.image.size < image.size / 10  # a crop around the tumor
    with pytest.raises(ValueError):
        tumor.image[0, 0, 0] = 1  # read-only
    assert copy.deepcopy(tumor) is tumor
    restored = pickle.loads(pickle.dumps(tumor))
    assert restored.checksum == tumor.checksum and np.array_equal(restored.mask, tumor.mask)
    assert len(pickle.dumps(tumor)) < 100_000
    assert repr(tumor).startswith("SourceTumor(") and "[[" not in repr(tumor)


def test_intensity_quantiles_keep_extremes_and_bound_cost():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(128, 128, 40)).astype(np.float32)
    table = intensity_quantiles(values)
    assert table[0] == values.min() and table[-1] == values.max()
    assert np.all(np.diff(table) >= 0)
    exact = np.percentile(values, [0.5, 50, 99.5])
    approx = np.interp([0.005, 0.5, 0.995], np.linspace(0, 1, table.size), table)
    assert np.allclose(exact, approx, atol=0.02)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_quantile_table_read_off_the_sorted_sample_is_numpys_to_the_last_bit(dtype):
    from singan_insert.insertion.placement import _sorted_quantiles

    rng = np.random.default_rng(1)
    for size in (1, 2, 7, 1390, 80247):
        for ordered in (np.sort(rng.normal(scale=300, size=size).astype(dtype)),
                        np.sort(rng.integers(0, 50, size).astype(dtype))):  # ties
            expected = np.quantile(ordered, np.linspace(0.0, 1.0, 8193)).astype(np.float64)
            assert np.array_equal(_sorted_quantiles(ordered, 8193), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint16, np.uint8])
def test_whole_volume_extremes_by_either_path(dtype):
    from singan_insert.insertion.placement import _min_max

    values = (np.random.default_rng(2).random((20, 30, 8)) * 200).astype(dtype)
    assert _min_max(values) == (float(values.min()), float(values.max()))
    read_only = values.copy()
    read_only.flags.writeable = False  # numpy's path: torch would warn on it
    assert _min_max(read_only) == (float(values.min()), float(values.max()))
    assert _min_max(values[:, ::-1]) == (float(values.min()), float(values.max()))
    assert _min_max(np.asfortranarray(values)) == (float(values.min()), float(values.max()))  # nibabel's order
    if np.issubdtype(dtype, np.floating):
        for bad in (np.nan, np.inf, -np.inf):
            spoilt = values.copy()
            spoilt[3, 4, 5] = bad
            assert not all(np.isfinite(_min_max(spoilt)))
            with pytest.raises(SinganInsertError, match="NaN|infinite|finite"):
                intensity_quantiles(spoilt)


# ---------------------------------------------------------------- 2D targets and margins
def test_a_two_dimensional_target_receives_the_tumor_section_through_its_plane(source):
    tumor, _, mask, affine = source
    plane = affine.copy()
    plane[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, 10.0]) + affine[:3, 3]  # slice k = 10
    pasted = paste_tumor(tumor, (48, 48, 1), plane, None)  # in place, margin 1 in-plane only
    full = pasted.full_mask((48, 48, 1))
    assert np.array_equal(full[..., 0], mask[..., 10].astype(bool))
    assert planar_axes((48, 48, 1)) == (2,) and planar_axes((1, 48, 48)) == (0,)
    assert planar_axes(SHAPE) == () and planar_axes((1, 1, 48)) == ()
    with pytest.raises(SinganInsertError, match="from the border"):  # in-plane margins still apply
        paste_tumor(tumor, (48, 48, 1), plane, Placement((8, 24, 0)))


@pytest.mark.parametrize("margin", [-1, 1.5, True, "2"])
def test_border_margin_must_be_a_non_negative_integer(source, margin):
    tumor, _, _, affine = source
    with pytest.raises(SinganInsertError, match="border_margin must be an integer >= 0"):
        paste_tumor(tumor, SHAPE, affine, Placement((24, 24, 10)), border_margin=margin)
    assert paste_tumor(tumor, SHAPE, affine, Placement((24, 24, 10)), border_margin=np.int64(2)).mask.any()


def test_a_mask_saved_as_0_255_is_refused_with_the_value_to_pass():
    image = np.random.default_rng(0).normal(size=(12, 12, 6)).astype(np.float32)
    mask = np.zeros((12, 12, 6), np.uint8)
    mask[4:8, 4:8, 2:4] = 255  # a binary mask written by an image editor
    with pytest.raises(SinganInsertError, match=r"holds 255\. .*--source-label-value"):
        SourceTumor.from_arrays(image, mask, np.eye(4), label_value=1)
    assert SourceTumor.from_arrays(image, mask, np.eye(4), label_value=255).num_voxels == 32
