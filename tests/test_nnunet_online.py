"""On-the-fly tumor insertion in nnU-Net v2 (singan_insert.integrations.nnunet).

The transform and settings tests need nnunetv2 importable; the end-to-end test runs the REAL
nnU-Net (plan and preprocess, a 5-iteration smoke training with the insertion trainer) on six
48x48x32 volumes, five of them without a tumor, and reads from the training log that inserted
tumors reached the network's batches and that the validation case was not a source.
"""

from __future__ import annotations

import importlib
import json
import pickle
import re
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")

from singan_insert.errors import MissingExtraError, SinganInsertError  # noqa: E402
from singan_insert.insertion.placement import SourceTumor  # noqa: E402
from singan_insert.integrations import nnunet as online  # noqa: E402
from singan_insert.integrations.nnunet import (  # noqa: E402
    OnlineInsertionSettings,
    TumorInsertionTransform,
    patch_affine,
    read_online_settings,
    write_online_settings,
)
from singan_insert.stages.nnunet import NnUNetCase, NnUNetWorkspace  # noqa: E402

SPACING = (0.8, 0.8, 1.5)
AFFINE = np.diag([*SPACING, 1.0])
PATCH_SPACING = (1.5, 0.8, 0.8)  # nnU-Net's (z, y, x) view of AFFINE's grid


def ball(shape, center, radius):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return np.linalg.norm(grid - np.asarray(center), axis=-1) < radius


def patch(seed=0, shape=(20, 48, 48)):
    """A z-scored-looking patch with nnU-Net's -1 padding along one side."""
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.normal(size=(1, *shape)).astype(np.float32))
    segmentation = torch.zeros((1, *shape), dtype=torch.int16)
    segmentation[:, :, :, :4] = -1
    segmentation[0][torch.from_numpy(ball(shape, (10, 12, 12), 3))] = 2
    return image, segmentation


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir / "harmonizer.safetensors")


@pytest.fixture(scope="module")
def source():
    shape = (20, 48, 48)
    rng = np.random.default_rng(5)
    mask = ball(shape, (10, 24, 24), 5)
    image = np.where(mask, 2.5, 0) + rng.normal(size=shape)
    return SourceTumor.from_arrays(image, mask.astype(np.uint8), patch_affine(PATCH_SPACING, (0, 1, 2)))


def transform(model, source, **settings):
    settings = OnlineInsertionSettings(model=model, probability=1.0, **settings)
    return TumorInsertionTransform(settings, [source], patch_affine(PATCH_SPACING, (0, 1, 2)))


# ---------------------------------------------------------------- settings and geometry
def test_settings_round_trip_through_the_dataset_file_and_the_variable(tmp_path, monkeypatch, model):
    monkeypatch.delenv(online.SETTINGS_VARIABLE, raising=False)
    with pytest.raises(SinganInsertError, match="write_online_settings"):
        read_online_settings(tmp_path)
    settings = OnlineInsertionSettings(model=model, probability=0.3, placement=[2], contrast=(0.5, 1.5),
                                       appearance="fixed", rim=False)
    path = write_online_settings(tmp_path, settings)
    assert path.name == "singan_insert_online.json"
    assert read_online_settings(tmp_path) == settings
    assert settings.insertion_parameters().rim is False
    # The insertion's own default, which leaves the rim off for every tumor moved to a location
    # (each placement here; test_annotation.py, test_a_tumor_moved_to_a_location_gets_no_rim_unless_asked).
    assert OnlineInsertionSettings(model=model).insertion_parameters().rim is None
    assert OnlineInsertionSettings(model=model, placement=[2]).insertion_parameters().rim is None
    assert OnlineInsertionSettings(model=model, rim=True).insertion_parameters().rim is True
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps({"model": model, "sources": "/data/ceT1_cases"}))
    monkeypatch.setenv(online.SETTINGS_VARIABLE, str(other))
    assert read_online_settings(tmp_path).sources == "/data/ceT1_cases"
    other.write_text(json.dumps({"model": model, "lambda": 0.5}))
    with pytest.raises(SinganInsertError, match=r"Unknown .*'lambda'"):
        read_online_settings(tmp_path)


