"""Insertion in the model's orientation (singan_insert.insertion.orientation): the same anatomy stored
another way round gives the same tumor, and the record speaks of the target's own voxels."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from test_volume import AFFINE, SHAPE, TUMOR, ellipsoid, synthetic_volume

from singan_insert.errors import SinganInsertError
from singan_insert.harmonizer.training_slice import load_training_slice
from singan_insert.insertion.insert import InsertionParameters, insert_tumor
from singan_insert.insertion.orientation import axis_direction, check_orientation_codes, reorientation_to
from singan_insert.insertion.placement import Placement, SourceTumor
from singan_insert.io import orientation_codes


def stored_otherwise(volume, affine, order, flips):
    """The same voxels stored with the axes permuted by ``order`` and reversed where ``flips``."""
    new_affine = np.asarray(affine, dtype=np.float64).copy()
    out = volume
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis)
            new_affine[:3, 3] += new_affine[:3, axis] * (volume.shape[axis] - 1)
            new_affine[:3, axis] *= -1
    out = np.ascontiguousarray(np.transpose(out, order))
    new_affine = new_affine[:, [*order, 3]]

    def back(x):
        x = np.transpose(x, np.argsort(order))
        for axis, flip in enumerate(flips):
            if flip:
                x = np.flip(x, axis)
        return x

    return out, new_affine, back


ORIENTATIONS = [((0, 1, 2), (True, False, False)), ((1, 0, 2), (False, False, False)),
                ((2, 0, 1), (False, True, True)), ((0, 1, 2), (True, True, True))]


@pytest.fixture(scope="module")
def oriented_model(tiny_harmonizer):
    model = tiny_harmonizer.copy()
    model.metadata = {**model.metadata, "provenance": {**model.provenance, "orientation": "RAS"}}
    return model


@pytest.fixture(scope="module")
def case():
    image, label = synthetic_volume(1, tumor=TUMOR)
    target = synthetic_volume(2)[0]
    existing = np.zeros(SHAPE, np.uint8)
    existing[2:5, 3:7, 1:4] = 2
    return SourceTumor.from_arrays(image, label, AFFINE), target, existing


@pytest.mark.parametrize("order, flips", ORIENTATIONS)
def test_reorientation_maps_voxels_points_and_ranges_consistently(order, flips):
    volume = np.random.default_rng(0).normal(size=(5, 6, 7))
    affine = np.diag([0.5, 0.7, 1.5, 1.0])
    affine[:3, 3] = (3.0, -2.0, 10.0)
    stored, stored_affine, _ = stored_otherwise(volume, affine, order, flips)
    turn = reorientation_to(stored_affine, stored.shape, "RAS")
    assert not turn.is_identity and turn.output_shape == volume.shape
    assert np.array_equal(turn.array(stored), volume)
    assert np.allclose(turn.affine(stored_affine), affine)
    assert np.array_equal(turn.inverse().array(volume), stored)
    for voxel in itertools.product(*[range(0, n, 2) for n in stored.shape]):
        assert volume[tuple(int(round(v)) for v in turn.point(voxel))] == stored[voxel]
    for axis in range(3):
        new_axis, start, stop = turn.interval(axis, 1, 3)
        assert turn.source_axis(new_axis) == axis
        slab = np.zeros(stored.shape, bool)
        slab[(slice(None),) * axis + (slice(1, 3),)] = True
        expected = np.zeros(volume.shape, bool)
        expected[(slice(None),) * new_axis + (slice(start, stop),)] = True
        assert np.array_equal(turn.array(slab), expected)
        assert turn.indices(axis, [1, 2]) == list(range(start, stop))


@pytest.mark.parametrize("order, flips", ORIENTATIONS)
def test_the_same_anatomy_stored_otherwise_gets_the_same_tumor(oriented_model, case, order, flips):
    source, target, existing = case
    location = (23.4, 25.0, 8.0)
    params = InsertionParameters(seed=0, placement=Placement(location=location))
    reference = insert_tumor(target, AFFINE, source, oriented_model, params, target_label=existing,
                             return_composite=True)
    assert "orientation" not in reference.record  # already the model's: nothing to do

    stored, stored_affine, back = stored_otherwise(target, AFFINE, order, flips)
    turn = reorientation_to(AFFINE, SHAPE, orientation_codes(stored_affine))
    moved = replace(params, placement=Placement(location=turn.point(location)))
    label = stored_otherwise(existing, AFFINE, order, flips)[0]
    result = insert_tumor(stored, stored_affine, source, oriented_model, moved, target_label=label,
                          return_composite=True)
    for name in ("image", "mask", "label", "composite"):
        assert np.array_equal(back(getattr(result, name)), getattr(reference, name)), name
    # The record is in the target's own voxels: box, slices and crop select the tumor there.
    record = result.record
    assert record["orientation"] == {"target": orientation_codes(stored_affine), "model": "RAS",
                                     "note": record["orientation"]["note"]}
    tumor = record["tumor"]
    box = tuple(slice(s, s + n) for s, n in zip(tumor["box_start"], tumor["box_shape"]))
    assert result.mask[box].sum() == result.mask.sum()
    axis = record["parameters"]["axis"]
    assert axis == order.index(2)  # the thick axis, where it lies in the stored array
    assert tumor["slices"] == np.flatnonzero(result.mask.any(axis=tuple(a for a in range(3) if a != axis))).tolist()
    assert record["target"]["shape"] == list(stored.shape)
    assert record["target"]["spacing_mm"] == pytest.approx([[0.5, 0.5, 1.5][o] for o in order])
    # ... and replays there bit for bit.
    replayed = insert_tumor(stored, stored_affine, source, oriented_model,
                            InsertionParameters.from_dict(record["parameters"]), target_label=label)
    assert np.array_equal(replayed.image, result.image)


def test_an_error_inside_a_reoriented_insertion_says_whose_voxels_it_names(oriented_model, case):
    source, target, _ = case
    stored, stored_affine, _ = stored_otherwise(target, AFFINE, (2, 0, 1), (False, True, True))
    with pytest.raises(SinganInsertError, match="outside the target") as caught:
        insert_tumor(stored, stored_affine, source, oriented_model,
                     InsertionParameters(placement=Placement(location=(2, 2, 2))))  # a corner
    message = str(caught.value)
    assert "in the model's orientation, RAS" in message
    assert f"your target of shape {stored.shape} is {orientation_codes(stored_affine)}" in message


def test_a_model_without_a_recorded_orientation_inserts_as_stored(tiny_harmonizer, case):
    source, target, _ = case
    assert tiny_harmonizer.orientation is None
    stored, stored_affine, back = stored_otherwise(target, AFFINE, (0, 1, 2), (True, False, False))
    result = insert_tumor(stored, stored_affine, source, tiny_harmonizer, InsertionParameters(seed=0))
    assert "orientation" not in result.record
    assert np.array_equal(back(result.mask), ellipsoid(SHAPE, *TUMOR))  # where it physically was


def test_a_bad_orientation_in_the_model_is_refused_clearly(tiny_harmonizer, case):
    source, target, _ = case
    model = tiny_harmonizer.copy()
    model.metadata = {**model.metadata, "provenance": {**model.provenance, "orientation": "RAR"}}
    with pytest.raises(SinganInsertError, match="model's orientation 'RAR' is not three axis codes"):
        insert_tumor(target, AFFINE, source, model)
    assert check_orientation_codes("lps") == "LPS"
    assert [axis_direction(c) for c in "LPS"] == ["L-R", "P-A", "S-I"]
    for bad in ("RA", "RASS", "XYZ", None, 3):
        with pytest.raises(SinganInsertError):
            check_orientation_codes(bad)


def test_training_from_a_nifti_records_its_orientation(tmp_path):
    volume = synthetic_volume(3)[0]
    lps = np.diag([-0.5, -0.5, 1.5, 1.0])
    nib.save(nib.Nifti1Image(volume, lps), tmp_path / "b.nii.gz")
    chosen = load_training_slice(tmp_path / "b.nii.gz", axis=2, index=8)
    assert chosen.provenance["orientation"] == "LPS"


@pytest.mark.parametrize("recorded", [False, True])
def test_slices_across_another_plane_than_the_model_s_are_announced(tiny_harmonizer, oriented_model, recorded):
    model = oriented_model if recorded else tiny_harmonizer
    # A coronal acquisition: the thick voxels run anterior-posterior (axis 1), the model's slices
    # were cut across axis 2.
    spacing = (0.5, 1.5, 0.5)
    affine = np.diag([*spacing, 1.0])
    target = synthetic_volume(4, shape=(48, 16, 48))[0]
    image, label = synthetic_volume(5, shape=(48, 16, 48), tumor=((24, 8, 24), (8, 3.5, 6)))
    source = SourceTumor.from_arrays(image, label, affine)
    expected = "runs A-P but the model was trained on slices cut across S-I" if recorded else \
        "thickest voxel axis is 1 but the model was trained on slices cut along axis 2"
    with pytest.warns(UserWarning, match=expected):
        insert_tumor(target, affine, source, model, InsertionParameters(seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        insert_tumor(target, affine, source, model, InsertionParameters(seed=0, axis=2))
