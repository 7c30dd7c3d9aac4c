"""3D insertion (singan_insert.insertion.insert) with the session's tiny harmonizer (tests/conftest.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from singan_insert.errors import SinganInsertError
from singan_insert.insertion.intensity import map_tumor_intensities
from singan_insert.insertion.placement import Placement, SourceTumor, intensity_quantiles
from singan_insert.insertion.insert import (
    InsertionParameters,
    _map_intensities,
    insert_tumor,
    through_plane_axis,
)

SHAPE = (48, 48, 16)
SPACING = (0.5, 0.5, 1.5)
AFFINE = np.diag([*SPACING, 1.0])
TUMOR = ((24, 24, 8), (8, 6, 3.5))  # centre and radii in voxels


def ellipsoid(shape, center, radii):
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii)) <= 1


def synthetic_volume(seed, shape=SHAPE, tumor=None, tumor_value=55.0):
    """Smooth anisotropic texture around 100; optionally a darker textured ellipsoid tumor."""
    rng = np.random.default_rng(seed)
    sigma = (2.0, 2.0, 2.0 * SPACING[0] / SPACING[2])
    image = 100 + ndimage.gaussian_filter(rng.normal(size=shape), sigma) * 60
    label = np.zeros(shape, np.uint8)
    if tumor is not None:
        mask = ellipsoid(shape, *tumor)
        texture = ndimage.gaussian_filter(rng.normal(size=shape), sigma) * 25
        image = np.where(mask, tumor_value + texture, image)
        label[mask] = 1
    return image.astype(np.float32), label


@pytest.fixture(scope="module")
def source():
    image, label = synthetic_volume(1, tumor=TUMOR)
    return SourceTumor.from_arrays(image, label, AFFINE)


@pytest.fixture(scope="module")
def target():
    return synthetic_volume(2)[0]


class HarmonizeSpy:
    """Wraps Harmonizer.harmonize to record its calls."""

    def __init__(self, harmonizer, monkeypatch):
        self.calls = []
        original = harmonizer.harmonize

        def spy(background, composite, mask, start_scale=None, **kwargs):
            self.calls.append(dict(background=background.copy(), composite=composite.copy(),
                                   mask=mask.copy(), start_scale=start_scale, **kwargs))
            return original(background, composite, mask, start_scale, **kwargs)

        monkeypatch.setattr(harmonizer, "harmonize", spy)


def test_insertion_writes_label_and_changes_only_the_tumor_neighbourhood(tiny_harmonizer, source, target):
    before = target.copy()
    result = insert_tumor(target, AFFINE, source, tiny_harmonizer)
    assert np.array_equal(target, before)  # inputs are not modified
    expected_mask = ellipsoid(SHAPE, *TUMOR)
    assert np.array_equal(result.mask, expected_mask)
    assert np.array_equal(result.label, expected_mask.astype(np.uint8))
    assert result.label.dtype == np.uint8 and result.image.dtype == np.float32
    # Beyond dilation + feather (1 + 2 mm = 6 px in plane) and outside the tumor slices,
    # the volume is bit-identical.
    plane_distance = ndimage.distance_transform_edt(~expected_mask, sampling=(0.5, 0.5, 1e6))
    far = plane_distance > 3.0 + 1e-6
    assert np.array_equal(result.image[far], target[far])
    assert not np.array_equal(result.image[expected_mask], target[expected_mask])
    json.dumps(result.record)  # JSON-serialisable


def test_every_tumor_slice_is_harmonized_in_one_batched_call(tiny_harmonizer, source, target, monkeypatch):
    spy = HarmonizeSpy(tiny_harmonizer, monkeypatch)
    result = insert_tumor(target, AFFINE, source, tiny_harmonizer, InsertionParameters(seed=3))
    assert len(spy.calls) == 1
    call = spy.calls[0]
    tumor_slices = np.flatnonzero(result.mask.any(axis=(0, 1)))
    assert call["background"].shape[0] == len(tumor_slices) == 7  # every slice along z
    assert result.record["tumor"]["slices"] == tumor_slices.tolist()
    assert call["shared_noise"] is True and call["seed"] == 3
    assert call["spacing"] == (0.5, 0.5)
    assert call["normalization"] is not None  # the volume's, not a per-slice fit
    assert all(m.any() for m in call["mask"])


def test_crop_cost_does_not_grow_with_the_volume(tiny_harmonizer, source, monkeypatch):
    spy = HarmonizeSpy(tiny_harmonizer, monkeypatch)
    params = InsertionParameters(context_mm=4.0, placement=Placement((40, 40, 8)))
    for shape in ((80, 80, 16), (160, 160, 24)):
        volume = synthetic_volume(3, shape=shape)[0]
        insert_tumor(volume, AFFINE, source, tiny_harmonizer, params)
    small, large = (call["background"].shape for call in spy.calls)
    assert small == large  # tumor box + 8 px of context on each side, whatever the volume
    assert small[1] <= 17 + 2 * 8 and small[2] <= 13 + 2 * 8


def test_no_stripes_across_slices(tiny_harmonizer, source, target):
    """Inter-slice intensity jumps inside the inserted tumor vs those of a real tumor."""
    truth, truth_label = synthetic_volume(2, tumor=TUMOR)  # the target with a real tumor
    # The paper's fixed contrast: on this anatomy-free texture, with a model whose slice shows no
    # tumor, the automatic level is a guess on either side (the side's margin was 5 % before
    # 2026-12-07, then another rule took the other side), and a brighter tumor has larger jumps
    # of its own texture; what is tested here is the slices' consistency.
    result = insert_tumor(target, AFFINE, source, tiny_harmonizer,
                          InsertionParameters(intensity_mode="matched", appearance="fixed", contrast=1.0, seed=0))

    def through_plane_jump(image, mask):
        both = mask[:, :, 1:] & mask[:, :, :-1]
        return np.abs(np.diff(image, axis=2))[both].mean()

    reference = through_plane_jump(truth, truth_label > 0)
    inserted = through_plane_jump(result.image, result.mask)
    assert inserted <= 1.5 * reference
    # The check does catch stripes: alternating slice offsets of the truth's own jump size.
    striped = result.image.copy()
    striped[:, :, ::2] += np.where(result.mask[:, :, ::2], reference, 0)
    assert through_plane_jump(striped, result.mask) > 1.5 * reference


def test_record_replays_bit_for_bit(tiny_harmonizer, source, target):
    params = InsertionParameters(placement=Placement((22, 26, 8), flips=(True, False, False),
                                                     rotation_degrees=(0, 0, 20)),
                                 contrast=0.8, seed=None, start_scale=-2)
    first = insert_tumor(target, AFFINE, source, tiny_harmonizer, params)
    record = json.loads(json.dumps(first.record))
    assert isinstance(record["parameters"]["seed"], int)  # the drawn seed is recorded
    assert record["parameters"]["start_scale"] == -2
    assert record["model"]["start_scale_resolved"] == tiny_harmonizer.num_scales - 2
    replayed = insert_tumor(target, AFFINE, source, tiny_harmonizer,
                            InsertionParameters.from_dict(record["parameters"]))
    assert np.array_equal(first.image, replayed.image)
    assert np.array_equal(first.label, replayed.label)
    other_seed = insert_tumor(target, AFFINE, source, tiny_harmonizer,
                              InsertionParameters.from_dict({**record["parameters"], "seed": 1}))
    assert not np.array_equal(first.image, other_seed.image)


def test_intensity_modes_and_contrast(tiny_harmonizer, source, target, monkeypatch):
    spy = HarmonizeSpy(tiny_harmonizer, monkeypatch)
    means = {}
    for contrast in (0.5, 1.0, 1.5):
        insert_tumor(target, AFFINE, source, tiny_harmonizer,
                     InsertionParameters(appearance="fixed", contrast=contrast))
        call = spy.calls[-1]
        means[contrast] = call["composite"][call["mask"] > 0].mean()
    # lambda scales the tumor's normalised intensity above the target's dark reference:
    # the pasted intensities are affine in lambda, increasing.
    assert means[0.5] < means[1.0] < means[1.5]
    assert means[1.5] - means[1.0] == pytest.approx(means[1.0] - means[0.5], rel=1e-3)
    # The mapped tumor lies in the target's range, not the source's.
    assert np.percentile(target, 0.5) <= means[0.5] and means[1.0] <= np.percentile(target, 99.5)


@pytest.mark.parametrize("mode", ["normalized", "matched"])
def test_quantile_table_mapping_matches_the_full_volume_mapping(source, target, mode):
    source_image, source_label = synthetic_volume(1, tumor=TUMOR)
    mask = source_label > 0
    exact = map_tumor_intensities(source_image, mask, target, mode=mode, contrast=0.8)[mask]
    approx = _map_intensities(source_image[mask], intensity_quantiles(source_image),
                              intensity_quantiles(target), mode, 0.8)
    span = np.percentile(target, 99.5) - np.percentile(target, 0.5)
    error = np.abs(exact - approx)
    assert np.percentile(error, 99) < 0.01 * span
    assert error.max() < 0.03 * span  # the extreme tail (the source's darkest voxels)


def test_overlap_policies(tiny_harmonizer, source, target):
    existing = np.zeros(SHAPE, np.int16)
    existing[24:40, 20:28, 5:11] = 2  # overlaps the tumor's +x half
    tumor = ellipsoid(SHAPE, *TUMOR)
    replaced = insert_tumor(target, AFFINE, source, tiny_harmonizer,
                            InsertionParameters(label_value=3), target_label=existing)
    assert replaced.label.dtype == np.int16
    assert np.all(replaced.label[tumor] == 3)
    assert np.all(replaced.label[(existing == 2) & ~tumor] == 2)
    kept = insert_tumor(target, AFFINE, source, tiny_harmonizer,
                        InsertionParameters(label_value=3, overlap="keep"), target_label=existing)
    assert np.all(kept.label[existing == 2] == 2)
    assert np.array_equal(kept.mask, tumor & (existing == 0))  # image and label agree
    assert np.array_equal(kept.label == 3, kept.mask)
    # ... in the image too: the labelled structure keeps its values, also where the tumor's edge
    # and the blend reach (they changed them before), while the unlabelled surroundings blend.
    assert np.array_equal(kept.image[existing == 2], target[existing == 2])
    assert not np.array_equal(replaced.image[(existing == 2) & ~tumor], target[(existing == 2) & ~tumor])
    overlapped = int(np.count_nonzero(tumor & (existing == 2)))
    assert overlapped > 0
    assert replaced.record["overlap"] == {"policy": "replace", "labelled_voxels": overlapped,
                                          "by_label": {"2": overlapped}}
    assert kept.record["overlap"]["policy"] == "keep" and kept.record["overlap"]["labelled_voxels"] == overlapped
    plain = insert_tumor(target, AFFINE, source, tiny_harmonizer, InsertionParameters(label_value=3))
    assert plain.record["overlap"] is None
    boolean = insert_tumor(target, AFFINE, source, tiny_harmonizer, target_label=existing == 2)
    assert boolean.record["overlap"]["by_label"] == {"1": overlapped}  # the value, not "True"
    with pytest.raises(SinganInsertError, match="overlaps"):
        insert_tumor(target, AFFINE, source, tiny_harmonizer, InsertionParameters(overlap="error"),
                     target_label=existing)
    with pytest.raises(SinganInsertError, match="nothing of the tumor is left"):
        insert_tumor(target, AFFINE, source, tiny_harmonizer, InsertionParameters(overlap="keep"),
                     target_label=np.ones(SHAPE, np.uint8))
    with pytest.raises(SinganInsertError, match="does not fit"):
        insert_tumor(target, AFFINE, source, tiny_harmonizer, InsertionParameters(label_value=300),
                     target_label=np.zeros(SHAPE, np.uint8))


def test_model_provenance_is_checked_when_declared(tiny_harmonizer, source, target):
    assert tiny_harmonizer.axis == 2 and tiny_harmonizer.modality == "hrT2"
    with pytest.raises(SinganInsertError, match="trained on 'hrT2'"):
        insert_tumor(target, AFFINE, source, tiny_harmonizer, modality="ceT1")
    with pytest.raises(SinganInsertError, match="along axis 2"):
        insert_tumor(target, AFFINE, source, tiny_harmonizer, InsertionParameters(axis=0))
    result = insert_tumor(target, AFFINE, source, tiny_harmonizer, InsertionParameters(axis=2),
                          modality="HRT2")
    assert result.record["parameters"]["axis"] == 2


def test_an_insertion_across_another_plane_than_the_model_replays_from_its_record(tiny_harmonizer, source, target):
    """The default cuts the target's thickest axis with a warning when the model was trained on
    another; the record holds that axis, and must replay, while an axis that is neither stays refused."""
    assert tiny_harmonizer.axis == 2 and tiny_harmonizer.orientation is None
    turned = np.ascontiguousarray(np.transpose(target, (2, 1, 0)))  # thickest axis now 0
    affine = np.zeros((4, 4))
    affine[0, 2], affine[1, 1], affine[2, 0], affine[3, 3] = SPACING[0], SPACING[1], SPACING[2], 1.0
    with pytest.warns(UserWarning, match="thickest voxel axis is 0 but the model was trained on slices cut along axis 2"):
        first = insert_tumor(turned, affine, source, tiny_harmonizer, InsertionParameters(seed=0))
    assert first.record["parameters"]["axis"] == 0 and first.mask.sum() > 0
    replay = InsertionParameters.from_dict(json.loads(json.dumps(first.record["parameters"])))
    with pytest.warns(UserWarning, match="thickest voxel axis is 0"):
        again = insert_tumor(turned, affine, source, tiny_harmonizer, replay)
    assert np.array_equal(again.image, first.image) and np.array_equal(again.label, first.label)
    with pytest.raises(SinganInsertError, match="along axis 2 but slices along axis 1"):
        insert_tumor(turned, affine, source, tiny_harmonizer, InsertionParameters(axis=1))


def test_default_axis_is_the_through_plane_axis():
    assert through_plane_axis((0.5, 0.5, 1.5)) == 2
    assert through_plane_axis((3.0, 0.4, 0.4)) == 0
    assert through_plane_axis((1.0, 1.0, 1.0)) == 2


def test_bad_inputs_raise_before_anything_is_written(tiny_harmonizer, source, target):
    with pytest.raises(SinganInsertError, match="3D"):
        insert_tumor(target[..., 0], AFFINE, source, tiny_harmonizer)
    with pytest.raises(SinganInsertError, match="NaN"):
        bad = target.copy()
        bad[0, 0, 0] = np.nan
        insert_tumor(bad, AFFINE, source, tiny_harmonizer)
    with pytest.raises(SinganInsertError, match="not invertible"):
        insert_tumor(target, np.diag([0.5, 0.5, 0.0, 1.0]), source, tiny_harmonizer)
    with pytest.raises(SinganInsertError, match="field of view"):
        insert_tumor(target, AFFINE, source, tiny_harmonizer,
                     InsertionParameters(placement=Placement((0, 0, 50))))
    with pytest.raises(SinganInsertError, match="contrast"):
        InsertionParameters(contrast=0)
    with pytest.raises(SinganInsertError, match="shape"):
        insert_tumor(target, AFFINE, source, tiny_harmonizer, target_label=np.zeros((4, 4, 4)))


def test_target_smaller_than_the_needed_crop(tiny_harmonizer):
    """A volume too small for the harmonizer's coarse scale gives a clear error."""
    shape = (8, 8, 8)
    image, label = synthetic_volume(4, shape=shape, tumor=((4, 4, 4), (2, 2, 2)))
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    tumor = SourceTumor.from_arrays(image, label, affine)
    with pytest.raises(SinganInsertError, match="8x8 px.*context.*too small"):
        insert_tumor(image, affine, tumor, tiny_harmonizer, InsertionParameters(start_scale=3))


