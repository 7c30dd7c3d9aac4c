"""Trust: bad inputs and faults around insertion (the TorchIO transforms, the API and `insert`).

Every case asserts its outcome (a clear error naming what to fix, or the right result) and that
nothing was written half (no temporary file, every record's image and label readable) or
outside the output folder. The fault tests kill `singan-insert insert` (kill -9 of the parent
with 1 and 2 workers, SIGTERM with 2 workers, Ctrl-C to the process group with 1 and 2 workers)
and run two writers into one folder at once.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from helpers import textured_slice

from singan_insert import TrainingConfig, train_harmonizer
from singan_insert.batch import LOCK_NAME, output_lock
from singan_insert.cli import main
from singan_insert.datasets.phantom import simulate_subject, write_crossmoda
from singan_insert.errors import SinganInsertError
from singan_insert.insertion.insert import InsertionParameters
from singan_insert.integrations.torchio import RandomTumorInsertion, TumorInsertion

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (64, 64, 32)


# --------------------------------------------------------------------------------------------
# Data and checks
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three simulated crossMoDA cases (ceT1, Label, hrT2 and a washed-out hrT2 stand-in)."""
    folder = tmp_path_factory.mktemp("cases")
    for i in range(3):
        name = f"case_{i + 1}"
        subject = simulate_subject(20 + i, shape=SHAPE)
        write_crossmoda(subject, folder, name)
        washed = nib.load(folder / f"{name}_hrT2.nii.gz")
        nib.save(washed, folder / f"{name}_hrT2_washed_out.nii.gz")
    return folder


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir)


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def assert_nothing_half_or_outside(sandbox: Path, before: dict[str, int], out: Path | None) -> None:
    """Only files under ``out`` appeared or changed in ``sandbox``; each output is complete."""
    after = files_under(sandbox)
    changed = {k for k in after if before.get(k) != after[k]} | (set(before) - set(after))
    prefix = None if out is None else str(out.relative_to(sandbox))
    outside = sorted(k for k in changed if prefix is None or not k.startswith(prefix + os.sep))
    assert outside == [], f"written outside the output folder: {outside}"
    if out is None or not out.exists():
        return
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp")), "temporary files left"
    for record in out.glob("*.json"):
        data = json.loads(record.read_text())
        stem = str(record)[: -len(".json")]
        for kind in ("image", "label"):
            volume = nib.load(f"{stem}_{kind}.nii.gz").get_fdata()
            assert volume.shape == tuple(data["target"]["shape"])


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("name,target,source_image,source_label\n" + "\n".join(rows) + "\n")
    return path


def row(data: Path, name: str, case: str = "case_1", target: str | None = None) -> str:
    target = target or str(data / f"{case}_hrT2_washed_out.nii.gz")
    return f"{name},{target},{data / f'{case}_ceT1.nii.gz'},{data / f'{case}_Label.nii.gz'}"


def insert(model, *args) -> int:
    return main(["insert", "--model", model, *args])


# --------------------------------------------------------------------------------------------
# API: every bad parameter is refused when the transform is built (clear error)
# --------------------------------------------------------------------------------------------
TWIN_ERRORS = [
    ({"border_margin": -1}, "border_margin"),
    ({"border_margin": 1.5}, "border_margin"),
    ({"max_anisotropy": -2.0}, "max_anisotropy"),
    ({"start_scale": 1.5}, "start_scale"),
    ({"seed": 2.5}, "seed"),
    ({"seed": 2**70}, "seed"),
    ({"seed": -1}, "seed"),
    ({"dilation_mm": math.nan}, "dilation_mm"),
    ({"feather_mm": math.nan}, "feather_mm"),
    ({"feather_mm": -1.0}, "feather_mm"),
    ({"contrast": math.nan}, "contrast"),
    ({"contrast": 0.0}, "contrast"),
    ({"contrast": True}, "contrast"),
    ({"location": (math.nan, 1.0, 1.0)}, "location"),
    ({"location": (1.0, 2.0)}, "location"),
    ({"scale": 0.0}, "scale"),
    ({"rotation": (0.0, math.inf, 0.0)}, "rotation"),
    ({"label_value": 0}, "label_value"),
    ({"axis": 3}, "axis"),
    ({"context_mm": -1.0}, "context_mm"),
    ({"context_mm": math.nan}, "context_mm"),
    ({"location_units": "inch"}, "units"),
    ({"overlap": "merge"}, "overlap"),
    ({"intensity_mode": "raw"}, "intensity_mode"),
    ({"p": 1.5}, "p"),
    ({"clip_to_fov": "yes"}, "clip_to_fov"),
]

