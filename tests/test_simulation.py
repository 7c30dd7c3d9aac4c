"""The two-contrast simulator: contrasts, determinism, geometry, tumor volumes, ground-truth renders."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torchio as tio
from scipy import ndimage

from singan_insert.errors import SinganInsertError
from singan_insert.datasets.phantom import (
    SimulatedSubject,
    Tissue,
    _Ellipsoid,
    _grid_affine,
    _index_axes,
    _rotation,
    simulate_subject,
    write_crossmoda,
)

SEEDS = (0, 1, 2)
# Tissues large enough to have voxels away from their borders at every seed.
BULK_TISSUES = (
    Tissue.SCALP,
    Tissue.BONE,
    Tissue.CSF,
    Tissue.GREY_MATTER,
    Tissue.WHITE_MATTER,
    Tissue.BRAINSTEM,
    Tissue.TUMOR,
)


@pytest.fixture(scope="module")
def subjects() -> list[SimulatedSubject]:
    return [simulate_subject(seed) for seed in SEEDS]


def _core_values(image: np.ndarray, tissue: np.ndarray, kind: Tissue) -> np.ndarray:
    """Intensities of a tissue away from its borders (no partial volume)."""
    core = ndimage.binary_erosion(tissue == kind)
    assert core.sum() >= 20, f"too few {kind.name} voxels to measure"
    return image[core]


def test_hrT2_contrast_order(subjects):
    # hrT2: CSF very bright; tumor intermediate, darker than CSF, brighter than brain tissue.
    for subject in subjects:
        mean = {k: _core_values(subject.image_b, subject.tissue_b, k).mean() for k in BULK_TISSUES}
        assert mean[Tissue.CSF] > 1.4 * mean[Tissue.TUMOR]
        assert mean[Tissue.TUMOR] > 1.1 * mean[Tissue.GREY_MATTER]
        assert mean[Tissue.GREY_MATTER] > mean[Tissue.WHITE_MATTER]
        assert mean[Tissue.TUMOR] > 1.4 * mean[Tissue.WHITE_MATTER]
        assert mean[Tissue.BONE] < 0.5 * mean[Tissue.WHITE_MATTER]
        assert mean[Tissue.CSF] == max(mean.values())


def test_ceT1_contrast_order(subjects):
    # ceT1: the tumor enhances strongly; CSF is dark.
    for subject in subjects:
        mean = {k: _core_values(subject.image_a, subject.tissue_a, k).mean() for k in BULK_TISSUES}
        assert mean[Tissue.TUMOR] > 1.4 * mean[Tissue.WHITE_MATTER]
        assert mean[Tissue.WHITE_MATTER] > mean[Tissue.GREY_MATTER] > 1.5 * mean[Tissue.CSF]
        assert mean[Tissue.TUMOR] > 3 * mean[Tissue.CSF]


def test_hrT2_tumor_is_heterogeneous(subjects):
    for subject in subjects:
        tumor = _core_values(subject.image_b, subject.tissue_b, Tissue.TUMOR)
        white = _core_values(subject.image_b, subject.tissue_b, Tissue.WHITE_MATTER)
        assert tumor.std() > 1.5 * white.std()


def test_background_noise_is_rician(subjects):
    # Far from the head the signal is zero, so magnitudes are Rayleigh: mean/sd = 1.913.
    subject = subjects[0]
    air = ndimage.binary_erosion(subject.tissue_b == Tissue.BACKGROUND, iterations=3)
    values = subject.image_b[air]
    assert values.min() > 0
    rayleigh_ratio = np.sqrt(np.pi / 2) / np.sqrt(2 - np.pi / 2)
    assert values.mean() / values.std() == pytest.approx(rayleigh_ratio, rel=0.03)


def test_deterministic_per_seed(subjects):
    again = simulate_subject(SEEDS[0])
    first = subjects[0]
    for name in ("image_a", "label_a", "tissue_a", "affine_a", "image_b", "label_b", "tissue_b", "affine_b"):
        assert np.array_equal(getattr(again, name), getattr(first, name)), name
    assert not np.array_equal(subjects[1].image_b, first.image_b)


def test_grids_spacings_and_shared_physical_space(subjects):
    for subject in subjects:
        assert subject.image_b.shape == (128, 128, 48)
        assert subject.spacing_b == pytest.approx((0.4, 0.4, 1.0))
        assert subject.spacing_a == pytest.approx((0.5, 0.5, 1.5))
        assert subject.image_a.shape != subject.image_b.shape
        assert subject.image_a.dtype == subject.image_b.dtype == np.float32
        # The tumor and the cochleas are in the same place in millimetres on both grids.
        for label, tolerance in ((1, 0.5), (2, 1.0)):
            centroids = []
            grids = ((subject.label_a, subject.affine_a), (subject.label_b, subject.affine_b))
            for image_label, affine in grids:
                index = np.array([idx.mean() for idx in np.nonzero(image_label == label)])
                centroids.append(affine[:3, :3] @ index + affine[:3, 3])
            assert np.linalg.norm(centroids[0] - centroids[1]) < tolerance


def test_torchio_resamples_a_onto_b_consistently(subjects):
    subject = subjects[1]
    torchio_subject = subject.to_torchio()
    assert set(torchio_subject.keys()) >= {"ceT1", "label", "hrT2", "hrT2_label"}
    assert np.allclose(torchio_subject["ceT1"].affine, subject.affine_a)
    assert torchio_subject["hrT2"].spacing == pytest.approx(subject.spacing_b)
    resampled = tio.Resample(torchio_subject["hrT2"])(tio.Subject(label=torchio_subject["label"]))
    tumor_from_a = resampled["label"].data[0].numpy() == 1
    tumor_b = subject.label_b == 1
    dice = 2 * (tumor_from_a & tumor_b).sum() / (tumor_from_a.sum() + tumor_b.sum())
    assert dice > 0.85


def test_tumor_volume_range():
    for volume in (0.1, 5.0):
        subject = simulate_subject(7, tumor_volume_cm3=(volume, volume))
        assert subject.tumor_volume_cm3 == pytest.approx(volume, rel=0.15)
        volume_a = (subject.label_a == 1).sum() * np.prod(subject.spacing_a) / 1000
        assert volume_a == pytest.approx(volume, rel=0.25)


def test_default_volumes_are_in_range(subjects):
    for subject in subjects:
        assert 0.085 <= subject.tumor_volume_cm3 <= 5.75


def test_cochlea_label_optional():
    subject = simulate_subject(3, label_cochleas=False)
    assert set(np.unique(subject.label_b)) == {0, 1}
    assert (simulate_subject(3).label_b == 2).sum() > 20


def test_render_b_own_tumor_is_the_published_image(subjects):
    subject = subjects[0]
    assert np.array_equal(subject.render_b(), subject.image_b)
    assert np.array_equal(subject.render_b(subject.label_b == 1), subject.image_b)
    assert np.array_equal(subject.render_a(), subject.image_a)


def test_washed_out_changes_only_the_tumor_neighbourhood(subjects):
    subject = subjects[0]
    tumor = subject.label_b == 1
    washed = subject.render_b_washed_out()
    near = ndimage.binary_dilation(tumor, np.ones((3, 3, 3), bool), iterations=3)
    assert np.array_equal(washed[~near], subject.image_b[~near])
    # The tumor vanishes into the bright CSF it sat in (what CycleGAN outputs look like).
    core = ndimage.binary_erosion(tumor, iterations=2)
    assert washed[core].mean() > 1.4 * subject.image_b[core].mean()


def test_moved_tumor_carries_its_pattern_and_noise_stays(subjects):
    subject, other = subjects[0], subjects[1]
    tumor = subject.label_b == 1
    shift = 6
    moved = np.roll(tumor, shift, axis=1)
    rendered = subject.render_b(moved)
    core = ndimage.binary_erosion(tumor, iterations=2)
    back = np.roll(rendered, -shift, axis=1)
    assert np.corrcoef(back[core], subject.image_b[core])[0, 1] > 0.6
    foreign = np.roll(subject.render_b(moved, tumor=other.tumor), -shift, axis=1)
    assert abs(np.corrcoef(foreign[core], subject.image_b[core])[0, 1]) < 0.4
    # An explicit placement equal to the default translation gives the same image.
    placement = np.eye(4)
    placement[:3, 3] = subject.affine_b[:3, :3] @ np.array([0, shift, 0])
    assert np.allclose(subject.render_b(moved, placement=placement), rendered, atol=1e-2)


def test_render_rejects_a_mask_on_the_wrong_grid(subjects):
    with pytest.raises(SinganInsertError, match="resample"):
        subjects[0].render_b(subjects[0].label_a == 1)


def test_voxel_distance_is_exact_for_a_sphere_on_an_anisotropic_rotated_grid():
    affine = _grid_affine((40, 40, 20), (0.5, 0.5, 1.5), np.zeros(3), _rotation(20, 10))
    sphere = _Ellipsoid(np.array([0.3, -0.2, 0.1]), np.full(3, 6.0))
    box = tuple(slice(0, n) for n in (40, 40, 20))
    distance = sphere.voxel_distance(affine, _index_axes(box))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in (40, 40, 20)], indexing="ij")).reshape(3, -1)
    offset = (affine[:3, :3] @ index + affine[:3, 3:4]) - sphere.center[:, None]
    norm = np.linalg.norm(offset, axis=0)
    steps = np.linalg.norm(affine[:3, :3].T @ (offset / norm), axis=0)  # voxel steps per mm along the normal
    expected = ((norm - 6.0) / steps).reshape(40, 40, 20)
    assert np.allclose(distance, expected, atol=1e-3)


def test_write_crossmoda_layout(subjects, tmp_path):
    subject = subjects[2]
    paths = write_crossmoda(subject, tmp_path / "data", "crossmoda_sim_2", truth_folder=tmp_path / "truth")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "crossmoda_sim_2_Label.nii.gz",
        "crossmoda_sim_2_ceT1.nii.gz",
        "crossmoda_sim_2_hrT2.nii.gz",
    ]
    assert paths["hrT2_label"] == tmp_path / "truth" / "crossmoda_sim_2_Label.nii.gz"
    ce_t1 = nib.load(paths["ceT1"])
    assert ce_t1.get_data_dtype() == np.float32
    assert np.allclose(ce_t1.affine, subject.affine_a)
    assert ce_t1.header.get_zooms() == pytest.approx(subject.spacing_a)
    assert np.array_equal(np.asarray(ce_t1.dataobj), subject.image_a)
    label = nib.load(paths["label"])
    assert label.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(label.dataobj), subject.label_a)
    hr_t2 = tio.ScalarImage(paths["hrT2"])
    assert hr_t2.spacing == pytest.approx(subject.spacing_b)
    assert hr_t2.orientation == ("R", "A", "S")
    assert np.allclose(hr_t2.affine, subject.affine_b, atol=1e-5)
    assert np.array_equal(np.asarray(nib.load(paths["hrT2_label"]).dataobj), subject.label_b)


def test_write_crossmoda_rejects_bad_names(subjects, tmp_path):
    with pytest.raises(SinganInsertError):
        write_crossmoda(subjects[0], tmp_path, "sub/dir")
    with pytest.raises(SinganInsertError):
        write_crossmoda(subjects[0], tmp_path, "x", truth_folder=tmp_path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seed": -1},
        {"seed": 1.5},
        {"shape": (16, 128, 48)},
        {"spacing_b": (0.4, 0.0, 1.0)},
        {"tumor_volume_cm3": (2.0, 1.0)},
        {"noise_level": -0.1},
        {"bias_strength": 2.0},
    ],
)
def test_bad_arguments_raise(kwargs):
    arguments = {"seed": 0, **kwargs}
    with pytest.raises(SinganInsertError):
        simulate_subject(**arguments)
