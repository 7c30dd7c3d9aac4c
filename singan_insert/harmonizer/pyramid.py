"""Scale geometry of the SinGAN pyramid, and the one resizing function everything uses.

Scale indices
-------------
Our scale index ``s`` runs from ``0`` (coarsest) to ``N - 1`` (finest), like the official
SinGAN code. The paper writes the generators :math:`G_1 \\dots G_N` (finest :math:`G_N`) and
harmonizes with :math:`G_N \\circ \\dots \\circ G_n`; our ``start_scale = s`` is the paper's
:math:`n = s + 1`, and runs :math:`N - s` generators. The official code's
``--harmonization_start_scale``, which GBA's code uses, is the same 0-based index as ours:
with :math:`K` scales, GBA's start scale :math:`K - k^*` runs the :math:`k^*` finest generators
(GBA: 17 scales, start 13-15, so 4 to 2 generators). A negative ``start_scale`` counts from
the finest, as Python indices do: ``-1`` runs the finest generator only, ``-3`` the three finest.

| our ``start_scale`` | paper's :math:`n` | generators run | official / GBA index |
|---|---|---|---|
| ``s`` (or ``s - N``) | ``s + 1`` | :math:`G_{s+1}..G_N` (``N - s`` of them) | ``s`` |

Geometry
--------
Given a training slice of shape :math:`(H, W)`, a factor :math:`r \\in (0, 1)`, ``min_size`` and
``max_size``: the slice is first shrunk (never enlarged) so that :math:`\\max(H, W) \\le`
``max_size``; the number of scales is

.. math:: N = \\left\\lceil \\log_r \\frac{\\text{min\\_size}}{\\min(H, W)} \\right\\rceil + 1,

and the factor is then adjusted to :math:`r' = (\\text{min\\_size} / \\min(H, W))^{1/(N-1)}` so
that the coarsest scale's short side is exactly ``min_size`` (as in the official code). Scale
``s`` has shape :math:`\\operatorname{round}(r'^{\\,N-1-s} (H, W))`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from singan_insert.errors import SinganInsertError


@dataclass(frozen=True)
class PyramidGeometry:
    """Shapes of the scales of one pyramid, coarsest first.

    Args:
        sizes: ``(height, width)`` per scale, coarsest first.
        scale_factor: the adjusted factor :math:`r'` between consecutive scales.
    """

    sizes: tuple[tuple[int, int], ...]
    scale_factor: float

    @classmethod
    def from_shape(
        cls,
        shape: tuple[int, int],
        scale_factor: float = 0.75,
        min_size: int = 25,
        max_size: int = 250,
    ) -> "PyramidGeometry":
        """Build the geometry for a training slice of ``shape`` (see the module docstring)."""
        if not 0 < scale_factor < 1:
            raise SinganInsertError(f"scale_factor must be in (0, 1), got {scale_factor}.")
        if min_size < 4:
            raise SinganInsertError(f"min_size must be at least 4 pixels, got {min_size}.")
        if max_size < min_size:
            raise SinganInsertError(f"max_size ({max_size}) must be >= min_size ({min_size}).")
        height, width = (int(v) for v in shape)
        if min(height, width) < min_size:
            raise SinganInsertError(
                f"The training slice ({height}x{width}) is smaller than min_size={min_size}. "
                "Use a larger slice or crop, or lower min_size."
            )
        shrink = min(max_size / max(height, width), 1.0)
        finest = (max(round(height * shrink), 1), max(round(width * shrink), 1))
        short = min(finest)
        if short < min_size:
            raise SinganInsertError(
                f"After shrinking to max_size={max_size} the short side is {short} < "
                f"min_size={min_size}; the slice is too elongated. Crop it or raise max_size."
            )
        num_scales = math.ceil(math.log(min_size / short) / math.log(scale_factor) - 1e-9) + 1
        num_scales = max(num_scales, 1)
        factor = (min_size / short) ** (1 / (num_scales - 1)) if num_scales > 1 else scale_factor
        sizes = tuple(
            (max(round(finest[0] * factor ** (num_scales - 1 - s)), 1),
             max(round(finest[1] * factor ** (num_scales - 1 - s)), 1))
            for s in range(num_scales)
        )
        return cls(sizes=sizes, scale_factor=float(factor))

    @property
    def num_scales(self) -> int:
        return len(self.sizes)

    @property
    def finest(self) -> tuple[int, int]:
        return self.sizes[-1]

    def relative_scale(self, scale: int) -> float:
        """Linear size of ``scale`` relative to the finest scale, :math:`r'^{N-1-s}`."""
        return self.scale_factor ** (self.num_scales - 1 - scale)

    def sizes_for(self, finest_shape: tuple[int, int]) -> tuple[tuple[int, int], ...]:
        """Scale shapes for an image of any ``finest_shape`` (harmonization of other sizes)."""
        height, width = finest_shape
        return tuple(
            (max(round(height * self.relative_scale(s)), 1), max(round(width * self.relative_scale(s)), 1))
            for s in range(self.num_scales)
        )

    def resolve_start_scale(self, start_scale: int, lowest: int) -> int:
        """Turn a possibly negative ``start_scale`` into an index in ``[lowest, N-1]``."""
        if isinstance(start_scale, bool) or not isinstance(start_scale, int):
            raise SinganInsertError(f"start_scale must be an integer, got {start_scale!r}.")
        resolved = start_scale + self.num_scales if start_scale < 0 else start_scale
        if not lowest <= resolved < self.num_scales:
            raise SinganInsertError(
                f"start_scale={start_scale} is out of range: this model harmonizes from scales "
                f"{lowest}..{self.num_scales - 1} (or {lowest - self.num_scales}..-1 counted "
                "from the finest)."
            )
        return resolved

    def to_dict(self) -> dict:
        return {"sizes": [list(s) for s in self.sizes], "scale_factor": self.scale_factor}

    @classmethod
    def from_dict(cls, data: dict) -> "PyramidGeometry":
        return cls(tuple(tuple(int(v) for v in s) for s in data["sizes"]), float(data["scale_factor"]))


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a ``(B, C, H, W)`` float tensor, anti-aliased when shrinking.

    Runs on the tensor's device in its dtype: no uint8 round trips, no numpy resizer.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image
    shrinking = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=shrinking)


def resize_source_span(start: int, stop: int, source_size: int, size: int) -> tuple[int, int]:
    """The source pixels ``[a, b)`` that :func:`resize` from ``source_size`` to ``size`` pixels (along
    one axis) reads for its output pixels ``[start, stop)``.

    PyTorch's bicubic interpolation (``align_corners=False``) samples output pixel :math:`i` at
    :math:`(i + 0.5)\\,s - 0.5` with :math:`s` = ``source_size / size`` and four taps; a shrink's
    anti-aliasing widens them by :math:`s`. One pixel more on each side covers the rounding. The
    same size is no resize: the span is the output's.
    """
    if source_size == size:  # resize returns the image itself
        return start, stop
    ratio = source_size / size
    taps = 2 * max(ratio, 1.0)
    first = math.floor((start + 0.5) * ratio - 0.5 - taps) - 1
    last = math.ceil((stop - 0.5) * ratio - 0.5 + taps) + 1
    return max(first, 0), min(last + 1, source_size)
