"""Random insertion parameters: one parser per kind of argument, one sampler for every caller.

The TorchIO transform :class:`~singan_insert.integrations.torchio.RandomTumorInsertion`, the
offline batch (``singan-insert insert``) and the crossMoDA pipeline draw their random values
here, so a value such as the contrast factor :math:`\\lambda` means the same thing everywhere.

A :class:`ValueSpec` is either a **range** or a **set**:

* range :math:`[a, b]`: :math:`v \\sim U(a, b)` (integers: uniform on :math:`\\{a, ..., b\\}`);
* set :math:`\\{v_1, ..., v_n\\}`: :math:`v = v_i` with probability :math:`1/n` (GBA's
  :math:`\\lambda \\in \\{0.5, 0.8, 1.5\\}`).

:func:`parse_spec` reads every spelling users write: a number (a set of one, i.e. a fixed
value), a pair ``(a, b)`` (a range, TorchIO's convention), a Python ``set`` (a set), a
``ValueSpec``, or the command line's strings (``"0.5:1.5"`` is a range, ``"0.5"`` one value of
a set; several tokens ``0.5 0.8 1.5`` form a set).

The ``check_*`` helpers validate single arguments the way TorchIO does (a ``ValueError``, here
:class:`~singan_insert.errors.SinganInsertError`, naming the argument and what is allowed);
they accept numpy scalars (``np.int64(3)`` is an integer) and refuse booleans, NaN and
infinities.

Draws come from a ``numpy.random.Generator`` when one is given (the batch: one generator per
output, seeded from the output's name, so results do not depend on the number of workers), else
from torch's global generator (TorchIO: ``torch.manual_seed`` reproduces a run).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from singan_insert.checks import (  # noqa: F401 (re-exported for the transforms and batch)
    MAX_SEED,
    check_int,
    check_non_negative,
    check_positive,
    check_probability,
    check_real,
    check_seed,
)
from singan_insert.errors import SinganInsertError

Generator = np.random.Generator | np.random.RandomState | None


# The single-argument checks live in singan_insert.checks (one copy for every layer); the
# names below are the ones this module's callers use.
check_number = check_real
check_integer = check_int


def check_contrast(value: Any, name: str = "contrast") -> float:
    """The contrast factor :math:`\\lambda`: a finite number > 0 (the one λ check)."""
    return check_positive(value, name)


def check_start_scale(value: Any, name: str = "start_scale") -> int | None:
    """A harmonizer start scale: ``None`` (the model's default) or an integer (negative counts
    from the finest scale)."""
    return None if value is None else check_integer(value, name)


def parse_range(value: Any, name: str, *, around: float | None = None,
                minimum: float | None = None) -> tuple[float, float]:
    """A ``(low, high)`` range, as TorchIO's transforms read them.

    Args:
        value: ``(a, b)`` with :math:`a \\le b`; or a number :math:`d`, which gives
            :math:`(c - d, c + d)` when ``around`` = :math:`c` is given (e.g. ``degrees=10``
            means :math:`U(-10, 10)`), else the fixed range :math:`(d, d)`.
        name: the argument's name, for messages.
        around: the centre :math:`c` of the range a single number spans (then :math:`d \\ge 0`).
        minimum: smallest value allowed in the range.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        number = check_number(value, name)
        if around is None:
            low = high = number
        else:
            if number < 0:
                raise SinganInsertError(f"{name} must be >= 0 when it is a single number, got {value!r}.")
            low, high = around - number, around + number
    else:
        items = _as_sequence(value, name)
        if len(items) != 2:
            raise SinganInsertError(f"{name} must be a number or a pair (low, high), got {value!r}.")
        low, high = (check_number(v, name) for v in items)
        if low > high:
            raise SinganInsertError(f"{name} must be (low, high) with low <= high, got {value!r}.")
    if minimum is not None and low < minimum:
        raise SinganInsertError(f"{name} must give values >= {minimum:g}, got {value!r}.")
    return low, high


