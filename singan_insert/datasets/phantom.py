"""A two-contrast head phantom with ground truth for tumor harmonization.

crossMoDA data cannot be shipped, and nobody can tell whether a harmonized tumor is right
without knowing how that tumor truly looks in the target modality. This module simulates
subjects with one anatomy seen in two contrasts, and renders the *true* target-modality
appearance of any tumor placed anywhere.

Anatomy
    World space is RAS millimetres. A random head-like label model is built from implicit
    surfaces :math:`\\phi_k(x) \\le 0` painted in order (later tissues cover earlier ones):
    scalp, skull, subarachnoid CSF, grey matter with sulci, white matter, a cerebellopontine
    angle / prepontine cistern, the pons, the basilar artery, the fourth ventricle, the petrous
    bones with internal auditory canals (CSF), vestibules, lateral semicircular canals and
    cochleas. A vestibular-schwannoma-like tumor (an ellipsoidal to lobulated body in the
    cistern, usually with a tail into the internal auditory canal, 0.1-5 cm³ by default) is
    label 1; the cochleas are label 2. The tumor sits in a CSF pocket slightly larger than
    itself (the cistern it has widened, with the CSF cleft seen around real schwannomas), so
    in hrT2 it is outlined by bright CSF and, washed out, leaves CSF behind.

    The head is a phantom scaled to modality B's field of view (it fills ~85 % of it), while
    voxel sizes, texture scales and tumor volumes are physical: at the default 128x128x48 grid
    of 0.4x0.4x1.0 mm the head is ~45 mm wide, so a tumor covers as many voxels as in a real
    hrT2 scan but sits in a small head. Mass effect is not modelled: the tumor replaces the
    tissue it overlaps.

Imaging
    Each modality samples the anatomy on its own grid (voxel-to-world affine :math:`A_m`): A is
    ceT1-like (0.5x0.5x1.5 mm, larger field of view, slightly rotated), B is hrT2-like
    (0.4x0.4x1.0 mm). With tissue fractions :math:`\\alpha_k`, tissue intensities
    :math:`\\mu_k (1 + a_k t_k(x))` (multi-scale Gaussian texture :math:`t_k`), a smooth bias
    field :math:`b_m`, a gain :math:`g_m` and noise level :math:`\\sigma_m`:

    .. math::

        c_m(x) = \\text{paint}_k\\big(\\alpha_k(x), \\mu_k (1 + a_k t_k(x))\\big), \\qquad
        I_m(x) = \\big| g_m b_m(x)\\, c_m(x) + \\sigma_m (n_1(x) + i\\, n_2(x)) \\big|

    (Rician magnitude noise). Partial volume comes from the signed distance to each surface
    measured in voxel steps of the grid, :math:`d = \\phi / \\lVert J^\\top \\nabla \\phi \\rVert`
    (:math:`J` the affine's linear part), as :math:`\\alpha = \\operatorname{clip}(1/2 - d, 0, 1)`:
    the through-plane 1.5 mm voxels of A blur boundaries more than B's 0.4 mm ones.

Ground truth for any tumor
    A tumor's tissue (:class:`TumorTissue`) lives in physical space: a solid part with its own
    heterogeneity field and, sometimes, cysts. It is composited into the tumor-free clean image
    with the fraction :math:`f = G_{0.5\\,\\text{voxel}} * M` of a binary mask :math:`M`, then bias,
    gain and the *same* noise realisation are applied:

    .. math::

        I_m^{M}(x) = \\big| g_m b_m(x) [(1 - f(x))\\, c_m(x) + f(x)\\, \\tau_m(P^{-1} x)]
        + \\sigma_m (n_1 + i n_2) \\big|

    where :math:`\\tau_m` is the tumor tissue's intensity in modality m and :math:`P` the
    placement of the tumor (its original site to the new one). So for a mask pasted anywhere,
    :meth:`SimulatedSubject.render_b` answers "what would B look like with this tumor here";
    an empty mask gives B "with the tumor washed out" (the tissue behind it, e.g. cistern CSF),
    a stand-in for a CycleGAN output in which tumors vanish. Outside the mask's blur the image
    is bit-identical to the washed-out one.

Everything is deterministic per seed, vectorised numpy/scipy; a 128x128x48 subject (both
modalities) takes a fraction of a second (see ``docs/figures/make_simulation_figure.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import fft as scipy_fft
from scipy import ndimage

from singan_insert.errors import SinganInsertError

if TYPE_CHECKING:  # torchio is a dependency, but importing it costs a second; do it lazily.
    import torchio as tio

__all__ = [
    "CET1_CONTRAST",
    "HRT2_CONTRAST",
    "TUMOR_CONTRAST",
    "SimulatedSubject",
    "Tissue",
    "TumorTissue",
    "simulate_subject",
    "write_crossmoda",
]

MODALITY_A = "ceT1"
MODALITY_B = "hrT2"
TUMOR_LABEL = 1
COCHLEA_LABEL = 2
# Sigma (in voxels) of the blur that turns a binary tumor mask into partial-volume fractions.
TUMOR_PARTIAL_VOLUME_SIGMA = 0.5


class Tissue(IntEnum):
    """Tissue classes of the anatomical label model (not the crossMoDA labels)."""

    BACKGROUND = 0
    SCALP = 1
    BONE = 2
    CSF = 3
    GREY_MATTER = 4
    WHITE_MATTER = 5
    BRAINSTEM = 6
    VESSEL = 7
    INNER_EAR = 8
    COCHLEA = 9
    TUMOR = 10


# (mean, relative texture amplitude) per tissue, in units of the brightest tissue.
# ceT1: CSF and inner-ear fluid dark, fat bright, vessels and tumor enhance.
CET1_CONTRAST: dict[Tissue, tuple[float, float]] = {
    Tissue.BACKGROUND: (0.0, 0.0),
    Tissue.SCALP: (0.75, 0.12),
    Tissue.BONE: (0.06, 0.30),
    Tissue.CSF: (0.10, 0.10),
    Tissue.GREY_MATTER: (0.36, 0.06),
    Tissue.WHITE_MATTER: (0.47, 0.05),
    Tissue.BRAINSTEM: (0.45, 0.05),
    Tissue.VESSEL: (0.65, 0.10),
    Tissue.INNER_EAR: (0.12, 0.10),
    Tissue.COCHLEA: (0.12, 0.10),
}
# hrT2 (CISS/FIESTA-like): CSF and labyrinth fluid very bright, flow voids in vessels.
HRT2_CONTRAST: dict[Tissue, tuple[float, float]] = {
    Tissue.BACKGROUND: (0.0, 0.0),
    Tissue.SCALP: (0.40, 0.15),
    Tissue.BONE: (0.05, 0.30),
    Tissue.CSF: (0.95, 0.04),
    Tissue.GREY_MATTER: (0.36, 0.07),
    Tissue.WHITE_MATTER: (0.27, 0.06),
    Tissue.BRAINSTEM: (0.30, 0.06),
    Tissue.VESSEL: (0.08, 0.20),
    Tissue.INNER_EAR: (0.88, 0.05),
    Tissue.COCHLEA: (0.88, 0.05),
}
# Tumor (solid mean, cyst mean, heterogeneity = relative sd of the solid part). In ceT1 the solid
# part enhances strongly and cysts do not; in hrT2 the tumor is intermediate, heterogeneous, and
# even its cysts stay darker than CSF.
TUMOR_CONTRAST: dict[str, tuple[float, float, float]] = {
    MODALITY_A: (0.85, 0.15, 0.10),
    MODALITY_B: (0.48, 0.78, 0.15),
}
_PAINT_ORDER_SHELLS = (Tissue.SCALP, Tissue.BONE, Tissue.CSF, Tissue.GREY_MATTER, Tissue.WHITE_MATTER)


# --------------------------------------------------------------------------------------------
# Grids and implicit shapes
# --------------------------------------------------------------------------------------------
def _grid_affine(shape, spacing, center, rotation) -> np.ndarray:
    """Voxel-to-world affine of a grid centred on ``center`` with axes ``rotation @ diag(spacing)``."""
    linear = np.asarray(rotation, float) @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(center, float) - linear @ ((np.asarray(shape) - 1) / 2)
    return affine


def _rotation(z_deg: float = 0.0, x_deg: float = 0.0, y_deg: float = 0.0) -> np.ndarray:
    """Rotation matrix ``Rz @ Rx @ Ry`` from angles in degrees."""
    a, b, c = np.deg2rad([z_deg, x_deg, y_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rz @ rx @ ry


def _index_box(affine, shape, world_low, world_high, margin: int = 2):
    """Index-space slices covering a world-space box (plus ``margin`` voxels), or None if outside."""
    corners = np.array(np.meshgrid(*zip(world_low, world_high), indexing="ij")).reshape(3, -1)
    inverse = np.linalg.inv(affine)
    index = inverse[:3, :3] @ corners + inverse[:3, 3:4]
    low = np.maximum(np.floor(index.min(axis=1)).astype(int) - margin, 0)
    high = np.minimum(np.ceil(index.max(axis=1)).astype(int) + margin + 1, shape)
    if np.any(high <= low):
        return None
    return tuple(slice(int(lo), int(hi)) for lo, hi in zip(low, high))


def _index_axes(box) -> list[np.ndarray]:
    """Broadcastable float32 index arrays (i, j, k) of a box."""
    axes = []
    for axis, part in enumerate(box):
        shape = [1, 1, 1]
        shape[axis] = part.stop - part.start
        axes.append(np.arange(part.start, part.stop, dtype=np.float32).reshape(shape))
    return axes


def _affine_of_index(matrix: np.ndarray, offset: np.ndarray, axes) -> list[np.ndarray]:
    """``matrix @ (i, j, k) + offset`` evaluated on broadcast index axes (one array per row)."""
    i, j, k = axes
    return [
        (np.float32(offset[r]) + np.float32(matrix[r, 0]) * i + np.float32(matrix[r, 1]) * j)
        + np.float32(matrix[r, 2]) * k
        for r in range(matrix.shape[0])
    ]


def _world_points(affine, box) -> np.ndarray:
    """World coordinates (3, *box_shape) of the voxel centres of a box."""
    return np.stack(_affine_of_index(affine[:3, :3], affine[:3, 3], _index_axes(box)))


@dataclass(frozen=True, eq=False)
class _Ellipsoid:
    """Solid ellipsoid :math:`\\lVert \\operatorname{diag}(1/a) R^\\top (x - c) \\rVert \\le 1` (mm)."""

    center: np.ndarray
    semi_axes: np.ndarray
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))

    def world_extent(self, level: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        half = level * np.sqrt(((self.rotation * self.semi_axes) ** 2).sum(axis=1))
        return self.center - half, self.center + half

    def radius(self, affine, axes) -> tuple[np.ndarray, np.ndarray]:
        """Normalised radius r (1 on the surface) and r / ||J^T grad r|| (voxel steps per unit r).

        With :math:`q = M i + m` (M maps voxel indices to normalised coordinates), both q and
        :math:`M^\\top q` are affine in the index, so everything is broadcast arithmetic.
        """
        matrix = (self.rotation.T / self.semi_axes[:, None]) @ affine[:3, :3]
        offset = (self.rotation.T @ (affine[:3, 3] - self.center)) / self.semi_axes
        q = _affine_of_index(matrix, offset, axes)
        g = _affine_of_index(matrix.T @ matrix, matrix.T @ offset, axes)
        r = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
        g_norm = np.sqrt(g[0] * g[0] + g[1] * g[1] + g[2] * g[2])
        return r, r / np.maximum(g_norm, np.float32(1e-12))

    def voxel_distance(self, affine, axes) -> np.ndarray:
        """Signed distance to the surface in voxel steps (first-order, exact on the surface)."""
        r, scale = self.radius(affine, axes)
        return (r - 1) * scale


@dataclass(frozen=True, eq=False)
class _Torus:
    """Solid torus (a semicircular-canal-like ring) of radii ``major`` and ``minor`` (mm)."""

    center: np.ndarray
    rotation: np.ndarray
    major: float
    minor: float

    def world_extent(self) -> tuple[np.ndarray, np.ndarray]:
        reach = self.major + self.minor
        return self.center - reach, self.center + reach

    def voxel_distance(self, affine, axes) -> np.ndarray:
        local = _affine_of_index(
            self.rotation.T @ affine[:3, :3], self.rotation.T @ (affine[:3, 3] - self.center), axes
        )
        rho = np.sqrt(local[0] ** 2 + local[1] ** 2) + np.float32(1e-6)
        radial = rho - np.float32(self.major)
        tube = np.sqrt(radial**2 + local[2] ** 2) + np.float32(1e-6)
        # Unit normal in local coordinates, then its length measured in voxel steps.
        normal = [radial * local[0] / rho / tube, radial * local[1] / rho / tube, local[2] / tube]
        to_voxels = (self.rotation.T @ affine[:3, :3]).T
        steps = [sum(np.float32(to_voxels[a, b]) * normal[b] for b in range(3)) for a in range(3)]
        step_norm = np.sqrt(steps[0] ** 2 + steps[1] ** 2 + steps[2] ** 2)
        return (tube - np.float32(self.minor)) / np.maximum(step_norm, np.float32(1e-12))


@dataclass(frozen=True, eq=False)
class _WorldNoise:
    """A smooth unit-variance random field stored on a world lattice (trilinear sampling)."""

    values: np.ndarray
    origin: np.ndarray
    spacing: float

    @classmethod
    def generate(cls, rng, low, high, correlation_mm: float) -> "_WorldNoise":
        spacing = correlation_mm / 1.5  # fine enough for trilinear sampling of a Gaussian-blurred field
        shape = np.ceil((np.asarray(high) - low) / spacing).astype(int) + 3
        values = _gaussian_random_field(rng, tuple(shape), (spacing,) * 3, [(correlation_mm, 1.0)])[0]
        return cls(values, np.asarray(low, float) - spacing, spacing)

    def sample(self, points: np.ndarray) -> np.ndarray:
        """Values at world points of shape (3, n)."""
        coordinates = (points - self.origin[:, None]) / self.spacing
        return ndimage.map_coordinates(self.values, coordinates, order=1, mode="nearest")


def _gaussian_random_field(rng, shape, spacing, scales) -> tuple[np.ndarray, np.ndarray]:
    """Two independent unit-variance periodic Gaussian fields with a multi-scale spectrum.

    ``scales = [(sigma_s_mm, w_s), ...]``: the sum of white noise blurred by a Gaussian of width
    :math:`\\sigma_s`, each contributing the share :math:`w_s` of the variance, i.e. the power
    spectrum :math:`\\sum_s w_s \\exp(-4\\pi^2 \\sigma_s^2 \\lVert k \\rVert^2) / Z_s` (k in cycles/mm,
    :math:`Z_s` normalising each term to unit variance). One complex inverse FFT gives both
    fields (the real and imaginary parts are independent).
    """
    frequencies = np.meshgrid(
        *[np.fft.fftfreq(n, d) for n, d in zip(shape, spacing)], indexing="ij", sparse=True
    )
    # The Gaussian spectrum is separable: per-axis factors and a broadcast product per scale.
    power = np.zeros(shape, np.float32)
    for sigma, weight in scales:
        factors = [np.exp(-4 * np.pi**2 * sigma**2 * f * f) for f in frequencies]
        total = np.prod([f.sum() for f in factors])
        factors = [(f / total ** (1 / 3)).astype(np.float32) for f in factors]
        power += np.float32(weight) * (factors[0] * factors[1]) * factors[2]
    amplitude = np.sqrt(power, out=power)
    spectrum = np.empty(shape, np.complex64)
    spectrum.real = rng.standard_normal(shape, dtype=np.float32)
    spectrum.imag = rng.standard_normal(shape, dtype=np.float32)
    spectrum *= amplitude
    field_ = scipy_fft.ifftn(spectrum, overwrite_x=True)
    out = []
    for part in (field_.real, field_.imag):
        part = part - np.float32(part.mean())
        part *= np.float32(1 / max(float(part.std()), 1e-12))
        out.append(part)
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# Tumor: shape (where it is) and tissue (how it looks)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _TumorShape:
    """Union of ellipsoids with low-frequency surface bumps (plus a fixed canal tail)."""

    lobes: tuple[_Ellipsoid, ...]
    bump_waves: np.ndarray  # (n, 3) rad/mm
    bump_phases: np.ndarray  # (n,)
    bump_amplitude: float
    tail: _Ellipsoid | None

    def world_extent(self):
        reach = 1 + 2 * self.bump_amplitude * len(self.bump_phases)
        parts = [lobe.world_extent(reach) for lobe in self.lobes]
        if self.tail is not None:
            parts.append(self.tail.world_extent())
        return np.min([p[0] for p in parts], axis=0), np.max([p[1] for p in parts], axis=0)

    def _bumps(self, affine, box) -> np.ndarray:
        points = _world_points(affine, box)
        center = self.lobes[0].center
        bumps = np.zeros(points.shape[1:], np.float32)
        for wave, phase in zip(self.bump_waves, self.bump_phases):
            projection = sum(np.float32(wave[a]) * (points[a] - np.float32(center[a])) for a in range(3))
            bumps += np.float32(self.bump_amplitude) * np.cos(projection + np.float32(phase))
        return bumps

    def rasterize(self, affine, shape) -> np.ndarray:
        """Binary mask of the voxel centres inside the tumor."""
        mask = np.zeros(shape, bool)
        box = _index_box(affine, shape, *self.world_extent())
        if box is None:
            return mask
        axes = _index_axes(box)
        radius = np.min([lobe.radius(affine, axes)[0] for lobe in self.lobes], axis=0)
        inside = radius - 1 <= self._bumps(affine, box)
        if self.tail is not None:
            inside |= self.tail.radius(affine, axes)[0] <= 1
        mask[box] = inside
        return mask

    def voxel_distance(self, affine, axes) -> np.ndarray:
        """Signed voxel distance of the body (lobes and bumps, not the tail), to first order."""
        radius, scale = self.lobes[0].radius(affine, axes)
        for lobe in self.lobes[1:]:
            other_radius, other_scale = lobe.radius(affine, axes)
            closer = other_radius < radius
            radius = np.where(closer, other_radius, radius)
            scale = np.where(closer, other_scale, scale)
        box = tuple(slice(int(a.ravel()[0]), int(a.ravel()[-1]) + 1) for a in axes)
        return (radius - 1 - self._bumps(affine, box)) * scale

    def grown(self, factor: float, margin_mm: float) -> "_TumorShape":
        """The body with every lobe's semi-axes scaled by ``factor`` plus ``margin_mm``; no tail."""
        lobes = tuple(
            _Ellipsoid(lobe.center, factor * lobe.semi_axes + margin_mm, lobe.rotation) for lobe in self.lobes
        )
        return _TumorShape(lobes, self.bump_waves, self.bump_phases, self.bump_amplitude, None)

    def scaled(self, factor: float) -> "_TumorShape":
        """The body (lobes and bumps) scaled by ``factor`` about its centre; the tail is fixed."""
        center = self.lobes[0].center
        lobes = tuple(
            _Ellipsoid(center + factor * (lobe.center - center), factor * lobe.semi_axes, lobe.rotation)
            for lobe in self.lobes
        )
        return _TumorShape(lobes, self.bump_waves / factor, self.bump_phases, self.bump_amplitude, self.tail)

    def volume_mm3(self, resolution: int = 40) -> float:
        low, high = self.world_extent()
        step = float(np.max(high - low)) / resolution
        shape = tuple(np.ceil((high - low) / step).astype(int) + 1)
        affine = _grid_affine(shape, (step,) * 3, (low + high) / 2, np.eye(3))
        return float(self.rasterize(affine, shape).sum()) * step**3


