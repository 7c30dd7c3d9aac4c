"""`train` re-runs and 2D inputs, `annotate --out`, and help texts that state every default."""

from __future__ import annotations

import argparse

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import textured_slice

from singan_insert import Harmonizer
from singan_insert.cli import build_parser, main

FAST = ["--preset", "tiny", "--iterations", "2", "--no-samples"]


def tumor_mask(shape=(48, 48)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[16:26, 22:32] = 255
    return mask


def test_rerunning_train_keeps_an_annotation_added_later(tmp_path, capsys):
    np.save(tmp_path / "slice.npy", textured_slice())
    np.save(tmp_path / "mask.npy", tumor_mask())
    out = tmp_path / "model"
    train = ["train", str(tmp_path / "slice.npy"), *FAST, "--out", str(out)]
    assert main(train) == 0
    assert main(["annotate", "--model", str(out), "--mask", str(tmp_path / "mask.npy")]) == 0
    annotated = (out / "harmonizer.safetensors").read_bytes()
    capsys.readouterr()
    # The same command again: the annotation stays, and so does every byte of the file.
    assert main(train) == 0
    printed = capsys.readouterr().out
    assert "keeping the tumor annotation of the existing model file" in printed and "unchanged" in printed
    assert (out / "harmonizer.safetensors").read_bytes() == annotated
    # A re-run that changes the model's description keeps the annotation in the new file.
    assert main([*train, "--modality", "hrT2"]) == 0
    model = Harmonizer.load(out)
    assert model.modality == "hrT2" and model.tumor_annotation is not None
    assert torch.equal(model.tumor_annotation, Harmonizer.load(annotated_copy(tmp_path, annotated)).tumor_annotation)
    # Asking for no annotation is obeyed.
    assert main([*train, "--modality", "hrT2", "--no-annotate"]) == 0
    assert Harmonizer.load(out).tumor_annotation is None
    assert "(no tumor annotation: each tumor's level will be guessed by realism" in capsys.readouterr().out


def annotated_copy(folder, data: bytes):
    path = folder / "annotated.safetensors"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("extra, named", [
    (["--label", "LABEL"], "--label"), (["--axis", "1"], "--axis"), (["--slice", "3"], "--slice"),
    (["--tumor-label", "1"], "--tumor-label")])
def test_a_2d_input_refuses_volume_options(tmp_path, capsys, extra, named):
    from PIL import Image

    Image.fromarray(textured_slice().clip(0, 255).astype(np.uint8)).save(tmp_path / "slice.png")
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((48, 48, 4), np.uint8), np.eye(4)), label)
    extra = [str(label) if e == "LABEL" else e for e in extra]
    assert main(["train", str(tmp_path / "slice.png"), *extra, *FAST, "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"is a 2D image, and {named} only applies to a 3D volume" in err and "--annotation MASK" in err
    assert not (tmp_path / "m" / "harmonizer.safetensors").exists()


def test_a_2d_or_one_slice_nifti_trains_with_its_pixel_size(tmp_path):
    image = textured_slice()
    for name, array, zooms in (("flat", image, [0.5, 0.5, 2.0]), ("one_slice", image[:, None, :], [0.5, 2.0, 0.5])):
        nib.save(nib.Nifti1Image(array, np.diag([*zooms, 1.0])), tmp_path / f"{name}.nii.gz")
        out = tmp_path / name
        assert main(["train", str(tmp_path / f"{name}.nii.gz"), *FAST, "--out", str(out)]) == 0
        model = Harmonizer.load(out)
        assert model.geometry.finest == (48, 48)
        # The model stores the pixel size of its finest scale: 0.5 mm when no scale shrank it.
        assert model.spacing is not None and np.allclose(model.spacing, (0.5, 0.5))


def test_annotate_out_with_a_trailing_slash_is_a_folder(tiny_model_dir, tmp_path, capsys):
    np.save(tmp_path / "mask.npy", tumor_mask())
    target = tmp_path / "new" / "folder"
    assert main(["annotate", "--model", str(tiny_model_dir), "--mask", str(tmp_path / "mask.npy"),
                 "--out", f"{target}/"]) == 0
    assert (target / "harmonizer.safetensors").is_file()
    assert Harmonizer.load(target).tumor_annotation is not None


def _subparsers(parser: argparse.ArgumentParser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices.items()


def test_every_option_says_its_default():
    for command, sub in _subparsers(build_parser()):
        required_groups = [g for g in sub._mutually_exclusive_groups if g.required]
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction) or action.required \
                    or any(action in g._group_actions for g in required_groups):
                continue
            text = (action.help or "").lower()
            assert "default" in text or "required" in text, \
                f"{command} {action.option_strings[0]}: {action.help!r}"
