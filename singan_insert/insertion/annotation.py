"""B's tumor look from ONE annotated training slice (the optional one-slice annotation).

Without an annotation the automatic appearance has to infer from the bare training slice where
B's tumor level lies (:func:`~singan_insert.insertion.appearance.choose_level`). A user who marks
the tumor on that one slice (:meth:`~singan_insert.Harmonizer.annotate`, or ``singan-insert train
--label L --annotate``) tells the model directly. Numbers are measured on that
slice :math:`x` (model units, i.e. percentile-normalised to :math:`[-1, 1]`; model pixel size),
over the annotated tumor :math:`T`, its interior :math:`T^-` (eroded by up to 2 px) and the ring
:math:`R` of background within ``shell_mm``:

.. math::

    \\mu = \\overline{x}_T, \\qquad
    s = \\operatorname{sd}_r\\big(L(x)\\big)_{T^-}, \\qquad
    t = \\operatorname{sd}_r\\big(x - L(x)\\big)_{T^-}, \\quad L(x) = \\frac{G_{1.5} * (x M_T)}{G_{1.5} * M_T},

the tumor's normalised level, its internal spread (structure at the scale the low-pass error
looks at) and its texture, the rest (with its in-plane correlation width, measured as the automatic
appearance measures the rim's, :func:`~singan_insert.insertion.appearance.inject_texture`) (:math:`\\operatorname{sd}_r` is the robust sd, :math:`1.4826\\,` MAD, so
that a cyst or a vessel does not count as spread); the contrast :math:`\\mu - \\overline{x}_R` is
recorded too, and the means over the tumor's outermost pixels (:func:`tumor_edge`) and over the
rest, its interior: B's edge is mixed with what surrounds the tumor, so it has a level of its
own. A new tumor whose mapped intensities :math:`v_1` (``lambda = 1``) have internal spread
:math:`s_1` (measured the same way on the composite, in the target's model units) becomes

.. math:: v = \\mu + \\frac{s}{s_1}\\,(v_1 - \\bar v_1)

(in the target's model units), keeping the source's internal structure (its ranks) with B's
spread, and gets texture up to :math:`t` (:func:`~singan_insert.insertion.appearance.inject_texture`).
The LEVEL is carried over, not the contrast to the ring: what surrounds a tumor varies (CSF,
brainstem, bone), so its contrast to the ring varies far more than its normalised level (on 20
simulated hrT2 subjects, seeds 200-219, ``benchmarks/dev_annotation_facts.py``: sd 0.22 against
0.04 model units). The visibility floor still holds: a
level within ``2 * visibility_floor`` of the new tumor's surroundings is moved that far away from
them. What one slice cannot tell: tumors of B that differ from the annotated one (another
level, cysts of another brightness) get the annotated tumor's look.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from singan_insert.errors import SinganInsertError

#: Sd (model px) of the low-pass under which the internal spread is measured.
STRUCTURE_SIGMA_PX = 1.5
#: At most this much erosion (px) of the tumor before its interior is measured.
MAX_EROSION_PX = 2
#: Edges (mm, in-plane distance outside the tumor) of the bands of B's rim profile: the 1-3 mm
#: around a tumor that B shows (in hrT2, the CSF cleft of the cistern the tumor has widened).
RIM_EDGES_MM = (0.0, 1.0, 2.0, 3.0)
#: The rim's widths follow the tumor's size (:func:`rim_scale`) within this factor either way.
RIM_SCALE_RANGE = (0.5, 2.0)


@dataclass(frozen=True)
class TumorProfile:
    """B's tumor look measured on an annotated training slice (model units; see the module docstring)."""

    contrast: float
    structure_std: float
    texture_std: float
    tumor_mean: float
    shell_mean: float
    tumor_pixels: int
    texture_width_px: float = 0.0
    rim_levels: tuple[float, ...] = ()
    radius_mm: float = 0.0
    edge_mean: float = float("nan")
    interior_mean: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        def finite_or_none(value: float) -> float | None:  # JSON has no NaN
            return round(value, 5) if np.isfinite(value) else None

        return {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @classmethod
    def measure(cls, image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float] | None,
                shell_mm: float) -> "TumorProfile":
        """Measure ``image`` (2D, model units) over the tumor ``mask`` (2D bool) and its ring."""
        from singan_insert.insertion.appearance import correlation_width, masked_lowpass, ring

        image = np.asarray(image, dtype=np.float64)
        mask = np.asarray(mask, dtype=bool)
        if image.ndim != 2 or mask.shape != image.shape:
            raise SinganInsertError(f"A tumor profile needs a 2D image and a mask of its shape, got "
                                    f"{image.shape} and {mask.shape}.")
        if not mask.any():
            raise SinganInsertError("The tumor annotation is empty.")
        shell = ring(mask[None], spacing or (1.0, 1.0), shell_mm)[0]
        if not shell.any():
            raise SinganInsertError("The annotated tumor covers the whole training slice: there are no "
                                    "surroundings to measure its contrast against.")
        structure, texture = interior_spread(image[None], mask[None])
        tumor_mean, shell_mean = float(image[mask].mean()), float(image[shell].mean())
        rest = image[None] - masked_lowpass(image[None], mask[None], STRUCTURE_SIGMA_PX)
        width = correlation_width(rest, tumor_interior(mask[None]), 1, 2)
        rim = tuple(float(v) for v in rim_profile(image[None], mask[None], spacing or (1.0, 1.0)))
        edge = tumor_edge(mask[None])[0]
        interior = mask & ~edge
        return cls(tumor_mean - shell_mean, structure, texture, tumor_mean, shell_mean, int(mask.sum()), width,
                   rim, equivalent_radius_mm(mask[None], spacing or (1.0, 1.0)), float(image[edge].mean()),
                   float(image[interior].mean()) if interior.any() else float("nan"))

    @classmethod
    def of(cls, harmonizer: Any, shell_mm: float) -> "TumorProfile | None":
        """The profile of a harmonizer's annotated training slice (cached on it), or ``None``."""
        annotation = getattr(harmonizer, "tumor_annotation", None)
        if annotation is None or getattr(harmonizer, "training_slice", None) is None:
            return None
        cache = harmonizer.__dict__.setdefault("_tumor_profile", {})
        if shell_mm not in cache:
            cache[shell_mm] = cls.measure(harmonizer.training_slice.numpy(), annotation.numpy() > 0.5,
                                          harmonizer.spacing, shell_mm)
        return cache[shell_mm]