@dataclass(frozen=True, eq=False)
class TumorTissue:
    """What a tumor is made of, in physical space: how it looks in either modality.

    The solid part has mean :math:`\\mu_s (1 + h\\, \\eta(u))`, with :math:`\\eta` a unit-variance
    sum of random plane waves (wavelengths 1.5-5 mm); cysts (balls) take the cyst mean. ``u`` is
    the position relative to ``center_mm``, the centroid of the tumor's ground-truth mask on
    the subject's modality-B grid, so a tumor moved elsewhere carries its pattern along.

    Args:
        center_mm: world position (mm) the internal pattern is anchored to.
        cyst_centers_mm: (n, 3) cyst centres relative to ``center_mm``.
        cyst_radii_mm: (n,) cyst radii.
        wave_vectors: (m, 3) heterogeneity wave vectors in rad/mm.
        wave_phases: (m,) phases.
        contrast: per modality name, ``(solid mean, cyst mean, heterogeneity)`` in units of the
            modality's brightest tissue (see :data:`TUMOR_CONTRAST`).
    """

    center_mm: np.ndarray
    cyst_centers_mm: np.ndarray
    cyst_radii_mm: np.ndarray
    wave_vectors: np.ndarray
    wave_phases: np.ndarray
    contrast: dict[str, tuple[float, float, float]]

    def intensity(self, offsets_mm: np.ndarray, modality: str) -> np.ndarray:
        """Clean intensity (no bias, gain or noise) at offsets (3, ...) from ``center_mm``."""
        if modality not in self.contrast:
            raise SinganInsertError(f"Unknown modality {modality!r}; use one of {sorted(self.contrast)}.")
        solid, cyst, heterogeneity = self.contrast[modality]
        offsets = np.asarray(offsets_mm, np.float32)
        pattern = np.zeros(offsets.shape[1:], np.float32)
        for wave, phase in zip(self.wave_vectors, self.wave_phases):
            pattern += np.cos(sum(np.float32(wave[a]) * offsets[a] for a in range(3)) + np.float32(phase))
        pattern *= np.float32(np.sqrt(2 / max(len(self.wave_phases), 1)))
        values = np.float32(solid) * (1 + np.float32(heterogeneity) * pattern)
        for center, radius in zip(self.cyst_centers_mm, self.cyst_radii_mm):
            distance = np.sqrt(sum((offsets[a] - np.float32(center[a])) ** 2 for a in range(3)))
            # Soft cyst wall (~0.3 mm) so cysts have partial volume too.
            inside = 1 / (1 + np.exp(np.clip((distance - np.float32(radius)) / np.float32(0.15), -30, 30)))
            values += inside * (np.float32(cyst) - values)
        return values.astype(np.float32)