def test_integer_target_gives_float_output(tiny_harmonizer, source, target):
    result = insert_tumor(np.round(target).astype(np.int16), AFFINE, source, tiny_harmonizer)
    assert result.image.dtype == np.float32


def test_a_tumor_placed_in_the_background_is_announced(tiny_harmonizer, source, target):
    import warnings

    with_air = target.copy()
    with_air[:, :, :5] = 0.0  # the lowest slices are air, below the tumor (slices 5..11)
    in_tissue = insert_tumor(with_air, AFFINE, source, tiny_harmonizer, InsertionParameters(seed=0))
    assert in_tissue.record["tumor"]["background_fraction"] == 0.0
    with_air[:, :, :12] = 0.0  # now most of the tumor's slices (5..11) are air
    with pytest.warns(UserWarning, match=r"% of the tumor lies in the target's background .* co-registered"):
        in_air = insert_tumor(with_air, AFFINE, source, tiny_harmonizer, InsertionParameters(seed=0))
    assert in_air.record["tumor"]["background_fraction"] > 0.5
    # An image with negative values (standardised, CT) has no air to tell by intensity.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        standardised = insert_tumor(with_air - 50.0, AFFINE, source, tiny_harmonizer, InsertionParameters(seed=0))
    assert standardised.record["tumor"]["background_fraction"] == 0.0