def parse_sextet(value: Any, name: str, *, around: float, minimum: float | None = None
                 ) -> tuple[float, float, float, float, float, float]:
    """Three ``(low, high)`` ranges, one per world axis (TorchIO's ``degrees``/``scales``).

    ``value`` is a number :math:`d` (:math:`(c-d, c+d)` on every axis), a pair ``(a, b)`` (the
    same range on every axis) or six numbers ``(a_x, b_x, a_y, b_y, a_z, b_z)``.
    """
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        items = _as_sequence(value, name)
        if len(items) == 6:
            ranges = [parse_range(items[i:i + 2], f"{name}[{i}:{i + 2}]", minimum=minimum)
                      for i in (0, 2, 4)]
            return tuple(v for pair in ranges for v in pair)
    low, high = parse_range(value, name, around=around, minimum=minimum)
    return (low, high) * 3


# --------------------------------------------------------------------------------------------
# Ranges and sets of values
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValueSpec:
    """A range or a set of values to draw from (see the module docstring).

    Args:
        kind: ``"range"`` (uniform on ``[values[0], values[1]]``) or ``"set"`` (uniform over
            ``values``, kept sorted and unique so that a draw does not depend on how the set
            was spelled).
        values: the two ends of the range, or the members of the set (at least one).
        integer: whether values are integers (a range then draws every integer in it with
            equal probability).
    """

    kind: str
    values: tuple[float, ...]
    integer: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("range", "set"):
            raise SinganInsertError(f"ValueSpec kind must be 'range' or 'set', got {self.kind!r}.")
        values = tuple(sorted(set(self.values)))
        if not values or (self.kind == "range" and len(self.values) != 2):
            raise SinganInsertError(f"A {self.kind} needs {'two ends' if self.kind == 'range' else 'a value'}, "
                                    f"got {self.values!r}.")
        if self.kind == "range" and not self.values[0] <= self.values[1]:
            raise SinganInsertError(f"A range needs low <= high, got {self.values!r}.")
        object.__setattr__(self, "values", tuple(self.values) if self.kind == "range" else values)

    @classmethod
    def choice(cls, *values: float, integer: bool = False) -> "ValueSpec":
        """A set: one of ``values`` with equal probability."""
        return cls("set", tuple(values), integer)

    @classmethod
    def uniform(cls, low: float, high: float, integer: bool = False) -> "ValueSpec":
        """A range: uniform on ``[low, high]``."""
        return cls("range", (low, high), integer)

    @property
    def low(self) -> float:
        return self.values[0]

    @property
    def high(self) -> float:
        return self.values[-1]

    @property
    def is_fixed(self) -> bool:
        return self.low == self.high

    def sample(self, rng: Generator = None) -> float | int:
        """One draw (see :func:`uniform01` for ``rng``); a single value draws nothing."""
        if self.is_fixed:
            return int(self.low) if self.integer else self.low
        if self.kind == "set":
            return self.values[draw_integer(0, len(self.values) - 1, rng)]
        if self.integer:
            return draw_integer(int(self.low), int(self.high), rng)
        return self.low + (self.high - self.low) * uniform01(rng)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "values": list(self.values), "integer": self.integer}

    def __str__(self) -> str:
        if self.kind == "range":
            return f"U({self.low:g}, {self.high:g})"
        return "{" + ", ".join(f"{v:g}" for v in self.values) + "}"


def parse_spec(value: Any, name: str, *, integer: bool = False) -> ValueSpec:
    """Read a range or a set of values (see the module docstring for the spellings).

    Args:
        value: a number, ``(a, b)``, a ``set``, a :class:`ValueSpec`, a string ``"a:b"`` or
            ``"v"``, or a list of such strings (the command line's tokens).
        name: the argument's name, for messages.
        integer: the values must be integers (e.g. start scales).
    """
    if isinstance(value, ValueSpec):
        spec = value
    elif isinstance(value, str):
        spec = _parse_token(value, name)
    elif isinstance(value, (set, frozenset)):
        spec = ValueSpec("set", tuple(check_number(v, name) for v in value))
    elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        spec = ValueSpec("set", (check_number(value, name),))
    else:
        items = _as_sequence(value, name)
        if items and all(isinstance(v, str) for v in items):
            specs = [_parse_token(v, name) for v in items]
            if len(specs) > 1 and any(s.kind == "range" for s in specs):
                raise SinganInsertError(
                    f"{name}: give either one range 'a:b' or a list of values, got {list(items)}.")
            spec = specs[0] if len(specs) == 1 else ValueSpec("set", tuple(s.values[0] for s in specs))
        elif len(items) == 2:
            spec = ValueSpec("range", parse_range(items, name))
        elif len(items) == 1:
            spec = ValueSpec("set", (check_number(items[0], name),))
        else:
            raise SinganInsertError(
                f"{name} must be a number, a range (low, high) or a set of values such as "
                f"{{0.5, 0.8, 1.5}}, got {value!r}. (A list of {len(items)} numbers is ambiguous: "
                "pass a set, or ValueSpec.choice(...).)")
    if integer:
        for v in spec.values:
            check_integer(v, name)
        spec = ValueSpec(spec.kind, tuple(int(v) for v in spec.values), integer=True)
        if spec.kind == "range" and (spec.low < 0) != (spec.high < 0):
            raise SinganInsertError(
                f"{name} range {value!r} must have both ends >= 0 or both < 0 (negative values "
                "count from the finest scale).")
    elif spec.integer:
        spec = ValueSpec(spec.kind, spec.values)
    return spec