RANDOM_ERRORS = [
    ({"degrees": -5}, "degrees"),
    ({"scales": 1.5}, "scales"),
    ({"flip_probability": 1.5}, "flip_probability"),
    ({"flip_axes": (0, 3)}, "flip_axes"),
    ({"max_attempts": 0}, "max_attempts"),
    ({"contrast": (1.0, 0.5)}, "contrast"),
    ({"contrast": [0.5, 0.8, 1.5]}, "set"),  # a list of three: ambiguous, says to use a set
    ({"contrast": {0.5, -1.0}}, "contrast"),
    ({"start_scale": (-2, 3)}, "start_scale"),
    ({"start_scale": (1.5, 2)}, "start_scale"),
    ({"placement_key": "label"}, "placement_values"),
    ({"placement_mode": "middle"}, "placement_mode"),
    ({"border_margin": -3}, "border_margin"),
    ({"max_anisotropy": 0.5}, "max_anisotropy"),
    ({"dilation_mm": math.nan}, "dilation_mm"),
    ({"p": -0.1}, "p"),
    ({"device": "gpu0"}, "Unknown device"),
    ({"label_key": ""}, "label_key"),
]

PARAMETER_ERRORS = [
    ({"dilation_mm": math.nan}, "dilation_mm"),
    ({"feather_mm": math.nan}, "feather_mm"),
    ({"seed": 2**64}, "seed"),
    ({"start_scale": 2.5}, "start_scale"),
    ({"border_margin": -1}, "border_margin"),
    ({"max_anisotropy": math.inf}, "max_anisotropy"),
]


@pytest.mark.parametrize("kwargs, message", TWIN_ERRORS, ids=[str(k) for k, _ in TWIN_ERRORS])
def test_tumor_insertion_refuses_bad_parameters_at_construction(model, data, sandbox, kwargs, message):
    before = files_under(sandbox)
    source = (str(data / "case_1_ceT1.nii.gz"), str(data / "case_1_Label.nii.gz"))
    location = kwargs.pop("location", (32, 32, 16))
    with pytest.raises(SinganInsertError, match=message):
        TumorInsertion(model, source, location, **kwargs)
    assert_nothing_half_or_outside(sandbox, before, None)


@pytest.mark.parametrize("kwargs, message", RANDOM_ERRORS, ids=[str(k) for k, _ in RANDOM_ERRORS])
def test_random_insertion_refuses_bad_parameters_at_construction(model, data, sandbox, kwargs, message):
    before = files_under(sandbox)
    source = (str(data / "case_1_ceT1.nii.gz"), str(data / "case_1_Label.nii.gz"))
    with pytest.raises(SinganInsertError, match=message):
        RandomTumorInsertion(model, [source], **kwargs)
    assert_nothing_half_or_outside(sandbox, before, None)


def test_missing_source_files_are_refused_at_construction(model, data, sandbox):
    before = files_under(sandbox)
    with pytest.raises(SinganInsertError, match="does not exist"):
        RandomTumorInsertion(model, [(str(data / "case_1_ceT1.nii.gz"), "missing_Label.nii.gz")])
    with pytest.raises(SinganInsertError, match="does not exist"):
        TumorInsertion(model, (str(data), str(data / "case_1_Label.nii.gz")), (32, 32, 16))
    with pytest.raises(SinganInsertError, match="model .* does not exist"):
        RandomTumorInsertion(str(sandbox / "no_model"), [(str(data / "case_1_ceT1.nii.gz"),
                                                          str(data / "case_1_Label.nii.gz"))])
    assert_nothing_half_or_outside(sandbox, before, None)


@pytest.mark.parametrize("kwargs, message", PARAMETER_ERRORS, ids=[str(k) for k, _ in PARAMETER_ERRORS])
def test_insertion_parameters_refuse_bad_numbers(kwargs, message):
    with pytest.raises(SinganInsertError, match=message):
        InsertionParameters(**kwargs)


