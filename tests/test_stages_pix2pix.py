"""pix2pix stage: U-Net, paired slices, translate_volume, training, resume, model files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from singan_insert.errors import ModelFileError, SinganInsertError
from singan_insert.harmonizer.normalization import PercentileNormalization
from singan_insert.stages.cyclegan import CycleGAN, CycleGANConfig
from singan_insert.stages.networks import UnetGenerator
from singan_insert.stages.pix2pix import MODEL_NAME, Pix2Pix, Pix2PixConfig, train_pix2pix
from singan_insert.stages.slices import PairedSliceDataset, translate_volume

AFFINE = np.array(
    [[0.0, 0.0, 1.5, -10.0], [0.5, 0.0, 0.0, 20.0], [0.0, 0.5, 0.0, -5.0], [0.0, 0.0, 0.0, 1.0]]
)


@pytest.fixture(autouse=True)
def one_thread():
    # Two shared cores: several intra-op threads only contend with each other here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def disk_pair(seed: int, shape=(32, 32, 6)):
    """``(B', A)``: the same disks, bright on dark in A and dark on bright in B'."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    slices = []
    for _ in range(shape[2]):
        cx, cy, r = rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), rng.uniform(0.2, 0.5)
        slices.append(((x - cx) ** 2 + (y - cy) ** 2 < r**2).astype(np.float32))
    a = np.stack(slices, axis=2) * 100 + rng.normal(0, 3, shape)
    b = 100 - np.stack(slices, axis=2) * 80 + rng.normal(0, 3, shape)
    return nib.Nifti1Image(b.astype(np.float32), AFFINE), nib.Nifti1Image(a.astype(np.float32), AFFINE)


@pytest.fixture
def pairs(tmp_path):
    files = []
    for i in range(2):
        b, a = disk_pair(i)
        nib.save(b, tmp_path / f"bprime{i}.nii.gz")
        nib.save(a, tmp_path / f"a{i}.nii.gz")
        files.append((tmp_path / f"bprime{i}.nii.gz", tmp_path / f"a{i}.nii.gz"))
    return files


def tiny(**changes) -> Pix2PixConfig:
    return Pix2PixConfig.preset("tiny", **changes)


def assert_same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class Negate(torch.nn.Module):
    """A stand-in generator with an exactly known output, checking its input size."""

    size_divisor = 4

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        assert x.shape[-2] % self.size_divisor == 0 and x.shape[-1] % self.size_divisor == 0
        self.seen.append(tuple(x.shape))
        return -x


# --- networks ---------------------------------------------------------------------------


def test_unet_shapes_dropout_and_skips():
    unet = UnetGenerator(1, 1, num_downs=6, ngf=4, norm="instance", dropout=0.5)
    assert unet.size_divisor == 64
    assert sum(isinstance(m, torch.nn.Dropout) for m in unet.modules()) == 1  # num_downs - 5
    reference = UnetGenerator(1, 1, num_downs=8, ngf=64, norm="batch")
    assert sum(isinstance(m, torch.nn.Dropout) for m in reference.modules()) == 3
    x = torch.randn(2, 1, 64, 128)
    unet.eval()
    y = unet(x)
    assert y.shape == x.shape and y.abs().max() < 1
    # The outermost skip carries full-resolution detail: a one-pixel change of the input
    # changes the output there even when the innermost level is cut off.
    for module in unet.encoders[-1].modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    bumped = x.clone()
    bumped[0, 0, 10, 10] += 1
    assert not torch.equal(unet(bumped)[0, 0, 10, 10], y[0, 0, 10, 10])
    with pytest.raises(SinganInsertError, match="num_downs"):
        UnetGenerator(num_downs=4)


