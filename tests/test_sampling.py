"""Random insertion parameters (singan_insert.insertion.sampling): one meaning per spelling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from singan_insert.errors import SinganInsertError
from singan_insert.insertion.sampling import (
    InsertionRanges,
    ValueSpec,
    check_integer,
    check_seed,
    parse_contrast,
    parse_range,
    parse_sextet,
    parse_start_scale,
)


def test_every_spelling_of_lambda_has_one_meaning():
    assert parse_contrast(0.5) == ValueSpec("set", (0.5,))
    assert parse_contrast((0.5, 0.8)) == ValueSpec("range", (0.5, 0.8))  # TorchIO's (a, b)
    assert parse_contrast({1.5, 0.5, 0.8}) == ValueSpec("set", (0.5, 0.8, 1.5))  # GBA's set
    assert parse_contrast(["0.5", "0.8", "1.5"]) == ValueSpec("set", (0.5, 0.8, 1.5))  # CLI tokens
    assert parse_contrast(["0.5:1.5"]) == ValueSpec("range", (0.5, 1.5))
    assert parse_contrast(np.float32(0.5)).values == (0.5,)
    spec = ValueSpec.choice(0.8, 0.5)
    assert parse_contrast(spec) is spec and str(spec) == "{0.5, 0.8}"


@pytest.mark.parametrize("value, message", [
    ((0.5, 0.8, 1.5), "ambiguous"), ((0.8, 0.5), "low <= high"), (0.0, "> 0"), (-1.0, "> 0"),
    (math.nan, "finite"), (math.inf, "finite"), (True, "number"), ("abc", "cannot read"),
    (["0.5", "0.6:0.9"], "either one range"), ({0.5, math.nan}, "finite"), ([], "ambiguous"),
])
def test_bad_lambdas_are_refused_with_the_argument_named(value, message):
    with pytest.raises(SinganInsertError, match=message):
        parse_contrast(value)


def test_start_scales_are_integers_on_one_side_of_zero():
    assert parse_start_scale(None) is None
    assert parse_start_scale((-3, -1)) == ValueSpec("range", (-3, -1), integer=True)
    assert parse_start_scale(["-3", "-2"]) == ValueSpec("set", (-3, -2), integer=True)
    assert parse_start_scale(np.int64(4)).values == (4,)
    for bad, message in (((-2, 3), "both ends"), (1.5, "integer"), (["1.5"], "integer")):
        with pytest.raises(SinganInsertError, match=message):
            parse_start_scale(bad)


def test_single_argument_checks_accept_numpy_and_refuse_the_rest():
    assert check_integer(np.int64(3), "n") == 3 and type(check_integer(np.int16(3), "n")) is int
    assert check_integer(3.0, "n") == 3
    for bad in (2.5, True, "3", math.nan, None):
        with pytest.raises(SinganInsertError, match="n must be an integer"):
            check_integer(bad, "n")
    assert check_seed(2**32 - 1) == 2**32 - 1
    for bad in (-1, 2**32, 2**70):
        with pytest.raises(SinganInsertError, match="seed"):
            check_seed(bad)
    assert parse_range(10, "degrees", around=0) == (-10, 10)
    assert parse_sextet(0.1, "scales", around=1) == pytest.approx((0.9, 1.1) * 3)
    assert parse_sextet((1, 2, 3, 4, 5, 6), "degrees", around=0) == (1, 2, 3, 4, 5, 6)
    with pytest.raises(SinganInsertError, match="degrees must be >= 0"):
        parse_range(-5, "degrees", around=0)


def test_draws_cover_the_spec_and_follow_the_generator():
    rng = np.random.default_rng(0)
    choices = [ValueSpec.choice(0.5, 0.8, 1.5).sample(rng) for _ in range(300)]
    counts = {v: choices.count(v) for v in (0.5, 0.8, 1.5)}
    assert sum(counts.values()) == 300 and min(counts.values()) > 70
    draws = np.array([ValueSpec.uniform(0.5, 0.8).sample(rng) for _ in range(300)])
    assert draws.min() >= 0.5 and draws.max() <= 0.8 and draws.std() > 0.07
    integers = {ValueSpec.uniform(-3, -1, integer=True).sample(rng) for _ in range(100)}
    assert integers == {-3, -2, -1}
    ranges = InsertionRanges(contrast={0.5, 0.8}, start_scale=(-3, -1), flip_axes=(0, 1),
                             degrees=10, scales=0.1)
    a = ranges.sample(np.random.default_rng(5))
    assert a == ranges.sample(np.random.default_rng(5))
    torch.manual_seed(1)
    b = ranges.sample()
    torch.manual_seed(1)
    assert b == ranges.sample()  # torch's global generator when none is given
    assert ranges.sample(np.random.default_rng(5), fixed_axes=(2,)).rotation[:2] == (0.0, 0.0)


def test_fixed_values_draw_nothing():
    """A fixed range consumes no random number, so the batch's draws stay few and stable."""
    rng = np.random.default_rng(3)
    drawn = InsertionRanges(contrast=0.5).sample(rng)
    assert drawn.contrast == 0.5 and drawn.flip == (False,) * 3 and drawn.scale == (1.0,) * 3
    assert drawn.seed == int(np.random.default_rng(3).integers(0, 2**31))
