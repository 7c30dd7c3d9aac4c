"""`singan-insert insert`: finished outputs are kept, never silently replaced or trusted when damaged.

Each test says what a careful user expects: a re-run never destroys a finished output before
its replacement exists, a second subject never silently replaces the first, a damaged output is
redone, the outputs keep the target's header, an Excel CSV is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import singan_insert.insertion.insert as insertion
import singan_insert.io as sio
from singan_insert.io import file_digest
from singan_insert.cli import main
from singan_insert.datasets.phantom import simulate_subject, write_crossmoda


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two simulated crossMoDA cases; their washed-out hrT2 targets carry a full scanner header."""
    folder = tmp_path_factory.mktemp("cases")
    for i in (1, 2):
        name = f"case_{i}"
        subject = simulate_subject(30 + i, shape=(64, 64, 32))
        write_crossmoda(subject, folder, name)
        target = nib.Nifti1Image(subject.render_b_washed_out().astype(np.float32), subject.affine_b)
        target.set_qform(subject.affine_b, 1)
        target.set_sform(subject.affine_b, 1)
        target.header.set_xyzt_units("mm", "sec")
        target.header["descrip"] = b"scanner hrT2"
        nib.save(target, folder / f"{name}_hrT2_washed_out.nii.gz")
    return folder


@pytest.fixture
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir)


def insert(model: str, *args: str) -> int:
    return main(["insert", "--model", model, *args])


def outputs(out: Path) -> dict[str, bytes]:
    """Every output's bytes; in the records, without the time each file was written (a redone
    output is the same output written at another time)."""
    def content(path: Path) -> bytes:
        if path.suffix != ".json":
            return path.read_bytes()
        record = json.loads(path.read_text())
        for entry in record.get("files", {}).values():
            entry.pop("mtime_ns", None)
        return json.dumps(record, sort_keys=True).encode()

    return {p.name: content(p) for p in sorted(out.iterdir()) if not p.name.startswith(".")}


