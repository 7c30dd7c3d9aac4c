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
