import math

import pytest
import torch

from singan_insert import PyramidGeometry, SinganInsertError
from singan_insert.harmonizer.pyramid import resize


def test_official_scale_count_and_sizes_128():
    geometry = PyramidGeometry.from_shape((128, 128), 0.75, 25, 250)
    # ceil(log_0.75(25/128)) + 1 = ceil(5.68) + 1 = 7 scales, coarsest exactly min_size.
    assert geometry.num_scales == 7
    assert geometry.sizes[0] == (25, 25)
    assert geometry.sizes[-1] == (128, 128)
    assert all(a[0] < b[0] for a, b in zip(geometry.sizes, geometry.sizes[1:]))
    assert math.isclose(geometry.scale_factor, (25 / 128) ** (1 / 6))


def test_max_size_shrinks_and_keeps_aspect():
    geometry = PyramidGeometry.from_shape((300, 150), 0.75, 25, 250)
    assert geometry.finest == (250, 125)
    assert geometry.sizes[0][1] == 25


def test_sizes_for_other_shapes_follow_ratios():
    geometry = PyramidGeometry.from_shape((128, 128))
    sizes = geometry.sizes_for((64, 96))
    assert sizes[-1] == (64, 96)
    assert sizes[-2] == (round(64 * geometry.scale_factor), round(96 * geometry.scale_factor))


def test_start_scale_resolution():
    geometry = PyramidGeometry.from_shape((128, 128))
    assert geometry.resolve_start_scale(-1, 1) == 6
    assert geometry.resolve_start_scale(3, 1) == 3
    for bad in (0, 7, -7):
        with pytest.raises(SinganInsertError, match="out of range"):
            geometry.resolve_start_scale(bad, 1)
    with pytest.raises(SinganInsertError, match="integer"):
        geometry.resolve_start_scale(2.5, 1)


@pytest.mark.parametrize("shape", [(20, 64), (10, 10)])
def test_too_small_image_is_refused(shape):
    with pytest.raises(SinganInsertError, match="min_size"):
        PyramidGeometry.from_shape(shape, 0.75, 25, 250)


def test_resize_is_torch_and_identity_when_same_size():
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64)
    assert resize(x, (32, 32)) is x
    y = resize(x, (16, 16))
    assert y.dtype == torch.float64 and y.shape == (1, 1, 16, 16)
    # anti-aliased shrink of a constant stays constant
    c = resize(torch.full((1, 1, 40, 40), 0.3), (13, 17))
    assert torch.allclose(c, torch.full_like(c, 0.3), atol=1e-6)
