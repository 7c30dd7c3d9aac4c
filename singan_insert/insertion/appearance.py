"""The automatic appearance of an inserted tumor: its level in B, chosen by realism, and B's texture.

A tumor pasted from modality A carries A's contrast: in crossMoDA a ceT1 schwannoma is bright
and its CSF surroundings dark, while in hrT2 the tumor is darker than the CSF around it. A
fixed contrast factor :math:`\\lambda` is right for one tumor and wrong for the next, and at
:math:`\\lambda = 1` the tumor takes the CSF's brightness and vanishes. Here the level is
chosen per tumor, by the model's ONE training slice of B (which shows a real tumor of B):

**Realism score.** For a candidate tumor mean level :math:`L` (in the model's units
:math:`[-1, 1]`), the tumor slices are rendered with the tumor region at :math:`L` and cut to
the model's pixel size, then shrunk by each factor :math:`f \\in` ``factors`` (default 0.5: a
patch of 9 px then covers 18 model pixels, about 7 mm at 0.4 mm, a small tumor with its rim).
Every patch centred on the tumor or its rim is compared with its nearest neighbour among the training slice's patches
at the same factor,

.. math::

    S(L) = \\sum_f \\frac{1}{|Q_f|} \\sum_{q \\in Q_f} \\min_{p \\in P_f} \\lVert q(L) - p \\rVert_2 .

A level that exists in B next to such surroundings (a tumor in CSF) has near neighbours; a
level B never shows there (a grey blob as bright as nothing around it) has none. At the finest
scale alone the best match is often the surroundings' own level (the tumor vanished into CSF),
which is why a coarser factor, whose patches see the blob in its rim, decides. (Measured on
12 simulated subjects, ``benchmarks/dev_harmonizer.py``: factor 0.5 with 9 px patches chose
levels closer to the truth than 0.5 + 0.25 with 7 px, 0.35, or 1 + 0.5 + 0.25.)

**Visibility constraint.** Only levels with :math:`|L - \\bar s| \\ge 2\\,\\phi` are eligible,
where :math:`\\bar s` is the mean of the background within ``shell_mm`` of the tumor (model
units) and :math:`\\phi` the ``visibility_floor`` as a fraction of the model's range: "vanished"
is never chosen.

**Side, then level.** :math:`S` alone prefers the side of :math:`\\bar s` where a tumor can
almost hide: a level just past the floor in dark surroundings matches the training slice's
plentiful dark regions (air, bone, CSF) nearly exactly, whatever B's tumors look like. So the
side (darker or brighter than :math:`\\bar s`) is that of the eligible level with the least
realism cost per unit of visibility, :math:`S(L) / V(L)`, where :math:`V(L)` is the mean distance
of the scored patches from the same patches :math:`q(\\varnothing)` without the tumor
(:meth:`PatchBank.score_and_visibility`),

.. math::

    V(L) = \\sum_f \\frac{1}{|Q_f|} \\sum_{q \\in Q_f} \\lVert q(L) - q(\\varnothing) \\rVert_2 ;

the level is then the one with the lowest :math:`S` on that side, refined by a parabola through
its neighbours. (Measured with models trained on one hrT2 and on one ceT1 slice of the simulator,
hrT2 tumors inserted into ceT1 the other way round: :math:`S` alone put an enhancing ceT1 tumor
on the dark side for 51 of 52 subjects and an hrT2 one on the wrong side for 1 of 44;
:math:`S / V` for the side put all 96 on the right one, and for hrT2 left the chosen level
unchanged on the other 43. :math:`S / V` alone is no level chooser: it prefers the extremes.)
The choice is flagged as ambiguous (the insertion warns: the side may be wrong, and an annotation
of the training slice's tumor decides it) unless realism alone confirms the side: unless the
chosen side's best level scores at least :data:`AMBIGUOUS_MARGIN` better in :math:`S` than the
other side's best. (:math:`S / V`'s own margin between the sides mostly measures the room each
side has, so it is not the measure of doubt.)

**Mapping.** The tumor's mapped intensities :math:`v_1` (``"normalized"`` or ``"matched"`` at
:math:`\\lambda = 1`) keep their internal structure (ranks and relative contrasts); their mean
is moved to the chosen level :math:`\\ell` (in intensity units) and their deviations scaled by
:math:`g = \\min(\\max(\\lambda^*, 0), 1)`,

.. math::

    v = \\ell + g\\,(v_1 - \\bar v_1), \\qquad \\lambda^* = \\frac{\\ell - t_{lo}}{\\bar v_1 - t_{lo}},

where :math:`t_{lo}` is the target's dark reference: for :math:`\\lambda^* \\le 1` this is exactly
the paper's contrast factor, :math:`v = t_{lo} + \\lambda^* (v_1 - t_{lo})`, chosen by the model
per tumor (a user's :math:`\\lambda` has no effect here); a tumor that must be brightened is
shifted rather than stretched, so a source tumor near the dark end does not get its noise
multiplied. A level at or below the dark reference gives :math:`\\lambda^* \\le 0` (recorded as
is) and a flat tumor. The record's ``level`` is the level chosen before harmonization;
``record["tumor"]["output_mean"]`` is the tumor's mean in the output.

**Edge.** Candidates and the final composite are rendered with a partial-volume edge,
:math:`(1 - f)\\,\\text{background} + f\\,\\text{tumor}` with :math:`f = G_{0.5} * M` within and
across slices (:func:`partial_volume`), as any scanner's point-spread function mixes a tumor's
edge voxels with their surroundings, on both sides of the edge.

**Texture.** After harmonization, seeded zero-mean noise is added inside the mask so that the
tumor's high-pass energy matches that of B's tissue around it:

.. math::

    x \\leftarrow x + a\\, \\frac{h(n)}{\\operatorname{sd}(h(n))},\\qquad
    a = \\sqrt{\\max(\\sigma_B^2 - \\sigma_x^2, 0)},

where :math:`h(y) = y - G_1 * y` is the in-plane high-pass (Gaussian :math:`\\sigma = 1` px),
:math:`\\operatorname{sd}(h(n))` is taken over the tumor's voxels (at least half the whole noise
field's, so that a tumor of a few voxels does not get its noise multiplied),
:math:`\\sigma_B` the robust sd (:math:`1.4826\\,` median absolute deviation, so that the edges of
structures crossing the rim do not count as texture) of :math:`h` of the background within
``shell_mm`` of the tumor, :math:`\\sigma_x` that of the harmonized tumor's interior (eroded by up
to 2 px, away from its edge), and :math:`n` Gaussian noise of the given seed with B's correlation
there: white noise smoothed by a Gaussian whose
in-plane and through-plane widths :math:`s` reproduce the lag-1 autocorrelations :math:`\\rho` of
:math:`h` in the rim (robust: :math:`\\rho = (\\sigma_+^2 - \\sigma_-^2) / (\\sigma_+^2 + \\sigma_-^2)` with
:math:`\\sigma_\\pm` the robust sds of the sum and difference of neighbours) (:math:`\\rho = e^{-1/(4 s^2)}`; white, :math:`s = 0`, for :math:`\\rho \\le 0.05`,
e.g. acquisition noise, independent across slices). The mean level is unchanged in expectation.
B's tumor may be smoother (or rougher) than its surroundings, so with the training slice at
hand :math:`\\sigma_B` is read from it instead (:class:`TextureBank`): the high-pass energy of the
training-slice regions whose low-pass look is nearest to the harmonized tumor's. (Choosing the
amplitude by the nearest-neighbour distance of textured candidates does not work: a smooth
patch is always nearer to noisy patches than a noisy one is, so it always picks "no texture".)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from singan_insert.errors import SinganInsertError
from singan_insert.harmonizer.pyramid import resize

#: Shrink factors (relative to the model's pixel size) at which patches are compared.
DEFAULT_FACTORS: tuple[float, ...] = (0.5,)
#: Side of the compared patches in pixels.
PATCH_SIZE = 9
#: Candidate levels of the first pass (model units, evenly spaced over [-1, 1]).
NUM_LEVELS = 17
#: Default minimum |tumor - surroundings| difference, as a fraction of the model's range.
DEFAULT_VISIBILITY_FLOOR = 0.05
#: At most this many bank patches per factor and query patches per candidate and factor.
MAX_BANK_PATCHES = 2048
MAX_QUERY_PATCHES = 256
#: At most this many tumor slices (the largest, evenly spread) take part in the choice.
MAX_SCORED_SLICES = 4
#: Texture: side of the low-pass patches matched against the training slice's (model pixels).
TEXTURE_PATCH_SIZE = 5
#: Largest correlation width (px) :func:`correlation_width` gives a texture.
MAX_TEXTURE_WIDTH_PX = 3.0


class PatchBank:
    """Patches of a harmonizer's training slice at several shrink factors (see the module docstring).

    Args:
        training_slice: the slice in the model's units, ``(H, W)`` at the model's pixel size.
        factors: shrink factors in (0, 1].
        patch_size: odd patch side in pixels (>= 3).
    """

    def __init__(self, training_slice: torch.Tensor, factors: Sequence[float] = DEFAULT_FACTORS,
                 patch_size: int = PATCH_SIZE):
        if patch_size < 3 or patch_size % 2 == 0:
            raise SinganInsertError(f"patch_size must be an odd integer >= 3, got {patch_size}.")
        if not factors or not all(0 < f <= 1 for f in factors):
            raise SinganInsertError(f"factors must be numbers in (0, 1], got {factors!r}.")
        image = torch.as_tensor(training_slice, dtype=torch.float32).reshape(1, 1, *training_slice.shape[-2:])
        self.factors = tuple(float(f) for f in factors)
        self.patch_size = int(patch_size)
        self.patches: list[torch.Tensor] = []
        for factor in self.factors:
            shrunk = resize(image, _scaled(image.shape[-2:], factor))
            if min(shrunk.shape[-2:]) < patch_size:
                raise SinganInsertError(
                    f"The training slice ({image.shape[-2]}x{image.shape[-1]} px) is too small for "
                    f"patches of {patch_size} px at factor {factor}.")
            patches = F.unfold(shrunk, patch_size)[0].T.contiguous()
            # A regular stride keeps the bank small and the choice deterministic.
            step = max(1, math.ceil(patches.shape[0] / MAX_BANK_PATCHES))
            self.patches.append(patches[::step].contiguous())

    @classmethod
    def of(cls, harmonizer: Any, factors: Sequence[float] = DEFAULT_FACTORS,
           patch_size: int = PATCH_SIZE) -> "PatchBank | None":
        """The bank of a harmonizer's stored training slice (cached on it), or ``None`` without one."""
        if getattr(harmonizer, "training_slice", None) is None:
            return None
        cache = harmonizer.__dict__.setdefault("_patch_banks", {})
        key = (tuple(float(f) for f in factors), int(patch_size))
        if key not in cache:
            cache[key] = cls(harmonizer.training_slice.float().cpu(), factors, patch_size)
        return cache[key]

    def score(self, images: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """:math:`S` per candidate: ``images`` ``(K, S, H, W)`` at the model's pixel size, ``region`` ``(S, H, W)``."""
        total = torch.zeros(images.shape[0])
        for bank, patches in self._query_patches(images, region):
            total += _nearest_distance(patches, bank)
        return total

    def score_and_visibility(self, images: torch.Tensor, region: torch.Tensor,
                             reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:math:`S` and :math:`V` per candidate, from one cut of the patches: :math:`V` is the mean
        distance of a candidate's patches (those :math:`S` compares) from the same patches of
        ``reference`` ``(S, H, W)`` (the slices without the tumor), summed over the factors: how
        much the candidate tumor shows."""
        stacked = torch.cat([images, reference[None].to(images.dtype)])
        score, visibility = torch.zeros(images.shape[0]), torch.zeros(images.shape[0])
        for bank, patches in self._query_patches(stacked, region):
            candidates, without = patches[:-1], patches[-1:]
            score += _nearest_distance(candidates, bank)
            visibility += (candidates - without).norm(dim=2).mean(dim=1)
        return score, visibility

    def _query_patches(self, images: torch.Tensor, region: torch.Tensor):
        """Per factor: ``(bank patches, (K, Q, P) patches of the K images centred in the region)``."""
        candidates, slices, height, width = images.shape
        half = self.patch_size // 2
        for factor, bank in zip(self.factors, self.patches):
            size = _scaled((height, width), factor)
            if min(size) < self.patch_size:
                continue
            shrunk = resize(images.reshape(candidates * slices, 1, height, width), size)
            where = resize(region[:, None].float(), size)[:, 0]
            rows = torch.nonzero((where > 0.25).any(dim=(0, 2))).flatten()
            cols = torch.nonzero((where > 0.25).any(dim=(0, 1))).flatten()
            if rows.numel() == 0:
                continue
            # Only the region's bounding box (plus half a patch) is cut into patches.
            top, bottom = max(int(rows[0]) - half, 0), min(int(rows[-1]) + half + 1, size[0])
            left, right = max(int(cols[0]) - half, 0), min(int(cols[-1]) + half + 1, size[1])
            shrunk, where = shrunk[..., top:bottom, left:right], where[..., top:bottom, left:right]
            if min(bottom - top, right - left) < self.patch_size:
                continue
            centre = where[:, half:where.shape[1] - half, half:where.shape[2] - half] > 0.25
            index = torch.nonzero(centre.reshape(-1)).flatten()
            if index.numel() == 0:
                continue
            index = index[::max(1, math.ceil(index.numel() / MAX_QUERY_PATCHES))]
            patches = F.unfold(shrunk, self.patch_size)  # (K*S, P, L)
            patches = patches.reshape(candidates, slices, patches.shape[1], -1)
            yield bank, patches.permute(0, 1, 3, 2).reshape(candidates, -1, patches.shape[2])[:, index]


def _nearest_distance(patches: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Per candidate, the mean over its ``(K, Q, P)`` patches of the distance to the nearest bank patch."""
    distance = torch.cdist(patches, bank[None].expand(patches.shape[0], -1, -1))
    return distance.min(dim=2).values.mean(dim=1)


class AmbiguousLevelWarning(UserWarning):
    """Realism alone does not confirm the side of the surroundings the tumor was put on
    (:attr:`LevelChoice.ambiguous`)."""


class UnannotatedModelWarning(UserWarning):
    """The tumor's level came from realism alone: the model has no tumor annotation.

    Realism finds a level that is common next to such surroundings in the training slice. Where
    the target modality's tumors look like one of its tissues (hrT2) that is the tumor's level;
    where they are brighter or darker than every tissue around them (an enhancing tumor in ceT1)
    it is a tissue's level, on the right side of the surroundings but with too little contrast
    (``benchmarks/results/bench_quality_cet1.md``), and only an annotation of the training slice's
    tumor gives the right level. The same holds for a tumor moved away from where such tumors grow:
    placed in brain tissue, realism mostly makes it darker than the tissue (a flow void's or bone's
    level), where a schwannoma is brighter (``benchmarks/results/dev_target_conditions.md``).
    """


#: A level choice is ambiguous (:attr:`LevelChoice.ambiguous`) unless the best level on the chosen
#: side scores at least this fraction better in realism alone than the best on the other side.
#: On 44 simulated hrT2 insertions (seeds 100-107, 200-219, 300-315) realism alone confirmed the
#: side by 4.4 % or more on 43 and flagged subject 107 (-0.8 %: it preferred the bright side); on
#: the 52 ceT1 insertions the other way round it flagged all 52 (down to -29 %), where the side
#: rule was right and realism alone wrong (a one-off probe, 2026-12-07).
AMBIGUOUS_MARGIN = 0.02


@dataclass(frozen=True)
class LevelChoice:
    """Result of :func:`choose_level` (model units).

    ``scores``: the realism score :math:`S` per candidate level; ``per_visibility``:
    :math:`S / V`, which chose the side. ``other_side_margin``: how much worse (relative) the best
    eligible level on the other side of the surroundings' level scores in :math:`S` than the chosen
    side's best (negative: realism alone prefers the other side); ``None`` when that side has none.
    """

    level: float
    shell: float
    levels: list[float]
    scores: list[float]
    eligible: list[bool]
    other_side_margin: float | None = None
    per_visibility: list[float] | None = None

    @property
    def ambiguous(self) -> bool:
        """Realism alone does not confirm the chosen side (see :data:`AMBIGUOUS_MARGIN`)."""
        return self.other_side_margin is not None and self.other_side_margin < AMBIGUOUS_MARGIN

    def to_dict(self) -> dict[str, Any]:
        margin = None if self.other_side_margin is None else round(self.other_side_margin, 4)
        return {"level": self.level, "shell": self.shell,
                "levels": [round(v, 4) for v in self.levels],
                "scores": [round(v, 4) for v in self.scores],
                "eligible": self.eligible, "other_side_margin": margin, "ambiguous": self.ambiguous,
                "per_visibility": None if self.per_visibility is None else [round(v, 4) for v in self.per_visibility]}


def choose_level(
    bank: PatchBank,
    background: torch.Tensor,
    mask: torch.Tensor,
    region: torch.Tensor,
    shell: float,
    visibility_floor: float = DEFAULT_VISIBILITY_FLOOR,
    num_levels: int = NUM_LEVELS,
) -> LevelChoice:
    """Pick the most realistic visible tumor level (see the module docstring).

    Args:
        bank: the training slice's patches.
        background: ``(S, H, W)`` tumor slices without the tumor, model units, model pixel size.
        mask: ``(S, H, W)`` tumor mask in [0, 1] on the same grid.
        region: ``(S, H, W)`` where patches are scored (the tumor and its rim).
        shell: mean background level around the tumor, model units.
        visibility_floor: minimum :math:`|L - \\bar s|` as a fraction of the model range, in [0, 0.5).
        num_levels: candidates of the first pass (>= 3).
    """
    if not 0 <= visibility_floor < 0.5:
        raise SinganInsertError(f"visibility_floor must be in [0, 0.5), got {visibility_floor!r}.")
    levels = torch.linspace(-1, 1, int(num_levels))
    # Flat candidates: rendering the source's internal structure at each level chose levels
    # farther from the truth on the development subjects (median contrast ratio 1.39 vs 1.20).
    composites = background[None] * (1 - mask[None]) + levels.view(-1, 1, 1, 1) * mask[None]
    scores, visibility = bank.score_and_visibility(composites, region, background)
    eligible = (levels - shell).abs() >= 2 * visibility_floor
    if not bool(eligible.any()):  # only when the floor exceeds the room on both sides
        eligible = (levels - shell).abs() == (levels - shell).abs().max()
    # The side: realism per unit of visibility (see the module docstring).
    per_visibility = scores / visibility.clamp_min(1e-12)
    unseen = torch.full_like(scores, float("inf"))
    side_best = int(torch.argmin(torch.where(eligible, per_visibility, unseen)))
    brighter = levels > shell
    side = brighter if bool(brighter[side_best]) else ~brighter
    # The level: realism alone, on that side.
    on_side = eligible & side
    best = int(torch.argmin(torch.where(on_side, scores, unseen)))
    level = float(levels[best])
    if 0 < best < len(levels) - 1 and bool(on_side[best - 1]) and bool(on_side[best + 1]):
        left, mid, right = (float(scores[best - 1]), float(scores[best]), float(scores[best + 1]))
        curvature = left - 2 * mid + right
        if curvature > 0:
            step = float(levels[1] - levels[0])
            level += step * 0.5 * (left - right) / curvature
    other_side = eligible & ~side
    margin = None
    if bool(other_side.any()):
        chosen = float(scores[best])
        margin = (float(scores[other_side].min()) - chosen) / max(abs(chosen), 1e-12)
    return LevelChoice(level, float(shell), levels.tolist(), scores.tolist(), eligible.tolist(), margin,
                       per_visibility.tolist())


def scoring_slices(mask_slices: np.ndarray, limit: int = MAX_SCORED_SLICES) -> np.ndarray:
    """Indices of at most ``limit`` tumor slices, evenly spread over the largest half by area."""
    areas = mask_slices.reshape(mask_slices.shape[0], -1).sum(axis=1)
    order = np.argsort(-areas, kind="stable")
    largest = np.sort(order[:max(limit, (len(order) + 1) // 2)])
    pick = np.unique(np.round(np.linspace(0, len(largest) - 1, min(limit, len(largest)))).astype(int))
    return largest[pick]


#: In-plane sd (px) of the partial-volume blur of the tumor's edge.
PARTIAL_VOLUME_SIGMA = 0.5
#: Through-plane sd (slices) of the partial-volume blur: a scanner's slice profile mixes
#: neighbouring slices as its in-plane point-spread function mixes neighbouring pixels (a profile
#: whose full width at half maximum is one voxel has sd 0.42 voxel). On seeds 200-207, added to
#: the uncut in-plane edge: the annotated default's seam 1.11 -> 1.07 and low-pass error
#: 0.045 -> 0.039, the unannotated default's seam 1.15 -> 1.08 and W1 0.024 -> 0.021 (its
#: high-pass ratio 0.83 -> 0.79). An earlier
#: in-plane-only default rested on a one-off run in which this blur also mixed the non-adjacent
#: slices that the level choice scores (they are scored in-plane only now), which raised W1.
PARTIAL_VOLUME_THROUGH_PLANE = 0.5


def partial_volume(mask_slices: np.ndarray, sigma_px: float = PARTIAL_VOLUME_SIGMA,
                   through_plane_px: float | None = None) -> np.ndarray:
    """Tumor fraction per voxel: :math:`f = G_\\sigma * M`, inside the mask and just outside it.

    Any scanner's point-spread function mixes a tumor's edge voxels with their surroundings,
    through the slices as well as within them (the slice profile), and it does so on both sides
    of the edge: the voxels just outside a tumor carry some of its signal. The automatic
    appearance renders its candidates and its composite as
    :math:`(1 - f)\\,\\text{background} + f\\,\\text{tumor}` with this :math:`f` (the tumor's values
    carried outward, :func:`spread_outward`). A fraction cut to 0 at the mask's edge gives an
    edge steeper than a scanner's: on the simulator, whose tumors have this blur, a flat tumor
    at the true level had 1.11 x the truth's seam with the fraction cut at the mask, 1.04 x
    without the cut (in-plane only; ``bench_quality``'s ``oracle_level`` row, seeds 200-207).

    Args:
        mask_slices: ``(S, H, W)`` mask of consecutive slices.
        sigma_px: in-plane sd of the blur (px).
        through_plane_px: sd across the slices (slices); default :data:`PARTIAL_VOLUME_THROUGH_PLANE`;
            0 for slices that are not neighbours.
    """
    from scipy.ndimage import gaussian_filter

    through = PARTIAL_VOLUME_THROUGH_PLANE if through_plane_px is None else float(through_plane_px)
    inside = (np.asarray(mask_slices) > 0).astype(np.float32)
    # Cut at 2 sd (1 voxel for sd 0.5): the voxels beside the edge get their share, and the
    # Gaussian's far tail (3e-4 of it) does not reach and alter voxels the insertion leaves alone.
    return gaussian_filter(inside, (through, sigma_px, sigma_px), mode="constant", truncate=2.0).astype(np.float32)


def spread_outward(slices: np.ndarray, mask_slices: np.ndarray) -> np.ndarray:
    """Per slice, every pixel outside the mask takes the value of its nearest mask pixel (slices
    the mask does not touch are returned as they are): the tumor's values where its
    partial-volume fraction reaches past the mask's edge."""
    from scipy.ndimage import distance_transform_edt

    out = np.array(slices, copy=True)
    inside = np.asarray(mask_slices) > 0
    for index in range(len(out)):
        if inside[index].any() and not inside[index].all():
            nearest = distance_transform_edt(~inside[index], return_distances=False, return_indices=True)
            out[index] = out[index][nearest[0], nearest[1]]
    return out


def inplane_distance(mask_slices: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Per slice: every pixel's in-plane distance (mm) to the mask (0 inside; ``inf`` on a slice
    the mask does not touch)."""
    from scipy.ndimage import distance_transform_edt

    distance = np.full(np.shape(mask_slices), np.inf)
    for index, inside in enumerate(np.asarray(mask_slices) > 0):
        if inside.any():
            distance[index] = distance_transform_edt(~inside, sampling=spacing)
    return distance


def ring(mask_slices: np.ndarray, spacing: tuple[float, float], width_mm: float) -> np.ndarray:
    """Per slice: pixels outside the mask within ``width_mm`` of it (in-plane distance)."""
    distance = inplane_distance(mask_slices, spacing)
    return (distance > 0) & (distance <= width_mm)


def highpass(slices: np.ndarray, sigma_px: float = 1.0) -> np.ndarray:
    """In-plane high-pass :math:`h(y) = y - G_\\sigma * y` of ``(S, H, W)`` slices."""
    from scipy.ndimage import gaussian_filter

    slices = np.asarray(slices, dtype=np.float64)
    return slices - gaussian_filter(slices, sigma=(0, sigma_px, sigma_px), mode="reflect")


def masked_lowpass(slices: np.ndarray, mask: np.ndarray,
                   sigma_px: float | tuple[float, ...]) -> np.ndarray:
    """:math:`G_\\sigma * (x M) / G_\\sigma * M`: the low-pass of the tumor from inside it only, so
    that its surroundings count neither as its structure nor (in the rest) as its texture.

    ``sigma_px``: one in-plane sd for ``(S, H, W)`` slices, or one sd per axis.
    """
    from scipy.ndimage import gaussian_filter

    sigma = (0, sigma_px, sigma_px) if np.isscalar(sigma_px) else tuple(sigma_px)
    inside = np.asarray(mask, dtype=np.float64)
    return gaussian_filter(np.asarray(slices, np.float64) * inside, sigma, mode="constant") / \
        np.maximum(gaussian_filter(inside, sigma, mode="constant"), 1e-6)


def inject_texture(
    harmonized: np.ndarray,
    background: np.ndarray,
    mask_slices: np.ndarray,
    surroundings: np.ndarray,
    seed: int,
    target_std: float | None = None,
    in_plane_width: float | None = None,
    highpass_sigma: float = 1.0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Add seeded noise inside the mask up to B's local high-pass energy (see the module docstring).

    Args:
        harmonized: ``(S, H, W)`` harmonized tumor slices (intensity units).
        background: the same slices without the tumor (B's own texture around it).
        mask_slices: ``(S, H, W)`` tumor mask (non-zero = tumor).
        surroundings: ``(S, H, W)`` bool, where B's texture is measured (the rim of the tumor).
        seed: noise seed; two seeds give different textures of the same statistics.
        target_std: :math:`\\sigma_B` when known otherwise (e.g. :meth:`TextureBank.texture_std`);
            default: measured in ``surroundings``.
        in_plane_width: the noise's in-plane correlation width (px) when known otherwise (e.g.
            measured in an annotated tumor of B, :class:`~singan_insert.insertion.annotation.TumorProfile`);
            default: measured in ``surroundings``.
        highpass_sigma: sd (px) of the Gaussian whose complement is "texture" (:func:`highpass`),
            for every measurement here and for the noise.

    Returns:
        The textured slices (same dtype) and ``{"target_std", "tumor_std", "added_std", ...}``.
    """
    from scipy.ndimage import gaussian_filter

    full_shape = np.shape(harmonized)
    inside = np.asarray(mask_slices) > 0
    surroundings = np.asarray(surroundings, dtype=bool)
    # Drawn (and filtered, below) over the whole crop, as before the box: the same noise.
    white = np.random.default_rng(seed).standard_normal(full_shape)
    # The measurements below read the tumor and its rim only: on their in-plane bounding box with
    # the high-pass filter's reach they give the same values as on the whole crop (a clinical
    # crop is several times the box), keeping the crop's own edges where they reach.
    box = inplane_box(inside | surroundings, _filter_reach(highpass_sigma))
    full, harmonized = harmonized, np.asarray(harmonized)[box]
    background, inside, surroundings = (np.asarray(a)[box] for a in (background, inside, surroundings))
    texture = highpass(background, highpass_sigma)
    if target_std is None:
        target_std = robust_std(texture[surroundings]) if surroundings.any() else 0.0
    # The tumor's own texture: its high-pass from inside the mask only, so that its contrast to
    # the surroundings does not count as texture (benchmarks/dev_harmonizer.py, row "auto",
    # before and after: high-pass ratio 0.79 -> 0.85, low-pass error and W1 unchanged), and
    # measured over its interior, as B's tumor texture is on the annotated slice
    # (annotation.interior_spread): the edge's partial volume, and with an annotation its step
    # above the interior, is structure, not texture (bench_quality on seeds 200-219: high-pass
    # ratio 0.79 -> 0.89 unannotated, 0.91 -> 0.96 annotated; W1 over the mapped paste's -0.001
    # to -0.012).
    from singan_insert.insertion.annotation import tumor_interior

    residual = harmonized - masked_lowpass(harmonized, inside, highpass_sigma)
    tumor_std = robust_std(residual[tumor_interior(inside)])
    added = math.sqrt(max(target_std ** 2 - tumor_std ** 2, 0.0))
    widths = (correlation_width(texture, surroundings, 0),
              correlation_width(texture, surroundings, 1, 2) if in_plane_width is None else float(in_plane_width))
    out = np.array(full, copy=True)
    info: dict[str, Any] = {"target_std": target_std, "tumor_std": tumor_std, "highpass_sigma_px": highpass_sigma,
                            "width_through_plane_px": widths[0], "width_in_plane_px": widths[1]}
    if added > 0:
        # Filtered over the whole crop: the field's own sd below is the crop's, as before the box.
        field = highpass(gaussian_filter(white, (widths[0], widths[1], widths[1]), mode="reflect"), highpass_sigma)
        noise = field[box]
        # Scaled to unit sd over the tumor, but never by more than twice the noise field's own sd:
        # over a few voxels (a tumor of one voxel: sd 0) the sample sd says nothing of the
        # field's, and dividing by it would multiply the noise without bound.
        noise /= max(float(noise[inside].std()), 0.5 * float(field.std()), 1e-12)
        tumor = out[box]  # a view: basic slicing
        tumor[inside] = (tumor[inside] + added * noise[inside]).astype(out.dtype)
    info["added_std"] = added
    return out, info


def _filter_reach(sigma_px: float) -> int:
    """How far (px) scipy's Gaussian filter of sd ``sigma_px`` reads (its default truncation, 4 sd)."""
    return int(4.0 * float(sigma_px) + 0.5)


def inplane_box(region: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    """Every slice, and the in-plane bounding box of ``region`` (``(S, H, W)``,
    :func:`~singan_insert.harmonizer.model.support_box`) grown by ``margin`` px and cut to the
    array; everything when ``region`` is empty."""
    from singan_insert.harmonizer.model import support_box

    box = support_box(np.asarray(region, dtype=bool))
    if box is None:
        return (slice(None),) * 3
    top, bottom, left, right = box
    return (slice(None), slice(max(top - margin, 0), bottom + margin), slice(max(left - margin, 0), right + margin))


class TextureBank:
    """B's texture per look: low-pass patches of the training slice with their high-pass energy.

    For a tumor that, smoothed, looks like some region of the training slice (in B: like the
    real tumor it shows), B's texture there is the texture that region has. Each low-pass patch
    :math:`G_1 * x` (``patch_size`` px) of the training slice is stored with the mean of
    :math:`h(x)^2` over it; :meth:`texture_std` returns the square root of the median energy of
    the nearest low-pass neighbours of a tumor's patches (the median: a few neighbours on an
    edge must not count as texture). Model units, model pixel size.
    """

    def __init__(self, training_slice: torch.Tensor, patch_size: int = TEXTURE_PATCH_SIZE):
        from scipy.ndimage import gaussian_filter

        image = np.asarray(torch.as_tensor(training_slice, dtype=torch.float32), dtype=np.float64)
        low = gaussian_filter(image, 1.0, mode="reflect")
        energy = (image - low) ** 2
        as_tensor = lambda a: torch.from_numpy(a.astype(np.float32))[None, None]  # noqa: E731
        patches = F.unfold(as_tensor(low), patch_size)[0].T
        energies = F.avg_pool2d(as_tensor(energy), patch_size, stride=1).flatten()
        step = max(1, math.ceil(patches.shape[0] / (4 * MAX_BANK_PATCHES)))
        self.patch_size = int(patch_size)
        self.patches, self.energies = patches[::step].contiguous(), energies[::step].contiguous()

    @classmethod
    def of(cls, harmonizer: Any) -> "TextureBank | None":
        """The texture bank of a harmonizer's stored training slice (cached), or ``None``."""
        if getattr(harmonizer, "training_slice", None) is None:
            return None
        if "_texture_bank" not in harmonizer.__dict__:
            harmonizer.__dict__["_texture_bank"] = cls(harmonizer.training_slice.float().cpu())
        return harmonizer.__dict__["_texture_bank"]

    def texture_std(self, slices: np.ndarray, region: np.ndarray) -> float | None:
        """B's texture sd (model units) for ``(S, H, W)`` model-unit ``slices``, patches centred in ``region``."""
        from scipy.ndimage import gaussian_filter

        half = self.patch_size // 2
        # Only the region's bounding box is read (with the patch's and the filter's reach: the
        # same patches as from the whole slices).
        box = inplane_box(np.asarray(region, bool), half + _filter_reach(1.0))
        slices, region = np.asarray(slices)[box], np.asarray(region)[box]
        low = gaussian_filter(np.asarray(slices, dtype=np.float64), (0, 1.0, 1.0), mode="reflect")
        patches = F.unfold(torch.from_numpy(low.astype(np.float32))[:, None], self.patch_size)
        patches = patches.permute(0, 2, 1).reshape(-1, patches.shape[1])
        centre = np.asarray(region, bool)[:, half:region.shape[1] - half, half:region.shape[2] - half]
        index = torch.from_numpy(np.flatnonzero(centre.reshape(-1)))
        if index.numel() == 0:
            return None
        index = index[::max(1, math.ceil(index.numel() / (4 * MAX_QUERY_PATCHES)))]
        nearest = torch.cdist(patches[index], self.patches).argmin(dim=1)
        return float(torch.sqrt(self.energies[nearest].median()))


def correlation_width(texture: np.ndarray, region: np.ndarray, *axes: int) -> float:
    """Gaussian width (px) whose lag-1 autocorrelation is that of ``texture`` in ``region`` along ``axes``."""
    correlations = []
    for axis in axes:
        if texture.shape[axis] < 2:
            continue
        head = [slice(None)] * 3
        tail = [slice(None)] * 3
        head[axis], tail[axis] = slice(0, -1), slice(1, None)
        both = region[tuple(head)] & region[tuple(tail)]
        if np.count_nonzero(both) < 16:
            continue
        a, b = texture[tuple(head)][both], texture[tuple(tail)][both]
        # Robust correlation from the spreads of the sum and the difference, so that the
        # edges of structures crossing the rim (outliers of h) do not count as texture.
        plus, minus = robust_std(a + b) ** 2, robust_std(a - b) ** 2
        if plus + minus > 0:
            correlations.append((plus - minus) / (plus + minus))
    rho = float(np.mean(correlations)) if correlations else 0.0
    if rho <= 0.05:
        return 0.0
    return float(min(math.sqrt(-1 / (4 * math.log(min(rho, 0.99)))), MAX_TEXTURE_WIDTH_PX))


def robust_std(values: np.ndarray) -> float:
    """:math:`1.4826 \\cdot` the median absolute deviation (the sd for Gaussian values)."""
    values = np.asarray(values, dtype=np.float64)
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def _scaled(shape: Sequence[int], factor: float) -> tuple[int, int]:
    return max(round(shape[0] * factor), 1), max(round(shape[1] * factor), 1)
