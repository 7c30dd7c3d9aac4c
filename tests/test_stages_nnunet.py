"""nnU-Net v2 stage: raw-format export, per-call environment, errors, and a REAL end-to-end run.

The export and environment tests need only nibabel. The end-to-end test runs the real
``nnunetv2`` (plan and preprocess, a 5-iteration smoke training, prediction) on six synthetic
48x48x32 volumes; it is skipped when the optional extra is not installed.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from singan_insert.errors import MissingExtraError, SinganInsertError
from singan_insert.stages import nnunet as nnunet_stage
from singan_insert.stages.nnunet import (
    CROSSMODA_LABELS,
    SMOKE_TRAINER,
    NnUNetCase,
    NnUNetDataset,
    NnUNetError,
    NnUNetWorkspace,
    nnunet_available,
)

AFFINE = np.diag([0.8, 0.8, 1.5, 1.0])


def write_case(folder: Path, identifier: str, shape=(12, 10, 6), seed=0, suffix=".nii.gz",
               label_values=(0, 1, 2), affine=AFFINE) -> NnUNetCase:
    """A synthetic case: noise plus a bright 'tumor' (1) and a smaller 'cochlea' (2)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    center = np.array(shape) / 2 + rng.uniform(-2, 2, size=3)
    label = np.zeros(shape, np.uint8)
    label[np.linalg.norm(grid - center, axis=-1) < min(shape) / 3] = label_values[1]
    label[np.linalg.norm(grid - (center + [shape[0] / 4, 0, 0]), axis=-1) < 1.5] = label_values[2]
    image = 100 + 10 * rng.standard_normal(shape) + 120 * (label == label_values[1])
    image += 60 * (label == label_values[2])
    folder.mkdir(parents=True, exist_ok=True)
    image_path = folder / f"{identifier}_hrT2{suffix}"
    label_path = folder / f"{identifier}_Label{suffix}"
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), image_path)
    nib.save(nib.Nifti1Image(label, affine), label_path)
    return NnUNetCase(identifier, (image_path,), label_path)


# ---------------------------------------------------------------------- export
def test_export_writes_nnunet_raw_format(tmp_path):
    cases = [write_case(tmp_path / "src", f"crossmoda2021_ldn_{i}", seed=i) for i in range(3)]
    test_case = write_case(tmp_path / "src", "val_1", seed=9, suffix=".nii")
    ws = NnUNetWorkspace(tmp_path / "ws")
    dataset = ws.export_dataset(501, "VS", cases, [test_case])

    folder = tmp_path / "ws" / "nnUNet_raw" / "Dataset501_VS"
    assert dataset.folder_name == "Dataset501_VS"
    description = json.loads((folder / "dataset.json").read_text())
    assert description["channel_names"] == {"0": "hrT2"}
    assert description["labels"] == {"background": 0, "VS": 1, "cochlea": 2}
    assert description["numTraining"] == 3 and description["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
        f"crossmoda2021_ldn_{i}_0000.nii.gz" for i in range(3)
    ]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [
        f"crossmoda2021_ldn_{i}.nii.gz" for i in range(3)
    ]
    # A .nii test image is converted, not renamed: it must really be gzip-compressed NIfTI.
    converted = folder / "imagesTs" / "val_1_0000.nii.gz"
    assert converted.read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(
        nib.load(converted).get_fdata(), nib.load(test_case.images[0]).get_fdata()
    )
    label = nib.load(folder / "labelsTr" / "crossmoda2021_ldn_0.nii.gz")
    assert label.get_data_dtype() == np.uint8
    np.testing.assert_allclose(label.affine, AFFINE)
    source = np.asarray(nib.load(cases[0].label).dataobj)
    np.testing.assert_array_equal(np.asarray(label.dataobj), source)
    assert set(np.unique(source)) == {0, 1, 2}