@pytest.mark.parametrize("bad, match", [
    ({"probability": 1.5}, "probability"), ({"placement": "brain"}, "placement"),
    ({"contrast": (0.8, 0.5), "appearance": "fixed"}, "contrast"), ({"overlap": "merge"}, "overlap"),
    ({"label_value": 0}, "label_value"), ({"label_value": 1.5}, "label_value"), ({"channel": 1.7}, "channel"),
    ({"channel": "1"}, "channel"), ({"model": "/nowhere/m.safetensors"}, "does not exist"),
    ({"rim": "no"}, "rim"),
])
def test_bad_settings_are_rejected_up_front(bad, match, tiny_model_file):
    # A missing model used to pass here and only skip every patch in nnU-Net's workers.
    with pytest.raises(SinganInsertError, match=match):
        OnlineInsertionSettings(**{"model": tiny_model_file, **bad})


def test_patch_affine_maps_each_array_axis_to_its_world_axis():
    # (z, y, x) arrays: axis 0 is world z; a transpose_forward of (2, 0, 1) moves it.
    np.testing.assert_allclose(patch_affine((1.5, 0.8, 0.7), (0, 1, 2))[:3, :3],
                               [[0, 0, 0.7], [0, 0.8, 0], [1.5, 0, 0]])
    np.testing.assert_allclose(patch_affine((0.7, 1.5, 0.8), (2, 0, 1))[:3, :3],
                               [[0.7, 0, 0], [0, 0, 0.8], [0, 1.5, 0]])


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIR"])
@pytest.mark.parametrize("transpose", [(0, 1, 2), (2, 0, 1)])
def test_patches_reach_the_model_s_orientation_by_undoing_the_transpose_only(codes, transpose):
    from singan_insert.insertion.orientation import in_model_frame, reorientation_to

    plain = patch_affine((1.5, 0.8, 0.7), transpose)
    turn = reorientation_to(in_model_frame(plain, codes), (10, 12, 14), codes)
    assert (turn.transform[:, 1] == 1).all()  # never mirrored
    assert [int(a) for a in turn.transform[:, 0]] == [2 - t for t in transpose]  # back to the file's axes
    # The plain patch affine (all signs positive) would mirror a patch for a model of a non-RAS file.
    assert (reorientation_to(plain, (10, 12, 14), codes).transform[:, 1] == -1).any() == (codes != "RAS")
    assert np.array_equal(in_model_frame(plain, None), plain)


# ---------------------------------------------------------------- the transform on one patch
def test_transform_inserts_into_the_foreground_and_keeps_the_padding(model, source):
    image, segmentation = patch()
    np.random.seed(3)
    out = transform(model, source)(image=image.clone(), segmentation=segmentation.clone())
    tumor = out["segmentation"][0] == 1
    assert tumor.any() and out["segmentation"].dtype == torch.int16
    assert (out["segmentation"][0][segmentation[0] == -1] != 1).any()  # padding mostly kept
    assert torch.equal(out["segmentation"][0][~tumor & (segmentation[0] == 2)],
                       segmentation[0][~tumor & (segmentation[0] == 2)])
    changed = out["image"][0] != image[0]
    assert changed[tumor].float().mean() > 0.9
    np.random.seed(3)
    again = transform(model, source)(image=image.clone(), segmentation=segmentation.clone())
    assert torch.equal(again["image"], out["image"])  # numpy's global state decides the draws


