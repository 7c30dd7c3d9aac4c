"""CycleGAN stage: networks, slice dataset, image pool, training, resume, model files."""

from __future__ import annotations

import pickle

import nibabel as nib
import numpy as np
import pytest
import torch

from singan_insert.errors import ModelFileError, SinganInsertError
from singan_insert.stages._training import CHECKPOINT_NAME, learning_rate_factor
from singan_insert.stages.cyclegan import (
    MODEL_NAME,
    CycleGAN,
    CycleGANConfig,
    ImagePool,
    train_cyclegan,
)
from singan_insert.stages.networks import PatchDiscriminator, ResnetBlock, ResnetGenerator
from singan_insert.stages.pix2pix import Pix2Pix, Pix2PixConfig, train_pix2pix
from singan_insert.stages.slices import SliceDataset

AFFINE = np.diag([0.5, 0.5, 1.5, 1.0])


@pytest.fixture(autouse=True)
def one_thread():
    # Two shared cores: several intra-op threads only contend with each other here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def disk_volume(seed: int, shape=(16, 16, 6), inverted: bool = False, blank_ends: bool = False):
    """A bright disk (100) on a dark background (0) with noise; ``inverted`` swaps them."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    radius = 0.4 + 0.2 * rng.random()
    disk = (x**2 + y**2 < radius**2).astype(np.float32) * 100
    data = np.repeat(disk[..., None], shape[2], axis=2) + rng.normal(0, 5, shape).astype(np.float32)
    if inverted:
        data = 100 - data
    if blank_ends:
        data[..., 0] = 0
        data[..., -1] = 0
    return nib.Nifti1Image(data.astype(np.float32), AFFINE)


@pytest.fixture
def domains(tmp_path):
    folder_a, folder_b = tmp_path / "A", tmp_path / "B"
    folder_a.mkdir()
    folder_b.mkdir()
    for i in range(2):
        nib.save(disk_volume(i), folder_a / f"a{i}.nii.gz")
        nib.save(disk_volume(10 + i, inverted=True), folder_b / f"b{i}.nii.gz")
    return folder_a, folder_b


def tiny(**changes) -> CycleGANConfig:
    return CycleGANConfig.preset("tiny", **changes)


def assert_same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- networks ---------------------------------------------------------------------------


def test_resnet_generator_keeps_shape_and_range():
    generator = ResnetGenerator(1, 1, ngf=4, n_blocks=3)
    x = torch.randn(2, 1, 16, 24)
    y = generator(x)
    assert y.shape == x.shape
    assert y.abs().max() < 1  # tanh head
    assert generator.size_divisor == 4
    assert sum(isinstance(m, ResnetBlock) for m in generator.modules()) == 3
    wider = ResnetGenerator(1, 1, ngf=8, n_blocks=3)
    assert sum(p.numel() for p in wider.parameters()) > sum(p.numel() for p in generator.parameters())


def test_resnet_block_is_a_residual():
    block = ResnetBlock(4)
    last_conv = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    torch.nn.init.zeros_(last_conv.weight)
    torch.nn.init.zeros_(last_conv.bias)
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(block(x), x)  # F(x) = norm(0) = 0, so only the skip remains


@pytest.mark.parametrize("n_layers, expected", [(2, 34), (3, 70)])
def test_patchgan_receptive_field(n_layers, expected):
    assert PatchDiscriminator.receptive_field(n_layers) == expected
    # Measure it: the input pixels one logit depends on. Batch norm in eval mode is
    # per-pixel affine, so it does not couple distant pixels the way instance norm does.
    critic = PatchDiscriminator(1, ndf=4, n_layers=n_layers, norm="batch").eval()
    x = torch.randn(1, 1, 160, 160, requires_grad=True)
    logits = critic(x)
    assert logits.shape[-1] == PatchDiscriminator.output_size(160, n_layers)
    centre = logits.shape[-1] // 2
    logits[0, 0, centre, centre].backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(dim=1)).flatten()
    cols = torch.nonzero(x.grad[0, 0].abs().sum(dim=0)).flatten()
    assert rows.max() - rows.min() + 1 == expected
    assert cols.max() - cols.min() + 1 == expected


def test_networks_are_seeded():
    torch.manual_seed(3)
    first = CycleGAN(tiny(seed=7))
    torch.manual_seed(4)
    state_before = torch.get_rng_state()
    second = CycleGAN(tiny(seed=7))
    assert torch.equal(torch.get_rng_state(), state_before)  # the caller's generator is untouched
    assert_same_weights(first, second)
    third = CycleGAN(tiny(seed=8))
    assert not torch.equal(first.generator_ab.model[1].weight, third.generator_ab.model[1].weight)


# --- configuration and schedule -----------------------------------------------------------


def test_reference_defaults_and_presets():
    reference = CycleGANConfig()
    assert (reference.ngf, reference.n_blocks, reference.ndf, reference.discriminator_layers) == (64, 9, 64, 3)
    assert (reference.lambda_cycle, reference.lambda_identity, reference.pool_size) == (10.0, 0.5, 50)
    assert (reference.learning_rate, reference.betas, reference.gan_mode) == (2e-4, (0.5, 0.999), "lsgan")
    cpu = CycleGANConfig.preset("cpu")
    assert (cpu.ngf, cpu.n_blocks, cpu.image_size) == (8, 2, 64)
    assert CycleGANConfig.from_dict(cpu.to_dict()) == cpu
    with pytest.raises(SinganInsertError, match="Unknown preset"):
        CycleGANConfig.preset("huge")
    with pytest.raises(SinganInsertError, match="multiples of 4"):
        tiny(image_size=18)
    with pytest.raises(SinganInsertError, match="too small"):
        tiny(image_size=16, discriminator_layers=3)
    with pytest.raises(SinganInsertError, match="gan_mode"):
        tiny(gan_mode="wgan")


def test_learning_rate_schedule_is_constant_then_linear():
    factors = [learning_rate_factor(t, 3, 4) for t in range(7)]
    assert factors[:3] == [1.0, 1.0, 1.0]
    assert factors[3:] == pytest.approx([4 / 5, 3 / 5, 2 / 5, 1 / 5])
    assert learning_rate_factor(0, 0, 1) == pytest.approx(1 / 2)


# --- data -------------------------------------------------------------------------------


def test_slice_dataset_normalises_and_skips_blank_slices(tmp_path):
    image = disk_volume(0, blank_ends=True)
    nib.save(image, tmp_path / "v.nii.gz")
    data = SliceDataset(tmp_path, axis=2)
    assert len(data) == 4  # the two blank end slices are left out
    assert data.locations == [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert data.slices.shape == (4, 1, 16, 16)
    assert data.slices.min() >= -1 and data.slices.max() <= 1
    volume = image.get_fdata(dtype=np.float32)
    expected = data.normalizations[0].to_model(torch.from_numpy(volume[:, :, 2]))
    assert torch.equal(data[1][0], expected)
    assert len(SliceDataset(tmp_path, skip_blank=False)) == 6
    along_x = SliceDataset([tmp_path / "v.nii.gz"], axis=0, size=8, skip_blank=False)
    assert along_x.slices.shape == (16, 1, 8, 8)


def test_slice_dataset_rejects_bad_input(tmp_path):
    with pytest.raises(SinganInsertError, match="no .nii"):
        SliceDataset(tmp_path)
    with pytest.raises(SinganInsertError, match="does not exist"):
        SliceDataset(tmp_path / "missing")
    nib.save(disk_volume(0), tmp_path / "a.nii.gz")
    nib.save(disk_volume(1, shape=(20, 16, 6)), tmp_path / "b.nii.gz")
    with pytest.raises(SinganInsertError, match="size="):
        SliceDataset(tmp_path)
    assert SliceDataset(tmp_path, size=16).slice_shape == (16, 16)


def test_image_pool_stores_then_swaps():
    pool = ImagePool(3, torch.Generator().manual_seed(0))
    first = torch.arange(3.0).view(3, 1, 1, 1)
    assert torch.equal(pool.query(first), first)  # filling: returned as is
    returned_old = returned_new = 0
    for value in range(3, 40):
        image = torch.full((1, 1, 1, 1), float(value))
        out = pool.query(image)
        if torch.equal(out, image):
            returned_new += 1
        else:
            returned_old += 1
            assert out.item() < value  # an older generated image
            assert any(torch.equal(image, stored) for stored in pool.images)  # swapped in
    assert returned_old > 5 and returned_new > 5  # both branches, about half each
    assert len(pool.images) == 3
    assert torch.equal(ImagePool(0, torch.Generator()).query(first), first)


# --- training ---------------------------------------------------------------------------


def test_train_save_load_and_translate(domains, tmp_path):
    folder_a, folder_b = domains
    out = tmp_path / "run"
    model = train_cyclegan(folder_a, folder_b, out, tiny(progress=True))
    assert model.info["iterations_done"] == 8
    assert (out / MODEL_NAME).is_file() and (out / CHECKPOINT_NAME).is_file()
    loaded = CycleGAN.load(out / MODEL_NAME)
    assert_same_weights(model, loaded)
    assert loaded.config == model.config
    assert loaded.info["iterations_done"] == 8

    source = nib.load(folder_a / "a0.nii.gz")
    translated = loaded.translate(source, "a_to_b", batch_size=4)
    assert translated.shape == source.shape
    assert np.array_equal(translated.affine, source.affine)
    values = translated.get_fdata()
    assert values.min() >= -1 and values.max() <= 1
    # Slice 3 is the generator applied to the normalised slice (16 px = training size).
    normalised = SliceDataset([source], skip_blank=False).slices[3:4]
    with torch.inference_mode():
        expected = loaded.generator_ab(normalised)[0, 0].numpy()
    np.testing.assert_allclose(values[:, :, 3], expected, atol=1e-5)
    backwards = loaded.translate(source, "b_to_a")
    assert not np.allclose(backwards.get_fdata(), values)
    with pytest.raises(SinganInsertError, match="direction"):
        loaded.translate(source, "sideways")


def test_training_reduces_the_cycle_error(domains, tmp_path):
    folder_a, folder_b = domains
    config = tiny(iterations=30, decay_iterations=30, learning_rate=1e-3, checkpoint_every=100)
    data_a, data_b = SliceDataset(folder_a, size=16), SliceDataset(folder_b, size=16)

    def cycle_error(model: CycleGAN) -> float:
        with torch.inference_mode():
            a, b = data_a.slices, data_b.slices
            error_a = (model.generator_ba(model.generator_ab(a)) - a).abs().mean()
            error_b = (model.generator_ab(model.generator_ba(b)) - b).abs().mean()
        return float(error_a + error_b)

    before = cycle_error(CycleGAN(config).eval())  # the run's initial state
    trained = train_cyclegan(data_a, data_b, tmp_path / "run", config)
    assert cycle_error(trained) < 0.5 * before


def test_resumed_run_is_bit_identical(domains, tmp_path):
    folder_a, folder_b = domains
    # The pool (4 images, batch 1) is full after 4 iterations, so its random swaps are
    # exercised before and after the interruption.
    config = tiny(iterations=5, decay_iterations=5, checkpoint_every=2)
    straight = train_cyclegan(folder_a, folder_b, tmp_path / "straight", config)
    partial = train_cyclegan(folder_a, folder_b, tmp_path / "split", config, stop_at=7)
    assert partial.info["iterations_done"] == 7
    assert not (tmp_path / "split" / MODEL_NAME).exists()  # not finished yet
    with pytest.raises(AssertionError):
        assert_same_weights(straight, partial)
    resumed = train_cyclegan(folder_a, folder_b, tmp_path / "split", config)
    assert resumed.info["iterations_done"] == 10
    assert_same_weights(straight, resumed)
    again = train_cyclegan(folder_a, folder_b, tmp_path / "split", config)  # already done
    assert_same_weights(straight, again)


def test_resume_refuses_other_settings_or_data(domains, tmp_path):
    folder_a, folder_b = domains
    train_cyclegan(folder_a, folder_b, tmp_path / "run", tiny(), stop_at=2)
    with pytest.raises(SinganInsertError, match="other settings"):
        train_cyclegan(folder_a, folder_b, tmp_path / "run", tiny(lambda_cycle=5.0))
    with pytest.raises(SinganInsertError, match="other data"):
        train_cyclegan([folder_a / "a0.nii.gz"], folder_b, tmp_path / "run", tiny())
    # Runtime settings may change between the two halves of a run.
    model = train_cyclegan(folder_a, folder_b, tmp_path / "run", tiny(checkpoint_every=3, log_every=2))
    assert model.info["iterations_done"] == 8


def test_slice_dataset_must_match_the_config(domains, tmp_path):
    folder_a, folder_b = domains
    with pytest.raises(SinganInsertError, match="config says"):
        train_cyclegan(SliceDataset(folder_a, size=32), folder_b, tmp_path / "run", tiny())
    with pytest.raises(SinganInsertError, match="CycleGANConfig"):
        train_cyclegan(folder_a, folder_b, tmp_path / "run", Pix2PixConfig.preset("tiny"))


# --- model files ------------------------------------------------------------------------


def test_bad_model_files_raise_model_file_error(tmp_path):
    model = CycleGAN(tiny())
    path = model.save(tmp_path / "model.safetensors")
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated|corrupt"):
        CycleGAN.load(tmp_path / "truncated.safetensors")
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ModelFileError, match="not a safetensors"):
        CycleGAN.load(tmp_path / "pickle.pt")
    Pix2Pix(Pix2PixConfig.preset("tiny")).save(tmp_path / "pix2pix.safetensors")
    with pytest.raises(ModelFileError, match="singan-insert-cyclegan"):
        CycleGAN.load(tmp_path / "pix2pix.safetensors")
    with pytest.raises(ModelFileError, match="does not exist"):
        CycleGAN.load(tmp_path / "missing.safetensors")
    assert_same_weights(CycleGAN.load(path), model)


def test_a_finished_run_or_a_resume_on_other_data_of_the_same_size_is_refused(domains, tmp_path):
    folder_a, folder_b = domains
    other_b = tmp_path / "other_b"
    other_b.mkdir()
    for i in range(2):  # same count and shape of slices, other content
        nib.save(disk_volume(20 + i, inverted=True), other_b / f"b{i}.nii.gz")
    train_cyclegan(folder_a, folder_b, tmp_path / "done", tiny())
    with pytest.raises(SinganInsertError, match="other data"):
        train_cyclegan(folder_a, other_b, tmp_path / "done", tiny())
    train_cyclegan(folder_a, folder_b, tmp_path / "half", tiny(), stop_at=2)
    with pytest.raises(SinganInsertError, match="other data"):
        train_cyclegan(folder_a, other_b, tmp_path / "half", tiny())
    pairs = [(folder_b / "b0.nii.gz", folder_a / "a0.nii.gz")]
    train_pix2pix(pairs, tmp_path / "p2p", Pix2PixConfig.preset("tiny"), stop_at=2)
    with pytest.raises(SinganInsertError, match="other data"):
        train_pix2pix([(other_b / "b0.nii.gz", folder_a / "a0.nii.gz")], tmp_path / "p2p",
                      Pix2PixConfig.preset("tiny"))
