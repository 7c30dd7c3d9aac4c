"""Bad inputs and faults around files: model files, NIfTI / 2D inputs, atomic writes, training inputs.

Every case asserts its outcome — a clear error (type and a message saying what happened and
what to do) or a correct result — AND that the output folder holds nothing half-written (no
temporary file, no partial output). Test names say the expected outcome: ``test_error_*`` for a
clear error, ``test_correct_*`` for a correct result (the report counts them by prefix).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import textured_slice
from PIL import Image
from safetensors.torch import save, save_file

from singan_insert import Harmonizer, ModelFileError, SinganInsertError, TrainingConfig, train_harmonizer
from singan_insert import io as sio
from singan_insert.cli import main
from singan_insert.harmonizer import model_file
from singan_insert.harmonizer.training_slice import load_training_slice

MODEL_KIND = "singan-insert-harmonizer"
CHECKPOINT_KIND = "singan-insert-checkpoint"


# ------------------------------------------------------------------------------ helpers
def leftovers(folder: Path) -> list[str]:
    """Temporary files of an interrupted or failed write (must always be empty)."""
    return sorted(p.name for p in Path(folder).rglob("*") if p.name.endswith(".tmp"))


def assert_clean(folder: Path, expected: set[str]) -> None:
    """``folder`` holds exactly ``expected`` (names), nothing half-written."""
    assert leftovers(folder) == []
    present = {p.name for p in Path(folder).iterdir()} if Path(folder).exists() else set()
    assert present == expected


def write_raw(path: Path, tensors: dict[str, torch.Tensor], meta: dict, digest: bool = True) -> Path:
    """A safetensors file with exactly ``meta``; with a *valid* digest, as a crafter would make it."""
    text = json.dumps(meta)
    header = {"singan_insert": text}
    if digest:
        header["singan_insert_sha256"] = model_file._digest(text, (
            (n, model_file._DTYPE_NAMES[t.dtype], tuple(t.shape), model_file._raw_bytes(t.contiguous()))
            for n, t in tensors.items()))
    path.write_bytes(save(tensors, metadata=header))
    return path


def header_length(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


class AllocationWatch:
    """Largest real (non-meta) torch.empty and the Python/numpy peak while the block runs."""

    def __init__(self, monkeypatch):
        self.largest = 0
        real_empty = torch.empty

        def watched(*args, **kwargs):
            tensor = real_empty(*args, **kwargs)
            if tensor.device.type != "meta":
                self.largest = max(self.largest, tensor.numel())
            return tensor

        monkeypatch.setattr(torch, "empty", watched)

    def __enter__(self):
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        self.python_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return False


@pytest.fixture
def model_bytes(tiny_model_dir) -> bytes:
    return (tiny_model_dir / "harmonizer.safetensors").read_bytes()


@pytest.fixture
def model_parts(tiny_model_dir):
    return model_file.load_tensors(tiny_model_dir / "harmonizer.safetensors", MODEL_KIND)


def save_nifti(path: Path, data, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 1.0, 1.0]) if affine is None else affine), path)
    return path


def save_broken_geometry(path: Path, data, zooms, zero_affine: bool) -> Path:
    """A NIfTI whose header says what nibabel refuses to write: zero/NaN pixdim, a zero sform."""
    import io

    raw = nib.Nifti1Image(data, np.diag([0.5, 0.5, 1.0, 1.0])).to_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    header["pixdim"][1:4] = zooms
    if zero_affine:
        header["qform_code"], header["sform_code"] = 0, 1
        for row in ("srow_x", "srow_y", "srow_z"):
            header[row] = 0
    path.write_bytes(gzip.compress(header.binaryblock + raw[348:]))
    return path


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(0).normal(100, 10, (24, 20, 6)).astype(np.float32)


# ================================================================== 1. model files
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0])
def test_error_bit_flip_in_header(model_bytes, tmp_path, fraction):
    """One flipped bit anywhere in the JSON header: a clear 'corrupt' error, never a load."""
    length = header_length(model_bytes)
    offset = 8 + min(int(fraction * length), length - 1)
    damaged = bytearray(model_bytes)
    damaged[offset] ^= 1 << (offset % 8)
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(damaged))
    with pytest.raises(ModelFileError, match="corrupt|truncated|not a safetensors file|not one written by singan-insert"):
        Harmonizer.load(path)
    assert_clean(tmp_path, {"m.safetensors"})


def test_error_header_bit_flips_are_detected(model_bytes, tmp_path):
    """The 8 length bytes and 400 seeded header positions, each with one seeded bit flipped."""
    rng = np.random.default_rng(0)
    length = header_length(model_bytes)
    path = tmp_path / "m.safetensors"
    outcomes = {}
    offsets = [*range(8), *sorted(rng.choice(np.arange(8, 8 + length), size=min(400, length), replace=False))]
    for offset in offsets:
        damaged = bytearray(model_bytes)
        damaged[offset] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(damaged))
        with pytest.raises(ModelFileError) as caught:
            model_file.load_tensors(path, MODEL_KIND)
        message = str(caught.value)
        outcomes[offset] = any(words in message for words in (
            "corrupt", "truncated", "not a safetensors file", "not one written by singan-insert"))
    assert all(outcomes.values()), [o for o, ok in outcomes.items() if not ok][:5]
    assert_clean(tmp_path, {"m.safetensors"})


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_error_bit_flip_in_tensor_data(model_bytes, tmp_path, fraction):
    start = 8 + header_length(model_bytes)
    offset = min(start + int(fraction * (len(model_bytes) - start)), len(model_bytes) - 1)
    for bit in (0, 7):
        damaged = bytearray(model_bytes)
        damaged[offset] ^= 1 << bit
        path = tmp_path / "m.safetensors"
        path.write_bytes(bytes(damaged))
        with pytest.raises(ModelFileError, match="corrupt: its content does not match the digest"):
            Harmonizer.load(path)
    assert_clean(tmp_path, {"m.safetensors"})


@pytest.mark.parametrize("cut", [0, 3, 8, 100, -1000, -1])
def test_error_truncated_model_file(model_bytes, tmp_path, cut):
    path = tmp_path / "m.safetensors"
    path.write_bytes(model_bytes[:cut] if cut else b"")
    with pytest.raises(ModelFileError, match="truncated|corrupt"):
        Harmonizer.load(path)
    assert_clean(tmp_path, {"m.safetensors"})


def test_error_nan_weight_with_a_valid_digest(model_parts, tmp_path):
    tensors, meta = model_parts
    tensors = dict(tensors)
    name = sorted(n for n in tensors if n.endswith("weight"))[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = float("nan")
    path = write_raw(tmp_path / "nan.safetensors", tensors, meta)
    with pytest.raises(ModelFileError, match=f"{name}.*NaN or infinite"):
        Harmonizer.load(path)
    assert_clean(tmp_path, {"nan.safetensors"})


def test_error_crafted_huge_shape_header_allocates_nothing(tmp_path, monkeypatch):
    """A header declaring a 4 GB tensor in a 100-byte file: refused from the header alone."""
    path = tmp_path / "huge.safetensors"
    header = json.dumps({"__metadata__": {"singan_insert": json.dumps({"format": MODEL_KIND, "format_version": 2}),
                                          "singan_insert_sha256": "0" * 64},
                         "w": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 1 << 32]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    with AllocationWatch(monkeypatch) as watch, pytest.raises(ModelFileError, match="corrupt or truncated.*needs"):
        Harmonizer.load(path)
    assert watch.largest < 10**6 and watch.python_peak < 20 * 2**20
    assert_clean(tmp_path, {"huge.safetensors"})


@pytest.mark.parametrize("field, value, message", [
    ("widths", [50_000, 50_000, 50_000], "widths must be in"),
    ("num_layers", 100_000, "num_layers must be in"),
    ("widths", [64, 64, 64], "does not hold the network"),
    ("geometry", {"sizes": [[100_000, 100_000]] * 3, "scale_factor": 0.75}, "geometry.sizes must be in"),
    ("noise_amplitudes", [float("nan"), 0.1, 0.1], "finite"),
    ("first_trained_scale", -1, "first_trained_scale"),
    ("spacing", [0, 0.5], "spacing must be >"),
    ("normalization", {"low": 5.0, "high": 5.0, "percentiles": [0.5, 99.5]}, "low < high"),
])
def test_error_crafted_metadata_with_valid_digest(model_parts, tmp_path, monkeypatch, field, value, message):
    """A small file whose metadata asks for huge networks: refused before any network exists."""
    tensors, meta = model_parts
    path = write_raw(tmp_path / "crafted.safetensors", tensors, {**meta, field: value})
    assert path.stat().st_size < 64 * 1024
    with AllocationWatch(monkeypatch) as watch, pytest.raises(ModelFileError, match=message):
        Harmonizer.load(path)
    assert watch.largest < 10**5, watch.largest  # the largest tiny-model tensor is ~600 values
    assert watch.python_peak < 20 * 2**20
    assert_clean(tmp_path, {"crafted.safetensors"})


def test_error_crafted_checkpoint_critic_width(tiny_model_dir, tmp_path, monkeypatch):
    tensors, meta = model_file.load_tensors(tiny_model_dir / "checkpoint.safetensors", CHECKPOINT_KIND)
    path = write_raw(tmp_path / "checkpoint.safetensors", tensors, {**meta, "critic_width": 100_000})
    with AllocationWatch(monkeypatch) as watch, pytest.raises(ModelFileError, match="critic_width must be in"):
        train_harmonizer(textured_slice(), TrainingConfig.preset("tiny"), out_dir=tmp_path, seed=0, progress=False)
    assert watch.largest < 10**5
    assert_clean(tmp_path, {"checkpoint.safetensors"})


def test_error_foreign_safetensors_and_pickles(tmp_path):
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "foreign.safetensors"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "model.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelFileError, match="not one written by singan-insert"):
        Harmonizer.load(tmp_path / "foreign.safetensors")
    for name in ("model.pt", "plain.pkl"):
        with pytest.raises(ModelFileError, match="not a safetensors file.*never unpickles"):
            Harmonizer.load(tmp_path / name)
    assert_clean(tmp_path, {"foreign.safetensors", "model.pt", "plain.pkl"})


def test_error_duplicate_keys_and_extra_metadata(model_bytes, model_parts, tmp_path):
    tensors, meta = model_parts
    text = json.dumps(meta)
    # The same tensor declared twice (a trick to smuggle a second meaning past a reader).
    duplicated = json.dumps({"__metadata__": {"singan_insert": text}, "a": {"dtype": "U8", "shape": [1],
                             "data_offsets": [0, 1]}})[:-1] + ', "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    blob = duplicated.encode()
    (tmp_path / "dup.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + b"\0")
    with pytest.raises(ModelFileError, match="corrupt.*duplicate"):
        Harmonizer.load(tmp_path / "dup.safetensors")
    extra = save(dict(tensors), metadata={"singan_insert": text, "other": "x"})
    (tmp_path / "extra.safetensors").write_bytes(extra)
    with pytest.raises(ModelFileError, match="unexpected header metadata"):
        Harmonizer.load(tmp_path / "extra.safetensors")
    assert_clean(tmp_path, {"dup.safetensors", "extra.safetensors"})


def test_error_model_path_is_a_folder_without_model(tmp_path):
    (tmp_path / "harmonizer.safetensors").mkdir()
    with pytest.raises(ModelFileError, match="is a folder"):
        Harmonizer.load(tmp_path)


def test_correct_cli_reports_corrupt_model(model_bytes, tmp_path, capsys):
    damaged = bytearray(model_bytes)
    damaged[-5] ^= 0x10
    (tmp_path / "m.safetensors").write_bytes(bytes(damaged))
    np.save(tmp_path / "s.npy", textured_slice())
    out = tmp_path / "out"
    code = main(["harmonize", "--model", str(tmp_path / "m.safetensors"), "--background", str(tmp_path / "s.npy"),
                 "--composite", str(tmp_path / "s.npy"), "--mask", str(tmp_path / "s.npy"), "--out", str(out / "h.npy")])
    assert code == 2 and "corrupt" in capsys.readouterr().err
    assert not out.exists()


# =================================================================== 2. files on disk
def test_correct_atomic_writes_honour_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        sio.atomic_write_bytes(tmp_path / "a.bin", b"x")
        os.umask(0o077)
        sio.atomic_write_bytes(tmp_path / "b.bin", b"y")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o600
    assert_clean(tmp_path, {"a.bin", "b.bin"})


def test_correct_stale_temporaries_of_dead_writers_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = tmp_path / f".model.safetensors.{dead_pid}-0123456789ab.tmp"
        live = tmp_path / f".model.safetensors.{alive.pid}-0123456789ab.tmp"
        old_style = tmp_path / ".x.npy.abcd_123.tmp"
        foreign = [tmp_path / "notes.tmp", tmp_path / ".hidden.tmp", tmp_path / "data.nii.gz"]
        for path in (stale, live, old_style, *foreign):
            path.write_bytes(b"partial")
        day_ago = os.stat(old_style).st_mtime - 2 * 24 * 3600
        os.utime(old_style, (day_ago, day_ago))
        sio._swept_folders.discard(tmp_path.resolve())
        sio.atomic_write_bytes(tmp_path / "new.bin", b"data")
        names = {p.name for p in tmp_path.iterdir()}
        assert names == {live.name, "new.bin", *(p.name for p in foreign)}
    finally:
        alive.kill()
        alive.wait()


def test_error_disk_full_keeps_the_previous_file(tmp_path, monkeypatch):
    target = sio.atomic_write_bytes(tmp_path / "model.bin", b"old content")
    real_write = os.write
    calls = []

    def full_disk(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data)[: len(data) // 2])  # a short write first, then full

    monkeypatch.setattr(sio.os, "write", full_disk)
    with pytest.raises(SinganInsertError, match="disk .*full; the previous file was kept unchanged.*re-run"):
        sio.atomic_write_bytes(target, b"new content that does not fit")
    monkeypatch.undo()
    assert target.read_bytes() == b"old content" and len(calls) == 2
    assert_clean(tmp_path, {"model.bin"})


def test_error_disk_full_during_training_checkpoint(tmp_path, monkeypatch, capsys):
    real_write = os.write
    state = {"checkpoint_writes": 0}

    def full_after_first_checkpoint(fd, data):
        if "checkpoint" in os.readlink(f"/proc/self/fd/{fd}"):
            state["checkpoint_writes"] += 1
            if state["checkpoint_writes"] > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell which file a descriptor writes")
    np.save(tmp_path / "slice.npy", textured_slice())
    monkeypatch.setattr(sio.os, "write", full_after_first_checkpoint)
    out = tmp_path / "out"
    code = main(["train", str(tmp_path / "slice.npy"), "--preset", "tiny", "--out", str(out), "--no-samples"])
    monkeypatch.undo()
    assert code == 2
    assert "disk (or your quota) is full; the previous file was kept unchanged" in capsys.readouterr().err
    assert_clean(out, {"checkpoint.safetensors"})
    model_file.load_tensors(out / "checkpoint.safetensors", CHECKPOINT_KIND)  # the kept one is whole
    # Space is back: the same command resumes and finishes.
    assert main(["train", str(tmp_path / "slice.npy"), "--preset", "tiny", "--out", str(out), "--no-samples"]) == 0
    assert_clean(out, {"checkpoint.safetensors", "harmonizer.safetensors", "training_log.json"})


def test_correct_staged_files_touch_nothing_until_all_are_written(tmp_path, monkeypatch):
    """A set of files that belong together: a failure while writing any of them keeps all the
    previous ones; a commit removes what it is told and puts the new ones in place."""
    for name in ("image", "label", "record"):
        (tmp_path / name).write_bytes(b"old " + name.encode())
    real_write = os.write

    def full_on_label(fd, data):
        if ".label." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell which file a descriptor writes")
    monkeypatch.setattr(sio.os, "write", full_on_label)
    with pytest.raises(SinganInsertError, match="disk .*full; the previous file was kept"):
        with sio.StagedFiles() as staged:
            for name in ("image", "label", "record"):
                staged.write_bytes(tmp_path / name, b"new " + name.encode())
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {
        "image": b"old image", "label": b"old label", "record": b"old record"}
    with sio.StagedFiles() as staged:
        for name in ("image", "label"):
            staged.write_bytes(tmp_path / name, b"new " + name.encode())
        assert (tmp_path / "image").read_bytes() == b"old image"  # staged, not yet in place
        staged.commit(remove_first=[tmp_path / "record"])
    assert_clean(tmp_path, {"image", "label"})
    assert (tmp_path / "label").read_bytes() == b"new label"


def test_error_unwritable_folder(tmp_path, monkeypatch):
    """EACCES (simulated: the tests may run as root, who writes anywhere) is said plainly."""
    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(sio.os, "open", refuse)
    with pytest.raises(SinganInsertError, match="not writable \\(Permission denied\\); nothing was written"):
        sio.atomic_write_bytes(tmp_path / "x.bin", b"x")
    monkeypatch.undo()
    assert_clean(tmp_path, set())


def test_correct_training_writes_every_file_atomically(tmp_path, monkeypatch):
    """Each file of a training folder arrives by the rename of a fsynced temporary file."""
    renamed = []
    real_replace = os.replace

    def recording(source, destination):
        assert re.fullmatch(r"\..+\.\d+-[0-9a-f]{12}\.tmp", Path(source).name)
        renamed.append(Path(destination).name)
        return real_replace(source, destination)

    monkeypatch.setattr(sio.os, "replace", recording)
    config = replace(TrainingConfig.preset("tiny"), iterations=4, checkpoint_every=2)
    train_harmonizer(textured_slice(), config, out_dir=tmp_path, progress=False)
    monkeypatch.undo()
    files = {p.name for p in tmp_path.iterdir()}
    assert set(renamed) == files and "training_log.json" in files
    assert sum(name.startswith("samples_scale") for name in files) == 3
    assert json.loads((tmp_path / "training_log.json").read_text())[0]["scale"] >= 0
    assert_clean(tmp_path, files)


_KILL_MID_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    import torch
    torch.set_num_threads(1)
    from helpers import textured_slice
    from singan_insert import TrainingConfig, train_harmonizer
    import singan_insert.io as sio

    real_write, seen = os.write, [0]

    def write_then_die(fd, data):
        if "checkpoint" in os.readlink(f"/proc/self/fd/{fd}"):
            seen[0] += 1
            if seen[0] == 3:  # the third checkpoint: half of it on disk, then SIGKILL
                real_write(fd, bytes(data)[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        return real_write(fd, data)

    sio.os.write = write_then_die
    train_harmonizer(textured_slice(), TrainingConfig.preset("tiny"), out_dir=sys.argv[1], seed=0,
                     spacing=(0.5, 0.5), progress=False, provenance={"axis": 2, "modality": "hrT2"})
""")