def test_transform_places_inside_a_given_label_and_skips_by_probability(model, source):
    image, segmentation = patch()
    np.random.seed(0)
    insertion = transform(model, source, placement=[2], border_margin=0)
    out = insertion(image=image.clone(), segmentation=segmentation.clone())
    record_center = np.argwhere(out["segmentation"][0].numpy() == 1).mean(axis=0)
    assert np.linalg.norm(record_center - (10, 12, 12)) < 4  # centred in the label-2 ball
    never = TumorInsertionTransform(OnlineInsertionSettings(model=model, probability=0.0), [source],
                                    patch_affine(PATCH_SPACING, (0, 1, 2)))
    np.random.seed(3)
    kept = never(image=image.clone(), segmentation=segmentation.clone())
    assert torch.equal(kept["image"], image) and torch.equal(kept["segmentation"], segmentation)
    # ...and it draws nothing: nnU-Net's own augmentations see the stream they would without it.
    after = np.random.random_sample()
    np.random.seed(3)
    assert after == np.random.random_sample()


def test_a_patch_without_room_is_passed_on_and_counted(model, source):
    image, segmentation = patch()
    segmentation[:] = -1  # no foreground at all
    insertion = transform(model, source)
    with pytest.warns(UserWarning, match="skipped"):
        out = insertion(image=image.clone(), segmentation=segmentation.clone())
    assert torch.equal(out["image"], image) and insertion.failures == 1 and insertion.inserted == 0


def test_transform_pickles_small_for_the_background_workers(model, source):
    insertion = transform(model, source)
    insertion(image=patch()[0], segmentation=patch()[1])  # loads the model in this process
    assert len(pickle.dumps(insertion)) < len(pickle.dumps(source)) + 10_000


def test_sources_from_a_folder_of_another_modality(tmp_path, model):
    rng = np.random.default_rng(0)
    shape = (24, 24, 12)
    for name in ("src1", "src2"):
        label = ball(shape, (12, 12, 6), 4).astype(np.uint8)
        image = (rng.normal(size=shape) + 3 * label).astype(np.float32)
        nib.save(nib.Nifti1Image(image, AFFINE), tmp_path / f"{name}_ceT1.nii.gz")
        nib.save(nib.Nifti1Image(label, AFFINE), tmp_path / f"{name}_Label.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), AFFINE), tmp_path / "lonely_Label.nii.gz")
    sources = online.sources_from_folder(OnlineInsertionSettings(model=model, sources=str(tmp_path)))
    assert len(sources) == 2 and all(s.num_voxels == ball(shape, (12, 12, 6), 4).sum() for s in sources)
    with pytest.raises(SinganInsertError, match="No source case"):
        online.sources_from_folder(OnlineInsertionSettings(model=model, sources=str(tmp_path),
                                                           source_suffix="T1w"))
    with pytest.raises(SinganInsertError, match="not a folder"):
        online.sources_from_folder(OnlineInsertionSettings(model=model, sources=str(tmp_path / "no")))


def test_2d_patches_are_refused(model, source):
    with pytest.raises(SinganInsertError, match="3D configuration"):
        transform(model, source)(image=torch.zeros(1, 48, 48), segmentation=torch.zeros(1, 48, 48))


# ---------------------------------------------------------------- the real nnU-Net
def write_case(folder, identifier, seed, tumor):
    rng = np.random.default_rng(seed)
    shape = (48, 48, 32)
    label = np.zeros(shape, np.uint8)
    label[ball(shape, (34, 24, 16), 2)] = 2  # a 'cochlea' in every case
    image = 100 + 10 * rng.standard_normal(shape) + 60 * (label == 2)
    if tumor:
        mask = ball(shape, (20, 22, 16) + rng.uniform(-2, 2, 3), 6)
        label[mask] = 1
        image += 120 * mask
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), AFFINE), folder / f"{identifier}_hrT2.nii.gz")
    nib.save(nib.Nifti1Image(label, AFFINE), folder / f"{identifier}_Label.nii.gz")
    return NnUNetCase(identifier, (folder / f"{identifier}_hrT2.nii.gz",), folder / f"{identifier}_Label.nii.gz")


