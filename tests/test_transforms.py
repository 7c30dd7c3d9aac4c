"""TorchIO transforms (singan_insert.integrations.torchio): TorchIO 1.x conventions end to end."""

from __future__ import annotations

import copy
import pickle
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio
from scipy import ndimage
from torchio.transforms.transform import Transform
from torchio.utils import get_subclasses

from singan_insert.errors import SinganInsertError
from singan_insert.harmonizer.model import Harmonizer
from singan_insert.insertion.placement import SourceTumor
from singan_insert.integrations.torchio import RandomTumorInsertion, TumorInsertion, load_harmonizer

SHAPE = (48, 48, 16)
SPACING = (0.5, 0.5, 1.5)
AFFINE = np.diag([*SPACING, 1.0])
TUMOR = ((24, 24, 8), (7, 5, 3))


def ellipsoid(shape, center, radii):
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii)) <= 1


def synthetic_volume(seed, tumor=None):
    rng = np.random.default_rng(seed)
    image = 100 + ndimage.gaussian_filter(rng.normal(size=SHAPE), (2, 2, 0.7)) * 60
    label = np.zeros(SHAPE, np.uint8)
    if tumor is not None:
        mask = ellipsoid(SHAPE, *tumor)
        image = np.where(mask, 55 + 10 * rng.normal(size=SHAPE), image)
        label[mask] = 1
    return image.astype(np.float32), label


def target_subject(seed=2, **extra) -> tio.Subject:
    image, _ = synthetic_volume(seed)
    return tio.Subject(image=tio.ScalarImage(tensor=image[None], affine=AFFINE), **extra)


@pytest.fixture(scope="module")
def source_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    image, label = synthetic_volume(1, tumor=TUMOR)
    nib.save(nib.Nifti1Image(image, AFFINE), folder / "src_ceT1.nii.gz")
    nib.save(nib.Nifti1Image(label, AFFINE), folder / "src_Label.nii.gz")
    return str(folder / "src_ceT1.nii.gz"), str(folder / "src_Label.nii.gz")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir / "harmonizer.safetensors")


def same(a: tio.Subject, b: tio.Subject) -> bool:
    return all(torch.equal(a[k].data, b[k].data) for k in a.get_images_dict(intensity_only=False))


# ---------------------------------------------------------------- deterministic twin & history
def test_tumor_insertion_adds_label_records_history_and_replays(model, source_files):
    subject = target_subject()
    transform = TumorInsertion(model, source_files, (22, 25, 8), seed=5)
    out = transform(subject)
    assert "label" not in subject and subject.applied_transforms == []  # copy=True
    assert isinstance(out["label"], tio.LabelMap)
    assert out["label"].data.sum() == ellipsoid(SHAPE, *TUMOR).sum()
    assert not torch.equal(out["image"].data, subject["image"].data)
    assert [t.name for t in out.history] == ["TumorInsertion"]
    replayed = out.get_composed_history()(subject)
    assert same(out, replayed)


def test_random_insertion_reproduces_with_manual_seed_and_replays_bit_for_bit(model, source_files):
    subject = target_subject()
    transform = RandomTumorInsertion(model, [source_files], start_scale=(-3, -1), contrast=(0.5, 1.5),
                                     appearance="fixed")
    torch.manual_seed(42)
    first = transform(subject)
    torch.manual_seed(42)
    second = transform(subject)
    assert same(first, second)
    torch.manual_seed(43)
    third = transform(subject)
    assert not torch.equal(first["image"].data, third["image"].data)
    (twin,) = first.history
    assert isinstance(twin, TumorInsertion) and -3 <= twin.start_scale <= -1
    assert 0.5 <= twin.contrast <= 1.5
    assert same(first, first.get_composed_history()(subject))


def test_args_names_are_attributes_and_init_arguments(model, source_files):
    transform = TumorInsertion(model, source_files, (22, 25, 8))
    rebuilt = TumorInsertion(**transform._get_reproducing_arguments())
    assert rebuilt._get_named_arguments() == transform._get_named_arguments()


def test_class_names_do_not_collide_with_torchio():
    names = [cls.__name__ for cls in get_subclasses(Transform)]
    assert names.count("TumorInsertion") == 1 and names.count("RandomTumorInsertion") == 1