# --------------------------------------------------------------------------------------------
# The anatomy and its rendering on one grid
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Anatomy:
    head: _Ellipsoid
    shell_levels: dict[Tissue, float]  # normalised head radius of each shell's outer surface
    sulcus_depth: float  # in normalised head radius
    sulcus_width: float  # in units of the sulcal noise sd
    sulci: _WorldNoise
    structures: tuple[tuple[Tissue, _Ellipsoid | _Torus], ...]  # painted in order


@dataclass(frozen=True, eq=False)
class _Acquisition:
    """One modality: its grid, the tumor-free clean image and the fixed imaging realisation."""

    name: str
    affine: np.ndarray
    clean: np.ndarray  # tumor-free image before bias, gain and noise
    tissue: np.ndarray  # tumor-free tissue map (uint8, Tissue values)
    gain_field: np.ndarray  # gain x bias field
    noise: np.ndarray  # (2, *shape) standard normal real and imaginary noise
    sigma: float  # noise sd in output units

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.clean.shape

    def finish(self, clean: np.ndarray) -> np.ndarray:
        """Bias, gain and Rician noise (the same realisation every time)."""
        signal = self.gain_field * clean + np.float32(self.sigma) * self.noise[0]
        imaginary = np.float32(self.sigma) * self.noise[1]
        return np.sqrt(signal * signal + imaginary * imaginary)


