"""Percentile normalisation of intensities into the harmonizer's range :math:`[-1, 1]`.

.. math::

    \\hat x = \\operatorname{clip}\\left(2\\,\\frac{x - p_{lo}}{p_{hi} - p_{lo}} - 1,\\; -1,\\; 1\\right),

where :math:`p_{lo}, p_{hi}` are the image's ``(0.5, 99.5)`` percentiles by default, and back by
the inverse affine map. The model stores the percentiles it was trained with, so that a target
volume is normalised the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from singan_insert.checks import ArrayLike, _as_numpy, check_finite
from singan_insert.errors import SinganInsertError


@dataclass(frozen=True)
class PercentileNormalization:
    """Robust affine map of intensities to :math:`[-1, 1]` (see the module docstring).

    Args:
        low: intensity mapped to -1 (the ``percentiles[0]`` percentile of the fitted data).
        high: intensity mapped to +1; must be greater than ``low``.
        percentiles: the percentiles ``low`` and ``high`` were fitted at, in [0, 100].
    """

    low: float
    high: float
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high)):
            raise SinganInsertError("Normalization bounds must be finite numbers.")
        if self.high <= self.low:
            raise SinganInsertError(
                f"The image is constant over its robust range (p{self.percentiles[0]} = "
                f"p{self.percentiles[1]} = {self.low:g}): there is nothing to learn or harmonize. "
                "Check that you passed the right image or slice."
            )

    @classmethod
    def fit(
        cls,
        image: ArrayLike,
        mask: ArrayLike | None = None,
        percentiles: tuple[float, float] = (0.5, 99.5),
    ) -> "PercentileNormalization":
        """Fit the percentiles of ``image`` (restricted to ``mask`` when given)."""
        values = _as_numpy(image)
        check_finite(values, "image")
        if mask is not None:
            values = values[_as_numpy(mask) > 0]
            if values.size == 0:
                raise SinganInsertError("The mask used to fit the normalisation is empty.")
        low, high = np.percentile(values, percentiles)
        return cls(float(low), float(high), (float(percentiles[0]), float(percentiles[1])))

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Map intensities to the model's range :math:`[-1, 1]` (clipped)."""
        return (2 * (x - self.low) / (self.high - self.low) - 1).clamp(-1, 1)

    def from_model(self, y: torch.Tensor) -> torch.Tensor:
        """Map model-range values back to intensities (inverse of :meth:`to_model`)."""
        return (y + 1) / 2 * (self.high - self.low) + self.low

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PercentileNormalization":
        return cls(float(data["low"]), float(data["high"]), tuple(data["percentiles"]))