# ---------------------------------------------------------------- probability and label key
def test_label_key_is_present_when_p_skips(model, source_files):
    subject = target_subject()
    for transform in (RandomTumorInsertion(model, [source_files], p=0),
                      TumorInsertion(model, source_files, (22, 25, 8), p=0)):
        out = transform(subject)
        assert out["label"].data.dtype == torch.uint8 and out["label"].data.sum() == 0
        assert torch.equal(out["image"].data, subject["image"].data)
        assert out.history[-1].source is None  # the skip is recorded...
        assert same(out, out.get_composed_history()(subject))  # ...and replays


def test_inserted_and_skipped_samples_collate_together(model, source_files):
    subjects = [target_subject(seed) for seed in (2, 3)]
    inserted = TumorInsertion(model, source_files, (22, 25, 8))(subjects[0])
    skipped = TumorInsertion(model, source_files, (22, 25, 8), p=0)(subjects[1])
    batch = tio.SubjectsLoader([inserted, skipped], batch_size=2).collate_fn([inserted, skipped])
    assert batch["label"][tio.DATA].shape == (2, 1, *SHAPE)


# ---------------------------------------------------------------- sources and placement
def test_bank_of_subjects_is_stored_compactly(model):
    image, label = synthetic_volume(1, tumor=TUMOR)
    bank_subject = tio.Subject(t1=tio.ScalarImage(tensor=image[None], affine=AFFINE),
                               label=tio.LabelMap(tensor=label[None], affine=AFFINE))
    transform = RandomTumorInsertion(model, [bank_subject], degrees=0, scales=0, flip_axes=())
    assert isinstance(transform.sources[0], SourceTumor)
    assert len(pickle.dumps(transform)) < 150_000
    out = transform(target_subject())
    assert out["label"].data.sum() == label.sum()


def test_same_subject_source_in_place_like_gba(model):
    """The subject's own tumor, re-inserted where it is with a contrast factor."""
    image, label = synthetic_volume(5, tumor=TUMOR)
    subject = tio.Subject(image=tio.ScalarImage(tensor=image[None], affine=AFFINE),
                          label=tio.LabelMap(tensor=label[None], affine=AFFINE))
    means = {}
    for contrast in (0.5, 1.5):
        transform = RandomTumorInsertion(model, "image", placement_key="label", placement_values=(1,),
                                         placement_mode="centroid", contrast=contrast, degrees=0,
                                         scales=0, flip_axes=(), start_scale=-1, appearance="fixed")
        out = transform(subject)
        assert torch.equal(out["label"].data, subject["label"].data)  # exactly in place
        means[contrast] = out["image"].data[label[None] > 0].mean()
        assert same(out, out.get_composed_history()(subject))
    assert means[0.5] < means[1.5]


def test_placement_from_a_label_region_and_a_probability_map(model, source_files):
    region = np.zeros(SHAPE, np.uint8)
    region[18:30, 18:30, 6:10] = 4
    region[0:4, 0:4, 0:4] = 7  # a region the tumor cannot fit in
    probability = np.zeros(SHAPE, np.float32)
    probability[26, 20, 8] = 1.0
    subject = target_subject(brain=tio.LabelMap(tensor=region[None], affine=AFFINE),
                             prior=tio.ScalarImage(tensor=probability[None], affine=AFFINE))
    common = dict(degrees=0, scales=0, flip_axes=(), include=["image"])
    out = RandomTumorInsertion(model, [source_files], placement_key="brain", placement_values=(4,),
                               **common)(subject)
    assert region[tuple(np.array(out.history[-1].location, int))] == 4
    out = RandomTumorInsertion(model, [source_files], placement_key="prior", **common)(subject)
    assert out.history[-1].location == (26.0, 20.0, 8.0)
    centroid = np.argwhere(out["label"].data[0].numpy()).mean(axis=0)
    assert np.allclose(centroid, (26, 20, 8), atol=0.5)
    with pytest.raises(SinganInsertError, match=r"fits nowhere in the placement region 'brain'.*"
                                                r"border_margin=1.*3 draw\(s\).*max_attempts"):
        RandomTumorInsertion(model, [source_files], placement_key="brain", placement_values=(7,),
                             max_attempts=3, **common)(subject)
    with pytest.raises(SinganInsertError, match="empty"):
        RandomTumorInsertion(model, [source_files], placement_key="brain", placement_values=(9,),
                             **common)(subject)