def _paint(anatomy: _Anatomy, affine, shape, contrast, textures) -> tuple[np.ndarray, np.ndarray]:
    """Tumor-free clean image and tissue map of the anatomy on one grid (with partial volume)."""
    clean = np.zeros(shape, np.float32)
    tissue = np.zeros(shape, np.uint8)
    texture_a, texture_b = textures

    def composite(box, distance, kind: Tissue) -> None:
        alpha = np.clip(np.float32(0.5) - distance, 0, 1)
        mean, amplitude = contrast[kind]
        # Each tissue gets its own mixture of the two texture fields (angle set by the class).
        angle = 2.399 * int(kind)  # golden angle: well-spread mixtures
        texture = np.float32(np.cos(angle)) * texture_a[box] + np.float32(np.sin(angle)) * texture_b[box]
        intensity = np.float32(mean) * (1 + np.float32(amplitude) * texture)
        target = clean[box]
        target += alpha * (intensity - target)
        tissue[box][distance <= 0] = kind

    head_box = _index_box(affine, shape, *anatomy.head.world_extent())
    if head_box is not None:
        axes = _index_axes(head_box)
        radius, scale = anatomy.head.radius(affine, axes)
        # Sulci: where the smooth noise crosses zero the cortex retreats (CSF clefts), and the
        # white matter retreats under them more widely (white-matter cores in the gyri).
        sulcal = np.zeros_like(radius)
        band = (radius > anatomy.shell_levels[Tissue.WHITE_MATTER] - 2 * anatomy.sulcus_depth) & (
            radius < anatomy.shell_levels[Tissue.GREY_MATTER] + 0.05
        )
        index = np.nonzero(band)
        voxels = np.stack([idx + part.start for idx, part in zip(index, head_box)])
        points = affine[:3, :3] @ voxels + affine[:3, 3:4]
        noise = anatomy.sulci.sample(points)
        sulcal[index] = np.exp(-((noise / anatomy.sulcus_width) ** 2))
        sulcal_wide = np.zeros_like(radius)
        sulcal_wide[index] = np.exp(-((noise / (2.5 * anatomy.sulcus_width)) ** 2))
        for kind in _PAINT_ORDER_SHELLS:
            level = np.float32(anatomy.shell_levels[kind])
            shifted = radius - level
            if kind is Tissue.GREY_MATTER:
                shifted = shifted + np.float32(anatomy.sulcus_depth) * sulcal
            elif kind is Tissue.WHITE_MATTER:
                shifted = shifted + np.float32(1.5 * anatomy.sulcus_depth) * sulcal_wide
            composite(head_box, shifted * scale, kind)

    for kind, shape_ in anatomy.structures:
        low, high = shape_.world_extent()
        box = _index_box(affine, shape, low, high)
        if box is not None:
            composite(box, shape_.voxel_distance(affine, _index_axes(box)), kind)
    return clean, tissue