def rim_profile(slices: np.ndarray, mask: np.ndarray, spacing: tuple[float, float],
                edges_mm: tuple[float, ...] = RIM_EDGES_MM, distance: np.ndarray | None = None) -> np.ndarray:
    """Mean of ``(S, H, W)`` ``slices`` in each band ``(edges[i], edges[i+1]]`` mm outside the
    ``mask`` (:func:`~singan_insert.insertion.appearance.inplane_distance`); NaN for a band with
    no pixel. ``distance``: that distance, when the caller has it already."""
    from singan_insert.insertion.appearance import inplane_distance

    distance = inplane_distance(mask, spacing) if distance is None else distance
    slices = np.asarray(slices, dtype=np.float64)
    means = []
    for low, high in zip(edges_mm[:-1], edges_mm[1:]):
        band = (distance > low) & (distance <= high)
        means.append(float(slices[band].mean()) if band.any() else float("nan"))
    return np.array(means)


def tumor_edge(mask: np.ndarray) -> np.ndarray:
    """Per slice of the ``(S, H, W)`` ``mask``: its outermost pixels, those with a 4-neighbour
    outside it (in-plane).

    These are the pixels a scanner's point-spread function mixes with the tumor's surroundings:
    in hrT2, with the bright cleft. Counted in pixels, not mm, because that mixing is the
    image's own, on its own grid. On the annotated slices of the simulated crossMoDA pipelines
    they are 0.055-0.095 of the range brighter than the tumor's interior, as in the real hrT2
    around real tumors; a composite mixed with the washed-out target had them no brighter.
    """
    from scipy.ndimage import binary_erosion, generate_binary_structure

    mask = np.asarray(mask, dtype=bool)
    # A tumor cut by the image's border (a field of view, clip_to_fov) goes on beyond it: no edge there.
    return mask & ~binary_erosion(mask, generate_binary_structure(2, 1)[None], border_value=1)


def equivalent_radius_mm(mask: np.ndarray, spacing: tuple[float, float]) -> float:
    """Radius (mm) of the disc whose area is the largest in-plane cross-section of the ``(S, H, W)``
    ``mask``: a tumor's size, the same on every slice of it (its end slices are small cuts of
    the same tumor, and so of the same cistern around it)."""
    areas = np.asarray(mask, dtype=bool).reshape(len(mask), -1).sum(axis=1)
    return float(np.sqrt(areas.max(initial=0) * spacing[0] * spacing[1] / np.pi))


def rim_scale(profile: "TumorProfile", mask: np.ndarray, spacing: tuple[float, float]) -> float:
    """Factor on :data:`RIM_EDGES_MM` for a new tumor ``mask`` (``(S, H, W)``, pixel size ``spacing``):

    .. math:: k = \\operatorname{clip}\\big(r / r_a,\\ 0.5,\\ 2\\big),

    the new tumor's :func:`equivalent_radius_mm` :math:`r` over the annotated tumor's
    :math:`r_a`: the rim keeps its proportions to the tumor. A schwannoma widens the cistern it
    grows in, so a larger tumor sits in a wider CSF cleft; in the simulated hrT2 of seeds
    200-219 the bright band reaches 1-1.25 mm out around 3-4 mm tumors and 1.75-2 mm around
    9-10 mm ones (width and radius correlate +0.90, ``benchmarks/dev_annotation_facts.py``),
    and a rim carried over from another subject is 23 % closer to the truth scaled than in mm.
    That is the simulator's anatomy; where B's clefts are known not to grow with the tumor,
    ``InsertionParameters(rim_scale=1)`` keeps the annotated widths.
    The clip keeps a tiny or huge tumor from getting no rim or a wide halo from one slice's
    evidence. 1 for a profile without a radius (a model annotated by an earlier version measures
    it again on load, so this only concerns hand-made profiles).
    """
    if profile.radius_mm <= 0:
        return 1.0
    low, high = RIM_SCALE_RANGE
    return float(np.clip(equivalent_radius_mm(mask, spacing) / profile.radius_mm, low, high))


