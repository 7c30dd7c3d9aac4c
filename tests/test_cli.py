import json

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import textured_slice

from singan_insert import Harmonizer
from singan_insert.cli import main
from singan_insert.datasets.phantom import simulate_subject, write_crossmoda


@pytest.fixture(scope="module")
def crossmoda_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crossmoda")
    for i in range(2):
        write_crossmoda(simulate_subject(10 + i, shape=(96, 96, 32)), folder, f"crossmoda2021_ldn_{i + 1}")
    return folder


def test_train_from_npy_then_rerun_resumes(tmp_path, capsys):
    np.save(tmp_path / "slice.npy", textured_slice())
    out = tmp_path / "model"
    assert main(["train", str(tmp_path / "slice.npy"), "--preset", "tiny", "--out", str(out), "--no-samples"]) == 0
    first = Harmonizer.load(out)
    assert not list(out.glob("samples_*.png"))
    assert main(["train", str(tmp_path / "slice.npy"), "--preset", "tiny", "--out", str(out), "--no-samples"]) == 0
    again = Harmonizer.load(out)
    # The re-run found the finished checkpoint: same weights and the same training log.
    a, b = first.pyramid.state_dict(), again.pyramid.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.metadata["training"]["log"] == first.metadata["training"]["log"]


def test_train_from_nifti_auto_slice(crossmoda_folder, tmp_path):
    out = tmp_path / "model"
    code = main(["train", str(crossmoda_folder / "crossmoda2021_ldn_1_ceT1.nii.gz"), "--label",
                 str(crossmoda_folder / "crossmoda2021_ldn_1_Label.nii.gz"), "--slice", "auto", "--axis", "2",
                 "--preset", "tiny", "--iterations", "3", "--modality", "ceT1", "--out", str(out)])
    assert code == 0
    model = Harmonizer.load(out)
    label = nib.load(str(crossmoda_folder / "crossmoda2021_ldn_1_Label.nii.gz")).get_fdata()
    assert model.provenance["slice_index"] == int(np.argmax((label > 0).sum(axis=(0, 1))))
    assert model.modality == "ceT1" and model.spacing is not None


def test_harmonize_npy(tiny_model_dir, tmp_path):
    background = textured_slice(seed=5)
    mask = np.zeros_like(background)
    mask[20:28, 20:28] = 1
    composite = np.where(mask > 0, 200, background).astype(np.float32)
    for name, array in (("bg", background), ("comp", composite), ("mask", mask)):
        np.save(tmp_path / f"{name}.npy", array)
    out = tmp_path / "out.npy"
    assert main(["harmonize", "--model", str(tiny_model_dir), "--background", str(tmp_path / "bg.npy"),
                 "--composite", str(tmp_path / "comp.npy"), "--mask", str(tmp_path / "mask.npy"),
                 "--out", str(out), "--start-scale", "-1"]) == 0
    result = np.load(out)
    assert result.shape == background.shape
    assert np.array_equal(result[:5], background[:5]) and not np.array_equal(result[mask > 0], composite[mask > 0])


def test_insert_folder_resume_and_replay(tiny_model_dir, crossmoda_folder, tmp_path, capsys):
    out = tmp_path / "augmented"
    args = ["insert", "--model", str(tiny_model_dir), "--data-root", str(crossmoda_folder), "--out", str(out),
            "--target-suffix", "hrT2", "--num", "2", "--contrast", "0.5", "0.8", "--appearance", "fixed",
            "--seed", "3"]
    assert main(args) == 0
    records = sorted(out.glob("*.json"))
    assert len(records) == 4
    assert len(list(out.glob("*_image.nii.gz"))) == 4 and len(list(out.glob("*_label.nii.gz"))) == 4
    outputs = lambda: {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".singan-insert.lock"}  # noqa: E731
    before = outputs()
    assert main(args) == 0
    assert "4 finished output(s) skipped, 0 redone" in capsys.readouterr().out
    assert outputs() == before

    # The JSON record replays the output bit for bit.
    from singan_insert.insertion.placement import SourceTumor
    from singan_insert.insertion.insert import InsertionParameters, insert_tumor

    record = json.loads(records[0].read_text())
    case = record["case"]
    target = nib.load(case["target"])
    source = SourceTumor.from_files(case["source_image"], case["source_label"],
                                    label_value=record["source_label_value"])
    replay = insert_tumor(np.asarray(target.dataobj, dtype=np.float32), target.affine, source,
                          Harmonizer.load(tiny_model_dir), InsertionParameters.from_dict(record["parameters"]))
    written = nib.load(str(records[0]).replace(".json", "_image.nii.gz")).get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(written, replay.image)
    label = nib.load(str(records[0]).replace(".json", "_label.nii.gz")).get_fdata()
    assert label.max() == 1 and label.sum() == replay.mask.sum()