def _bias_field(rng, affine, shape, head: _Ellipsoid, strength: float) -> np.ndarray:
    """exp of a random quadratic polynomial of the normalised world position (coil shading)."""
    box = tuple(slice(0, n) for n in shape)
    points = _world_points(affine, box)
    x = [(p - np.float32(c)) / np.float32(s) for p, c, s in zip(points, head.center, head.semi_axes)]
    terms = [x[0], x[1], x[2], x[0] * x[1], x[0] * x[2], x[1] * x[2]]
    terms += [x[0] ** 2 - 0.3, x[1] ** 2 - 0.3, x[2] ** 2 - 0.3]
    coefficients = rng.uniform(-1, 1, len(terms)) * strength / np.sqrt(len(terms) / 3)
    log_bias = sum(np.float32(c) * t for c, t in zip(coefficients, terms))
    return np.exp(log_bias).astype(np.float32)


def _acquire(rng, name, anatomy, affine, shape, contrast, noise_level, bias_strength) -> _Acquisition:
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    # Texture: fine grain, small blobs and slow drifts (sd in mm, share of the variance).
    textures = _gaussian_random_field(rng, shape, spacing, [(0.4, 0.5), (1.2, 0.3), (3.5, 0.2)])
    jitter = rng.uniform(0.96, 1.04, len(Tissue))
    contrast = {kind: (mean * jitter[int(kind)], amp) for kind, (mean, amp) in contrast.items()}
    clean, tissue = _paint(anatomy, affine, shape, contrast, textures)
    gain = float(rng.uniform(400, 1200))
    gain_field = np.float32(gain) * _bias_field(rng, affine, shape, anatomy.head, bias_strength)
    noise = rng.standard_normal((2, *shape), dtype=np.float32)
    return _Acquisition(name, affine, clean, tissue, gain_field, noise, noise_level * gain)


# --------------------------------------------------------------------------------------------
# Random anatomy
# --------------------------------------------------------------------------------------------
def _random_anatomy(rng, head_radius: float, z_half: float) -> _Anatomy:
    """A random head: positions and sizes are fractions of ``head_radius`` (R, mm)."""
    R = head_radius

    def jitter(spread: float = 0.05) -> float:
        return 1 + rng.uniform(-spread, spread)

    center = rng.uniform(-0.02, 0.02, 3) * R
    head = _Ellipsoid(
        center,
        np.array([0.80 * jitter(), 0.95 * jitter(), 1.0]) * R * np.array([1, 1, max(1.6, 1.3 * z_half / R)]),
        _rotation(rng.uniform(-4, 4)),
    )
    shell_levels = {
        Tissue.SCALP: 1.0,
        Tissue.BONE: 0.93 * jitter(0.01),
        Tissue.CSF: 0.86 * jitter(0.01),
        Tissue.GREY_MATTER: 0.835,
        Tissue.WHITE_MATTER: 0.72 * jitter(0.02),
    }
    # The sulcal field only needs to cover the imaged slab, not the whole (tall) head.
    low, high = head.world_extent()
    low[2], high[2] = max(low[2], center[2] - 1.1 * z_half - 2), min(high[2], center[2] + 1.1 * z_half + 2)
    sulci = _WorldNoise.generate(rng, low, high, 0.035 * R)

    def at(x, y, z=0.0):
        return center + np.array([x, y, z]) * R

    structures: list[tuple[Tissue, _Ellipsoid | _Torus]] = [
        # Cerebellopontine-angle and prepontine cisterns (one CSF pool around the pons).
        (Tissue.CSF, _Ellipsoid(at(0, 0.12), np.array([0.42 * jitter(), 0.24 * jitter(), 0.9]) * R)),
        (Tissue.BRAINSTEM, _Ellipsoid(at(0, 0.05), np.array([0.24 * jitter(), 0.20 * jitter(), 2.5]) * R)),
        (Tissue.VESSEL, _Ellipsoid(at(rng.uniform(-0.03, 0.03), 0.29), np.array([0.035, 0.035, 2.5]) * R)),
        (Tissue.CSF, _Ellipsoid(at(0, -0.20), np.array([0.10, 0.05, 0.35]) * R)),  # fourth ventricle
    ]
    for side in (-1.0, 1.0):
        # Petrous bone: oblique bar pointing antero-medially, hollowed by the canal and labyrinth.
        structures.append(
            (
                Tissue.BONE,
                _Ellipsoid(at(side * 0.55, 0.12), np.array([0.32, 0.11, 0.22]) * R, _rotation(-side * 40)),
            )
        )
        structures.append((Tissue.CSF, _Ellipsoid(at(side * 0.47, 0.10), np.array([0.13, 0.035, 0.035]) * R)))
        structures.append(
            (Tissue.INNER_EAR, _Ellipsoid(at(side * 0.66, 0.06), np.array([0.055, 0.045, 0.045]) * R))
        )
        structures.append(
            (Tissue.INNER_EAR, _Torus(at(side * 0.71, 0.02, 0.01), _rotation(0, 8), 0.06 * R, 0.02 * R))
        )
        structures.append(
            (
                Tissue.COCHLEA,
                _Ellipsoid(at(side * 0.62, 0.17), np.array([0.075, 0.06, 0.05]) * R, _rotation(side * 30)),
            )
        )
    return _Anatomy(head, shell_levels, 0.12, 0.3, sulci, tuple(structures))