def test_export_multichannel_naming_and_overwrite(tmp_path):
    a = write_case(tmp_path / "a", "c1", seed=1)
    b = write_case(tmp_path / "b", "c1", seed=2)
    case = NnUNetCase("c1", (a.images[0], b.images[0]), a.label)
    ws = NnUNetWorkspace(tmp_path / "ws")
    ws.export_dataset(7, "Two", [case], channel_names=("ceT1", "hrT2"))
    folder = ws.raw / "Dataset007_Two"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
        "c1_0000.nii.gz", "c1_0001.nii.gz"
    ]
    assert json.loads((folder / "dataset.json").read_text())["channel_names"] == {
        "0": "ceT1", "1": "hrT2"
    }
    with pytest.raises(SinganInsertError, match="already exists"):
        ws.export_dataset(7, "Other", [case], channel_names=("ceT1", "hrT2"))
    # What nnU-Net derived from the old cases (splits, a trained model) must not outlive them:
    # its splits_final.json would leave the new cases out of training.
    for tree in (ws.preprocessed, ws.results):
        (tree / "Dataset007_Two").mkdir(parents=True)
        (tree / "Dataset007_Two" / "splits_final.json").write_text("[]")
    (ws.preprocessed / "Dataset008_Kept").mkdir()
    ws.export_dataset(7, "Other", [a], overwrite=True)
    assert [p.name for p in ws.raw.iterdir()] == ["Dataset007_Other"]
    assert not (ws.preprocessed / "Dataset007_Two").exists() and not (ws.results / "Dataset007_Two").exists()
    assert (ws.preprocessed / "Dataset008_Kept").is_dir()  # another dataset id is left alone


@pytest.mark.parametrize(
    "problem, match",
    [
        ("undeclared_label", "not declared"),
        ("shape_mismatch", "not on the grid"),
        ("affine_mismatch", "not on the grid"),
        ("no_label", "no label file"),
        ("channel_count", "declares 2 channel"),
        ("duplicate", "used twice"),
        ("missing_file", "does not exist"),
        ("float_label", "non-integer"),
    ],
)
def test_export_rejects_bad_cases(tmp_path, problem, match):
    case = write_case(tmp_path / "src", "c1")
    cases, channels = [case], ("hrT2",)
    if problem == "undeclared_label":
        cases = [write_case(tmp_path / "src", "c2", label_values=(0, 1, 3))]
    elif problem == "shape_mismatch":
        other = write_case(tmp_path / "other", "c1", shape=(12, 10, 7))
        cases = [NnUNetCase("c1", case.images, other.label)]
    elif problem == "affine_mismatch":
        other = write_case(tmp_path / "other", "c1", affine=np.diag([1.0, 1.0, 1.0, 1.0]))
        cases = [NnUNetCase("c1", case.images, other.label)]
    elif problem == "no_label":
        cases = [NnUNetCase("c1", case.images)]
    elif problem == "channel_count":
        channels = ("ceT1", "hrT2")
    elif problem == "duplicate":
        cases = [case, case]
    elif problem == "missing_file":
        cases = [NnUNetCase("c1", (tmp_path / "nope.nii.gz",), case.label)]
    elif problem == "float_label":
        path = tmp_path / "float_label.nii.gz"
        nib.save(nib.Nifti1Image(np.full((12, 10, 6), 0.5, np.float32), AFFINE), path)
        cases = [NnUNetCase("c1", case.images, path)]
    with pytest.raises(SinganInsertError, match=match):
        NnUNetWorkspace(tmp_path / "ws").export_dataset(501, "VS", cases, channel_names=channels)