def test_insert_with_two_workers_matches_one(tiny_model_dir, crossmoda_folder, tmp_path):
    common = ["--model", str(tiny_model_dir), "--data-root", str(crossmoda_folder), "--seed", "1",
              "--target-suffix", "hrT2"]
    assert main(["insert", *common, "--out", str(tmp_path / "one")]) == 0
    assert main(["insert", *common, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    for path in (tmp_path / "one").glob("*_image.nii.gz"):
        a = nib.load(str(path)).get_fdata()
        b = nib.load(str(tmp_path / "two" / path.name)).get_fdata()
        np.testing.assert_array_equal(a, b)


def test_batched_single_process_path_matches_the_per_case_path(tiny_model_dir, crossmoda_folder, tmp_path):
    """--batch-cases (the path --device cuda takes) writes the same outputs, one process."""
    import json

    common = ["--model", str(tiny_model_dir), "--data-root", str(crossmoda_folder), "--seed", "1",
              "--target-suffix", "hrT2", "--num", "2"]
    assert main(["insert", *common, "--out", str(tmp_path / "one")]) == 0
    assert main(["insert", *common, "--out", str(tmp_path / "batched"), "--batch-cases", "3"]) == 0
    images = sorted((tmp_path / "one").glob("*_image.nii.gz"))
    assert len(images) >= 2
    for path in images:
        a = nib.load(str(path)).get_fdata()
        b = nib.load(str(tmp_path / "batched" / path.name)).get_fdata()
        np.testing.assert_allclose(a, b, atol=1e-4 * (np.ptp(a) or 1))
        label = path.name.replace("_image", "_label")
        np.testing.assert_array_equal(nib.load(str(tmp_path / "one" / label)).get_fdata(),
                                      nib.load(str(tmp_path / "batched" / label)).get_fdata())
        record = path.name.replace("_image.nii.gz", ".json")
        one, batched = (json.loads((tmp_path / d / record).read_text()) for d in ("one", "batched"))
        assert one["parameters"] == batched["parameters"] and one["fingerprint"] == batched["fingerprint"]
    # the two paths resume each other's outputs: nothing is redone
    assert main(["insert", *common, "--out", str(tmp_path / "batched")]) == 0
    assert main(["insert", *common, "--out", str(tmp_path / "x"), "--batch-cases", "0"]) == 2
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").glob("*.nii.gz"))


def test_batched_path_refuses_workers(tiny_model_dir, crossmoda_folder, tmp_path, capsys):
    assert main(["insert", "--model", str(tiny_model_dir), "--data-root", str(crossmoda_folder),
                 "--target-suffix", "hrT2", "--out", str(tmp_path / "o"), "--batch-cases", "2",
                 "--workers", "2"]) == 2
    assert "one or the other" in capsys.readouterr().err


def test_errors_are_clear(tiny_model_dir, crossmoda_folder, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["insert", "--model", str(tiny_model_dir), "--data-root", str(crossmoda_folder),
                 "--target-suffix", "hrT2", "--out", str(blocker / "sub")]) == 2
    assert "Cannot create the output folder" in capsys.readouterr().err
    bad_model = tmp_path / "bad.safetensors"
    bad_model.write_bytes(b"\x80\x04not a model")
    assert main(["insert", "--model", str(bad_model), "--data-root", str(crossmoda_folder),
                 "--target-suffix", "hrT2", "--out", str(tmp_path / "o")]) == 2
    assert "not a safetensors file" in capsys.readouterr().err
    assert main(["insert", "--model", str(tiny_model_dir), "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "No complete case" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "m")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["insert", "--model", str(tiny_model_dir), "--data-root", str(crossmoda_folder),
                 "--target-suffix", "hrT2", "--out", str(tmp_path / "o"), "--rim-scale", "0"]) == 2
    assert "rim_scale must be > 0" in capsys.readouterr().err


def test_insert_rim_options_reach_the_record_and_the_fingerprint(tiny_model_dir, crossmoda_folder, tmp_path):
    import json

    common = ["--model", str(tiny_model_dir), "--data-root", str(crossmoda_folder), "--target-suffix", "hrT2"]
    assert main(["insert", *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["insert", *common, "--out", str(tmp_path / "b"), "--rim", "off", "--rim-scale", "1.5"]) == 0
    record = next((tmp_path / "b").glob("*_aug0.json"))
    default, chosen = (json.loads((tmp_path / d / record.name).read_text()) for d in ("a", "b"))
    assert chosen["parameters"]["rim"] is False and chosen["parameters"]["rim_scale"] == 1.5
    assert default["settings"]["rim"] is None and default["fingerprint"] != chosen["fingerprint"]
