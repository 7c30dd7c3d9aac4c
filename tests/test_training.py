import json

import numpy as np
import pytest
import torch

from singan_insert import Harmonizer, SinganInsertError, TrainingConfig, train_harmonizer
from singan_insert.harmonizer.training import CHECKPOINT_NAME

from helpers import textured_slice

TINY = TrainingConfig.preset("tiny")


def _weights(harmonizer):
    return {k: v.clone() for k, v in harmonizer.pyramid.state_dict().items()}


FROM_NOISE = TrainingConfig(min_size=12, max_size=32, iterations=100, generator_steps=1, critic_steps=1,
                            width=8, max_width=8, checkpoint_every=10)


def test_training_lowers_reconstruction_error():
    model = train_harmonizer(textured_slice((32, 32)), FROM_NOISE, seed=0, progress=False)
    coarsest = model.metadata["training"]["log"][0]
    # Scale 0 starts from pure noise (identity-initialised generator: zero output), so a
    # working optimisation must bring the reconstruction far below where it started.
    assert coarsest["reconstruction_rmse"] < 0.7 * coarsest["initial_reconstruction_rmse"], coarsest


def test_harmonization_mode_keeps_reconstruction_close(tiny_harmonizer):
    log = tiny_harmonizer.metadata["training"]["log"]
    assert [entry["scale"] for entry in log] == [3, 4, 5]
    # The first trained scale starts as the identity on the upsampled coarser slice; the
    # adversarial term adds texture, but reconstruction must stay in the same range.
    assert log[0]["initial_reconstruction_rmse"] == pytest.approx(log[0]["upsampled_input_rmse"], rel=1e-5)
    for entry in log:
        assert entry["reconstruction_rmse"] < 3 * entry["upsampled_input_rmse"], entry


def test_same_seed_same_model_and_different_seed_differs():
    image = textured_slice()
    a = _weights(train_harmonizer(image, TINY, seed=1, progress=False))
    b = _weights(train_harmonizer(image, TINY, seed=1, progress=False))
    c = _weights(train_harmonizer(image, TINY, seed=2, progress=False))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("stop_after", [15, 30, 47])  # inside a scale, at a scale boundary, later
def test_interrupt_and_resume_matches_uninterrupted_run(tmp_path, stop_after):
    image = textured_slice()
    reference = train_harmonizer(image, TINY, out_dir=tmp_path / "full", seed=4, progress=False)
    out = tmp_path / "interrupted"
    assert train_harmonizer(image, TINY, out_dir=out, seed=4, progress=False,
                            stop_after_iterations=stop_after) is None
    assert (out / CHECKPOINT_NAME).exists() and not (out / "harmonizer.safetensors").exists()
    resumed = train_harmonizer(image, TINY, out_dir=out, seed=4, progress=False)
    ref_w, res_w = _weights(reference), _weights(resumed)
    assert ref_w.keys() == res_w.keys()
    assert all(torch.equal(ref_w[k], res_w[k]) for k in ref_w)
    assert resumed.pyramid.noise_amplitudes == reference.pyramid.noise_amplitudes
    # The log too: each scale's starting point and health, as in the uninterrupted run.
    keep = ("scale", "initial_reconstruction_rmse", "upsampled_input_rmse", "healthy")
    logs = [[{k: e.get(k) for k in keep} for e in m.metadata["training"]["log"]] for m in (reference, resumed)]
    assert logs[0] == logs[1]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    train_harmonizer(textured_slice(), TINY, out_dir=tmp_path, seed=4, progress=False, stop_after_iterations=12)
    with pytest.raises(SinganInsertError, match="another training run"):
        train_harmonizer(textured_slice(seed=9), TINY, out_dir=tmp_path, seed=4, progress=False)


def test_outputs_written(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"harmonizer.safetensors", "checkpoint.safetensors", "training_log.json"} <= names
    assert {"samples_scale03.png", "samples_scale04.png", "samples_scale05.png"} <= names
    log = json.loads((tiny_model_dir / "training_log.json").read_text())
    assert [entry["scale"] for entry in log] == [3, 4, 5]
    # Five tiles (real | reconstruction | 3 samples), each wide enough for its label.
    from PIL import Image

    from singan_insert.harmonizer.training import LABELLED_TILE_WIDTH

    width = Image.open(tiny_model_dir / "samples_scale03.png").size[0]
    assert width >= 5 * LABELLED_TILE_WIDTH


