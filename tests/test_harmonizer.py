import numpy as np
import pytest
import torch
from helpers import textured_slice

from singan_insert import Harmonizer, SinganInsertError
from singan_insert.harmonizer.model import blend_weight


def _paste(seed=0, batch=3, shape=(48, 48)):
    backgrounds = np.stack([textured_slice(shape, seed=seed + i) for i in range(batch)])
    masks = np.zeros_like(backgrounds)
    for i in range(batch):
        masks[i, 18 + i : 28 + i, 15:27] = 1
    composites = backgrounds.copy()
    composites[masks > 0] = 220.0
    return backgrounds, composites, masks


def test_untouched_outside_the_dilated_mask(tiny_harmonizer):
    bg, comp, mask = _paste()
    out = tiny_harmonizer.harmonize(bg, comp, mask, seed=0, dilation_mm=1.0, feather_mm=2.0)
    weight = blend_weight(mask, tiny_harmonizer.spacing, 1.0, 2.0)
    outside = weight == 0
    assert outside.sum() > 0.8 * outside.size
    assert np.array_equal(out[outside], bg[outside])  # bit-identical
    assert out.dtype == bg.dtype and out.shape == bg.shape
    # ...and the tumor region did change
    assert np.abs(out - comp)[mask > 0].mean() > 0


def test_float64_input_is_bit_identical_outside(tiny_harmonizer):
    bg, comp, mask = _paste(batch=1)
    bg, comp = bg.astype(np.float64) + 0.123456789, comp.astype(np.float64) + 0.123456789
    out = tiny_harmonizer.harmonize(bg, comp, mask, seed=0)
    outside = blend_weight(mask, tiny_harmonizer.spacing, 1.0, 2.0) == 0
    assert out.dtype == np.float64 and np.array_equal(out[outside], bg[outside])


def test_batch_equals_one_by_one(tiny_harmonizer):
    bg, comp, mask = _paste(batch=4)
    batch = tiny_harmonizer.harmonize(bg, comp, mask, start_scale=-2, seed=7)
    for i in range(4):
        single = tiny_harmonizer.harmonize(bg[i], comp[i], mask[i], start_scale=-2, seed=7,
                                           normalization=_norm(bg))
        batch_i = tiny_harmonizer.harmonize(bg, comp, mask, start_scale=-2, seed=7)[i]
        np.testing.assert_allclose(single, batch_i, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(batch, tiny_harmonizer.harmonize(bg, comp, mask, start_scale=-2, seed=7))


def _norm(bg):
    from singan_insert import PercentileNormalization

    return PercentileNormalization.fit(bg)


def test_seed_controls_noise(tiny_harmonizer):
    bg, comp, mask = _paste(batch=1)
    a = tiny_harmonizer.harmonize(bg, comp, mask, seed=1)
    b = tiny_harmonizer.harmonize(bg, comp, mask, seed=1)
    c = tiny_harmonizer.harmonize(bg, comp, mask, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_tensor_in_tensor_out_and_other_sizes(tiny_harmonizer):
    bg, comp, mask = (torch.from_numpy(a) for a in _paste(batch=2, shape=(40, 72)))
    out = tiny_harmonizer.harmonize(bg, comp, mask, seed=0)
    assert torch.is_tensor(out) and out.shape == (2, 40, 72)


def test_spacing_resamples_to_model_spacing(tiny_harmonizer):
    bg, comp, mask = _paste(batch=1)
    coarse = tiny_harmonizer.harmonize(bg, comp, mask, seed=0, spacing=(1.0, 1.0), dilation_mm=2, feather_mm=4)
    native = tiny_harmonizer.harmonize(bg, comp, mask, seed=0, spacing=(0.5, 0.5), dilation_mm=2, feather_mm=4)
    assert coarse.shape == native.shape and not np.allclose(coarse, native)


def test_start_scale_changes_result_and_finer_keeps_more_of_the_paste(tiny_harmonizer):
    bg, comp, mask = _paste(batch=2)
    inside = mask > 0
    errors = {}
    for scale in tiny_harmonizer.valid_start_scales:
        out = tiny_harmonizer.harmonize(bg, comp, mask, start_scale=scale, seed=0)
        errors[scale] = np.abs(out - comp)[inside].mean()
    coarsest, finest = min(errors), max(errors)
    assert errors[finest] < errors[coarsest]


def test_blend_weight_in_mm():
    mask = np.zeros((1, 41, 41), dtype=np.float32)
    mask[0, 20, 20] = 1
    weight = blend_weight(mask, (0.5, 0.5), dilation_mm=1.0, feather_mm=2.0)[0]
    assert weight[20, 20] == 1 and weight[20, 22] == 1          # 1.0 mm away: inside the dilation
    assert 0 < weight[20, 24] < 1                                 # 2.0 mm: on the ramp
    assert weight[20, 26] == 0 and weight[20, 27] == 0            # >= 3.0 mm: zero
    assert np.all(np.diff(weight[20, 20:]) <= 0)


@pytest.mark.parametrize("spacing", [(0.5, 0.5), (0.3, 1.2)])
def test_blend_weight_is_the_whole_slice_distance_ramp(spacing):
    """The weight (computed in the mask's widened box) equals the ramp of the whole slice's
    distance to the mask, soft values kept, for masks at the border and in the middle."""
    from scipy.ndimage import distance_transform_edt

    rng = np.random.default_rng(0)
    mask = np.zeros((3, 40, 50), dtype=np.float32)
    mask[0, 0:4, 45:50] = 1
    mask[1, 18:25, 20:23] = rng.uniform(0.2, 1.0, (7, 3))
    mask[2, 5, 5] = mask[2, 30, 40] = 1
    weight = blend_weight(mask, spacing, dilation_mm=1.0, feather_mm=2.0)
    for index in range(3):
        distance = distance_transform_edt(mask[index] == 0, sampling=spacing)
        t = np.clip(1 - (distance - 1.0) / 2.0, 0, 1)
        expected = np.where(distance > 3.0, 0.0, t * t * (3 - 2 * t))
        np.testing.assert_allclose(weight[index], np.maximum(expected, mask[index]), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b, c, m: (b, c, m[:, :-1]), "same shape"),
        (lambda b, c, m: (b, c, m * 0), "empty"),
        (lambda b, c, m: (b, c, m * 2), r"\[0, 1\]"),
        (lambda b, c, m: (b, c * np.nan, m), "NaN"),
        (lambda b, c, m: (b[None], c[None], m[None]), "2D slices"),
        (lambda b, c, m: (b.astype(str), c, m), "dtype"),
        (lambda b, c, m: (b.tolist(), c, m), "numpy array or torch tensor"),
    ],
)
def test_bad_input(tiny_harmonizer, change, message):
    bg, comp, mask = change(*_paste(batch=2))
    with pytest.raises(SinganInsertError, match=message):
        tiny_harmonizer.harmonize(bg, comp, mask, seed=0)