def parse_contrast(value: Any, name: str = "contrast") -> ValueSpec:
    """The contrast factor :math:`\\lambda` as a :class:`ValueSpec` of positive values."""
    spec = parse_spec(value, name)
    for v in spec.values:
        check_contrast(v, name)
    return spec


def check_contrast_applies(contrast: Any, appearance: str, name: str = "contrast", default: Any = 1.0,
                           fixed_spelling: str = "appearance='fixed'") -> None:
    """Refuse contrast factors that would be ignored without a word.

    With ``appearance="auto"`` (the default) the model chooses each tumor's :math:`\\lambda`
    itself and the given one has no effect; a user who sets GBA's ``{0.5, 0.8, 1.5}`` there
    would train on the model's choice believing it was theirs. ``None`` or ``default`` (the
    caller's own default value) pass: they are what not choosing looks like.

    Args:
        contrast: the value as given (any spelling of :func:`parse_contrast`, or ``None``).
        appearance: ``"auto"`` or ``"fixed"``.
        name: the argument's name, for the message.
        default: the caller's default contrast.
        fixed_spelling: how to ask for the fixed appearance where the user is (e.g.
            ``"--appearance fixed"`` on the command line).
    """
    if appearance != "auto" or contrast is None:
        return
    given = parse_contrast(contrast, name)
    if set(given.values) <= set(parse_contrast(default, name).values):
        return
    raise SinganInsertError(
        f"{name}={given} has no effect with appearance 'auto' (the default), where the model chooses "
        f"each tumor's level in the target modality itself. To insert with these contrast factors "
        f"(the paper's or GBA's fixed lambda), pass {fixed_spelling}; to let the model choose, leave "
        f"{name} out.")


def parse_start_scale(value: Any, name: str = "start_scale") -> ValueSpec | None:
    """``None`` (the model's default) or a :class:`ValueSpec` of integer start scales."""
    return None if value is None else parse_spec(value, name, integer=True)


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------
def uniform01(rng: Generator = None) -> float:
    """A draw from :math:`U[0, 1)`: from ``rng`` or torch's global generator (``None``).

    ``rng`` is a ``numpy.random.Generator`` or a legacy ``numpy.random.RandomState`` (MONAI's
    ``self.R``, the global state nnU-Net's augmentation workers seed).
    """
    if rng is not None:
        return float(rng.random())
    return float(torch.rand(1, dtype=torch.float64).item())


def draw_integer(low: int, high: int, rng: Generator = None) -> int:
    """A uniform integer in ``[low, high]`` (both included)."""
    if rng is not None:
        integers = rng.integers if hasattr(rng, "integers") else rng.randint  # Generator / RandomState
        return int(integers(low, high + 1))
    return int(torch.randint(int(low), int(high) + 1, (1,)).item())


def draw_seed(rng: Generator = None) -> int:
    """A noise seed in ``[0, 2**31 - 1]`` (TorchIO's range for its own seeds)."""
    return draw_integer(0, 2**31 - 1, rng)


@dataclass(frozen=True)
class SampledParameters:
    """One draw of :class:`InsertionRanges`: what a deterministic insertion needs."""

    contrast: float
    start_scale: int | None
    flip: tuple[bool, bool, bool]
    rotation: tuple[float, float, float]
    scale: tuple[float, float, float]
    seed: int