def _random_tumor_shape(rng, anatomy: _Anatomy, head_radius: float, volume_mm3: float) -> _TumorShape:
    """A vestibular-schwannoma-like tumor grown from one internal auditory canal into the cistern."""
    R = head_radius
    side = rng.choice([-1.0, 1.0])
    center0 = anatomy.head.center
    porus = center0 + np.array([side * 0.40, 0.10, 0.0]) * R
    radius = (3 * volume_mm3 / (4 * np.pi)) ** (1 / 3)
    center = porus + np.array([-side * 0.55, rng.uniform(-0.2, 0.2), rng.uniform(-0.15, 0.15)]) * radius
    elongation = np.exp(rng.uniform(-0.25, 0.25, 3))
    elongation /= np.prod(elongation) ** (1 / 3)
    lobes = [_Ellipsoid(center, radius * elongation, _rotation(rng.uniform(-90, 90), rng.uniform(-15, 15)))]
    for _ in range(rng.choice([0, 1, 2], p=[0.4, 0.4, 0.2])):
        direction = rng.normal(size=3)
        direction[0] = -side * abs(direction[0])  # lobes grow into the cistern, not the bone
        direction /= np.linalg.norm(direction)
        lobes.append(_Ellipsoid(center + 0.6 * radius * direction, radius * rng.uniform(0.45, 0.65, 3)))
    waves = rng.normal(size=(5, 3))
    waves *= (rng.uniform(1.5, 4.0, 5) / np.linalg.norm(waves, axis=1))[:, None] / radius
    tail = None
    if rng.random() < 0.8:  # intracanalicular part ("ice-cream cone")
        tail = _Ellipsoid(center0 + np.array([side * 0.49, 0.10, 0.0]) * R, np.array([0.11, 0.03, 0.03]) * R)
    shape = _TumorShape(tuple(lobes), waves, rng.uniform(0, 2 * np.pi, 5), 0.03, tail)
    # Scale the body so the whole tumor has the requested volume (volume ~ scale^3 for the body).
    factor = 1.0
    for _ in range(4):
        factor *= (volume_mm3 / max(shape.scaled(factor).volume_mm3(), 1e-6)) ** (1 / 3)
    return shape.scaled(factor)


def _random_tumor_tissue(rng, shape: _TumorShape) -> TumorTissue:
    radius = float(np.mean(shape.lobes[0].semi_axes))
    count = int(rng.choice([0, 1, 2, 3], p=[0.65, 0.2, 0.1, 0.05]))
    cyst_centers = rng.normal(size=(count, 3))
    distances = rng.uniform(0, 0.45, count) * radius
    cyst_centers *= (distances / np.maximum(np.linalg.norm(cyst_centers, axis=1), 1e-9))[:, None]
    waves = rng.normal(size=(32, 3))
    waves *= (2 * np.pi / rng.uniform(1.5, 5.0, 32) / np.linalg.norm(waves, axis=1))[:, None]
    return TumorTissue(
        center_mm=np.zeros(3),  # set to the B-grid mask centroid by the caller
        cyst_centers_mm=cyst_centers,
        cyst_radii_mm=rng.uniform(0.15, 0.35, count) * radius,
        wave_vectors=waves,
        wave_phases=rng.uniform(0, 2 * np.pi, 32),
        contrast=dict(TUMOR_CONTRAST),
    )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SimulatedSubject:
    """One simulated subject: modality A (ceT1-like) and B (hrT2-like) of the same anatomy.

    Arrays are indexed (i, j, k) like NIfTI data; ``affine_*`` maps voxel indices to RAS mm and
    both modalities share that physical space. Labels follow crossMoDA: 0 background, 1 tumor
    (vestibular schwannoma), 2 cochlea (when simulated with ``label_cochleas=True``).

    Attributes:
        seed: the seed it was simulated from.
        image_a, label_a, tissue_a, affine_a: modality A image (float32), labels (uint8),
            anatomical tissue map (uint8, :class:`Tissue` values) and 4x4 affine.
        image_b, label_b, tissue_b, affine_b: the same for modality B; ``image_b`` is the
            ground-truth hrT2 with the subject's tumor and ``label_b`` its true segmentation.
        tumor: the tumor's tissue (pass it to another subject's :meth:`render_b` to paste this
            subject's tumor there).
    """

    seed: int
    image_a: np.ndarray
    label_a: np.ndarray
    tissue_a: np.ndarray
    affine_a: np.ndarray
    image_b: np.ndarray
    label_b: np.ndarray
    tissue_b: np.ndarray
    affine_b: np.ndarray
    tumor: TumorTissue
    _acquisition_a: _Acquisition = field(repr=False)
    _acquisition_b: _Acquisition = field(repr=False)

    @property
    def spacing_a(self) -> tuple[float, float, float]:
        """Voxel size of modality A in mm."""
        return _spacing(self.affine_a)

    @property
    def spacing_b(self) -> tuple[float, float, float]:
        """Voxel size of modality B in mm."""
        return _spacing(self.affine_b)

    @property
    def tumor_volume_cm3(self) -> float:
        """Volume of the tumor's voxels on the B grid, in cm³."""
        return float((self.label_b == TUMOR_LABEL).sum() * np.prod(self.spacing_b) / 1000)

    def render_a(
        self,
        tumor_mask_a: np.ndarray | None = None,
        *,
        tumor: TumorTissue | None = None,
        placement: np.ndarray | None = None,
    ) -> np.ndarray:
        """Modality A with a tumor at ``tumor_mask_a`` (see :meth:`render_b`)."""
        return self._render(self._acquisition_a, self.label_a, tumor_mask_a, tumor, placement)

    def render_b(
        self,
        tumor_mask_b: np.ndarray | None = None,
        *,
        tumor: TumorTissue | None = None,
        placement: np.ndarray | None = None,
    ) -> np.ndarray:
        """The true modality-B image with a tumor occupying ``tumor_mask_b``.

        Args:
            tumor_mask_b: boolean (or 0/1) array of the B grid's shape: where the tumor is.
                ``None`` means the subject's own tumor (``label_b == 1``); an all-false mask
                gives the washed-out image.
            tumor: whose tumor tissue fills the mask; default this subject's (pass
                ``other.tumor`` when the mask holds a tumor pasted from another subject).
            placement: 4x4 world-to-world (mm) transform taking the tumor from where it grew to
                where the mask is, so that its internal pattern (cysts, heterogeneity) follows
                rotations, flips and scaling too. Default: the translation from
                ``tumor.center_mm`` to the mask's centroid (identity for ``None`` masks).

        Returns:
            float32 image on the B grid; bias, gain and the noise realisation are those of
            ``image_b``, and voxels farther than the mask's partial-volume blur (~2 voxels)
            are bit-identical to :meth:`render_b_washed_out`.
        """
        return self._render(self._acquisition_b, self.label_b, tumor_mask_b, tumor, placement)

    def render_b_washed_out(self) -> np.ndarray:
        """Modality B without the tumor: the tissue behind it shows (a CycleGAN stand-in)."""
        return self.render_b(np.zeros(self._acquisition_b.shape, bool))

    def to_torchio(self) -> "tio.Subject":
        """A TorchIO subject with ``ceT1`` and ``label`` (A grid), ``hrT2`` and ``hrT2_label`` (B grid).

        The two grids differ, so apply spatial transforms to one modality at a time (e.g. build
        a ``tio.Subject`` from ``subject['hrT2']`` alone) or resample one onto the other first.
        """
        import torch
        import torchio as tio

        def tensor(array):  # a copy: transforms must not write into the subject's arrays
            return torch.from_numpy(np.array(array[None], copy=True))

        return tio.Subject(
            ceT1=tio.ScalarImage(tensor=tensor(self.image_a), affine=self.affine_a),
            label=tio.LabelMap(tensor=tensor(self.label_a), affine=self.affine_a),
            hrT2=tio.ScalarImage(tensor=tensor(self.image_b), affine=self.affine_b),
            hrT2_label=tio.LabelMap(tensor=tensor(self.label_b), affine=self.affine_b),
            seed=self.seed,
        )

    def _render(self, acquisition, own_label, mask, tumor, placement) -> np.ndarray:
        tumor = self.tumor if tumor is None else tumor
        if placement is not None:
            placement = np.asarray(placement, float)
            if placement.shape != (4, 4) or not np.all(np.isfinite(placement)):
                raise SinganInsertError("placement must be a finite 4x4 world-to-world affine matrix (mm).")
        if mask is None:
            mask = own_label == TUMOR_LABEL
            placement = np.eye(4) if placement is None else placement
        else:
            mask = np.asarray(mask)
            if mask.shape != acquisition.shape:
                raise SinganInsertError(
                    f"The tumor mask has shape {mask.shape} but the {acquisition.name} grid is "
                    f"{acquisition.shape}; resample the mask onto that grid first."
                )
            mask = mask.astype(bool)
        return _render(acquisition, mask, tumor, placement)


