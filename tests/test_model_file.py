import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from singan_insert import Harmonizer, ModelFileError
from singan_insert.harmonizer.model_file import FORMAT_VERSION, load_tensors, save_tensors


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


def test_other_kind_and_other_version(tmp_path):
    other_kind = save_tensors(tmp_path / "ck.safetensors", {"x": torch.zeros(1)}, "singan-insert-checkpoint")
    with pytest.raises(ModelFileError, match="was expected"):
        Harmonizer.load(other_kind)
    future = save_tensors(tmp_path / "v.safetensors", {"x": torch.zeros(1)}, "singan-insert-harmonizer",
                          {"format_version": FORMAT_VERSION + 1})
    with pytest.raises(ModelFileError, match="format version"):
        Harmonizer.load(future)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        Harmonizer.load(tmp_path / "nope.safetensors")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = save_tensors(tmp_path / "a.safetensors", {"x": torch.ones(2)}, "k")
    import singan_insert.harmonizer.model_file as mf

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mf.os, "replace", boom)
    with pytest.raises(OSError):
        save_tensors(path, {"x": torch.zeros(2)}, "k")
    tensors, _ = load_tensors(path, "k")
    assert torch.equal(tensors["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