def test_the_insertion_keeps_to_the_values_the_target_can_hold(tiny_harmonizer, source, target):
    """Beside a black structure (bone, air) the generators ring and the rim shifts a dark pixel
    further down: nothing may come out darker than the target's darkest voxel, and nothing around
    the tumor brighter than its brightest."""
    from singan_insert.insertion.insert import _within_target_range

    with_bone = target.copy()
    with_bone[:, 30:, :] = 0.0  # a black band right beside the tumor (rows 18..30)
    result = insert_tumor(with_bone, AFFINE, source, tiny_harmonizer, InsertionParameters(seed=0))
    low, high = float(with_bone.min()), float(with_bone.max())
    assert result.image.min() >= low and result.image[~result.mask].max() <= high
    assert result.record["tumor"]["clipped_to_target_range"] > 0  # out of range before the clip

    mask = np.array([[0, 1, 0]])  # the target's range is [0, 20]
    harmonized = np.array([[-3.0, 25.0, 24.0]])  # below the minimum, a bright tumor, a bright ring
    clipped, count = _within_target_range(harmonized, mask, 0.0, 20.0)
    np.testing.assert_array_equal(clipped, [[0.0, 25.0, 20.0]])  # the tumor may be the brightest
    assert count == 2
    unchanged, none = _within_target_range(np.array([[1.0, 30.0, 19.0]]), mask, 0.0, 20.0)
    assert none == 0 and unchanged.tolist() == [[1.0, 30.0, 19.0]]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_target_that_is_not_finite_is_refused_with_what_to_do(tiny_harmonizer, source, target, bad):
    broken = target.copy()
    broken[0, 0, 0] = bad  # far from the tumor: the whole volume is checked, not the crop
    with pytest.raises(SinganInsertError, match="target image contains NaN or infinite.*nan_to_num"):
        insert_tumor(broken, AFFINE, source, tiny_harmonizer, InsertionParameters(seed=0))