def render_rim(harmonized: np.ndarray, mask: np.ndarray, spacing: tuple[float, float],
               rim_levels: tuple[float, ...], normalization: Any,
               edges_mm: tuple[float, ...] = RIM_EDGES_MM,
               distance: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Give the surroundings of a new tumor B's rim: the annotated tumor's band levels.

    The pasted tumor brings no surroundings of its own, and the target's are those of a place
    without a tumor (after a CycleGAN, of a tumor washed out): in hrT2 a schwannoma sits in the
    CSF cleft of the cistern it has widened, a bright 1-2 mm that the pyramid does not invent.
    With the band means :math:`\\ell_b` of the annotated slice (model units, bands
    :math:`(e_b, e_{b+1}]` mm of in-plane distance :math:`d` outside the tumor) and the band
    means :math:`c_b` of the harmonized slices, every pixel of band :math:`b` moves by

    .. math:: v \\leftarrow v + (\\ell_b - c_b),

    an additive shift: the target's own texture and anatomy stay, only each band's mean level
    becomes B's (steps between bands are what a cleft looks like; the 0.8-1 mm pixels of a band
    are few, so a smoother profile would not be resolved anyway). A band already at B's level (a
    target that shows the cleft) is left as it is; pixels beyond the last edge are not touched.

    Args:
        harmonized: ``(S, H, W)`` tumor slices (target units).
        mask: ``(S, H, W)`` tumor mask of those slices.
        spacing: in-plane pixel size (mm).
        rim_levels: :attr:`TumorProfile.rim_levels` (model units; NaN bands are skipped).
        normalization: the target's :class:`~singan_insert.harmonizer.normalization.PercentileNormalization`.
        edges_mm: band edges (mm), increasing from 0.
        distance: :func:`~singan_insert.insertion.appearance.inplane_distance` of ``mask``, when
            the caller has it already.

    Returns:
        The new slices and a record (band levels before and after, target units, and the shift).
    """
    import torch

    from singan_insert.insertion.appearance import inplane_distance

    edges = np.asarray(edges_mm, dtype=np.float64)
    if len(rim_levels) != len(edges) - 1:
        raise SinganInsertError(f"{len(rim_levels)} rim levels for {len(edges) - 1} bands: the annotation "
                                "profile and the band edges disagree.")
    distance = inplane_distance(mask, spacing) if distance is None else distance
    targets = normalization.from_model(torch.tensor(np.asarray(rim_levels, np.float64))).numpy()
    before = rim_profile(harmonized, mask, spacing, edges_mm, distance)
    offsets = np.where(np.isfinite(targets) & np.isfinite(before), targets - before, 0.0)
    band = np.searchsorted(edges, distance, side="left") - 1  # (e_b, e_{b+1}] -> b; inside -> -1
    inside_bands = (band >= 0) & (band < len(offsets))
    field = np.where(inside_bands, offsets[np.clip(band, 0, len(offsets) - 1)], 0.0)
    out = (harmonized + field).astype(harmonized.dtype)
    after = before + offsets  # every pixel of a band moved by its offset

    def listed(values):  # JSON has no NaN
        return [round(float(v), 5) if np.isfinite(v) else None for v in values]

    return out, {"edges_mm": [float(e) for e in edges], "target": listed(targets), "before": listed(before),
                 "after": listed(after)}


def interior_spread(slices: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Robust sds of the low-pass (:data:`STRUCTURE_SIGMA_PX`) and of the rest (the high-pass) of
    ``(S, H, W)`` ``slices`` over the interior of the ``(S, H, W)`` bool ``mask``."""
    from singan_insert.insertion.appearance import masked_lowpass, robust_std

    slices = np.asarray(slices, dtype=np.float64)
    interior = tumor_interior(mask)
    low = masked_lowpass(slices, mask, STRUCTURE_SIGMA_PX)
    return robust_std(low[interior]), robust_std((slices - low)[interior])


def tumor_interior(mask: np.ndarray) -> np.ndarray:
    """The ``(S, H, W)`` mask eroded in-plane by up to :data:`MAX_EROSION_PX` (keeping >= 4 px):
    where a tumor's texture is measured, away from its edge's partial volume."""
    from scipy.ndimage import binary_erosion, generate_binary_structure

    interior = np.asarray(mask, dtype=bool)
    in_plane = generate_binary_structure(2, 1)[None]
    for _ in range(MAX_EROSION_PX):
        eroded = binary_erosion(interior, in_plane)
        if eroded.sum() < 4:
            break
        interior = eroded
    return interior