def test_reference_defaults_and_validation():
    reference = Pix2PixConfig()
    assert (reference.num_downs, reference.ngf, reference.lambda_l1, reference.gan_mode) == (8, 64, 100.0, "vanilla")
    assert (reference.learning_rate, reference.betas, reference.dropout) == (2e-4, (0.5, 0.999), 0.5)
    assert Pix2PixConfig.from_dict(reference.to_dict()) == reference
    with pytest.raises(SinganInsertError, match="multiples of 32"):
        tiny(image_size=48)
    with pytest.raises(SinganInsertError, match="dropout"):
        tiny(dropout=1.0)


# --- paired data ------------------------------------------------------------------------


def test_paired_slices_stay_aligned(pairs):
    data = PairedSliceDataset(pairs, axis=2)
    assert len(data) == 12 and data.slice_shape == (32, 32)
    source, target = data[7]
    pair_index, slice_index = data.locations[7]
    b = nib.load(pairs[pair_index][0]).get_fdata(dtype=np.float32)[:, :, slice_index]
    a = nib.load(pairs[pair_index][1]).get_fdata(dtype=np.float32)[:, :, slice_index]
    norm_b, norm_a = data.normalizations[pair_index]
    assert torch.equal(source[0], norm_b.to_model(torch.from_numpy(b)))
    assert torch.equal(target[0], norm_a.to_model(torch.from_numpy(a)))


def test_paired_slices_need_the_same_grid(pairs, tmp_path):
    b, _ = disk_pair(5, shape=(32, 32, 5))
    with pytest.raises(SinganInsertError, match="same voxel grid"):
        PairedSliceDataset([(b, pairs[0][1])])
    moved = nib.Nifti1Image(nib.load(pairs[0][0]).get_fdata(dtype=np.float32), AFFINE + np.eye(4) * 0.1)
    with pytest.raises(SinganInsertError, match="affines"):
        PairedSliceDataset([(moved, pairs[0][1])])
    with pytest.raises(SinganInsertError, match="tuple"):
        PairedSliceDataset([pairs[0][0]])


# --- translate_volume -------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_translate_volume_restacks_exactly(axis, tmp_path):
    data = np.random.default_rng(0).normal(100, 20, (12, 8, 5)).astype(np.float32)
    image = nib.Nifti1Image(data, AFFINE)
    image.header.set_zooms((0.5, 0.5, 1.5))
    result = translate_volume(Negate(), image, axis, batch_size=3)
    assert result.shape == data.shape
    assert np.array_equal(result.affine, AFFINE)
    assert result.header.get_zooms() == (0.5, 0.5, 1.5)
    normalisation = PercentileNormalization.fit(data)
    expected = -normalisation.to_model(torch.from_numpy(data)).numpy()
    np.testing.assert_array_equal(result.get_fdata(dtype=np.float32), expected)
    # Back to intensities with a given normalisation.
    mapped = translate_volume(Negate(), image, axis, output_normalization=normalisation)
    np.testing.assert_allclose(
        mapped.get_fdata(), normalisation.from_model(torch.from_numpy(expected)).numpy(), rtol=1e-5
    )