def test_numpy_integers_are_integers(model, data):
    source = (str(data / "case_1_ceT1.nii.gz"), str(data / "case_1_Label.nii.gz"))
    twin = TumorInsertion(model, source, (32, 32, 16), start_scale=np.int64(-2), seed=np.int64(7),
                          border_margin=np.int32(2), label_value=np.uint8(3), axis=np.int64(2))
    assert (twin.start_scale, twin.seed, twin.border_margin, twin.label_value, twin.axis) == (-2, 7, 2, 3, 2)
    assert all(type(v) is int for v in (twin.start_scale, twin.seed, twin.border_margin))
    random = RandomTumorInsertion(model, [source], start_scale=(np.int64(-3), np.int64(-1)),
                                  max_attempts=np.int64(5))
    assert random.max_attempts == 5 and random.ranges.start_scale.values == (-3, -1)


def test_outside_advice_names_where_clip_to_fov_exists(model, data):
    """A tumor kept at its physical position but outside a small target: the advice must not
    send a RandomTumorInsertion user to an argument it does not have."""
    from singan_insert.insertion.placement import SourceTumor

    files = (str(data / "case_1_ceT1.nii.gz"), str(data / "case_1_Label.nii.gz"))
    source = SourceTumor.from_files(*files, label_value=1)
    affine = np.diag([0.5, 0.5, 1.5, 1.0])
    affine[:3, 3] = source.centroid_mm - affine[:3, :3] @ np.array([0.0, 32.0, 16.0])  # cut at i = 0
    target = tio.Subject(image=tio.ScalarImage(tensor=torch.rand(1, *SHAPE), affine=affine))
    with pytest.raises(SinganInsertError, match=r"partly outside.*clip_to_fov=True \(InsertionParameters or TumorInsertion\)"):
        RandomTumorInsertion(model, [source], degrees=0, scales=0, flip_axes=(), border_margin=0)(target)


def test_zero_spacing_is_reported_as_such(model, data):
    source = (str(data / "case_1_ceT1.nii.gz"), str(data / "case_1_Label.nii.gz"))
    affine = np.diag([0.4, 0.0, 1.0, 1.0])
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.rand(1, *SHAPE), affine=affine))
    with pytest.raises(SinganInsertError, match="voxel size is zero"):
        TumorInsertion(model, source, (32, 32, 16), source_label_value=1)(subject)