def _shell_and_block_region() -> np.ndarray:
    """A region the tumor mostly cannot fit in: a 5-voxel border shell, plus a small inner block."""
    region = np.ones(SHAPE, np.uint8)
    region[5:-5, 5:-5, :] = 0  # the shell: too close to the border for the (15 x 11 x 7) tumor
    region[22:25, 22:25, 7:10] = 1  # 27 voxels where it fits, among about 12,800
    return region


def test_placement_draws_only_among_voxels_where_the_tumor_fits(model, source_files):
    """The former rejection sampler drew max_attempts voxels of the whole region and failed
    when none fitted: here nearly always, although 27 voxels fit."""
    region = _shell_and_block_region()
    subject = target_subject(region=tio.LabelMap(tensor=region[None], affine=AFFINE))
    transform = RandomTumorInsertion(model, [source_files], placement_key="region", degrees=0,
                                     scales=0, flip_axes=(), include=["image"])
    for seed in (0, 1):
        torch.manual_seed(seed)
        out = transform(subject)
        location = np.array(out.history[-1].location)
        assert np.all((location >= (22, 22, 7)) & (location <= (24, 24, 9)))
        assert same(out, out.get_composed_history()(subject))  # the drawn location replays
        torch.manual_seed(seed)
        assert same(out, transform(subject))  # and torch's seed reproduces it
    source = SourceTumor.from_files(*source_files)
    locations = set()
    for seed in range(40):
        torch.manual_seed(seed)
        _, location = transform._draw_placement(subject, subject["image"], source, [])
        locations.add(location)
    assert all(region[tuple(int(v) for v in location)] for location in locations)
    assert all(22 <= location[0] <= 24 for location in locations) and len(locations) > 10


def test_a_probability_map_weighs_only_the_voxels_where_the_tumor_fits(model, source_files):
    prior = np.zeros(SHAPE, np.float32)
    prior[:3] = 100.0  # heavy, but the tumor never fits there
    prior[20, 24, 8], prior[28, 24, 8] = 1.0, 3.0
    subject = target_subject(prior=tio.ScalarImage(tensor=prior[None], affine=AFFINE))
    transform = RandomTumorInsertion(model, [source_files], placement_key="prior", degrees=0,
                                     scales=0, flip_axes=(), include=["image"])
    source = SourceTumor.from_files(*source_files)
    torch.manual_seed(0)
    drawn = [transform._draw_placement(subject, subject["image"], source, [])[1] for _ in range(200)]
    assert set(drawn) == {(20.0, 24.0, 8.0), (28.0, 24.0, 8.0)}
    assert 0.65 < drawn.count((28.0, 24.0, 8.0)) / len(drawn) < 0.85  # weight 3 of 4


def test_max_attempts_redraws_a_pose_that_fits_nowhere(model, source_files):
    region = np.zeros(SHAPE, np.uint8)
    region[24, 24, 8] = 1  # with border_margin=3 only a small enough tumor fits
    subject = target_subject(region=tio.LabelMap(tensor=region[None], affine=AFFINE))
    source = SourceTumor.from_files(*source_files)
    common = dict(placement_key="region", degrees=0, scales=(0.6, 1.8), flip_axes=(),
                  border_margin=3, include=["image"])
    once = RandomTumorInsertion(model, [source_files], max_attempts=1, **common)
    failures = 0
    for seed in range(20):
        torch.manual_seed(seed)
        try:
            once._draw_placement(subject, subject["image"], source, [])
        except SinganInsertError as error:
            assert "fits nowhere" in str(error) and "max_attempts" in str(error)
            failures += 1
    assert 0 < failures < 20
    patient = RandomTumorInsertion(model, [source_files], max_attempts=60, **common)
    for seed in range(20):
        torch.manual_seed(seed)
        drawn, location = patient._draw_placement(subject, subject["image"], source, [])
        assert location == (24.0, 24.0, 8.0) and drawn.scale[0] < 1.3


