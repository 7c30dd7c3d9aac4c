"""The crossMoDA pipeline's stamps: a re-run redoes exactly what changed (singan_insert.pipeline.stamps).

One tiny work folder is made once per module; each test works on a copy of it (which also
checks that a copied work folder stays valid: its stamps name files relative to it).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from singan_insert.errors import SinganInsertError
from singan_insert.pipeline import CrossModaData, CrossModaPipeline
from singan_insert.pipeline.stamps import Stamps

SCRIPTS = Path(__file__).resolve().parents[1] / "examples" / "crossmoda"
CASE = "crossmoda2021_ldn_{}"


def run_all(work: Path, *extra: str) -> int:
    spec = importlib.util.spec_from_file_location("crossmoda_run_all", SCRIPTS / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--synthetic", "--work", str(work), "--threads", "1", "--no-progress", *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("finished") / "work"
    assert run_all(work, "--profile", "tiny") == 0
    torch.set_num_threads(threads)
    return work


@pytest.fixture
def work(finished, tmp_path):
    copy = tmp_path / "work"
    shutil.copytree(finished, copy)  # copy2 keeps the times; the stamps must survive a move anyway
    return copy


def mtimes(work: Path) -> dict[str, int]:
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in work.rglob("*")
            if p.is_file() and "stamps" not in p.parts and "evaluation" not in p.parts and p.name not in ("timings.json", ".singan-insert.lock")}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in set(before) | set(after) if before.get(k) != after.get(k)}


def voxels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_rerun_of_a_finished_copy_redoes_nothing(work, capsys):
    before = mtimes(work)
    assert run_all(work) == 0
    assert "redoing" not in capsys.readouterr().out
    assert changed(before, mtimes(work)) == set()


def test_replaced_inputs_redo_everything_built_from_them(work, capsys):
    data = work / "data"
    shutil.copy(data / "target_validation" / f"{CASE.format(8)}_hrT2.nii.gz",
                data / "target_validation" / f"{CASE.format(7)}_hrT2.nii.gz")
    for kind in ("ceT1", "Label"):
        shutil.copy(data / "source_training" / f"{CASE.format(2)}_{kind}.nii.gz",
                    data / "source_training" / f"{CASE.format(1)}_{kind}.nii.gz")
    before = mtimes(work)
    assert run_all(work) == 0
    out = capsys.readouterr().out
    assert "redoing grid/validation/crossmoda2021_ldn_7_hrT2.nii.gz: changed: input" in out
    assert "redoing S_A: changed: volumes (crossmoda2021_ldn_1)" in out
    redone = changed(before, mtimes(work))
    assert {"segmenter/segmenter.safetensors", "cyclegan/cyclegan.safetensors",
            "bprime/harmonized/crossmoda2021_ldn_1_aug0_image.nii.gz"} <= redone
    for method in ("baseline", "ours", "naive"):
        predictions = [voxels(work / "predictions" / method / f"{CASE.format(n)}_Label.nii.gz") for n in (7, 8)]
        np.testing.assert_array_equal(*predictions)  # identical inputs now give identical predictions


def test_added_and_removed_cases_retrain_on_the_data_sets_case_list(work, capsys):
    for path in (work / "data" / "source_training").glob(f"{CASE.format(3)}_*"):
        path.unlink()
    before = mtimes(work)
    assert run_all(work) == 0
    assert "cases (added none, removed ['crossmoda2021_ldn_3'])" in capsys.readouterr().out
    redone = changed(before, mtimes(work))
    assert {"segmenter/segmenter.safetensors", "cyclegan/cyclegan.safetensors",
            "pix2pix/harmonized/pix2pix.safetensors", "pix2pix/naive/pix2pix.safetensors",
            "predictions/ours/crossmoda2021_ldn_7_Label.nii.gz"} <= redone
    from singan_insert.stages.pix2pix import Pix2Pix

    slices_per_case = 16
    model = Pix2Pix.load(work / "pix2pix" / "harmonized" / "pix2pix.safetensors")
    assert model.info["data"]["pairs"]["slices"] == 2 * slices_per_case  # case 3's leftover B' is not used


def test_another_harmonizer_slice_retrains_it_and_redoes_bprime(work, capsys):
    before = mtimes(work)
    assert run_all(work, "--case", CASE.format(5), "--slice", "20") == 0
    assert "redoing the harmonizer: changed: case; label; scan; slice" in capsys.readouterr().out
    stamp = json.loads((work / "stamps" / "harmonizer.json").read_text())
    assert stamp["parts"]["case"] == CASE.format(5) and stamp["parts"]["slice"] == 20
    redone = changed(before, mtimes(work))
    assert {"harmonizer/harmonizer.safetensors", "bprime/harmonized/crossmoda2021_ldn_1_aug0_image.nii.gz",
            "pix2pix/harmonized/pix2pix.safetensors", "predictions/ours/crossmoda2021_ldn_8_Label.nii.gz"} <= redone
    assert "cyclegan/cyclegan.safetensors" not in redone and "segmenter/segmenter.safetensors" not in redone


def test_deleted_intermediate_outputs_are_redone(work, capsys):
    (work / "bprime" / "harmonized" / f"{CASE.format(2)}_aug0_image.nii.gz").unlink()
    (work / "translated" / "ours" / f"{CASE.format(7)}_ceT1.nii.gz").unlink()
    before = mtimes(work)
    assert run_all(work) == 0
    out = capsys.readouterr().out
    assert "crossmoda2021_ldn_2_aug0_image.nii.gz is missing" in out
    redone = changed(before, mtimes(work))
    assert {"bprime/harmonized/crossmoda2021_ldn_2_aug0_image.nii.gz",
            "translated/ours/crossmoda2021_ldn_7_ceT1.nii.gz"} <= redone
    # Redone bit-identically (same seed): nothing below them changes.
    assert "pix2pix/harmonized/pix2pix.safetensors" not in redone


def test_a_relative_work_folder_resumes_from_another_current_folder(work, tmp_path, monkeypatch, capsys):
    before = mtimes(work)
    (work / "pix2pix" / "harmonized" / "pix2pix.safetensors").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    pipeline = CrossModaPipeline(CrossModaData(work / "data"), work)
    pipeline.train_pix2pix("harmonized")
    assert "pix2pix/harmonized/pix2pix.safetensors is missing" in capsys.readouterr().out
    assert changed(before, mtimes(work)) == {"pix2pix/harmonized/pix2pix.safetensors",
                                             "pix2pix/harmonized/checkpoint.safetensors"}
    assert Stamps(work).name(work / "grid") == "grid"


def test_a_label_on_another_grid_is_skipped_for_every_step(work, capsys):
    path = work / "data" / "source_training" / f"{CASE.format(2)}_Label.nii.gz"
    label = nib.load(str(path))
    affine = label.affine.copy()
    affine[0, 3] += 6.0
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), affine, label.header), str(path))
    assert run_all(work) == 0
    out = capsys.readouterr().out
    assert "skipped crossmoda2021_ldn_2: The affines of the source image" in out
    segmenter = json.loads((work / "stamps" / "segmenter.json").read_text())
    assert segmenter["parts"]["cases"] == [CASE.format(1), CASE.format(3)]


def test_nan_input_is_named_and_a_fixed_input_is_resampled_again(work, capsys):
    path = work / "data" / "source_training" / f"{CASE.format(2)}_ceT1.nii.gz"
    image = nib.load(str(path))
    good = np.asarray(image.dataobj, np.float32)
    bad = good.copy()
    bad[10:20, 10:20, 10:12] = np.nan
    nib.save(nib.Nifti1Image(bad, image.affine, image.header), str(path))
    assert run_all(work) == 2
    assert str(path) in capsys.readouterr().err
    nib.save(nib.Nifti1Image(good, image.affine, image.header), str(path))
    assert run_all(work) == 0
    assert np.isfinite(voxels(work / "grid" / "source" / f"{CASE.format(2)}_ceT1.nii.gz")).all()


def test_predictions_keep_the_scans_header_and_orphan_labels_are_reported(work, capsys):
    scan = nib.load(str(work / "data" / "target_validation" / f"{CASE.format(7)}_hrT2.nii.gz"))
    prediction = nib.load(str(work / "predictions" / "ours" / f"{CASE.format(7)}_Label.nii.gz"))
    assert int(prediction.header["qform_code"]) == int(scan.header["qform_code"])
    assert int(prediction.header["sform_code"]) == int(scan.header["sform_code"])
    shutil.copy(work / "data" / "source_training" / f"{CASE.format(1)}_Label.nii.gz",
                work / "data" / "source_training" / "orphan_Label.nii.gz")
    assert run_all(work) == 0
    assert "orphan_Label.nii.gz: there is no ceT1 scan" in capsys.readouterr().out


def test_a_second_run_on_a_locked_work_folder_is_refused(work):
    from singan_insert.batch import output_lock

    pipeline = CrossModaPipeline(CrossModaData(work / "data"), work)
    with output_lock(work):
        with pytest.raises(SinganInsertError, match="Another run is using the work folder"):
            pipeline.prepare()
    with pipeline.locked():
        pipeline.prepare()  # re-entrant: a step calls its upstream steps


def test_stamp_reports_why_and_resumes_only_matching_checkpoints(tmp_path, capsys):
    stamps = Stamps(tmp_path)
    output, checkpoint = tmp_path / "out.bin", tmp_path / "checkpoint"
    parts = {"settings": {"a": 1}, "cases": ["x", "y"]}
    assert stamps.stale("k", [output], parts) == "new"
    checkpoint.write_bytes(b"partial")
    stamps.begin("k", parts, [checkpoint])
    assert not checkpoint.exists()  # no pending stamp: the checkpoint is of unknown data
    checkpoint.write_bytes(b"partial")
    stamps.begin("k", parts, [checkpoint])
    assert checkpoint.exists()  # the same parts: resumed
    output.write_bytes(b"model")
    stamps.record("k", [output], parts)
    assert stamps.stale("k", [output], parts) is None
    assert stamps.stale("k", [output], {**parts, "cases": ["x"]}) == \
        "changed: cases (added none, removed ['y'])"
    output.write_bytes(b"other")
    assert "was changed after it was written" in stamps.stale("k", [output], parts)
    stamps.begin("k", {**parts, "cases": ["x"]}, [checkpoint])
    assert not checkpoint.exists()
