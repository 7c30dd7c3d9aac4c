import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save, save_file

from singan_insert import Harmonizer, ModelFileError
from singan_insert.harmonizer import model_file
from singan_insert.harmonizer.model_file import (
    FORMAT_VERSION,
    UnverifiedModelFileWarning,
    load_tensors,
    read_header,
    save_tensors,
)


def write_raw(path, tensors, meta, digest=True):
    """A file with exactly ``meta`` in its header (and a correct digest unless told otherwise)."""
    text = json.dumps(meta)
    header = {"singan_insert": text}
    if digest:
        header["singan_insert_sha256"] = model_file._digest(
            text, ((n, model_file._DTYPE_NAMES[t.dtype], tuple(t.shape), model_file._raw_bytes(t.contiguous()))
                   for n, t in tensors.items()))
    path.write_bytes(save(tensors, metadata=header))
    return path


def test_save_load_round_trip_is_bit_exact(tiny_harmonizer, tmp_path):
    path = tiny_harmonizer.save(tmp_path / "copy.safetensors")
    loaded = Harmonizer.load(path)
    a, b = tiny_harmonizer.pyramid.state_dict(), loaded.pyramid.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.pyramid.noise_amplitudes == tiny_harmonizer.pyramid.noise_amplitudes
    assert loaded.geometry == tiny_harmonizer.geometry
    assert loaded.normalization == tiny_harmonizer.normalization
    assert loaded.spacing == tiny_harmonizer.spacing
    assert loaded.metadata["training"]["seed"] == 0
    bg = np.random.default_rng(0).normal(100, 10, (2, 48, 48)).astype(np.float32)
    mask = np.zeros_like(bg)
    mask[:, 20:30, 20:30] = 1
    comp = np.where(mask > 0, 150, bg).astype(np.float32)
    np.testing.assert_array_equal(tiny_harmonizer.harmonize(bg, comp, mask, seed=3),
                                  loaded.harmonize(bg, comp, mask, seed=3))


def test_metadata_is_documented_json(tiny_model_dir):
    _, meta = load_tensors(tiny_model_dir / "harmonizer.safetensors", "singan-insert-harmonizer")
    for key in ("format_version", "package_version", "geometry", "noise_amplitudes", "normalization",
                "spacing", "training", "provenance"):
        assert key in meta
    json.dumps(meta)


def test_truncated_file(tiny_model_dir, tmp_path):
    data = (tiny_model_dir / "harmonizer.safetensors").read_bytes()
    for cut in (5, 200, len(data) - 10):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="truncated|corrupt"):
            Harmonizer.load(path)


def test_pickle_file_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        Harmonizer.load(path)
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        Harmonizer.load(path)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelFileError, match="not one written by singan-insert"):
        Harmonizer.load(path)