def test_integer_images_come_out_float32_inserted_or_skipped(model, source_files):
    image, _ = synthetic_volume(2)
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(image[None]).to(torch.int16),
                                                affine=AFFINE))
    for p in (1, 0):
        out = TumorInsertion(model, source_files, (22, 25, 8), p=p)(subject)
        assert out["image"].data.dtype == torch.float32
        assert same(out, out.get_composed_history()(subject))
    skipped = TumorInsertion(model, source_files, (22, 25, 8), p=0)(subject)
    assert torch.equal(skipped["image"].data, subject["image"].data.float())


def test_messages_name_what_is_missing(model, source_files):
    subject = target_subject()
    with pytest.raises(SinganInsertError,
                       match=r"include names \['t2'\], which the subject does not have"):
        TumorInsertion(model, source_files, (22, 25, 8), include=["t2"])(subject)
    as_label = tio.Subject(image=tio.LabelMap(tensor=subject["image"].data, affine=AFFINE))
    with pytest.raises(SinganInsertError, match=r"\['image'\] is a LabelMap"):
        TumorInsertion(model, source_files, (22, 25, 8), include=["image"])(as_label)
    with pytest.raises(SinganInsertError,
                       match="The subject has no image 'ceT1' to take the source tumor from"):
        RandomTumorInsertion(model, "ceT1", include=["image"])(subject)
    corner = np.zeros(SHAPE, np.uint8)
    corner[0:2, 0:2, 0:2] = 1
    cornered = target_subject(region=tio.LabelMap(tensor=corner[None], affine=AFFINE))
    with pytest.raises(SinganInsertError,  # shapes as plain ints, not np.int64(48)
                       match=r"^The tumor \(\(\d+, \d+, \d+\) voxel crop.* of the \(48, 48, 16\) volume"):
        RandomTumorInsertion(model, [source_files], placement_key="region", include=["image"],
                             max_attempts=1)(cornered)


# ---------------------------------------------------------------- TorchIO machinery
def test_works_inside_compose_and_oneof(model, source_files):
    insertion = RandomTumorInsertion(model, [source_files], degrees=0, scales=0)
    pipeline = tio.Compose([tio.RandomFlip(axes=(0,)), tio.OneOf([insertion, insertion]),
                            tio.RescaleIntensity((0, 1))])
    out = pipeline(target_subject())
    assert [t.name for t in out.history] == ["Flip", "TumorInsertion", "RescaleIntensity"]
    assert out["label"].data.sum() > 0
    assert same(out, out.get_composed_history()(target_subject()))


def test_not_invertible_and_compose_inverse_warns(model, source_files):
    out = tio.Compose([TumorInsertion(model, source_files, (22, 25, 8))])(target_subject())
    assert not out.history[0].is_invertible()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inverse = out.get_inverse_transform()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert "Skipping TumorInsertion as it is not invertible" in messages
    assert len(inverse) == 0


def test_include_exclude_copy_keep(model, source_files):
    image, _ = synthetic_volume(7)
    two = target_subject(other=tio.ScalarImage(tensor=image[None], affine=AFFINE))
    with pytest.raises(SinganInsertError, match="Exactly one target image"):
        TumorInsertion(model, source_files, (22, 25, 8))(two)
    out = TumorInsertion(model, source_files, (22, 25, 8), exclude=["other"],
                         keep={"image": "image_original"})(two)
    assert torch.equal(out["other"].data, two["other"].data)
    assert torch.equal(out["image_original"].data, two["image"].data)
    assert not torch.equal(out["image"].data, two["image"].data)
    in_place = TumorInsertion(model, source_files, (22, 25, 8), include=["image"], copy=False)
    returned = in_place(two)
    assert returned is two and "label" in two