def test_real_nnunet_training_receives_inserted_tumors_and_never_reads_validation_cases(tmp_path, model):
    # case0 and case5 have a tumor; case5 is the validation case, so case0 is the only source.
    cases = [write_case(tmp_path / "src", f"case{i}", i, tumor=i in (0, 5)) for i in range(6)]
    ws = NnUNetWorkspace(tmp_path / "ws", num_processes_augmentation=1)
    dataset = ws.export_dataset(502, "Online", cases)
    ws.plan_and_preprocess(dataset, ("3d_fullres",), timeout=300)
    preprocessed = ws.preprocessed / "Dataset502_Online"
    (preprocessed / "splits_final.json").write_text(json.dumps(
        [{"train": [f"case{i}" for i in range(5)], "val": ["case5"]}]))
    write_online_settings(preprocessed, OnlineInsertionSettings(
        model=model, probability=1.0, degrees=5.0))

    trainer = "singan_insert.integrations.nnunet.nnUNetTrainerTumorInsertion_Smoke"
    ws.train(dataset, "3d_fullres", 0, trainer=trainer, validate=False, timeout=400)
    log = (ws.logs / "train_fold0.log").read_text()
    sources = re.search(r"1 source tumor\(s\) from \[(.*?)\]", log)
    assert sources and sources.group(1) == "'nnU-Net training case case0'", log[-3000:]
    counts = re.search(r"(\d+) of (\d+) training patches held the tumor label, (\d+) of them from "
                       r"cases without one", log)
    assert counts, log[-3000:]
    print(sources.group(0), counts.group(0), sep="\n")  # shown with pytest -s
    with_tumor, patches, inserted = (int(v) for v in counts.groups())
    batch_size = json.loads((preprocessed / "nnUNetPlans.json").read_text())[
        "configurations"]["3d_fullres"]["batch_size"]
    assert patches == 5 * batch_size  # the smoke trainer's 5 iterations
    # Four of the five training cases have no tumor of their own: with probability 1 their
    # patches reach the network with an inserted one.
    assert inserted > 0 and with_tumor >= inserted


def test_missing_nnunet_gives_install_hint(monkeypatch):
    for name in [m for m in sys.modules if m == "nnunetv2" or m.startswith("nnunetv2.")]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import nnunetv2...` fail
    monkeypatch.setitem(sys.modules, "nnunetv2", None)
    monkeypatch.delitem(sys.modules, "singan_insert.integrations.nnunet", raising=False)
    with pytest.raises(MissingExtraError, match=r"singan-insert\[nnunet\]"):
        importlib.import_module("singan_insert.integrations.nnunet")


def test_the_trainer_checks_the_settings_against_the_dataset(tiny_model_file, tiny_harmonizer, tmp_path):
    dataset = {"channel_names": {"0": "hrT2", "1": "T1"}, "labels": {"background": 0, "tumor": 1, "cochlea": 2}}
    settings = OnlineInsertionSettings(model=tiny_model_file)
    online.check_against_dataset(settings, dataset)  # fine: channel 0, tumor label 1
    with pytest.raises(SinganInsertError, match="channel=5"):
        online.check_against_dataset(OnlineInsertionSettings(model=tiny_model_file, channel=5), dataset)
    # An undeclared label fails here, not as an index error in the loss deep into training.
    with pytest.raises(SinganInsertError, match=r"label_value \[3\]"):
        online.check_against_dataset(OnlineInsertionSettings(model=tiny_model_file, label_value=3), dataset)
    with pytest.raises(SinganInsertError, match=r"placement \[4\]"):
        online.check_against_dataset(OnlineInsertionSettings(model=tiny_model_file, placement=[4]), dataset)
    with pytest.warns(UserWarning, match="differs from source_label"):
        online.check_against_dataset(OnlineInsertionSettings(model=tiny_model_file, label_value=2), dataset)
    assert tiny_harmonizer.modality == "hrT2"
    with pytest.warns(UserWarning, match="channel 1 is 'T1'"):
        online.check_against_dataset(OnlineInsertionSettings(model=tiny_model_file, channel=1), dataset)
    # A model file that does not load is an error here, never a reason to skip every patch.
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    with pytest.raises(SinganInsertError):
        online.check_against_dataset(OnlineInsertionSettings(model=str(broken)), dataset)