# --------------------------------------------------------------------------------------------
# CLI: bad arguments (exit 2, nothing written)
# --------------------------------------------------------------------------------------------
CLI_ERRORS = [
    (["--contrast", "nan"], "contrast must be a finite number"),
    (["--contrast", "0"], "contrast must be > 0"),
    (["--contrast", "0.5:abc"], "cannot read"),
    (["--contrast", "0.5", "0.7:0.9"], "either one range"),
    (["--context-mm", "nan"], "context_mm must be a finite number"),
    (["--seed", "-1"], "seed must be in [0, 4294967295]"),
    (["--num", "0"], "num must be >= 1"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--start-scale", "1.5"], "start_scale must be an integer"),
    (["--label-value", "0"], "label_value must be >= 1"),
]


@pytest.mark.parametrize("extra, message", CLI_ERRORS, ids=[" ".join(e) for e, _ in CLI_ERRORS])
def test_insert_refuses_bad_arguments(model, data, sandbox, capsys, extra, message):
    before = files_under(sandbox)
    out = sandbox / "out"
    assert insert(model, "--data-root", str(data), "--out", str(out), *extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert_nothing_half_or_outside(sandbox, before, None)


# --------------------------------------------------------------------------------------------
# CLI: bad rows and bad inputs are recorded; the others are written (exit 1)
# --------------------------------------------------------------------------------------------
def _bad_nifti(kind: str, folder: Path, good_path: Path) -> str:
    path = folder / f"bad_{kind}.nii.gz"
    good = nib.load(str(good_path))
    if kind == "garbage":
        path.write_bytes(os.urandom(2048))
    elif kind == "truncated":
        raw = (folder / "full.nii.gz")
        nib.save(good, raw)
        path.write_bytes(raw.read_bytes()[:3000])
    elif kind == "rgb":
        rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        nib.save(nib.Nifti1Image(rgb, good.affine), path)
    elif kind == "complex":
        nib.save(nib.Nifti1Image(np.ones(SHAPE, np.complex64), good.affine), path)
    elif kind == "4d":
        nib.save(nib.Nifti1Image(np.ones((*SHAPE, 2), np.float32), good.affine), path)
    elif kind == "directory":
        path = folder / "a_directory.nii.gz"
        path.mkdir()
    elif kind == "nan":
        values = np.asarray(good.dataobj, np.float32).copy()
        values[3, 3, 3] = np.nan
        nib.save(nib.Nifti1Image(values, good.affine), path)
    return str(path)


BAD_TARGETS = [("garbage", "Could not read"), ("truncated", "Could not read"),
               ("rgb", "colour (RGB"), ("complex", "holds complex64 data"), ("4d", "3 axes are expected"),
               ("directory", "not found or not a file"), ("nan", "NaN")]


@pytest.mark.parametrize("kind, message", BAD_TARGETS, ids=[k for k, _ in BAD_TARGETS])
def test_one_unreadable_target_is_recorded_and_the_batch_goes_on(model, data, sandbox, capsys, kind, message):
    bad = _bad_nifti(kind, sandbox, data / "case_1_hrT2.nii.gz")
    csv_path = write_csv(sandbox / "cases.csv", [row(data, "bad", target=bad), row(data, "good", "case_2")])
    before = files_under(sandbox)
    out = sandbox / "out"
    assert insert(model, "--csv", str(csv_path), "--out", str(out)) == 1
    printed = capsys.readouterr().out
    assert message in printed and ("failed: bad aug 0" in printed or "refused: bad" in printed)
    assert sorted(p.name for p in out.glob("*.json")) == ["good_aug0.json"]
    assert not list(out.glob("bad_*"))
    assert_nothing_half_or_outside(sandbox, before, out)


BAD_ROWS = [
    ("../escape", "not a plain file-name prefix"),
    ("/tmp/abs_escape", "not a plain file-name prefix"),
    ("sub/dir", "not a plain file-name prefix"),
    (".hidden", "not a plain file-name prefix"),
]


@pytest.mark.parametrize("name, message", BAD_ROWS, ids=[n for n, _ in BAD_ROWS])
def test_case_names_cannot_write_outside_the_output_folder(model, data, sandbox, capsys, name, message):
    csv_path = write_csv(sandbox / "cases.csv", [row(data, name), row(data, "good", "case_2")])
    before = files_under(sandbox)
    out = sandbox / "deep" / "out"
    assert insert(model, "--csv", str(csv_path), "--out", str(out)) == 1
    printed = capsys.readouterr().out
    assert f"refused: {name}" in printed and message in printed
    assert sorted(p.name for p in out.glob("*.json")) == ["good_aug0.json"]
    assert not Path("/tmp/abs_escape_aug0.json").exists()
    assert_nothing_half_or_outside(sandbox, before, out)


def test_duplicate_short_and_missing_rows_are_refused(model, data, sandbox, capsys):
    csv_path = write_csv(sandbox / "cases.csv", [
        row(data, "twin"), row(data, "twin", "case_2"), "short,only_a_target",
        row(data, "lost", target=str(sandbox / "missing.nii.gz")), row(data, "good", "case_3")])
    before = files_under(sandbox)
    out = sandbox / "out"
    assert insert(model, "--csv", str(csv_path), "--out", str(out)) == 1
    printed = capsys.readouterr().out
    assert printed.count("refused: twin: the name 'twin' is given 2 times") == 2
    assert "refused: short: line 4 has no source_image, source_label" in printed
    assert "refused: lost: not found or not a file" in printed
    assert "4 case(s) refused" in printed
    assert sorted(p.name for p in out.glob("*.json")) == ["good_aug0.json"]
    assert_nothing_half_or_outside(sandbox, before, out)


# --------------------------------------------------------------------------------------------
# CLI: resume is keyed on each output's parameters and files
# --------------------------------------------------------------------------------------------
def test_resume_redoes_deleted_or_changed_outputs(model, data, sandbox, capsys, tiny_model_dir,
                                                  tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    out = sandbox / "out"
    common = ["--data-root", str(data), "--out", str(out), "--seed", "4", "--appearance", "fixed"]
    before = files_under(sandbox)
    assert insert(model, *common, "--contrast", "0.5") == 0
    assert len(list(out.glob("*.json"))) == 3
    capsys.readouterr()
    # A deleted image is redone; the others are skipped.
    (out / "case_2_aug0_image.nii.gz").unlink()
    assert insert(model, *common, "--contrast", "0.5") == 0
    assert "2 finished output(s) skipped, 1 redone" in capsys.readouterr().out
    # A changed parameter redoes every output, and the records say the new value.
    assert insert(model, *common, "--contrast", "0.8") == 0
    assert "0 finished output(s) skipped, 3 redone" in capsys.readouterr().out
    contrasts = {json.loads(p.read_text())["parameters"]["contrast"] for p in out.glob("*.json")}
    assert contrasts == {0.8}
    # The same model bytes under another path change nothing; another model redoes them.
    copy = models / "copy.safetensors"
    copy.write_bytes((Path(tiny_model_dir) / "harmonizer.safetensors").read_bytes())
    assert insert(str(copy), *common, "--contrast", "0.8") == 0
    assert "3 finished output(s) skipped, 0 redone" in capsys.readouterr().out
    retrained = models / "retrained"
    train_harmonizer(textured_slice(seed=1), TrainingConfig.preset("tiny"), out_dir=retrained,
                     seed=1, spacing=(0.5, 0.5), progress=False, provenance={"axis": 2, "modality": "hrT2"})
    assert insert(str(retrained), *common, "--contrast", "0.8") == 0
    assert "0 finished output(s) skipped, 3 redone" in capsys.readouterr().out
    assert_nothing_half_or_outside(sandbox, before, out)


def test_demo_layout_inserts_into_the_translation_and_reports_incomplete_cases(model, data, sandbox, capsys):
    """The demo's data/ folder: ceT1, Label, hrT2, hrT2_washed_out, hrT2_augmented(_Label)."""
    folder = sandbox / "demo_data"
    folder.mkdir()
    for path in data.glob("case_1_*"):
        (folder / path.name).symlink_to(path)
    (folder / "case_1_hrT2_augmented.nii.gz").symlink_to(data / "case_1_hrT2.nii.gz")
    (folder / "case_1_hrT2_augmented_Label.nii.gz").symlink_to(data / "case_1_Label.nii.gz")
    for case in ("case_9", "case_1_rescan"):  # cases with their own hrT2 only; one extends case_1's name
        for suffix in ("ceT1", "Label", "hrT2"):
            (folder / f"{case}_{suffix}.nii.gz").symlink_to(data / f"case_2_{suffix}.nii.gz")
    before = files_under(sandbox)
    out = sandbox / "out"
    # Incomplete cases make the exit status 1 (docs/cli.md), as refused CSV rows do.
    assert insert(model, "--data-root", str(folder), "--out", str(out)) == 1
    printed = capsys.readouterr().out
    record = json.loads((out / "case_1_aug0.json").read_text())
    assert record["case"]["target"].endswith("case_1_hrT2_washed_out.nii.gz")
    for case in ("case_9", "case_1_rescan"):
        # Listed before the progress bar and again after the summary, which counts them.
        assert printed.count(f"incomplete case {case}: no translated target") == 2
    summary = next(line for line in printed.splitlines() if line.startswith("Wrote "))
    assert "--target-suffix hrT2" in printed and "2 case(s) incomplete" in summary
    assert "case_1_hrT2_augmented" not in printed  # the demo's own output is not a case
    assert sorted(p.name for p in out.glob("*.json")) == ["case_1_aug0.json"]
    assert_nothing_half_or_outside(sandbox, before, out)


def test_a_full_disk_stops_the_batch_keeps_finished_outputs_and_resumes(model, data, sandbox, capsys, monkeypatch):
    import errno

    import singan_insert.io as io

    real, calls = io._write_temporary, []

    def fill_up(path, payload):
        calls.append(path)
        if len(calls) > 4:  # the first output (image, label, record) fits, then the disk is full
            full = OSError(errno.ENOSPC, "No space left on device", str(path))
            raise io._write_error(Path(path), full) from full  # as the real writer reports it
        return real(path, payload)

    out = sandbox / "out"
    before = files_under(sandbox)
    monkeypatch.setattr(io, "_write_temporary", fill_up)
    assert insert(model, "--data-root", str(data), "--out", str(out)) == 1
    printed = capsys.readouterr().out
    assert "failed: case_2 aug 0: the disk is full" in printed and "case_3 aug 0: not run" in printed
    assert len(calls) == 5  # case_2's image was written, its label was not: nothing more tried
    assert not list(out.glob("case_2_*"))  # no half of case_2 is kept
    assert sorted(p.name for p in out.glob("*.json")) == ["case_1_aug0.json"]
    assert_nothing_half_or_outside(sandbox, before, out)
    monkeypatch.setattr(io, "_write_temporary", real)
    assert insert(model, "--data-root", str(data), "--out", str(out)) == 0
    assert "1 finished output(s) skipped, 0 redone" in capsys.readouterr().out
    assert len(list(out.glob("*.json"))) == 3
    assert_nothing_half_or_outside(sandbox, before, out)


def test_a_second_writer_is_refused_while_the_folder_is_locked(model, data, sandbox, capsys):
    out = sandbox / "out"
    out.mkdir()
    before = files_under(sandbox)
    with output_lock(out):
        assert insert(model, "--data-root", str(data), "--out", str(out)) == 2
        assert f"(pid {os.getpid()}) is writing to" in capsys.readouterr().err
    assert not list(out.glob("*.json"))
    assert insert(model, "--data-root", str(data), "--out", str(out), "--num", "1") == 0
    assert_nothing_half_or_outside(sandbox, before, out)


# --------------------------------------------------------------------------------------------
# Faults: kill -9 / SIGTERM of `insert`, two concurrent writers (real processes)
# --------------------------------------------------------------------------------------------
def _command(model, data, out, *extra):
    return [sys.executable, "-m", "singan_insert", "insert", "--model", model, "--data-root",
            str(data), "--out", str(out), "--num", "3", "--seed", "2", *extra]


def _environment():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return env


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                children.append(int(entry.name))
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def reference(model, data, tmp_path_factory):
    """An uninterrupted run: what every resumed run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference")
    assert main(["insert", "--model", model, "--data-root", str(data), "--out", str(out),
                 "--num", "3", "--seed", "2"]) == 0
    return out


def _assert_same_outputs(out: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.glob("*_aug*"))
    assert sorted(p.name for p in out.glob("*_aug*")) == names
    for name in names:
        if name.endswith(".nii.gz"):
            assert np.array_equal(nib.load(str(out / name)).get_fdata(), nib.load(str(reference / name)).get_fdata())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and prctl")
@pytest.mark.parametrize("workers, sig", [(1, signal.SIGKILL), (2, signal.SIGKILL), (2, signal.SIGTERM),
                                          (2, signal.SIGINT), (1, signal.SIGINT)],
                         ids=["kill-9-1-worker", "kill-9-2-workers", "sigterm-2-workers",
                              "ctrl-c-2-workers", "ctrl-c-1-worker"])
def test_killed_insert_leaves_no_worker_and_resumes_exactly(model, data, reference, sandbox, workers, sig):
    out = sandbox / "out"
    before = files_under(sandbox)
    # Ctrl-C in a terminal signals the whole process group: the run is its own group here.
    process = subprocess.Popen(_command(model, data, out, "--workers", str(workers)), env=_environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=sig == signal.SIGINT)
    try:
        _wait_for(lambda: list(out.glob("*.json")), 120, "a first finished output")
        workers_seen = _children(process.pid) if workers > 1 else []
        finished = len(list(out.glob("*.json")))
        if sig == signal.SIGINT:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert len(list(out.glob("*.json"))) < 9, "the run finished before it could be interrupted"
    if sig == signal.SIGINT:
        # The queue is cancelled: at most the outputs in flight when the signal came get finished.
        assert process.returncode == 130
        assert len(list(out.glob("*.json"))) <= finished + workers
    if workers > 1:
        assert workers_seen, "no worker process was found"
        _wait_for(lambda: not any(_alive(p) for p in workers_seen), 10, "the workers to die with their parent")
    assert main(["insert", "--model", model, "--data-root", str(data), "--out", str(out),
                 "--num", "3", "--seed", "2"]) == 0
    _assert_same_outputs(out, reference)
    assert_nothing_half_or_outside(sandbox, before, out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock")
def test_two_concurrent_writers(model, data, reference, sandbox):
    out = sandbox / "out"
    before = files_under(sandbox)
    first = subprocess.Popen(_command(model, data, out), env=_environment(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (out / LOCK_NAME).is_file() and (out / LOCK_NAME).read_text().strip(),
                  120, "the first writer's lock")
        # Pause the first writer so that the second surely arrives while it holds the folder.
        first.send_signal(signal.SIGSTOP)
        try:
            second = subprocess.run(_command(model, data, out, "--appearance", "fixed", "--contrast", "0.8"),
                                    env=_environment(), capture_output=True, text=True, timeout=120)
        finally:
            first.send_signal(signal.SIGCONT)
        assert first.wait(300) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2 and "is writing to" in second.stderr
    _assert_same_outputs(out, reference)  # only the first writer's outputs
    assert_nothing_half_or_outside(sandbox, before, out)