def test_identifiers_labels_and_ids_are_validated(tmp_path):
    with pytest.raises(SinganInsertError, match="NNNN"):
        NnUNetCase("case_0000", ("x.nii.gz",))
    with pytest.raises(SinganInsertError, match="not usable"):
        NnUNetCase("bad/name", ("x.nii.gz",))
    with pytest.raises(SinganInsertError, match=r"\[1, 999\]"):
        NnUNetDataset(1000, "VS")
    case = write_case(tmp_path / "src", "c1")
    ws = NnUNetWorkspace(tmp_path / "ws")
    with pytest.raises(SinganInsertError, match="background"):
        ws.export_dataset(501, "VS", [case], labels={"VS": 1, "cochlea": 2})
    with pytest.raises(SinganInsertError, match="consecutive"):
        ws.export_dataset(501, "VS", [case], labels={"background": 0, "VS": 1, "cochlea": 3})
    with pytest.raises(SinganInsertError, match="fold"):
        ws.train(501, fold=5)
    assert CROSSMODA_LABELS == {"background": 0, "VS": 1, "cochlea": 2}


# ---------------------------------------------------------------------- environment
def test_environment_is_per_workspace_and_leaves_the_caller_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    before = dict(os.environ)
    first = NnUNetWorkspace(tmp_path / "one", num_processes_augmentation=0)
    second = NnUNetWorkspace(tmp_path / "two", results=tmp_path / "shared_results")
    env1, env2 = first.environment(), second.environment({"PATH": "/bin"})
    assert env1["nnUNet_raw"] == str(tmp_path / "one" / "nnUNet_raw")
    assert env1["nnUNet_preprocessed"] == str(tmp_path / "one" / "nnUNet_preprocessed")
    assert env2["nnUNet_results"] == str(tmp_path / "shared_results")
    assert env1["nnUNet_def_n_proc"] == "1" and env1["nnUNet_n_proc_DA"] == "0"
    assert env2["nnUNet_n_proc_DA"] == "1" and env2["nnUNet_compile"] == "false"
    assert env2["PATH"] == "/bin" and "HOME" not in env2
    assert dict(os.environ) == before


def test_child_process_sees_the_workspace_paths_and_failures_are_reported(tmp_path):
    ws = NnUNetWorkspace(tmp_path / "ws")
    script = "import os; print('raw=' + os.environ['nnUNet_raw'])"
    ws._run("probe", [sys.executable, "-c", script], verbose=False, timeout=60)
    assert (ws.logs / "probe.log").read_text().strip() == f"raw={ws.raw}"
    assert "nnUNet_raw" not in os.environ or os.environ["nnUNet_raw"] != str(ws.raw)

    failing = "print('step one'); raise SystemExit('the data is wrong')"
    with pytest.raises(NnUNetError, match="exit code 1.*the data is wrong") as info:
        ws._run("failing", [sys.executable, "-c", failing], verbose=False, timeout=60)
    assert "step one" in str(info.value) and str(ws.logs / "failing.log") in str(info.value)
    with pytest.raises(NnUNetError, match="timeout"):
        ws._run("slow", [sys.executable, "-c", "import time; time.sleep(30)"],
                verbose=False, timeout=1)


def test_missing_extra_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(nnunet_stage, "nnunet_available", lambda: False)
    ws = NnUNetWorkspace(tmp_path / "ws")
    for call in (lambda: ws.plan_and_preprocess(501), lambda: ws.train(501),
                 lambda: ws.predict(501, tmp_path, tmp_path / "out")):
        with pytest.raises(MissingExtraError, match=r"pip install 'singan-insert\[nnunet\]'"):
            call()


def test_predict_input_folder_groups_channels(tmp_path):
    for name in ("b_0000", "a_0000", "a_0001", "notes"):
        (tmp_path / f"{name}.nii.gz").write_bytes(b"")
    inputs, identifiers = nnunet_stage._prediction_inputs(tmp_path, ".nii.gz")
    assert identifiers == ["a", "b"]
    assert [[Path(p).name for p in channels] for channels in inputs] == [
        ["a_0000.nii.gz", "a_0001.nii.gz"], ["b_0000.nii.gz"]
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SinganInsertError, match="no '<case>_0000"):
        nnunet_stage._prediction_inputs(tmp_path / "empty", ".nii.gz")
    with pytest.raises(SinganInsertError, match="not a folder"):
        nnunet_stage._prediction_inputs(tmp_path / "missing", ".nii.gz")