@dataclass(frozen=True)
class InsertionRanges:
    """The random parameters of an insertion and their ranges, parsed once.

    Args:
        contrast: :math:`\\lambda` (see :func:`parse_contrast`), > 0.
        start_scale: ``None`` (the model's default) or start scales (see
            :func:`parse_start_scale`).
        flip_axes: world axes (0 = x, 1 = y, 2 = z) that may be flipped.
        flip_probability: probability of flipping each of ``flip_axes``, in ``[0, 1]``.
        degrees: rotation ranges (see :func:`parse_sextet`, centred on 0): :math:`\\theta_i
            \\sim U(a_i, b_i)`.
        scales: scaling ranges (centred on 1): :math:`s_i \\sim U(a_i, b_i)`, :math:`a_i > 0`.
        isotropic: one scale factor (the x range's) for all axes.

    Draws are made in a fixed order (flips, rotation, scale, start scale, contrast, seed) so a
    generator seeded the same way always gives the same parameters.
    """

    contrast: Any = 1.0
    start_scale: Any = None
    flip_axes: Sequence[int] = ()
    flip_probability: float = 0.5
    degrees: Any = 0.0
    scales: Any = 0.0
    isotropic: bool = True

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("contrast", parse_contrast(self.contrast))
        set_("start_scale", parse_start_scale(self.start_scale))
        axes = tuple(check_integer(a, "flip_axes", 0, 2) for a in _as_sequence(self.flip_axes, "flip_axes"))
        set_("flip_axes", axes)
        set_("flip_probability", check_probability(self.flip_probability, "flip_probability"))
        set_("degrees", parse_sextet(self.degrees, "degrees", around=0.0))
        scales = parse_sextet(self.scales, "scales", around=1.0)
        if min(scales) <= 0:
            raise SinganInsertError(f"scales must give factors > 0, got {self.scales!r}.")
        set_("scales", scales)
        if not isinstance(self.isotropic, (bool, np.bool_)):
            raise SinganInsertError(f"isotropic must be True or False, got {self.isotropic!r}.")
        set_("isotropic", bool(self.isotropic))

    def sample(self, rng: Generator = None, *, fixed_axes: Sequence[int] = ()) -> SampledParameters:
        """Draw one set of parameters.

        Args:
            rng: a ``numpy.random.Generator``, or ``None`` for torch's global generator.
            fixed_axes: world axes about which nothing rotates (a 2D target: the axis normal to
                its plane keeps the only rotation that stays in the plane).
        """
        flip = tuple(bool(a in self.flip_axes and uniform01(rng) < self.flip_probability)
                     for a in range(3))
        rotation = tuple(_uniform(self.degrees[2 * a], self.degrees[2 * a + 1], rng) for a in range(3))
        if fixed_axes:
            rotation = tuple(0.0 if a not in fixed_axes else r for a, r in enumerate(rotation))
        if self.isotropic:
            scale = (_uniform(self.scales[0], self.scales[1], rng),) * 3
        else:
            scale = tuple(_uniform(self.scales[2 * a], self.scales[2 * a + 1], rng) for a in range(3))
        start_scale = None if self.start_scale is None else int(self.start_scale.sample(rng))
        contrast = float(self.contrast.sample(rng))
        return SampledParameters(contrast=contrast, start_scale=start_scale, flip=flip,
                                 rotation=rotation, scale=scale, seed=draw_seed(rng))


def _uniform(low: float, high: float, rng: Generator) -> float:
    # A fixed range draws nothing, so adding a fixed parameter does not shift later draws.
    return low if low == high else low + (high - low) * uniform01(rng)


def _parse_token(token: str, name: str) -> ValueSpec:
    try:
        if ":" in token:
            low, high = (float(part) for part in token.split(":"))
            return ValueSpec("range", parse_range((low, high), name))
        return ValueSpec("set", (check_number(float(token), name),))
    except ValueError as error:
        if isinstance(error, SinganInsertError):
            raise
        raise SinganInsertError(
            f"{name}: cannot read {token!r}; write a number such as 0.5 or a range such as 0.5:1.5."
        ) from None


def _as_sequence(value: Any, name: str) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise SinganInsertError(f"{name} must be a number or a sequence of numbers, got {value!r}.")
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return tuple(value)
