"""The built-in U-Net segmenter: loss, network shapes, learning, files, determinism, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from singan_insert.errors import ModelFileError, SinganInsertError
from singan_insert.harmonizer.model_file import load_tensors, save_tensors
from singan_insert.stages.segmenter import (
    SEGMENTER_KIND,
    Segmenter,
    SegmenterConfig,
    UNet,
    dice_ce_loss,
)


def synthetic_case(seed: int, shape=(24, 24, 12)) -> tuple[np.ndarray, np.ndarray]:
    """hrT2-like volume: a dark ellipsoidal 'tumor' (1) and a bright small 'cochlea' (2)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    centre = np.array(shape) / 2 + rng.uniform(-4, 4, 3) * np.array([1, 1, 0.5])
    label = np.zeros(shape, np.uint8)
    radius = rng.uniform(3, 5)
    label[np.linalg.norm((grid - centre) / [1, 1, 0.5], axis=-1) < radius] = 1
    label[np.linalg.norm(grid - (centre + [6, 0, 0]), axis=-1) < 1.8] = 2
    image = 100 + 15 * rng.standard_normal(shape) - 40 * (label == 1) + 60 * (label == 2)
    return image.astype(np.float32), label


def dice(prediction: np.ndarray, truth: np.ndarray, label: int) -> float:
    a, b = prediction == label, truth == label
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


TRAIN = [synthetic_case(i) for i in range(4)]
TEST = [synthetic_case(100 + i) for i in range(3)]


@pytest.fixture(scope="module")
def trained_3d() -> Segmenter:
    segmenter = Segmenter(SegmenterConfig.preset("tiny", iterations=150), seed=0)
    segmenter.fit([x for x, _ in TRAIN], [y for _, y in TRAIN])
    return segmenter


# ---------------------------------------------------------------------- loss and network
def test_dice_ce_loss_values():
    target = torch.tensor([[[0, 1], [2, 2]]])  # (N=1, 2, 2), 4 voxels
    perfect = 50.0 * torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float()
    assert dice_ce_loss(perfect, target).item() < 1e-6

    uniform = torch.zeros(1, 3, 2, 2)
    # CE = ln 3; with p = 1/3 everywhere, class k with n_k voxels has Dice 2(n_k/3)/(4/3 + n_k).
    dice_1 = 2 * (1 / 3) / (4 / 3 + 1)
    dice_2 = 2 * (2 / 3) / (4 / 3 + 2)
    expected = math.log(3) + (1 - (dice_1 + dice_2) / 2)
    assert dice_ce_loss(uniform, target).item() == pytest.approx(expected, rel=1e-5)
    assert dice_ce_loss(uniform, target, dice_weight=0).item() == pytest.approx(math.log(3))


@pytest.mark.parametrize("dims, shape", [(3, (16, 8, 8)), (2, (32, 16))])
def test_unet_output_shape(dims, shape):
    network = UNet(dims, in_channels=2, num_classes=3, base_channels=4, levels=3)
    assert network(torch.zeros(2, 2, *shape)).shape == (2, 3, *shape)


# ---------------------------------------------------------------------- learning
def test_3d_segmenter_learns_the_tumor(trained_3d):
    losses = trained_3d.loss_history
    assert len(losses) == 150 and trained_3d.iterations_trained == 150
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    scores = [dice(trained_3d.predict(x), y, 1) for x, y in TEST]
    assert min(scores) > 0.8, scores  # measured 0.89-0.94 on these held-out volumes


def test_2d_segmenter_learns_both_structures():
    config = SegmenterConfig.preset("cpu2d", iterations=300, patch_size=(16, 16), levels=2,
                                    base_channels=8, batch_size=4)
    segmenter = Segmenter(config, seed=0)
    segmenter.fit([x for x, _ in TRAIN], [y for _, y in TRAIN])
    predictions = [segmenter.predict(x) for x, _ in TEST]
    assert predictions[0].shape == TEST[0][1].shape and predictions[0].dtype == np.uint8
    tumor = np.mean([dice(p, y, 1) for p, (_, y) in zip(predictions, TEST)])
    cochlea = np.mean([dice(p, y, 2) for p, (_, y) in zip(predictions, TEST)])
    assert tumor > 0.75 and cochlea > 0.6, (tumor, cochlea)  # measured 0.88 and 0.85