def test_correct_kill_9_mid_checkpoint_then_resume(tmp_path, tiny_harmonizer):
    """SIGKILL while a checkpoint is half written; the re-run resumes, sweeps the temp, ends identical."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell which file a descriptor writes")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tests_dir = str(Path(__file__).parent)
    killed = subprocess.run([sys.executable, "-c", _KILL_MID_CHECKPOINT, str(out), tests_dir],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(leftovers(out)) == 1  # the half-written temporary of the killed write
    assert not (out / "harmonizer.safetensors").exists()
    kept = model_file.load_tensors(out / "checkpoint.safetensors", CHECKPOINT_KIND)[1]
    assert (kept["scale"], kept["iteration"]) != (0, 0)
    resumed = train_harmonizer(textured_slice(), TrainingConfig.preset("tiny"), out_dir=out, seed=0,
                               spacing=(0.5, 0.5), progress=False, provenance={"axis": 2, "modality": "hrT2"})
    assert leftovers(out) == []
    a, b = tiny_harmonizer.pyramid.state_dict(), resumed.pyramid.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert Harmonizer.load(out).pyramid.noise_amplitudes == tiny_harmonizer.pyramid.noise_amplitudes


# ------------------------------------------------------------------------ reading NIfTI
def _bad_nifti(kind: str, folder: Path, volume: np.ndarray) -> Path:
    path = folder / "vol.nii.gz"
    if kind == "missing":
        return folder / "missing.nii.gz"
    if kind == "folder":
        (folder / "dir.nii.gz").mkdir()
        return folder / "dir.nii.gz"
    if kind in ("truncated", "truncated_plain"):
        name = "vol.nii.gz" if kind == "truncated" else "vol.nii"
        save_nifti(folder / name, volume)
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
        return folder / name
    if kind == "garbage_gzip":
        path.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
        return path
    if kind == "garbage":
        path.write_bytes(os.urandom(600))
        return path
    if kind == "rgb":
        rgb = np.zeros(volume.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        return save_nifti(path, rgb)
    if kind == "complex":
        return save_nifti(path, volume.astype(np.complex64))
    if kind == "4d":
        return save_nifti(path, np.stack([volume] * 3, axis=-1))
    if kind == "zero_affine":
        return save_broken_geometry(path, volume, [0, 0, 0], zero_affine=True)
    if kind == "zero_sform":
        return save_broken_geometry(path, volume, [0.5, 0.5, 1.0], zero_affine=True)
    if kind == "nan_pixdim":
        return save_broken_geometry(path, volume, [np.nan, 0.5, 1.0], zero_affine=False)
    if kind == "nan_data":
        bad = volume.copy()
        bad[3, 4, 2] = np.nan
        return save_nifti(path, bad)
    if kind == "inf_data":
        bad = volume.copy()
        bad[0, 0, 0] = np.inf
        return save_nifti(path, bad)
    raise AssertionError(kind)


NIFTI_CASES = [
    ("missing", "does not exist"),
    ("folder", "is a folder"),
    ("truncated", "truncated, damaged or not a NIfTI"),
    ("truncated_plain", "truncated, damaged or not a NIfTI"),
    ("garbage_gzip", "truncated, damaged or not a NIfTI"),
    ("garbage", "truncated, damaged or not a NIfTI"),
    ("rgb", "colour .*grayscale"),
    ("complex", "complex.*numpy.abs"),
    ("4d", r"shape \(24, 20, 6, 3\); 3 axes"),
    ("zero_affine", "pixdim.*finite and positive.*does not invent"),
    ("zero_sform", "affine that is not finite or not invertible"),
    ("nan_pixdim", "pixdim.*finite and positive"),
    ("nan_data", "NaN or infinite"),
    ("inf_data", "NaN or infinite"),
]


@pytest.mark.parametrize("kind, message", NIFTI_CASES)
def test_error_bad_training_nifti_through_the_cli(kind, message, tmp_path, volume, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    path = _bad_nifti(kind, inputs, volume)
    before = {p.name for p in inputs.iterdir()}
    out = tmp_path / "out"
    code = main(["train", str(path), "--preset", "tiny", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("singan-insert train: error:")
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not out.exists()
    assert_clean(inputs, before)


@pytest.mark.parametrize("kind, message", [c for c in NIFTI_CASES if c[0] in ("complex", "zero_affine", "rgb")])
def test_error_bad_label_nifti(kind, message, tmp_path, volume):
    image = save_nifti(tmp_path / "img.nii.gz", volume)
    (tmp_path / "lab").mkdir()
    label = _bad_nifti(kind, tmp_path / "lab", volume)
    with pytest.raises(SinganInsertError, match=message):
        load_training_slice(image, label_path=label)
    assert label.name in {p.name for p in (tmp_path / "lab").iterdir()}


def test_correct_singleton_4d_and_spacing_from_header(tmp_path, volume):
    path = save_nifti(tmp_path / "v.nii.gz", volume[..., None], affine=np.diag([0.4, 0.6, 1.5, 1]))
    chosen = load_training_slice(path, axis=2, index=2)
    np.testing.assert_array_equal(chosen.image, volume[:, :, 2])
    assert chosen.spacing == pytest.approx((0.4, 0.6))
    assert_clean(tmp_path, {"v.nii.gz"})


# --------------------------------------------------------------------------- reading 2D
def test_error_bad_2d_inputs(tmp_path):
    image = (textured_slice() % 256).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 3])
    colour = np.stack([image, image[::-1], image], axis=-1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    np.save(tmp_path / "complex.npy", image.astype(np.complex64))
    np.save(tmp_path / "object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "volume.npy", np.zeros((4, 4, 4)))
    nan = image.astype(np.float32)
    nan[1, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    cases = {
        "truncated.png": "truncated, damaged or not an image",
        "colour.png": "colour image; save it as grayscale",
        "complex.npy": "complex.*numpy.abs",
        "object.npy": "truncated, damaged or not an image",  # numpy refuses to unpickle
        "volume.npy": "a 2D slice is expected",
        "nan.npy": "NaN or infinite",
        "missing.png": "does not exist",
    }
    for name, message in cases.items():
        with pytest.raises(SinganInsertError, match=message):
            sio.read_2d(tmp_path / name)
    assert leftovers(tmp_path) == []


def test_correct_grayscale_saved_as_rgba_png(tmp_path):
    image = (textured_slice() % 256).astype(np.uint8)
    rgba = np.stack([image, image, image, np.full_like(image, 255)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "gray_rgba.png")
    np.testing.assert_array_equal(sio.read_2d(tmp_path / "gray_rgba.png"), image.astype(np.float32))


# ================================================================== 3. training inputs
@pytest.mark.parametrize("field, value, message", [
    ("learning_rate", float("nan"), "learning_rate must be a finite number"),
    ("learning_rate", 0.0, r"learning_rate must be in \(0, 1\)"),
    ("learning_rate", -1e-4, r"learning_rate must be in \(0, 1\)"),
    ("betas", (0.5, float("nan")), "betas must be a finite number"),
    ("betas", (0.5, 1.0), r"betas must be in \[0, 1\)"),
    ("scale_factor", float("nan"), "scale_factor must be a finite"),
    ("alpha", float("inf"), "alpha must be a finite"),
    ("lambda_gp", -0.1, "lambda_gp must be >= 0"),
    ("noise_amp_factor", float("nan"), "noise_amp_factor must be a finite"),
    ("lr_decay_at", float("nan"), "lr_decay_at must be a finite"),
    ("crop_size", 31.5, "crop_size must be an integer"),
    ("width", 0, "width must be >= 1"),
    ("max_size", 10**6, "max_size must be <= 4096"),
])
def test_error_training_config_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        replace(TrainingConfig.preset("tiny"), **{field: value})


@pytest.mark.parametrize("argv, message", [
    (["--iterations", "0"], "--iterations: the value must be >= 1, got 0"),
    (["--iterations", "-3"], "--iterations: the value must be >= 1"),
    (["--seed", str(2**63)], "--seed: the value must be in \\[0, 4294967295\\]"),
    (["--seed", "-1"], "--seed: the value must be in \\[0, 4294967295\\]"),
    (["--seed", "1.5"], "--seed: '1.5' is not an integer"),
])
def test_error_cli_training_numbers(argv, message, tmp_path, capsys):
    np.save(tmp_path / "slice.npy", textured_slice())
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        main(["train", str(tmp_path / "slice.npy"), "--preset", "tiny", "--out", str(out), *argv])
    assert exited.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--dilation-mm", "nan"], "--dilation-mm: the value must be a finite number"),
    (["--feather-mm", "-1"], "--feather-mm: the value must be >= 0"),
    (["--spacing", "0", "0.5"], "--spacing: the value must be > 0"),
])
def test_error_cli_harmonize_numbers(argv, message, tmp_path, capsys, tiny_model_dir):
    np.save(tmp_path / "s.npy", textured_slice())
    args = ["harmonize", "--model", str(tiny_model_dir), "--background", str(tmp_path / "s.npy"),
            "--composite", str(tmp_path / "s.npy"), "--mask", str(tmp_path / "s.npy"),
            "--out", str(tmp_path / "out" / "h.npy"), *argv]
    with pytest.raises(SystemExit):
        main(args)
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed", [2**40, -1, 2.5, True])
def test_error_training_seed_out_of_range(seed, tmp_path):
    with pytest.raises(SinganInsertError, match="seed must be"):
        train_harmonizer(textured_slice(), TrainingConfig.preset("tiny"), out_dir=tmp_path, seed=seed, progress=False)
    assert_clean(tmp_path, set())


def test_correct_largest_seed_trains(tmp_path):
    config = replace(TrainingConfig.preset("tiny"), iterations=2, trained_scales=1)
    model = train_harmonizer(textured_slice(), config, out_dir=tmp_path, seed=2**32 - 1, progress=False,
                             sample_figures=False)
    assert model.metadata["training"]["seed"] == 2**32 - 1
    assert_clean(tmp_path, {"checkpoint.safetensors", "harmonizer.safetensors", "training_log.json"})


@pytest.mark.parametrize("make", [lambda a: a.astype(np.complex64), lambda a: torch.from_numpy(a).to(torch.complex64)])
def test_error_complex_training_data(make, tmp_path):
    with pytest.raises(SinganInsertError, match="dtype (torch.)?complex64"):
        train_harmonizer(make(textured_slice()), TrainingConfig.preset("tiny"), out_dir=tmp_path, progress=False)
    assert_clean(tmp_path, set())


def test_error_fractional_crop_box(tmp_path, volume):
    path = save_nifti(tmp_path / "v.nii.gz", volume)
    with pytest.raises(SinganInsertError, match="crop box value must be an integer"):
        load_training_slice(path, index=1, crop=(0, 10.5, 0, 10))


def test_correct_truncated_checkpoint_advice_does_not_loop(tiny_model_dir, tmp_path, capsys):
    """A truncated checkpoint says 'delete it and re-run'; doing so trains from the start."""
    np.save(tmp_path / "slice.npy", textured_slice())
    out = tmp_path / "out"
    out.mkdir()
    data = (tiny_model_dir / "checkpoint.safetensors").read_bytes()
    (out / "checkpoint.safetensors").write_bytes(data[: len(data) // 2])
    argv = ["train", str(tmp_path / "slice.npy"), "--preset", "tiny", "--iterations", "2", "--out", str(out),
            "--no-samples"]
    assert main(argv) == 2
    assert "truncated" in (err := capsys.readouterr().err) and "delete it and re-run" in err
    assert_clean(out, {"checkpoint.safetensors"})
    (out / "checkpoint.safetensors").unlink()
    assert main(argv) == 0
    assert_clean(out, {"checkpoint.safetensors", "harmonizer.safetensors", "training_log.json"})