def _render(acquisition: _Acquisition, mask: np.ndarray, tumor: TumorTissue, placement) -> np.ndarray:
    """Composite ``tumor`` into the tumor-free clean image at ``mask``, then bias, gain, noise."""
    clean = acquisition.clean.copy()
    if mask.any():
        if placement is None:  # move the tumor's pattern along with the mask's centroid
            placement = np.eye(4)
            placement[:3, 3] = _centroid_mm(mask, acquisition.affine) - tumor.center_mm
        margin = int(np.ceil(4 * TUMOR_PARTIAL_VOLUME_SIGMA)) + 1
        box = tuple(
            slice(max(int(idx.min()) - margin, 0), min(int(idx.max()) + margin + 1, n))
            for idx, n in zip(np.nonzero(mask), mask.shape)
        )
        fraction = ndimage.gaussian_filter(
            mask[box].astype(np.float32), TUMOR_PARTIAL_VOLUME_SIGMA, mode="constant"
        )
        points = _world_points(acquisition.affine, box).reshape(3, -1)
        inverse = np.linalg.inv(placement)
        offsets = inverse[:3, :3] @ points + (inverse[:3, 3] - tumor.center_mm)[:, None]
        values = tumor.intensity(offsets.reshape(3, *fraction.shape), acquisition.name)
        target = clean[box]
        target += fraction * (values - target)
    return acquisition.finish(clean)


def simulate_subject(
    seed: int,
    shape: tuple[int, int, int] = (128, 128, 48),
    *,
    spacing_b: tuple[float, float, float] = (0.4, 0.4, 1.0),
    spacing_a: tuple[float, float, float] = (0.5, 0.5, 1.5),
    field_of_view_a: tuple[float, float, float] = (1.2, 1.2, 1.0),
    tumor_volume_cm3: tuple[float, float] = (0.1, 5.0),
    misalignment_deg: float = 5.0,
    noise_level: float = 0.03,
    bias_strength: float = 0.2,
    label_cochleas: bool = True,
) -> SimulatedSubject:
    """Simulate one subject (deterministic per ``seed``).

    Args:
        seed: non-negative integer; the same seed and arguments give bit-identical subjects.
        shape: modality B's grid (i, j, k); k is the slice axis. Each side at least 32.
        spacing_b: modality B voxel size in mm (hrT2-like).
        spacing_a: modality A voxel size in mm (ceT1-like).
        field_of_view_a: A's field of view relative to B's, per axis (> 0); A's shape follows.
        tumor_volume_cm3: (low, high) range the tumor volume is drawn from, log-uniformly;
            pass (v, v) for a fixed volume. The head scales with B's field of view, so keep
            the largest tumor well below the head (the default range suits the default grid).
        misalignment_deg: A's grid is rotated by up to this angle about the slice axis (and
            half of it about the left-right axis) and shifted by up to 1.5 mm, as unregistered
            scans are. 0 aligns the grids' axes.
        noise_level: Rician noise sd relative to the brightest tissue, in [0, 0.5].
        bias_strength: amplitude of the log bias field, in [0, 1] (0: no bias).
        label_cochleas: also label the cochleas (2), as crossMoDA does.

    Returns:
        A :class:`SimulatedSubject`.
    """
    _check_arguments(
        seed, shape, spacing_a, spacing_b, field_of_view_a, tumor_volume_cm3, noise_level, bias_strength
    )
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)]
    anatomy_rng, tumor_rng, geometry_rng, rng_a, rng_b = streams

    fov_b = np.asarray(shape) * np.asarray(spacing_b, float)
    head_radius = 0.46 * min(fov_b[0], fov_b[1])
    anatomy = _random_anatomy(anatomy_rng, head_radius, fov_b[2] / 2)
    affine_b = _grid_affine(shape, spacing_b, np.zeros(3), np.eye(3))
    shape_a = tuple(int(n) for n in np.maximum(np.round(fov_b * field_of_view_a / spacing_a), 8))
    rotation_a = _rotation(
        geometry_rng.uniform(-1, 1) * misalignment_deg, geometry_rng.uniform(-0.5, 0.5) * misalignment_deg
    )
    shift_a = geometry_rng.uniform(-1.5, 1.5, 3) * (misalignment_deg > 0)
    affine_a = _grid_affine(shape_a, spacing_a, shift_a, rotation_a)

    low, high = np.log(tumor_volume_cm3[0]), np.log(tumor_volume_cm3[1])
    volume_mm3 = 1000 * float(np.exp(tumor_rng.uniform(low, high)))
    tumor_shape = _random_tumor_shape(tumor_rng, anatomy, head_radius, volume_mm3)
    tumor = _random_tumor_tissue(tumor_rng, tumor_shape)
    # The tumor sits in a CSF pocket (the cistern it has widened, with a CSF cleft around it),
    # painted after the brainstem and before the bones; washed out, the pocket is what remains.
    pocket = tumor_shape.grown(1.12, 0.6)
    structures = list(anatomy.structures)
    after_brainstem = [kind for kind, _ in structures].index(Tissue.VESSEL) + 1
    structures.insert(after_brainstem, (Tissue.CSF, pocket))
    anatomy = dataclasses.replace(anatomy, structures=tuple(structures))

    imaging = {"noise_level": noise_level, "bias_strength": bias_strength}
    acquisition_a = _acquire(rng_a, MODALITY_A, anatomy, affine_a, shape_a, CET1_CONTRAST, **imaging)
    acquisition_b = _acquire(rng_b, MODALITY_B, anatomy, affine_b, tuple(shape), HRT2_CONTRAST, **imaging)
    mask_a = tumor_shape.rasterize(affine_a, shape_a)
    mask_b = tumor_shape.rasterize(affine_b, tuple(shape))
    for name, mask in ((MODALITY_A, mask_a), (MODALITY_B, mask_b)):
        if not mask.any():
            raise SinganInsertError(
                f"The simulated tumor has no voxel on the {name} grid; increase tumor_volume_cm3."
            )
        if mask[[0, -1]].any() or mask[:, [0, -1]].any() or mask[:, :, [0, -1]].any():
            raise SinganInsertError(
                f"The simulated tumor touches the {name} field of view's border; use a larger grid "
                "(shape) or smaller tumor_volume_cm3."
            )
    tumor = TumorTissue(
        _centroid_mm(mask_b, affine_b),
        tumor.cyst_centers_mm,
        tumor.cyst_radii_mm,
        tumor.wave_vectors,
        tumor.wave_phases,
        tumor.contrast,
    )

    labels, tissues = [], []
    for acquisition, mask in ((acquisition_a, mask_a), (acquisition_b, mask_b)):
        label = np.zeros(acquisition.shape, np.uint8)
        if label_cochleas:
            label[acquisition.tissue == Tissue.COCHLEA] = COCHLEA_LABEL
        label[mask] = TUMOR_LABEL
        tissue = acquisition.tissue.copy()
        tissue[mask] = Tissue.TUMOR
        labels.append(label)
        tissues.append(tissue)

    # The published images go through the same path as any other render (render_b() == image_b).
    return SimulatedSubject(
        seed=int(seed),
        image_a=_render(acquisition_a, mask_a, tumor, np.eye(4)),
        label_a=labels[0],
        tissue_a=tissues[0],
        affine_a=affine_a,
        image_b=_render(acquisition_b, mask_b, tumor, np.eye(4)),
        label_b=labels[1],
        tissue_b=tissues[1],
        affine_b=affine_b,
        tumor=tumor,
        _acquisition_a=acquisition_a,
        _acquisition_b=acquisition_b,
    )