def test_translate_volume_pads_resizes_and_writes_floats(tmp_path):
    # An int16 file with a scale factor: the output must be float32 without that scaling.
    floats = np.random.default_rng(1).uniform(0, 1e6, (15, 13, 4)).astype(np.float32)
    image = nib.Nifti1Image(floats, AFFINE)
    image.set_data_dtype(np.int16)
    nib.save(image, tmp_path / "scaled.nii.gz")
    image = nib.load(tmp_path / "scaled.nii.gz")
    assert image.dataobj.slope != 1  # nibabel scaled the floats into int16
    volume = image.get_fdata(dtype=np.float32)
    negate = Negate()
    result = translate_volume(negate, tmp_path / "scaled.nii.gz", 2, batch_size=4)
    assert negate.seen[0] == (4, 1, 16, 16)  # reflect-padded to the generator's multiple
    nib.save(result, tmp_path / "out.nii.gz")
    reread = nib.load(tmp_path / "out.nii.gz")
    assert reread.get_data_dtype() == np.float32
    np.testing.assert_allclose(reread.affine, AFFINE, atol=1e-6)
    expected = -PercentileNormalization.fit(volume).to_model(torch.from_numpy(volume)).numpy()
    np.testing.assert_allclose(reread.get_fdata(), expected, atol=1e-6)
    # Resampled to the training size and back: a smooth ramp survives the round trip.
    x, y, z = np.meshgrid(np.arange(15), np.arange(13), np.arange(4), indexing="ij")
    ramp = nib.Nifti1Image((x + 2 * y + 5 * z).astype(np.float32), AFFINE)
    expected = -PercentileNormalization.fit(ramp.get_fdata()).to_model(torch.from_numpy(ramp.get_fdata())).numpy()
    resized = translate_volume(Negate(), ramp, 2, size=32)
    assert resized.shape == ramp.shape
    inner = (slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(resized.get_fdata()[inner], expected[inner], atol=0.02)
    with pytest.raises(SinganInsertError, match="axis"):
        translate_volume(Negate(), image, 3)
    with pytest.raises(SinganInsertError, match="3D"):
        translate_volume(Negate(), nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), AFFINE))


def test_translate_volume_does_not_depend_on_batch_size(pairs):
    model = Pix2Pix(tiny())
    one = model.translate(pairs[0][0], batch_size=1).get_fdata()
    many = model.translate(pairs[0][0], batch_size=5).get_fdata()
    np.testing.assert_allclose(one, many, atol=1e-5)
    assert model.generator.training  # the caller's mode is restored


# --- training ---------------------------------------------------------------------------


def test_training_learns_the_mapping(pairs, tmp_path):
    data = PairedSliceDataset(pairs, size=32)
    config = tiny(iterations=100, decay_iterations=50, batch_size=4, learning_rate=1e-3, checkpoint_every=1000)

    def l1(model: Pix2Pix) -> float:
        with torch.inference_mode():
            return float((model.generator.eval()(data.sources) - data.targets).abs().mean())

    before = l1(Pix2Pix(config))  # the run's initial state
    model = train_pix2pix(data, tmp_path / "run", config)
    best_constant = float((data.targets - data.targets.median()).abs().mean())
    after = l1(model)
    assert after < 0.5 * before
    # Better than any constant image (the median is the best one under L1): it uses the input.
    assert after < best_constant
    translated = model.translate(pairs[0][0])
    assert np.array_equal(translated.affine, nib.load(pairs[0][1]).affine)
    target = data.targets[: translated.shape[2], 0].permute(1, 2, 0).numpy()
    assert np.abs(translated.get_fdata() - target).mean() < best_constant


def test_resumed_run_with_dropout_is_bit_identical(pairs, tmp_path):
    # 64 px and 6 levels: one decoder level uses dropout, so the random state must resume too.
    large = []
    for i in range(1):
        b, a = disk_pair(20 + i, shape=(64, 64, 3))
        large.append((b, a))
    config = tiny(image_size=64, num_downs=6, iterations=3, decay_iterations=3, checkpoint_every=2)
    straight = train_pix2pix(large, tmp_path / "straight", config)
    partial = train_pix2pix(large, tmp_path / "split", config, stop_at=3)
    with pytest.raises(AssertionError):
        assert_same_weights(straight, partial)
    resumed = train_pix2pix(large, tmp_path / "split", config)
    assert resumed.info["iterations_done"] == 6
    assert_same_weights(straight, resumed)
    assert_same_weights(straight, Pix2Pix.load(tmp_path / "split" / MODEL_NAME))


def test_bad_model_files_raise_model_file_error(tmp_path):
    CycleGAN(CycleGANConfig.preset("tiny")).save(tmp_path / "cyclegan.safetensors")
    with pytest.raises(ModelFileError, match="singan-insert-pix2pix"):
        Pix2Pix.load(tmp_path / "cyclegan.safetensors")
    path = Pix2Pix(tiny()).save(tmp_path / "model.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelFileError):
        Pix2Pix.load(path)