def test_other_kind_and_other_version(tiny_model_dir, tmp_path):
    with pytest.raises(ModelFileError, match="holds a 'singan-insert-checkpoint'.*was expected"):
        Harmonizer.load(tiny_model_dir / "checkpoint.safetensors")
    future = write_raw(tmp_path / "v.safetensors", {"x": torch.zeros(1)},
                       {"format": "singan-insert-harmonizer", "format_version": FORMAT_VERSION + 1,
                        "package_version": "9.0"})
    with pytest.raises(ModelFileError, match="format version 3.*reads versions \\[1, 2\\]"):
        Harmonizer.load(future)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        Harmonizer.load(tmp_path / "nope.safetensors")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = save_tensors(tmp_path / "a.safetensors", {"x": torch.ones(2)}, "k")
    import singan_insert.harmonizer.model_file as mf

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("singan_insert.io.os.replace", boom)
    with pytest.raises(OSError):
        save_tensors(path, {"x": torch.zeros(2)}, "k")
    tensors, _ = load_tensors(path, "k")
    assert torch.equal(tensors["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_new_files_are_version_2_with_a_digest(tiny_model_dir):
    header = read_header(tiny_model_dir / "harmonizer.safetensors", "singan-insert-harmonizer")
    assert FORMAT_VERSION == 2 and header.meta["format_version"] == 2
    assert len(header.digest) == 64
    # The digest is over the metadata text and the tensors, as the module docstring says.
    tensors, _ = load_tensors(header.path, "singan-insert-harmonizer")
    recomputed = model_file._digest(header.meta_text, ((n, model_file._DTYPE_NAMES[t.dtype], tuple(t.shape),
                                                        model_file._raw_bytes(t)) for n, t in tensors.items()))
    assert recomputed == header.digest


def test_package_keys_cannot_be_overridden_by_metadata(tmp_path):
    path = save_tensors(tmp_path / "a.safetensors", {"x": torch.ones(1)}, "k", {"format": "other", "format_version": 9})
    _, meta = load_tensors(path, "k")
    assert meta["format"] == "k" and meta["format_version"] == FORMAT_VERSION


def test_version_1_file_loads_with_one_warning(tiny_model_dir, tiny_harmonizer, tmp_path):
    """A 0.1 file (format_version 1, no digest) is read after the structural checks, with a warning."""
    tensors, meta = load_tensors(tiny_model_dir / "harmonizer.safetensors", "singan-insert-harmonizer")
    # A version-2 file downgraded by hand still holds the training slice, which no 0.1 file has.
    edited = write_raw(tmp_path / "edited.safetensors", tensors, {**meta, "format_version": 1}, digest=False)
    with pytest.raises(ModelFileError, match="training_slice"):
        Harmonizer.load(edited)
    tensors = {k: v for k, v in tensors.items() if k not in ("training_slice", "tumor_annotation")}
    old = write_raw(tmp_path / "old.safetensors", tensors, {**meta, "format_version": 1}, digest=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = Harmonizer.load(old)
    assert [w.category for w in caught] == [UnverifiedModelFileWarning]
    assert "no digest" in str(caught[0].message)
    a, b = tiny_harmonizer.pyramid.state_dict(), loaded.pyramid.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Re-saving adds the digest: no warning any more.
    resaved = loaded.save(tmp_path / "new.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Harmonizer.load(resaved)


def test_version_2_without_digest_is_corrupt(tiny_model_dir, tmp_path):
    tensors, meta = load_tensors(tiny_model_dir / "harmonizer.safetensors", "singan-insert-harmonizer")
    stripped = write_raw(tmp_path / "s.safetensors", tensors, meta, digest=False)
    with pytest.raises(ModelFileError, match="corrupt.*without its digest"):
        Harmonizer.load(stripped)


def test_nan_weights_are_refused_on_save(tmp_path):
    with pytest.raises(ModelFileError, match="NaN or infinite.*diverged"):
        save_tensors(tmp_path / "n.safetensors", {"w": torch.tensor([1.0, float("inf")])}, "k")
    assert list(tmp_path.iterdir()) == []


def test_module_check_builds_nothing_real(tiny_model_dir, monkeypatch):
    """check_module_tensors compares shapes on the meta device: no real parameter is allocated."""
    from singan_insert.harmonizer.networks import ScaleGenerator

    header = read_header(tiny_model_dir / "harmonizer.safetensors", "singan-insert-harmonizer")
    real_empty, sizes = torch.empty, []

    def recording_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        if tensor.device.type != "meta":
            sizes.append(tensor.numel())
        return tensor

    monkeypatch.setattr(torch, "empty", recording_empty)
    with pytest.raises(ModelFileError, match="does not hold the network"):
        model_file.check_module_tensors(header, "generators.0", lambda: ScaleGenerator(width=50_000, num_layers=5))
    assert sizes == []


def test_what_load_would_refuse_is_not_saved(tiny_harmonizer, tmp_path):
    """The registered checks run at save too: a saved file always loads again."""
    broken = tiny_harmonizer.__class__(
        tiny_harmonizer.pyramid, tiny_harmonizer.geometry, tiny_harmonizer.normalization,
        (0.0, 0.5), tiny_harmonizer.reconstruction_noise, tiny_harmonizer.metadata)
    with pytest.raises(ModelFileError, match="Refusing to write.*spacing must be > 0"):
        broken.save(tmp_path / "m.safetensors")
    with pytest.raises(ModelFileError, match="Refusing to write.*unexpected tensors"):
        save_tensors(tmp_path / "c.safetensors", {"x": torch.zeros(1)}, "singan-insert-checkpoint",
                     {"fingerprint": "f", "seed": 0, "scale": 0, "iteration": 0, "amplitudes": [], "log": [],
                      "normalization": {"low": 0.0, "high": 1.0, "percentiles": [0.5, 99.5]}})
    assert list(tmp_path.iterdir()) == []


def test_newer_version_from_this_package_version_is_damage(tmp_path):
    from singan_insert import __version__

    path = write_raw(tmp_path / "v.safetensors", {"x": torch.zeros(1)},
                     {"format": "singan-insert-harmonizer", "format_version": 3, "package_version": __version__})
    with pytest.raises(ModelFileError, match="corrupt \\(format version 3 from singan-insert"):
        Harmonizer.load(path)