def test_shipped_trainers_need_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # makes `import nnunetv2...` fail
    for name in [m for m in sys.modules if m.startswith("nnunetv2.")]:  # imported by other tests
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "singan_insert.stages.nnunet_trainers", raising=False)
    with pytest.raises(MissingExtraError, match=r"singan-insert\[nnunet\]"):
        importlib.import_module("singan_insert.stages.nnunet_trainers")


# ---------------------------------------------------------------------- the real nnU-Net
needs_nnunet = pytest.mark.skipif(
    not nnunet_available(),
    reason="nnunetv2 is not installed (optional extra: pip install 'singan-insert[nnunet]'; "
    "see ci/nnunet-requirements.txt)",
)


@needs_nnunet
def test_trainer_resolution_avoids_the_by_name_lookup():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from singan_insert.stages.nnunet_trainers import SHIPPED_TRAINERS
    from singan_insert.stages.nnunet_worker import resolve_trainer as resolve

    assert resolve(SMOKE_TRAINER) is SHIPPED_TRAINERS[SMOKE_TRAINER]
    assert resolve("nnUNetTrainer") is nnUNetTrainer
    dotted = "nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs"
    assert resolve(f"{dotted}.nnUNetTrainer_1epoch").__name__ == "nnUNetTrainer_1epoch"
    with pytest.raises(RuntimeError, match="not a subclass of nnUNetTrainer"):
        resolve("singan_insert.errors.SinganInsertError")
    # A bare name goes through nnU-Net's lookup, which imports torchvision (via timm): it
    # works with a healthy torch/torchvision pair and fails with our advice beside a CPU torch.
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - PyPI torchvision beside a local torch raises RuntimeError
        with pytest.raises(RuntimeError, match="dotted path"):
            resolve("nnUNetTrainer_5epochs")
    else:
        assert resolve("nnUNetTrainer_5epochs").__name__ == "nnUNetTrainer_5epochs"


@needs_nnunet
def test_real_nnunet_end_to_end(tmp_path):
    """Export -> plan and preprocess -> 5-iteration smoke training -> prediction, for real."""
    before = dict(os.environ)
    cases = [write_case(tmp_path / "src", f"case{i}", shape=(48, 48, 32), seed=i)
             for i in range(7)]
    ws = NnUNetWorkspace(tmp_path / "ws", num_processes_augmentation=0)
    dataset = ws.export_dataset(501, "Smoke", cases[:6], cases[6:])

    plans_file = ws.plan_and_preprocess(dataset, ("3d_fullres",), timeout=300)
    plans = json.loads(plans_file.read_text())
    assert plans["dataset_name"] == "Dataset501_Smoke"
    # nnU-Net reads the volumes as (z, y, x): our 48x48x32 grid and 0.8/0.8/1.5 mm spacing.
    assert plans["original_median_shape_after_transp"] == [32, 48, 48]
    assert np.allclose(plans["original_median_spacing_after_transp"], [1.5, 0.8, 0.8])

    fold_folder = ws.train(dataset, "3d_fullres", 0, trainer=SMOKE_TRAINER, validate=False,
                           timeout=400)
    assert fold_folder == ws.model_folder(dataset, SMOKE_TRAINER) / "fold_0"
    assert (fold_folder / "checkpoint_final.pth").is_file()
    log = (ws.logs / "train_fold0.log").read_text()
    assert "Epoch 0" in log and "Epoch 1" not in log  # the shipped trainer's single epoch

    predictions = ws.predict(dataset, cases[6:], tmp_path / "pred", trainer=SMOKE_TRAINER,
                             use_mirroring=False, timeout=300)
    assert [p.name for p in predictions] == ["case6.nii.gz"]
    predicted = nib.load(predictions[0])
    assert predicted.shape == (48, 48, 32)
    np.testing.assert_allclose(predicted.affine, AFFINE, atol=1e-5)
    assert set(np.unique(np.asarray(predicted.dataobj)).tolist()) <= {0, 1, 2}
    assert dict(os.environ) == before