def test_model_is_not_carried_and_transforms_are_cheap_to_copy(model, source_files):
    transform = RandomTumorInsertion(model, [source_files])
    out = transform(target_subject())
    for obj in (transform, out.history[0]):
        blob = pickle.dumps(obj)
        assert len(blob) < 5_000 and b"Harmonizer" not in blob
        assert copy.deepcopy(obj)._get_named_arguments().keys() == obj._get_named_arguments().keys()
    assert load_harmonizer(model) is load_harmonizer(model)  # loaded once per process
    assert isinstance(load_harmonizer(model), Harmonizer)
    with pytest.raises(SinganInsertError, match="does not exist"):
        TumorInsertion(model + ".missing", source_files, (22, 25, 8))(target_subject())


def test_dictionary_input_like_monai(model, source_files):
    image, _ = synthetic_volume(2)
    transform = TumorInsertion(model, source_files, (22, 25, 8), include=["image", "label"],
                               label_keys=["label"])
    data = {"image": torch.from_numpy(image[None]), "label": torch.zeros((1, *SHAPE), dtype=torch.uint8),
            "subject_id": "case_001"}
    out = transform(data)
    assert isinstance(out, dict) and out["subject_id"] == "case_001"
    assert isinstance(out["image"], torch.Tensor) and isinstance(out["label"], torch.Tensor)
    assert out["label"].sum() > 0 and not torch.equal(out["image"], data["image"])
    missing = transform({"image": torch.from_numpy(image[None])})  # the label key is added
    assert torch.equal(missing["label"], out["label"])
    with pytest.raises(SinganInsertError, match="label_keys"):
        TumorInsertion(model, source_files, (22, 25, 8), include=["image", "label"])(data)


def test_declared_modality_and_bad_arguments(model, source_files):
    with pytest.raises(SinganInsertError, match="trained on 'hrT2'"):
        TumorInsertion(model, source_files, (22, 25, 8), modality="ceT1")(target_subject())
    with pytest.raises(SinganInsertError, match="contrast"):
        RandomTumorInsertion(model, [source_files], contrast=(0.0, 1.0))
    with pytest.raises(SinganInsertError, match="start_scale"):
        RandomTumorInsertion(model, [source_files], start_scale=(-2, 3))
    with pytest.raises(SinganInsertError, match="label_value"):
        TumorInsertion(model, source_files, label_value=0)
    with pytest.raises(SinganInsertError, match="label map"):
        TumorInsertion(model, source_files, (22, 25, 8))(
            target_subject(label=tio.ScalarImage(tensor=np.zeros((1, *SHAPE), np.float32), affine=AFFINE)))


def test_appearance_parts_reach_the_insertion(model, source_files):
    subject = target_subject()
    default = TumorInsertion(model, source_files, (22, 25, 8), seed=5)
    kept = TumorInsertion(model, source_files, (22, 25, 8), seed=5, harmonize_tumor=False, texture=False)
    assert kept.insertion_parameters().harmonize_tumor is False and kept.insertion_parameters().texture is False
    assert not torch.equal(default(subject)["image"].data, kept(subject)["image"].data)
    torch.manual_seed(0)
    randomized = RandomTumorInsertion(model, [source_files], rim=False, rim_scale=1.5)(subject)
    (twin,) = randomized.history
    assert twin.rim is False and twin.rim_scale == 1.5
    assert same(randomized, randomized.get_composed_history()(subject))
    for bad in ({"rim_scale": 0}, {"rim": "yes"}, {"harmonize_tumor": 1}):
        with pytest.raises(SinganInsertError, match=next(iter(bad))):
            TumorInsertion(model, source_files, (22, 25, 8), **bad)
        with pytest.raises(SinganInsertError, match=next(iter(bad))):
            RandomTumorInsertion(model, [source_files], **bad)


# ---------------------------------------------------------------- loaders and queues
def _dataset(model, source_files, p=1.0):
    transform = RandomTumorInsertion(model, [source_files], degrees=0, scales=0, p=p, border_margin=4)
    return tio.SubjectsDataset([target_subject(2), target_subject(3)], transform=transform)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_subjects_loader_with_two_workers(model, source_files, context):
    loader = tio.SubjectsLoader(_dataset(model, source_files), batch_size=1, num_workers=2,
                                multiprocessing_context=context)
    batches = list(loader)
    labels = torch.cat([b["label"][tio.DATA] for b in batches])
    assert labels.shape == (2, 1, *SHAPE) and labels.dtype == torch.uint8
    assert all(label.sum() > 0 for label in labels)  # each worker loaded the model and inserted