def test_a_failed_redo_keeps_the_previous_output_with_its_record(model, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert insert(model, "--data-root", str(data), "--out", str(out), "--seed", "1") == 0
    before = outputs(out)
    capsys.readouterr()
    real = insertion.insert_tumor
    calls = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure of case_2")
        return real(*args, **kwargs)

    monkeypatch.setattr(insertion, "insert_tumor", second_fails)
    assert insert(model, "--data-root", str(data), "--out", str(out), "--seed", "2") == 1
    printed = capsys.readouterr().out
    assert "0 finished output(s) skipped, 2 redone (2 with changed parameters" in printed
    assert "failed: case_2 aug 0: RuntimeError: simulated failure of case_2; its previous output (and record) " \
           "was kept" in printed
    after = outputs(out)
    # case_2: the previous image, label and record, byte for byte; case_1: the new settings.
    assert {k: v for k, v in after.items() if k.startswith("case_2")} == \
           {k: v for k, v in before.items() if k.startswith("case_2")}
    assert json.loads(after["case_1_aug0.json"])["settings"]["seed"] == 2
    assert after["case_1_aug0_image.nii.gz"] != before["case_1_aug0_image.nii.gz"]
    # The kept output is still a finished one: the next run with its settings skips it.
    monkeypatch.undo()
    assert insert(model, "--data-root", str(data), "--out", str(out), "--seed", "1") == 0
    assert "1 finished output(s) skipped, 1 redone" in capsys.readouterr().out


def test_a_redo_cut_while_writing_keeps_the_previous_output(model, data, tmp_path, capsys, monkeypatch):
    """A write that fails half-way (the label, after the image) leaves the previous triple."""
    out = tmp_path / "out"
    assert insert(model, "--data-root", str(data), "--out", str(out), "--seed", "1") == 0
    before = outputs(out)
    real, calls = sio._write_temporary, []

    def label_fails(path, data):
        calls.append(path)
        if path.name.endswith("_label.nii.gz"):
            raise RuntimeError("cut while writing")
        return real(path, data)

    monkeypatch.setattr(sio, "_write_temporary", label_fails)
    assert insert(model, "--data-root", str(data), "--out", str(out), "--seed", "2") == 1
    monkeypatch.undo()
    assert "cut while writing" in capsys.readouterr().out
    assert outputs(out) == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_options_the_model_cannot_run_are_refused_before_any_output(model, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert insert(model, "--data-root", str(data), "--out", str(out)) == 0
    before = outputs(out)
    capsys.readouterr()
    for option in (["--start-scale", "7"], ["--start-scale=-9:-1"], ["--axis", "0"]):
        assert insert(model, "--data-root", str(data), "--out", str(out), *option) == 2
        captured = capsys.readouterr()
        assert captured.err.count("error:") == 1 and not captured.out
        assert ("--start-scale: start_scale=" in captured.err and "out of range" in captured.err) \
            or "trained on slices cut along axis 2" in captured.err
    assert outputs(out) == before


def test_target_outputs_of_another_subject_are_not_replaced(model, data, tmp_path, capsys):
    subjects = []
    for i in (1, 2):
        folder = tmp_path / f"subj{i}"
        folder.mkdir()
        for kind, name in (("hrT2_washed_out", "target"), ("ceT1", "ceT1"), ("Label", "label")):
            (folder / f"{name}.nii.gz").write_bytes((data / f"case_{i}_{kind}.nii.gz").read_bytes())
        subjects.append(["--target", str(folder / "target.nii.gz"), "--source-image",
                         str(folder / "ceT1.nii.gz"), "--source-label", str(folder / "label.nii.gz")])
    out = tmp_path / "out"
    assert insert(model, *subjects[0], "--out", str(out)) == 0
    first = outputs(out)
    assert sorted(first) == ["target_aug0.json", "target_aug0_image.nii.gz", "target_aug0_label.nii.gz"]
    capsys.readouterr()
    assert insert(model, *subjects[1], "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "made from other input files" in err and "subj1" in err and "--name" in err
    assert outputs(out) == first
    # --name gives the second subject its own outputs; the first one's stay.
    assert insert(model, *subjects[1], "--out", str(out), "--name", "subj2") == 0
    assert {k: v for k, v in outputs(out).items() if k.startswith("target")} == first
    assert json.loads((out / "subj2_aug0.json").read_text())["input_paths"]["target"] == \
        str((tmp_path / "subj2" / "target.nii.gz").resolve())
    # The same path with changed content is redone, as before (not refused).
    (tmp_path / "subj1" / "target.nii.gz").touch()
    assert insert(model, *subjects[0], "--out", str(out)) == 0
    assert "0 finished output(s) skipped, 1 redone" in capsys.readouterr().out
    # --name belongs to --target.
    assert insert(model, "--data-root", str(data), "--out", str(out), "--name", "x") == 2
    assert "--name names the outputs of the one case of --target" in capsys.readouterr().err


def test_damaged_outputs_are_redone(model, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert insert(model, "--data-root", str(data), "--out", str(out), "--num", "2") == 0
    reference = outputs(out)
    record = json.loads((out / "case_1_aug0.json").read_text())
    image = out / "case_1_aug0_image.nii.gz"
    # Size and time let a resume skip reading a finished output; the SHA-256 decides otherwise.
    assert record["files"]["image"] == {"size": image.stat().st_size, "sha256": file_digest(image),
                                        "mtime_ns": image.stat().st_mtime_ns}
    image.write_bytes(image.read_bytes()[:1000])  # a half-copied file
    label = out / "case_2_aug1_label.nii.gz"
    flipped = bytearray(label.read_bytes())
    flipped[-40] ^= 0xFF  # same size, other bytes
    label.write_bytes(bytes(flipped))
    capsys.readouterr()
    assert insert(model, "--data-root", str(data), "--out", str(out), "--num", "2") == 0
    printed = capsys.readouterr().out
    assert "2 finished output(s) skipped, 2 redone (0 with changed parameters, inputs or model; 2 whose " \
           "files are missing or differ from their record)" in printed
    assert "redone: case_1 aug 0: its image file differs from its record" in printed
    assert "redone: case_2 aug 1: its label file differs from its record" in printed
    assert outputs(out) == reference


def test_outputs_beyond_a_smaller_num_made_otherwise_are_reported(model, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert insert(model, "--data-root", str(data), "--out", str(out), "--num", "2") == 0
    capsys.readouterr()
    # Fewer outputs, same settings: the second is still this run's output, nothing to say.
    assert insert(model, "--data-root", str(data), "--out", str(out), "--num", "1") == 0
    assert "beyond --num" not in capsys.readouterr().out
    # Fewer outputs with other settings: aug1 of each case is left from the other run.
    assert insert(model, "--data-root", str(data), "--out", str(out), "--num", "1", "--label-value", "5") == 1
    printed = capsys.readouterr().out
    assert "2 output(s) beyond --num 1 were left by an earlier run and do not match this one" in printed
    assert "left over: case_1 aug 1: made with other settings, inputs or model." in printed
    assert "left over: case_2 aug 1: made with other settings, inputs or model." in printed
    assert (out / "case_1_aug1_label.nii.gz").exists()  # reported, never deleted


def test_outputs_keep_the_target_header(model, data, tmp_path):
    out = tmp_path / "out"
    assert insert(model, "--data-root", str(data), "--out", str(out)) == 0
    target = nib.load(str(data / "case_1_hrT2_washed_out.nii.gz"))
    for kind, dtype in (("image", np.float32), ("label", np.uint8)):
        written = nib.load(str(out / f"case_1_aug0_{kind}.nii.gz"))
        for field in ("qform_code", "sform_code", "xyzt_units", "descrip", "pixdim"):
            assert np.array_equal(written.header[field], target.header[field]), (kind, field)
        assert np.allclose(written.affine, target.affine) and written.get_data_dtype() == dtype


def test_harmonize_nifti_output_keeps_the_background_header_and_shape(model, tmp_path, capsys):
    from helpers import textured_slice

    background = textured_slice(seed=3)[:, :, None]  # a (H, W, 1) slice
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    mask = np.zeros(background.shape[:2], np.float32)
    mask[20:26, 20:26] = 1
    for name, array in (("bg", background), ("comp", np.where(mask[..., None] > 0, 200, background))):
        image = nib.Nifti1Image(array.astype(np.float32), affine)
        image.set_qform(affine, 1)
        image.header.set_xyzt_units("mm")
        nib.save(image, tmp_path / f"{name}.nii.gz")
    np.save(tmp_path / "mask.npy", mask)
    common = ["harmonize", "--model", model, "--background", str(tmp_path / "bg.nii.gz"), "--composite",
              str(tmp_path / "comp.nii.gz"), "--mask", str(tmp_path / "mask.npy")]
    assert main([*common, "--out", str(tmp_path / "h.nii.gz")]) == 0
    written, background_file = nib.load(str(tmp_path / "h.nii.gz")), nib.load(str(tmp_path / "bg.nii.gz"))
    assert written.shape == background_file.shape == (48, 48, 1)
    assert written.header["qform_code"] == 1 and written.header.get_xyzt_units()[0] == "mm"
    # An extension it cannot write is refused, and nothing is written.
    for name in ("h.txt", "h.jpg"):
        assert main([*common, "--out", str(tmp_path / name)]) == 2
        assert ".png, .npy, .nii, .nii.gz" in capsys.readouterr().err
        assert not (tmp_path / name).exists()


def test_csv_from_excel_with_a_byte_order_mark_and_spaces(model, data, tmp_path):
    rows = ["name , target,source_image ,source_label",
            f" c1 ,{data / 'case_1_hrT2_washed_out.nii.gz'} , {data / 'case_1_ceT1.nii.gz'},"
            f"{data / 'case_1_Label.nii.gz'} "]
    path = tmp_path / "cases.csv"
    path.write_bytes("\ufeff".encode("utf-8") + "\r\n".join(rows).encode("utf-8") + b"\r\n")
    out = tmp_path / "out"
    assert insert(model, "--csv", str(path), "--out", str(out)) == 0
    assert json.loads((out / "c1_aug0.json").read_text())["case"]["target"].endswith("_washed_out.nii.gz")


def test_an_unfinished_training_folder_says_so(tiny_model_dir, data, tmp_path, capsys):
    folder = tmp_path / "unfinished"
    folder.mkdir()
    (folder / "checkpoint.safetensors").write_bytes((tiny_model_dir / "checkpoint.safetensors").read_bytes())
    for argv in (["insert", "--model", str(folder), "--data-root", str(data), "--out", str(tmp_path / "o")],
                 ["annotate", "--model", str(folder), "--remove"],
                 ["harmonize", "--model", str(folder), "--background", "b.npy", "--composite", "c.npy",
                  "--mask", "m.npy", "--out", str(tmp_path / "h.npy")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "has not finished" in err and "Re-run the same `singan-insert train` command" in err
    assert not (tmp_path / "o").exists()