def test_reference_preset_is_the_official_schedule():
    ref = TrainingConfig.preset("reference")
    assert (ref.scale_factor, ref.iterations, ref.generator_steps, ref.critic_steps) == (0.75, 2000, 3, 3)
    assert (ref.learning_rate, ref.alpha, ref.lambda_gp, ref.trained_scales) == (5e-4, 10.0, 0.1, None)
    assert [ref.width_at(s, 9) for s in (0, 3, 4, 8)] == [32, 32, 64, 128]


def test_reference_mode_trains_from_noise_and_samples():
    config = TrainingConfig(**{**FROM_NOISE.to_dict(), "iterations": 3})
    model = train_harmonizer(textured_slice((32, 32)), config, seed=0, progress=False)
    assert model.first_trained_scale == 0 and model.pyramid.noise_amplitudes[0] == 1.0
    samples = model.sample(2, seed=0)
    assert samples.shape == (2, 32, 32) and torch.isfinite(samples).all()


@pytest.mark.parametrize(
    "image, message",
    [
        (np.full((48, 48), 3.0), "constant"),
        (np.pad(np.ones((40, 40)), 4) * np.nan, "NaN"),
        (np.random.default_rng(0).normal(size=(10, 10)), "min_size"),
        (np.ones((4, 48, 48)), "2D"),
        (np.array([["a"] * 48] * 48), "dtype"),
        ([[1.0, 2.0]], "numpy array"),
    ],
)
def test_bad_training_input(image, message):
    with pytest.raises(SinganInsertError, match=message):
        train_harmonizer(image, TINY, progress=False)


def test_unknown_preset():
    with pytest.raises(SinganInsertError, match="Unknown preset"):
        TrainingConfig.preset("slow")


def test_a_slice_too_small_for_the_harmonization_mode_warns():
    from singan_insert.harmonizer.pyramid import PyramidGeometry
    from singan_insert.harmonizer.training import SmallSliceWarning

    config = TrainingConfig.preset("tiny", iterations=1)
    small = textured_slice((16, 16), seed=0)
    assert PyramidGeometry.from_shape((16, 16), config.scale_factor, config.min_size,
                                      config.max_size).num_scales <= config.trained_scales
    with pytest.warns(SmallSliceWarning, match="trained from noise"):
        train_harmonizer(small, config, progress=False, sample_figures=False)


@pytest.mark.parametrize("overrides, message", [
    (dict(augment="no"), "augment"),
    (dict(crop_size=2), "crop_size"),
    (dict(iterations=2.5), "iterations"),
])
def test_training_config_refuses_what_it_would_misread(overrides, message):
    with pytest.raises(SinganInsertError, match=message):
        TrainingConfig.preset("tiny", **overrides)


def test_training_config_stores_integral_floats_as_ints_and_from_dict_names_unknown_keys():
    config = TrainingConfig.preset("tiny", iterations=2.0)
    assert config.iterations == 2 and isinstance(config.iterations, int)
    assert config == TrainingConfig.preset("tiny", iterations=2)  # the same run: a resume finds its checkpoint
    with pytest.raises(SinganInsertError, match="Unknown training setting"):
        TrainingConfig.from_dict({**config.to_dict(), "iteration": 3})


@pytest.mark.parametrize("value", [0, -1, 2.5, "3"])
def test_stop_after_iterations_is_checked(value, tmp_path):
    with pytest.raises(SinganInsertError, match="stop_after_iterations"):
        train_harmonizer(textured_slice((64, 64), seed=0), TrainingConfig.preset("tiny", iterations=1),
                         out_dir=tmp_path, stop_after_iterations=value, progress=False)


def test_stop_after_iterations_needs_somewhere_to_keep_the_checkpoint():
    with pytest.raises(SinganInsertError, match="out_dir"):
        train_harmonizer(textured_slice((64, 64), seed=0), TrainingConfig.preset("tiny", iterations=1),
                         stop_after_iterations=1, progress=False)