def test_queue_with_label_sampler_on_the_inserted_label(model, source_files):
    sampler = tio.LabelSampler(patch_size=(16, 16, 6), label_name="label")
    queue = tio.Queue(_dataset(model, source_files), max_length=4, samples_per_volume=2,
                      sampler=sampler, num_workers=0, shuffle_subjects=False, shuffle_patches=False)
    patches = [queue[i] for i in range(len(queue))]
    assert len(patches) == 4
    for patch in patches:
        assert patch["label"].data[0, 8, 8, 3] > 0  # LabelSampler centres patches on the tumor


# ---------------------------------------------------------------- the README's snippet
def test_readme_use_it_snippet_runs_and_inserts_exactly_the_tumor(tmp_path, monkeypatch):
    """The README's "Use it" block, run as written (only the training preset is made tiny)."""
    import re
    from pathlib import Path

    from singan_insert.datasets.phantom import Tissue, simulate_subject, write_crossmoda

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Use it", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert code.count('preset("fast")') == 1
    code = code.replace('preset("fast")', 'preset("tiny")')

    monkeypatch.chdir(tmp_path)
    target = simulate_subject(3, shape=(64, 64, 32))
    nib.save(nib.Nifti1Image(target.image_b.astype(np.float32), target.affine_b), "hrT2.nii.gz")
    nib.save(nib.Nifti1Image(target.label_b.astype(np.uint8), target.affine_b), "hrT2_rough_label.nii.gz")
    region = (target.tissue_b == Tissue.CSF).astype(np.uint8)
    nib.save(nib.Nifti1Image(region, target.affine_b), "region.nii.gz")
    files = write_crossmoda(simulate_subject(5, shape=(64, 64, 32)), tmp_path / "bank", "src")
    Path(files["ceT1"]).rename("ceT1.nii.gz")
    Path(files["label"]).rename("ceT1_label.nii.gz")
    source = SourceTumor.from_files("ceT1.nii.gz", "ceT1_label.nii.gz", label_value=1)

    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    transform, subject = namespace["transform"], namespace["subject"]
    from singan_insert import Harmonizer

    assert Harmonizer.load("model").tumor_annotation is not None  # the rough label annotates the slice
    voxel_mm3 = float(abs(np.linalg.det(target.affine_b[:3, :3])))
    outcomes = []
    for seed in range(6):
        torch.manual_seed(seed)
        out = transform(subject)
        label = out["label"].data[0].numpy()
        assert set(np.unique(label)) <= {0, 1}
        insertion = next(t for t in out.history if t.name == "TumorInsertion")
        if insertion.source is None:
            assert label.sum() == 0
            outcomes.append("skipped")
            continue
        # Exactly the tumor: its volume (after the random scale and RandomAffine's resampling),
        # not the placement region's, and centred on a voxel of the region.
        assert 0.5 < label.sum() * voxel_mm3 / source.volume_mm3 < 1.8
        assert label.sum() < 0.5 * region.sum()
        assert region[tuple(np.round(insertion.location).astype(int))] == 1
        outcomes.append("inserted")
    assert {"skipped", "inserted"} <= set(outcomes)


# ---------------------------------------------------------------- what the label receives
def _labelled_subject(seed=5):
    """A subject whose own label holds a tumor (1) and a 'cochlea' (2), crossMoDA-like."""
    image, label = synthetic_volume(seed, tumor=TUMOR)
    label[30:33, 10:13, 7:9] = 2
    return tio.Subject(image=tio.ScalarImage(tensor=image[None], affine=AFFINE),
                       label=tio.LabelMap(tensor=label[None], affine=AFFINE)), label