def write_crossmoda(
    subject: SimulatedSubject,
    folder: str | Path,
    name: str,
    *,
    truth_folder: str | Path | None = None,
) -> dict[str, Path]:
    """Write a subject in the crossMoDA layout.

    Writes ``<folder>/<name>_ceT1.nii.gz`` (float32), ``<name>_Label.nii.gz`` (uint8, A grid)
    and ``<name>_hrT2.nii.gz`` (float32), with the subjects' affines as both qform and sform
    (code 1, scanner) and units in mm. crossMoDA gives no hrT2 labels for training; with
    ``truth_folder`` the true hrT2 labels are written there as ``<name>_Label.nii.gz`` (the
    layout of crossMoDA's hidden evaluation labels), which must differ from ``folder``.

    Returns:
        The written paths under keys ``"ceT1"``, ``"label"``, ``"hrT2"`` (and ``"hrT2_label"``).
    """
    import nibabel as nib

    if not name or Path(name).name != name:
        raise SinganInsertError(
            f"name must be a plain file-name prefix such as 'crossmoda_sim_1', got {name!r}."
        )
    folder = Path(folder)
    if truth_folder is not None and Path(truth_folder).resolve() == folder.resolve():
        raise SinganInsertError("truth_folder must differ from folder: both would hold <name>_Label.nii.gz.")
    items = [
        ("ceT1", folder / f"{name}_ceT1.nii.gz", subject.image_a.astype(np.float32), subject.affine_a),
        ("label", folder / f"{name}_Label.nii.gz", subject.label_a.astype(np.uint8), subject.affine_a),
        ("hrT2", folder / f"{name}_hrT2.nii.gz", subject.image_b.astype(np.float32), subject.affine_b),
    ]
    if truth_folder is not None:
        truth_path = Path(truth_folder) / f"{name}_Label.nii.gz"
        items.append(("hrT2_label", truth_path, subject.label_b.astype(np.uint8), subject.affine_b))
    written = {}
    for key, path, data, affine in items:
        path.parent.mkdir(parents=True, exist_ok=True)
        image = nib.Nifti1Image(data, affine)
        image.header.set_xyzt_units("mm")
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        nib.save(image, path)
        written[key] = path
    return written


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def _centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    index = np.array([idx.mean() for idx in np.nonzero(mask)])
    return affine[:3, :3] @ index + affine[:3, 3]


def _check_arguments(
    seed, shape, spacing_a, spacing_b, field_of_view_a, volume, noise_level, bias_strength
) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SinganInsertError(f"seed must be a non-negative integer, got {seed!r}.")
    if len(shape) != 3 or any(int(n) != n or n < 32 for n in shape):
        raise SinganInsertError(f"shape must be three integers >= 32, got {shape!r}.")
    triples = (("spacing_a", spacing_a), ("spacing_b", spacing_b), ("field_of_view_a", field_of_view_a))
    for label, values in triples:
        if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
            raise SinganInsertError(f"{label} must be three positive numbers, got {values!r}.")
    if len(volume) != 2 or not (0 < volume[0] <= volume[1]) or not np.isfinite(volume[1]):
        raise SinganInsertError(f"tumor_volume_cm3 must be (low, high) with 0 < low <= high, got {volume!r}.")
    if not 0 <= noise_level <= 0.5:
        raise SinganInsertError(f"noise_level must be in [0, 0.5], got {noise_level}.")
    if not 0 <= bias_strength <= 1:
        raise SinganInsertError(f"bias_strength must be in [0, 1], got {bias_strength}.")
