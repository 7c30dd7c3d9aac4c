"""Checks shared by every layer: values that must be finite, arrays of the right kind.

Low in the package (it imports only :mod:`singan_insert.errors`), so the model, insertion and
the integrations validate the same way and say the same thing.
"""

from __future__ import annotations

import numpy as np
import torch

from singan_insert.errors import SinganInsertError

ArrayLike = np.ndarray | torch.Tensor


def check_finite(values: ArrayLike, name: str) -> None:
    """Raise a clear error when ``values`` holds NaN or infinity."""
    # Fast path: a finite sum proves every value finite (one pass, no boolean temporary).
    if torch.is_tensor(values):
        finite = bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all())
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            finite = bool(np.isfinite(np.sum(values))) or bool(np.isfinite(values).all())
    if not finite:
        raise SinganInsertError(
            f"The {name} contains NaN or infinite values; replace them (e.g. with "
            "numpy.nan_to_num) before passing it to singan-insert."
        )


def _as_numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


#: Largest seed accepted anywhere in the package (numpy's legacy range): every seed derived
#: from it (per scale, per worker, per case) still fits torch's and numpy's 64-bit seeds.
MAX_SEED = 2**32 - 1


def check_int(value: object, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as an ``int`` when it is an integer in ``[minimum, maximum]``.

    Python and numpy integers are accepted, and so are integral floats such as ``3.0`` (JSON and
    YAML readers produce them); a fractional ``2.5`` is refused rather than truncated, and so are
    ``bool``, NaN and strings.

    Raises:
        SinganInsertError: (a ``ValueError``) saying what was expected and what was given.
    """
    integral_float = (isinstance(value, (float, np.floating)) and np.isfinite(value)
                      and float(value).is_integer())
    if isinstance(value, (bool, np.bool_)) or not (isinstance(value, (int, np.integer)) or integral_float):
        raise SinganInsertError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    value = int(value)
    _check_range(value, name, minimum, maximum)
    return value


def check_real(
    value: object, name: str, minimum: float | None = None, maximum: float | None = None,
    *, open_minimum: bool = False, open_maximum: bool = False,
) -> float:
    """Return ``value`` as a ``float`` when it is a finite real number in the given interval.

    ``open_minimum`` / ``open_maximum`` exclude the bounds (``(0, 1)`` for a ratio).

    Raises:
        SinganInsertError: NaN, infinity, a bool, a non-number or a value out of range.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SinganInsertError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not np.isfinite(value):
        raise SinganInsertError(f"{name} must be a finite number, got {value}.")
    _check_range(value, name, minimum, maximum, open_minimum, open_maximum)
    return value


def check_positive(value: object, name: str) -> float:
    """``value`` as a finite float > 0."""
    return check_real(value, name, 0, open_minimum=True)


def check_non_negative(value: object, name: str) -> float:
    """``value`` as a finite float >= 0."""
    return check_real(value, name, 0)


def check_probability(value: object, name: str) -> float:
    """``value`` as a float in ``[0, 1]``."""
    return check_real(value, name, 0, 1)


def check_spacing(spacing: object, ndim: int, name: str = "spacing") -> tuple[float, ...]:
    """``spacing`` as ``ndim`` finite floats > 0 (mm per pixel or voxel, in array-axis order).

    A sequence of another length is refused, not cut: a 3D spacing given for a 2D slice says
    nothing about which two of its values belong to the slice's axes.
    """
    try:
        values = tuple(spacing)  # type: ignore[arg-type]
    except TypeError:
        values = None
    if values is None or len(values) != ndim:
        raise SinganInsertError(
            f"{name} must hold {ndim} positive numbers (mm per {'pixel' if ndim == 2 else 'voxel'}, one per "
            f"array axis), got {spacing!r}." + (" For a slice of a volume, pass the in-plane pair, e.g. "
                                                "nifti_spacing(image)[:2] for an axial slice." if ndim == 2 else ""))
    return tuple(check_positive(v, f"{name}[{i}]") for i, v in enumerate(values))


def check_seed(seed: object, name: str = "seed") -> int:
    """An integer seed in ``[0, MAX_SEED]`` (``2**32 - 1``), as ``int``."""
    return check_int(seed, name, 0, MAX_SEED)


def check_placement_region(region: np.ndarray, values: tuple[int, ...] | None, key: object) -> np.ndarray:
    """The voxels of the placement label map ``region`` (named ``key``) that may receive a tumor.

    Those with a value in ``values``; with ``values=None``, the non-zero ones of a map that holds
    ONE non-zero value: a map of several labels (a tumor and a cochlea, a tissue map) is refused
    rather than taken whole, since which of its labels is meant cannot be guessed.
    """
    region = np.asarray(region)
    if values is not None:
        return np.isin(region, values)
    inside = region != 0
    present = region[inside]
    if present.size and (present != present.flat[0]).any():
        present = np.unique(present)
        shown = ", ".join(f"{v:g}" for v in present[:10].astype(float))
        fractional = np.issubdtype(present.dtype, np.floating) and (present != np.round(present)).any()
        raise SinganInsertError(
            f"The placement region {key!r} holds several labels ({shown}); choose the region with "
            "placement_values=(...), e.g. (1,) (crossMoDA: 1 = schwannoma, 2 = cochlea)."
            + (" Its values are not all integers: threshold it, or resample it with nearest-neighbour "
               "interpolation." if fractional else ""))
    return inside


def _check_range(value, name, minimum, maximum, open_minimum=False, open_maximum=False) -> None:
    low_bad = minimum is not None and (value <= minimum if open_minimum else value < minimum)
    high_bad = maximum is not None and (value >= maximum if open_maximum else value > maximum)
    if not (low_bad or high_bad):
        return
    if maximum is None:
        allowed = f"{'>' if open_minimum else '>='} {_show(minimum)}"
    elif minimum is None:
        allowed = f"{'<' if open_maximum else '<='} {_show(maximum)}"
    else:
        allowed = (f"in {'(' if open_minimum else '['}{_show(minimum)}, "
                   f"{_show(maximum)}{')' if open_maximum else ']'}")
    raise SinganInsertError(f"{name} must be {allowed}, got {_show(value)}.")


def _show(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"