def test_the_label_receives_exactly_the_tumor_and_keeps_existing_labels(model, source_files):
    subject, label = _labelled_subject()
    region = np.zeros(SHAPE, np.uint8)
    region[16:32, 16:32, 6:10] = 1
    subject.add_image(tio.LabelMap(tensor=region[None], affine=AFFINE), "region")
    out = RandomTumorInsertion(model, [source_files], placement_key="region", label_value=3,
                               degrees=0, scales=0, flip_axes=())(subject)
    new = out["label"].data[0].numpy()
    tumor = new == 3
    assert tumor.sum() == ellipsoid(SHAPE, *TUMOR).sum()  # the tumor, nothing of the region
    assert np.array_equal(new[~tumor], label[~tumor])  # every other voxel as it was
    assert torch.equal(out["region"].data, subject["region"].data)  # the region untouched


def test_placement_on_the_label_map_itself_needs_its_values(model, source_files):
    subject, label = _labelled_subject()
    with pytest.raises(SinganInsertError, match="placement_values"):
        RandomTumorInsertion(model, "image", placement_key="label")
    # A crossMoDA-like map as a separate region: several values, so it must say which.
    subject.add_image(tio.LabelMap(tensor=label[None], affine=AFFINE), "anatomy")
    with pytest.raises(SinganInsertError, match="several labels"):
        RandomTumorInsertion(model, [source_files], placement_key="anatomy", degrees=0, scales=0,
                             include=["image"])(subject)
    # GBA in place: over the tumor (1), never the cochlea (2); the cochlea stays labelled.
    out = RandomTumorInsertion(model, "image", placement_key="label", placement_values=(1,),
                               placement_mode="centroid", degrees=0, scales=0, flip_axes=(),
                               source_label_value=1)(subject)
    assert label[tuple(np.round(out.history[-1].location).astype(int))] == 1
    assert np.array_equal(out["label"].data[0].numpy(), label)


def test_centroid_placement_stays_inside_a_crescent_region(model, source_files):
    crescent = (ellipsoid(SHAPE, (24, 24, 8), (14, 14, 4)) & ~ellipsoid(SHAPE, (24, 28, 8), (13, 13, 5)))
    subject = target_subject(region=tio.LabelMap(tensor=crescent[None].astype(np.uint8), affine=AFFINE))
    centre = np.argwhere(crescent).mean(axis=0)
    assert not crescent[tuple(np.round(centre).astype(int))]  # its centre of mass lies outside
    transform = RandomTumorInsertion(model, [source_files], placement_key="region",
                                     placement_mode="centroid", degrees=0, scales=0.0,
                                     flip_axes=(), border_margin=0)
    source = SourceTumor.from_files(*source_files)
    _, location = transform._draw_placement(subject, subject["image"], source, [])
    assert crescent[tuple(np.round(location).astype(int))]


# ---------------------------------------------------------------- 2D subjects
def test_two_dimensional_subjects_work(model):
    rng = np.random.default_rng(0)
    shape2d = (48, 48, 1)
    image = (100 + ndimage.gaussian_filter(rng.normal(size=shape2d), (2, 2, 0)) * 60).astype(np.float32)
    source_image = image.copy()
    tumor = ellipsoid(shape2d, (24, 24, 0), (6, 5, 1))
    source_image[tumor] = 40
    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    bank = tio.Subject(image=tio.ScalarImage(tensor=source_image[None], affine=affine),
                       label=tio.LabelMap(tensor=tumor[None].astype(np.uint8), affine=affine))
    subject = tio.Subject(image=tio.ScalarImage(tensor=image[None], affine=affine))
    transform = RandomTumorInsertion(model, [bank], placement_key=None, degrees=20, scales=0.1)
    placed = RandomTumorInsertion(model, [bank], degrees=20, scales=0.1,
                                  placement_key="prior", border_margin=2, include=["image"])
    prior = np.ones(shape2d, np.float32)
    for t, s in ((transform, subject),
                 (placed, tio.Subject(image=subject["image"],
                                      prior=tio.ScalarImage(tensor=prior[None], affine=affine)))):
        torch.manual_seed(1)
        out = t(s)
        label = out["label"].data[0].numpy()
        assert label.shape == shape2d and 0.7 * tumor.sum() < label.sum() < 1.4 * tumor.sum()
        assert out.history[-1].rotation[:2] == (0.0, 0.0)  # only the in-plane rotation
        assert not torch.equal(out["image"].data, s["image"].data)
        assert same(out, out.get_composed_history()(s))
