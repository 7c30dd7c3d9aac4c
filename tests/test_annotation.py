"""The optional one-slice annotation: a tumor mask on the training slice gives B's tumor look."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from singan_insert import Harmonizer, TrainingConfig, train_harmonizer
from singan_insert.datasets.phantom import simulate_subject
from singan_insert.errors import ModelFileError, SinganInsertError
from singan_insert.evaluation.experiments import training_slice_from_subject
from singan_insert.harmonizer.model_file import load_tensors, save_tensors
from singan_insert.harmonizer.normalization import PercentileNormalization
from singan_insert.harmonizer.training import TrainingHealthWarning
from singan_insert.insertion.annotation import (
    RIM_EDGES_MM,
    RIM_SCALE_RANGE,
    TumorProfile,
    equivalent_radius_mm,
    interior_spread,
    render_rim,
    rim_scale,
    tumor_edge,
)
from singan_insert.insertion.appearance import inplane_distance
from singan_insert.insertion.insert import InsertionParameters, insert_tumor
from singan_insert.insertion.placement import SourceTumor, intensity_quantiles


@pytest.fixture(scope="module")
def training_subject():
    return simulate_subject(0)


@pytest.fixture(scope="module")
def annotated_model(training_subject):
    image, spacing, index = training_slice_from_subject(training_subject)
    annotation = np.take(training_subject.label_b, index, axis=2) == 1
    config = TrainingConfig.preset("tiny", max_size=128, min_size=24, iterations=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingHealthWarning)
        return train_harmonizer(image, config, seed=0, spacing=spacing, progress=False, annotation=annotation,
                                provenance={"axis": 2, "modality": "hrT2"})


def test_profile_measures_level_contrast_and_spread():
    image = np.zeros((40, 40))
    image[:, :] = 0.8  # surroundings
    mask = np.zeros((40, 40), bool)
    mask[12:28, 12:28] = True
    image[mask] = -0.2
    profile = TumorProfile.measure(image, mask, (0.5, 0.5), shell_mm=2.0)
    assert profile.tumor_mean == pytest.approx(-0.2)
    assert profile.shell_mean == pytest.approx(0.8)
    assert profile.contrast == pytest.approx(-1.0)
    assert profile.structure_std == pytest.approx(0.0, abs=1e-9)
    assert profile.texture_std < 1e-3  # a flat tumor: nothing but the tumor is measured
    # A textured tumor has a texture sd near its noise's; a smooth ramp has structure, no texture.
    rng = np.random.default_rng(0)
    noisy = image + np.where(mask, rng.normal(0, 0.1, image.shape), 0)
    assert TumorProfile.measure(noisy, mask, (0.5, 0.5), 2.0).texture_std > 0.05
    ramp = image + np.where(mask, np.linspace(-0.3, 0.3, 40)[None, :], 0)
    structure, texture = interior_spread(ramp[None], mask[None])
    assert structure > 0.05 and texture < 0.01


def test_annotation_is_resized_stored_and_verified(annotated_model, training_subject, tmp_path):
    finest = tuple(annotated_model.geometry.finest)
    assert annotated_model.tumor_annotation is not None
    assert tuple(annotated_model.tumor_annotation.shape) == finest
    path = annotated_model.save(tmp_path / "annotated.safetensors")
    loaded = Harmonizer.load(path)
    assert torch.equal(loaded.tumor_annotation, annotated_model.tumor_annotation)
    # A file whose annotation has another shape is refused (by the writer, and by the same
    # metadata check on reading).
    tensors, meta = load_tensors(path, "singan-insert-harmonizer")
    tensors["tumor_annotation"] = torch.ones(3, 3)
    with pytest.raises(ModelFileError, match="tumor_annotation"):
        save_tensors(tmp_path / "bad.safetensors", tensors, "singan-insert-harmonizer",
                     {k: v for k, v in meta.items() if k not in ("format", "format_version")})
    # A copy shares the generators but not the annotation.
    twin = loaded.copy().annotate(None)
    assert twin.pyramid is loaded.pyramid and twin.tumor_annotation is None
    assert loaded.tumor_annotation is not None
    # Removing and re-adding (e.g. on a model trained without one) needs no retraining.
    loaded.annotate(None)
    assert loaded.tumor_annotation is None and TumorProfile.of(loaded, 2.0) is None
    full = np.zeros(finest, bool)
    full[20:40, 20:40] = True
    loaded.annotate(full)
    assert tuple(loaded.tumor_annotation.shape) == finest and (loaded.tumor_annotation > 0.5).sum() == 400
    # A mask of another size than the trained slice's or the finest scale's is refused, even
    # with the same aspect ratio: it cannot be told from a full slice's mask on a cropped model.
    with pytest.raises(SinganInsertError, match="trained on"):
        loaded.annotate(full[::2, ::2])


def test_an_annotation_of_the_uncropped_slice_is_refused_on_a_cropped_model(training_subject):
    image, spacing, index = training_slice_from_subject(training_subject)
    mask = np.take(training_subject.label_b, index, axis=2) == 1
    rows, cols = np.nonzero(mask)
    crop = (int(rows.min()) - 20, int(rows.min()) + 44, int(cols.min()) - 20, int(cols.min()) + 44)
    model = train_harmonizer(image[crop[0]:crop[1], crop[2]:crop[3]], TrainingConfig.preset("tiny", iterations=1),
                             spacing=spacing, progress=False, sample_figures=False,
                             provenance={"crop": list(crop)})
    with pytest.raises(SinganInsertError, match=rf"mask\[{crop[0]}:{crop[1]}, {crop[2]}:{crop[3]}\]"):
        model.annotate(mask)  # the same aspect ratio as the crop: it used to be squeezed into it
    model.annotate(mask[crop[0]:crop[1], crop[2]:crop[3]])
    finest = model.geometry.finest
    expected = mask.sum() * finest[0] * finest[1] / 64 ** 2  # the whole tumor, at the finest scale's size
    assert int((model.tumor_annotation > 0.5).sum()) == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize("mask, message", [
    (np.zeros((128, 128), bool), "empty"),
    (np.ones((4, 128, 128), bool), "2D"),
    (np.ones((128, 40), bool), "trained on"),
    (np.full((128, 128), np.nan), "NaN|finite"),
])
def test_bad_annotations_are_refused(annotated_model, mask, message):
    model = annotated_model.copy().annotate(None)
    with pytest.raises(SinganInsertError, match=message):
        model.annotate(mask)


def test_train_refuses_a_mismatched_annotation_before_training(training_subject):
    image, spacing, index = training_slice_from_subject(training_subject)
    with pytest.raises(SinganInsertError, match="shape"):
        train_harmonizer(image, TrainingConfig.preset("tiny"), annotation=np.ones((3, 3)), progress=False)
    with pytest.raises(SinganInsertError, match="empty"):
        train_harmonizer(image, TrainingConfig.preset("tiny"), annotation=np.zeros(image.shape), progress=False)


@pytest.mark.parametrize("seed", [3, 4])
def test_annotated_insertion_takes_b_level_from_the_slice(annotated_model, seed):
    subject = simulate_subject(seed)
    washed = subject.render_b_washed_out()
    source = SourceTumor.from_arrays(subject.image_a, subject.label_a, subject.affine_a, label_value=1)
    for contrast in (0.5, 1.0, 1.5):  # the user's lambda has no effect on the automatic appearance
        result = insert_tumor(washed, subject.affine_b, source, annotated_model,
                              InsertionParameters(seed=0, contrast=contrast, texture=False))
        record = result.record["appearance"]
        assert record["by"] == "annotation"
        profile = TumorProfile.of(annotated_model, 2.0)
        normalization = PercentileNormalization.fit(intensity_quantiles(washed))
        to_model = lambda v: float(normalization.to_model(torch.tensor(v)).mean())  # noqa: E731
        level = to_model(result.image[result.mask])
        # The harmonized tumor is brought back to the chosen level (the annotated one, unless
        # that is within the visibility floor of these surroundings), its outermost pixels
        # standing above its interior by the annotated tumor's step (B's edge is mixed with the cleft).
        assert level == pytest.approx(to_model(record["level"]), abs=0.01)
        axis = result.record["parameters"]["axis"]
        slices = np.moveaxis(result.image, axis, 0)
        edge = tumor_edge(np.moveaxis(result.mask, axis, 0))
        interior = np.moveaxis(result.mask, axis, 0) & ~edge
        step = to_model(slices[edge]) - to_model(slices[interior])
        assert step == pytest.approx(profile.edge_mean - profile.interior_mean, abs=0.01)
        if abs(profile.tumor_mean - to_model(record["surroundings"])) >= 0.1:
            assert to_model(record["level"]) == pytest.approx(profile.tumor_mean, abs=1e-3)
    # The truth's level in the same units is close to the annotated one (the simulator's
    # hrT2 tumors share one level), unlike the raw paste's.
    truth = subject.render_b(result.mask)
    truth_level = float(normalization.to_model(torch.tensor(truth[result.mask])).mean())
    raw = insert_tumor(washed, subject.affine_b, source, annotated_model,
                       InsertionParameters(seed=0, appearance="fixed", contrast=1.0))
    raw_level = float(normalization.to_model(torch.tensor(raw.image[raw.mask])).mean())
    assert abs(level - truth_level) < 0.15 < abs(raw_level - truth_level)


def test_annotated_level_respects_the_visibility_floor(annotated_model):
    subject = simulate_subject(3)
    washed = subject.render_b_washed_out()
    source = SourceTumor.from_arrays(subject.image_a, subject.label_a, subject.affine_a, label_value=1)
    profile = TumorProfile.of(annotated_model, 2.0)
    floor = 0.45  # far more than the annotated tumor's contrast to this subject's surroundings
    result = insert_tumor(washed, subject.affine_b, source, annotated_model,
                          InsertionParameters(seed=0, visibility_floor=floor, texture=False))
    record = result.record["appearance"]
    normalization = PercentileNormalization.fit(intensity_quantiles(washed))
    to_model = lambda v: float(normalization.to_model(torch.tensor(v)))  # noqa: E731
    assert abs(to_model(record["level"]) - to_model(record["surroundings"])) == pytest.approx(2 * floor, abs=1e-3)
    assert abs(to_model(record["level"]) - profile.tumor_mean) > 0.05


def test_cli_train_annotates_from_the_label_and_annotate_adds_or_removes(training_subject, tmp_path, capsys):
    import nibabel as nib

    from singan_insert.cli import main

    nib.save(nib.Nifti1Image(training_subject.image_b.astype(np.float32), training_subject.affine_b),
             tmp_path / "hrT2.nii.gz")
    nib.save(nib.Nifti1Image(training_subject.label_b.astype(np.uint8), training_subject.affine_b),
             tmp_path / "label.nii.gz")
    common = [str(tmp_path / "hrT2.nii.gz"), "--label", str(tmp_path / "label.nii.gz"), "--preset", "tiny",
              "--iterations", "2", "--no-samples", "--device", "cpu"]
    assert main(["train", *common, "--out", str(tmp_path / "with")]) == 0
    assert "annotated" in capsys.readouterr().out
    with_annotation = Harmonizer.load(tmp_path / "with")
    assert with_annotation.tumor_annotation is not None
    assert main(["train", *common, "--no-annotate", "--out", str(tmp_path / "without")]) == 0
    without = Harmonizer.load(tmp_path / "without")
    assert without.tumor_annotation is None
    # Annotating later (a 2D mask of the training slice) needs no retraining.
    _, _, index = training_slice_from_subject(training_subject)
    np.save(tmp_path / "mask.npy", (np.take(training_subject.label_b, index, axis=2) == 1).astype(np.uint8))
    assert main(["annotate", "--model", str(tmp_path / "without"), "--mask", str(tmp_path / "mask.npy")]) == 0
    assert torch.equal(Harmonizer.load(tmp_path / "without").tumor_annotation, with_annotation.tumor_annotation)
    (tmp_path / "copy").mkdir()  # --out may name a folder: the model file goes inside
    assert main(["annotate", "--model", str(tmp_path / "without"), "--mask", str(tmp_path / "mask.npy"),
                 "--out", str(tmp_path / "copy")]) == 0
    assert Harmonizer.load(tmp_path / "copy").tumor_annotation is not None
    assert main(["annotate", "--model", str(tmp_path / "without"), "--remove"]) == 0
    assert Harmonizer.load(tmp_path / "without").tumor_annotation is None
    # The slice's crossMoDA label map (1 = tumor, 2 = cochlea) is refused as a mask, and taken
    # with --label-value: the same annotation as the tumor's own mask.
    label_slice = np.take(training_subject.label_b, index, axis=2).astype(np.uint8)
    assert set(np.unique(label_slice)) == {0, 1, 2}
    np.save(tmp_path / "labels.npy", label_slice)
    assert main(["annotate", "--model", str(tmp_path / "without"), "--mask", str(tmp_path / "labels.npy")]) == 2
    assert "several labels" in capsys.readouterr().err
    assert main(["annotate", "--model", str(tmp_path / "without"), "--mask", str(tmp_path / "labels.npy"),
                 "--label-value", "1"]) == 0
    assert torch.equal(Harmonizer.load(tmp_path / "without").tumor_annotation, with_annotation.tumor_annotation)
    assert main(["annotate", "--model", str(tmp_path / "without"), "--mask", str(tmp_path / "labels.npy"),
                 "--label-value", "3"]) == 2
    assert "no pixel of label 3" in capsys.readouterr().err
    # A label without the tumor on the chosen slice is a clear error, before any training.
    assert main(["train", *common, "--slice", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "no tumor" in capsys.readouterr().err


def test_profile_measures_the_rim_band_by_band():
    image = np.full((40, 40), -0.5)
    mask = np.zeros((40, 40), bool)
    mask[12:28, 12:28] = True
    image[mask] = 0.0
    distance = inplane_distance(mask[None], (0.5, 0.5))[0]
    image[(distance > 0) & (distance <= 1.0)] = 0.9  # a bright 1 mm cleft, as CSF around a schwannoma
    profile = TumorProfile.measure(image, mask, (0.5, 0.5), shell_mm=2.0)
    assert profile.rim_levels == pytest.approx((0.9, -0.5, -0.5))
    assert RIM_EDGES_MM == (0.0, 1.0, 2.0, 3.0)


def test_profile_measures_the_tumor_edge_apart_from_its_interior():
    image = np.full((40, 40), -0.5)
    mask = np.zeros((40, 40), bool)
    mask[12:28, 10:30] = True
    edge = tumor_edge(mask[None])[0]
    # The outermost pixels: a 4-neighbour outside the mask; none outside it; a ring one pixel wide.
    assert not edge[~mask].any() and edge.sum() == 2 * 16 + 2 * 20 - 4
    assert not edge[13:27, 11:29].any()
    image[mask] = 0.1
    image[edge] = 0.3  # mixed with a bright cleft, as B's edge pixels are
    profile = TumorProfile.measure(image, mask, (0.5, 0.5), shell_mm=2.0)
    assert profile.edge_mean == pytest.approx(0.3) and profile.interior_mean == pytest.approx(0.1)
    assert profile.interior_mean < profile.tumor_mean < profile.edge_mean
    # A tumor cut by the image's border goes on beyond it; one two pixels wide has no interior.
    cut = np.zeros((10, 10), bool)
    cut[:4, 3:7] = True
    assert not tumor_edge(cut[None])[0][0, 4:6].any() and tumor_edge(cut[None])[0][3, 3:7].all()
    thin = np.zeros((40, 40), bool)
    thin[10:30, 20:22] = True
    image[thin] = 0.2
    measured = TumorProfile.measure(image, thin, (0.5, 0.5), shell_mm=2.0)
    assert np.isnan(measured.interior_mean) and measured.to_dict()["interior_mean"] is None


def test_render_rim_shifts_each_band_to_b_level_and_keeps_the_rest():
    rng = np.random.default_rng(0)
    slices = rng.normal(1.0, 0.05, (3, 40, 40)).astype(np.float32)
    mask = np.zeros(slices.shape, bool)
    mask[:, 14:26, 15:27] = True
    mask[0, 14:18, 15:19] = False  # slices of different cross-sections
    spacing = (0.5, 0.5)
    normalization = PercentileNormalization(0.0, 2.0)  # model units = value - 1
    levels = (0.6, 0.2, float("nan"))  # the third band unknown on the annotated slice: left as it is
    out, record = render_rim(slices, mask, spacing, levels, normalization)
    distance = inplane_distance(mask, spacing)
    for (low, high), level in zip([(0, 1), (1, 2)], levels):
        band = (distance > low) & (distance <= high)
        assert float(out[band].mean()) == pytest.approx(level + 1.0, abs=1e-5)
        shift = out[band] - slices[band]
        assert np.ptp(shift) < 1e-5  # one shift per band: the texture stays
    untouched = mask | (distance > 2.0)
    assert np.array_equal(out[untouched], slices[untouched])
    assert record["target"][2] is None and record["after"][0] == pytest.approx(1.6, abs=1e-4)
    with pytest.raises(SinganInsertError, match="bands"):
        render_rim(slices, mask, spacing, (0.1, 0.2), normalization)


def test_annotated_insertion_gives_the_tumor_b_rim(annotated_model):
    subject = simulate_subject(3)
    # The target without the tumor's CSF pocket (what a CycleGAN that washed the tumor out may
    # show): everything within 5 mm of the tumor filled with the tissue level 5-8 mm out.
    from scipy.ndimage import distance_transform_edt

    target = subject.render_b_washed_out().copy()
    distance_3d = distance_transform_edt(subject.label_b != 1, sampling=subject.spacing_b)
    near = distance_3d <= 5.0
    rng = np.random.default_rng(0)
    target[near] = np.median(target[(distance_3d > 5) & (distance_3d <= 8)]) + rng.normal(0, 0.01, near.sum())
    source = SourceTumor.from_arrays(subject.image_a, subject.label_a, subject.affine_a, label_value=1)
    with_rim = insert_tumor(target, subject.affine_b, source, annotated_model, InsertionParameters(seed=0))
    without = insert_tumor(target, subject.affine_b, source, annotated_model, InsertionParameters(seed=0, rim=False))
    assert with_rim.record["parameters"]["rim"] is True and without.record["parameters"]["rim"] is False
    # With B's own look from the annotation, the tumor keeps it through harmonization.
    assert with_rim.record["parameters"]["harmonize_tumor"] is False
    normalization = PercentileNormalization.fit(intensity_quantiles(target))
    profile = TumorProfile.of(annotated_model, 2.0)
    slices = sorted(set(np.nonzero(with_rim.mask)[2]))
    mask = np.moveaxis(with_rim.mask, 2, 0)[slices]
    distance = inplane_distance(mask, subject.spacing_b[:2])
    # The rim's widths follow the new tumor's size over the annotated one's (here another subject's).
    scale = with_rim.record["parameters"]["rim_scale"]
    assert scale == pytest.approx(np.clip(equivalent_radius_mm(mask, subject.spacing_b[:2]) / profile.radius_mm,
                                          *RIM_SCALE_RANGE))
    assert scale != pytest.approx(1.0, abs=0.05)  # the case tests the scaling, not the identity
    edges = np.asarray(RIM_EDGES_MM) * scale
    for b, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        band = (distance > low) & (distance <= high)
        got = float(normalization.to_model(torch.tensor(np.moveaxis(with_rim.image, 2, 0)[slices][band])).mean())
        before = float(normalization.to_model(torch.tensor(np.moveaxis(without.image, 2, 0)[slices][band])).mean())
        assert got == pytest.approx(profile.rim_levels[b], abs=0.01)
        if b == 0:  # the cleft: B's annotated tumor is outlined by bright CSF, this target is not
            assert profile.rim_levels[0] > before + 0.2
    # Inside the tumor, and far from it, the rim changes nothing.
    far = np.ones(target.shape, bool)
    reach = max(RIM_EDGES_MM[-1] * scale, 1.0 + 2.0) + 0.5  # past the rim and the blend (dilation + feather)
    margin = [int(np.ceil(reach / size)) for size in subject.spacing_b]
    far[tuple(slice(max(s.start - m, 0), s.stop + m) for s, m in zip(_box(with_rim.mask), margin))] = False
    assert np.array_equal(with_rim.image[with_rim.mask], without.image[with_rim.mask])
    assert np.array_equal(with_rim.image[far], without.image[far])
    # No annotation, no rim: asking for one says so; an old record without the field still replays.
    plain = annotated_model.copy().annotate(None)
    with pytest.warns(UserWarning, match="rim=True has no effect"):
        result = insert_tumor(target, subject.affine_b, source, plain, InsertionParameters(seed=0, rim=True))
    assert result.record["parameters"]["rim"] is False
    assert result.record["parameters"]["harmonize_tumor"] is True  # without it, harmonized as before
    old = {k: v for k, v in with_rim.record["parameters"].items() if k not in ("rim", "rim_scale")}
    assert InsertionParameters.from_dict(old).rim is None
    # A record made before the rim followed the tumor's size replays with the widths it had.
    fixed_widths = {k: v for k, v in with_rim.record["parameters"].items() if k != "rim_scale"}
    assert InsertionParameters.from_dict(fixed_widths).rim_scale == 1.0
    replayed = insert_tumor(target, subject.affine_b, source, annotated_model,
                            InsertionParameters.from_dict(with_rim.record["parameters"]))
    assert np.array_equal(replayed.image, with_rim.image)


def test_a_tumor_moved_to_a_location_gets_no_rim_unless_asked(annotated_model):
    """Where the tumor grew (no location), the annotated rim; moved to a location, whose
    surroundings need not be the fluid space it comes from, none unless ``rim=True``."""
    from singan_insert.insertion.placement import Placement

    subject = simulate_subject(3)
    target = subject.render_b_washed_out()
    source = SourceTumor.from_arrays(subject.image_a, subject.label_a, subject.affine_a, label_value=1)
    # A location inside the head, a few voxels from where the tumor grew.
    location = tuple(float(c) + d for c, d in zip(np.argwhere(subject.label_b == 1).mean(axis=0), (6, -4, 0)))

    def inserted(**fields):
        return insert_tumor(target, subject.affine_b, source, annotated_model, InsertionParameters(seed=0, **fields))

    assert inserted().record["parameters"]["rim"] is True
    moved = inserted(placement=Placement(location=location))
    assert moved.record["parameters"]["rim"] is False
    unmoved_pose = inserted(placement=Placement(flips=(True, False, False)))  # turned in place: not moved
    assert unmoved_pose.record["parameters"]["rim"] is True
    without = inserted(placement=Placement(location=location), rim=False)
    forced = inserted(placement=Placement(location=location), rim=True)
    assert np.array_equal(moved.image, without.image)
    assert forced.record["parameters"]["rim"] is True and not np.array_equal(forced.image, moved.image)
    # The record replays as made, whatever the default becomes.
    replayed = insert_tumor(target, subject.affine_b, source, annotated_model,
                            InsertionParameters.from_dict(forced.record["parameters"]))
    assert np.array_equal(replayed.image, forced.image)


def test_rim_scale_follows_the_tumor_size():
    profile = TumorProfile(0.0, 0.0, 0.0, 0.0, 0.0, 1, rim_levels=(0.5, 0.1, 0.0), radius_mm=4.0)
    spacing = (0.5, 0.5)
    yy, xx = np.mgrid[:80, :80]

    def disc(radius_mm):
        return ((yy - 40) ** 2 + (xx - 40) ** 2 <= (radius_mm / spacing[0]) ** 2)[None]

    assert equivalent_radius_mm(disc(6.0), spacing) == pytest.approx(6.0, rel=0.03)
    assert rim_scale(profile, disc(6.0), spacing) == pytest.approx(1.5, rel=0.03)
    assert rim_scale(profile, disc(4.0), spacing) == pytest.approx(1.0, rel=0.03)
    # One tumor, one scale: its small end slices are cuts of the same tumor.
    stack = np.concatenate([disc(1.0), disc(6.0), disc(2.0)])
    assert rim_scale(profile, stack, spacing) == pytest.approx(1.5, rel=0.03)
    assert rim_scale(profile, disc(0.5), spacing) == RIM_SCALE_RANGE[0]
    assert rim_scale(profile, disc(15.0), spacing) == RIM_SCALE_RANGE[1]
    assert rim_scale(replace(profile, radius_mm=0.0), disc(6.0), spacing) == 1.0
    for bad in (0, -1.0, float("nan"), True, "2"):
        with pytest.raises(SinganInsertError, match="rim_scale"):
            InsertionParameters(rim_scale=bad)


def _box(mask):
    from scipy.ndimage import find_objects

    return find_objects(mask.astype(np.uint8))[0]


def test_texture_tops_up_the_interior_not_the_edge_step():
    # A flat tumor whose outermost pixels stand a step above its interior, as the annotated
    # default renders it: the step is structure, so the noise still brings the interior's
    # high-pass up to B's; counted over the whole mask, the step would pass for texture.
    from singan_insert.insertion.appearance import highpass, inject_texture, masked_lowpass, robust_std
    from singan_insert.insertion.annotation import tumor_interior

    rng = np.random.default_rng(0)
    background = rng.normal(0.0, 0.05, (3, 40, 40)).astype(np.float32)
    mask = np.zeros(background.shape, bool)
    mask[:, 14:24, 14:24] = True
    slices = background.copy()
    slices[mask] = 0.5
    slices[tumor_edge(mask)] = 0.9
    surroundings = ~mask
    out, info = inject_texture(slices, background, mask, surroundings, seed=0, target_std=0.05)
    over_mask = robust_std((slices - masked_lowpass(slices, mask, 1.0))[mask])
    assert info["tumor_std"] < 0.5 * over_mask  # what reaches the interior of the step's blur only
    assert info["added_std"] > 0.04 > np.sqrt(max(0.05 ** 2 - over_mask ** 2, 0.0))
    interior = tumor_interior(mask)
    assert robust_std(highpass(out)[interior]) > 0.6 * robust_std(highpass(background)[interior])