def test_probabilities_and_small_volumes(trained_3d):
    image, _ = synthetic_case(7, shape=(10, 9, 5))  # smaller than the 16x16x8 patch
    probs = trained_3d.predict_proba(image)
    assert probs.shape == (3, 10, 9, 5) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(trained_3d.predict(image), probs.argmax(0))
    as_tensor = trained_3d.predict(torch.from_numpy(TEST[0][0]))
    np.testing.assert_array_equal(as_tensor, trained_3d.predict(TEST[0][0]))


# ---------------------------------------------------------------------- files
def test_save_load_round_trip(trained_3d, tmp_path):
    path = trained_3d.save(tmp_path / "segmenter.safetensors")
    loaded = Segmenter.load(path)
    assert loaded.config == trained_3d.config and loaded.iterations_trained == 150
    image = TEST[1][0]
    np.testing.assert_array_equal(loaded.predict_proba(image), trained_3d.predict_proba(image))
    _, meta = load_tensors(path, SEGMENTER_KIND)
    assert meta["config"]["patch_size"] == [16, 16, 8]

    other = save_tensors(
        tmp_path / "other.safetensors", {"x": torch.zeros(1)}, "singan-insert-cyclegan"
    )
    with pytest.raises(ModelFileError, match="segmenter"):
        Segmenter.load(other)
    pickle_file = tmp_path / "model.pth"
    torch.save(trained_3d.network.state_dict(), pickle_file)
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        Segmenter.load(pickle_file)


# ---------------------------------------------------------------------- determinism
def test_training_is_seeded_and_leaves_global_state_alone():
    config = SegmenterConfig.preset("tiny", iterations=5)
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()
    threads = torch.get_num_threads()
    runs = []
    for seed in (3, 3, 4):
        segmenter = Segmenter(config, seed=seed)
        segmenter.fit([x for x, _ in TRAIN[:2]], [y for _, y in TRAIN[:2]])
        runs.append(segmenter.network.state_dict())
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name])
    assert any(not torch.equal(runs[0][n], runs[2][n]) for n in runs[0])
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert torch.get_num_threads() == threads


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(patch_size=(15, 16, 8)), "multiple of 2\\*\\*\\(levels-1\\)"),
        (dict(patch_size=(16, 16)), "must have 3 sides"),
        (dict(spatial_dims=4), "spatial_dims"),
        (dict(num_classes=1), "num_classes"),
        (dict(foreground_fraction=1.5), "foreground_fraction"),
        (dict(dice_weight=0, ce_weight=0), "not both 0"),
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(SinganInsertError, match=match):
        SegmenterConfig.preset("tiny", **changes)


def test_config_presets_and_dict_round_trip():
    for name in ("tiny", "cpu3d", "cpu2d"):
        config = SegmenterConfig.preset(name)
        assert SegmenterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(SinganInsertError, match="Unknown preset"):
        SegmenterConfig.preset("huge")


def test_bad_training_data_is_rejected():
    segmenter = Segmenter(SegmenterConfig.preset("tiny"))
    image, label = TRAIN[0]
    cases = [
        (([image], [label, label]), "2 label maps"),
        (([image], [label[:-1]]), "must match voxel for voxel"),
        (([image], [label + 3]), r"integers in \[0, 3\)"),
        (([image[0]], [label[0]]), "expected a volume"),
        (([np.ones_like(image)], [label]), "constant"),
        (([], []), "nothing to train"),
    ]
    for (images, labels), match in cases:
        with pytest.raises(SinganInsertError, match=match):
            segmenter.fit(images, labels, iterations=1)
    with pytest.raises(SinganInsertError, match="num_threads"):
        Segmenter(num_threads=0)


def test_device_errors_are_the_packages_messages():
    with pytest.raises(SinganInsertError, match="Unknown device 'gpu'"):
        Segmenter(SegmenterConfig.preset("tiny"), device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(SinganInsertError, match="CUDA was requested but is not available"):
            Segmenter(SegmenterConfig.preset("tiny"), device="cuda")