@pytest.mark.parametrize("scale", [0, 2, 6, -4, 1.5])
def test_start_scale_out_of_range(tiny_harmonizer, scale):
    bg, comp, mask = _paste(batch=1)
    with pytest.raises(SinganInsertError, match="start_scale"):
        tiny_harmonizer.harmonize(bg, comp, mask, start_scale=scale)


def test_too_small_slices_for_a_coarse_start(tiny_harmonizer):
    bg, comp, mask = _paste(batch=1, shape=(8, 8))
    mask[:] = 0
    mask[0, 3:5, 3:5] = 1
    with pytest.raises(SinganInsertError, match="too small"):
        tiny_harmonizer.harmonize(bg, comp, mask, start_scale=3)


def test_repr_and_properties(tiny_harmonizer):
    assert tiny_harmonizer.valid_start_scales == range(3, 6)
    assert tiny_harmonizer.default_start_scale == 3
    assert tiny_harmonizer.axis == 2 and tiny_harmonizer.modality == "hrT2"
    assert "Harmonizer(scales=6" in repr(tiny_harmonizer)


@pytest.mark.parametrize("spacing", [None, (0.7, 0.45), (0.3, 0.3)])
@pytest.mark.parametrize("where", [(40, 44), (3, 4), (76, 58), (40, 10)])
def test_generators_run_only_where_the_blend_weight_reaches(tiny_harmonizer, monkeypatch, spacing, where):
    """The generators see only the part of each scale that reaches the blend weight's box, and the
    output is the whole-image run's (tumors in the middle, a corner, an edge; the slices resampled
    up and down to the model's pixel size)."""
    from singan_insert.harmonizer import model as model_module

    background = np.stack([textured_slice((80, 88), seed=s) for s in range(2)])
    yy, xx = np.mgrid[:80, :88]
    mask = np.repeat((((yy - where[0]) ** 2 + (xx - where[1]) ** 2) < 36)[None].astype(np.float32), 2, 0)
    composite = np.where(mask > 0, 200.0, background).astype(np.float32)
    pixels = []
    hook = [g.register_forward_pre_hook(lambda _, args: pixels.append(args[0].shape[-2] * args[0].shape[-1]))
            for g in tiny_harmonizer.pyramid.generators]
    try:
        for start in tiny_harmonizer.valid_start_scales:
            pixels.clear()
            cropped = tiny_harmonizer.harmonize(background, composite, mask, start, seed=4, spacing=spacing)
            cropped_pixels = sum(pixels)
            monkeypatch.setattr(model_module, "support_box", lambda weight: None)
            pixels.clear()
            whole = tiny_harmonizer.harmonize(background, composite, mask, start, seed=4, spacing=spacing)
            monkeypatch.undo()
            # Equal to the last bit on the CPUs tried; a convolution library may pick another
            # kernel for the smaller input, so allow its rounding (one pixel of reach too few errs by 1e-3).
            np.testing.assert_allclose(cropped, whole, rtol=0, atol=1e-4)
            assert cropped_pixels < sum(pixels)  # a radius-6 tumor needs a fraction of the slice
    finally:
        for h in hook:
            h.remove()


def test_resize_source_span_covers_what_the_resize_reads():
    """Changing a source pixel outside the span leaves the resized pixels of the span's output alone."""
    from singan_insert.harmonizer.pyramid import resize, resize_source_span

    generator = torch.Generator().manual_seed(0)
    for source_size, size in [(20, 31), (31, 20), (17, 17), (40, 9), (9, 40)]:
        image = torch.randn(1, 1, source_size, 5, generator=generator)
        for start, stop in [(0, 3), (4, 7), (size - 3, size)]:
            first, last = resize_source_span(start, stop, source_size, size)
            changed = image.clone()
            changed[..., :first, :] += 100
            changed[..., last:, :] += 100
            np.testing.assert_array_equal(resize(image, (size, 5))[..., start:stop, :],
                                          resize(changed, (size, 5))[..., start:stop, :])
