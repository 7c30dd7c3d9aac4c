import nibabel as nib
import numpy as np
import pytest

from singan_insert import SinganInsertError
from singan_insert.harmonizer.training_slice import load_training_slice


@pytest.fixture
def volume(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(100, 10, (40, 36, 12)).astype(np.float32)
    label = np.zeros(data.shape, np.uint8)
    label[10:20, 10:20, 7] = 1
    label[12:14, 12:14, 3] = 1
    affine = np.diag([0.4, 0.5, 1.5, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "lab.nii.gz")
    return tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", data


def test_auto_picks_largest_label_slice(volume):
    img, lab, data = volume
    ts = load_training_slice(img, axis=2, index="auto", label_path=lab, modality="hrT2")
    assert ts.provenance["slice_index"] == 7 and ts.provenance["modality"] == "hrT2"
    np.testing.assert_array_equal(ts.image, data[:, :, 7])
    assert ts.spacing == pytest.approx((0.4, 0.5))


def test_axis_index_and_crop(volume):
    img, _, data = volume
    ts = load_training_slice(img, axis=0, index=5, crop=(2, 30, 1, 11))
    np.testing.assert_array_equal(ts.image, data[5, 2:30, 1:11])
    assert ts.spacing == pytest.approx((0.5, 1.5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"axis": 2, "index": 12}, "out of range"),
        ({"axis": 3, "index": 0}, "axis"),
        ({"axis": 2, "index": 0, "crop": (0, 50, 0, 10)}, "outside"),
        ({"axis": 2, "index": 0, "crop": (0, 5, 0)}, "4 numbers"),
        ({"axis": 2, "index": "middle"}, "integer or 'auto'"),
    ],
)
def test_bad_arguments(volume, kwargs, message):
    with pytest.raises(SinganInsertError, match=message):
        load_training_slice(volume[0], **kwargs)


def test_label_on_another_grid(volume, tmp_path):
    img, _, data = volume
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4)), tmp_path / "other.nii.gz")
    with pytest.raises(SinganInsertError, match="not on the grid"):
        load_training_slice(img, label_path=tmp_path / "other.nii.gz")
