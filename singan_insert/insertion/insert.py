"""Tumor insertion in a 3D volume: paste, map intensities, harmonize every tumor slice, label.

For one tumor, :func:`insert_tumor`

1. places the source tumor on the target grid (:func:`singan_insert.insertion.placement.paste_tumor`);
2. maps its intensities into the target's units with
   :func:`singan_insert.insertion.intensity.map_tumor_intensities` (``"normalized"`` or ``"matched"``),
   then sets its level: by default (``appearance="auto"``) the model chooses, per tumor, the
   most realistic visible level against its training slice of B
   (:mod:`singan_insert.insertion.appearance`), which fixes the contrast factor
   :math:`\\lambda` of that tumor; with ``appearance="fixed"`` (the paper's method) the
   user's :math:`\\lambda` is applied as is. A model whose training slice's tumor is annotated
   (:mod:`singan_insert.insertion.annotation`) takes the level, spread and texture from that
   tumor instead of choosing them by realism. Both mappings are monotone functions of the
   intensity that depend on the two images only through their distributions, so they are built
   once on compact quantile tables (:func:`singan_insert.insertion.placement.intensity_quantiles`) and applied
   to the tumor voxels by linear interpolation: the cost does not grow with the volume. On
   test volumes the result agrees with the whole-volume mapping within 1 % of the target's
   robust range for 99 % of the tumor voxels; only the few most extreme values of the tails
   (where whole-volume histogram matching follows single outlier voxels) differ by up to ~3 %;
3. builds the composite (the target with the mapped tumor inside its mask; with the automatic
   appearance, with a partial-volume edge that reaches the voxels beside the mask and, through
   the slices, the neighbouring tumor slices, :func:`~singan_insert.insertion.appearance.partial_volume`;
   only the tumor's own slices are harmonized and written, so the slices just beyond the
   tumor's two ends are left as they are); with an annotated
   model (``rim``, default on) its surroundings get B's rim, the annotated tumor's band levels
   0-3 mm outside it, widths scaled by the tumor's size over the annotated one's
   (:func:`singan_insert.insertion.annotation.render_rim`, :func:`~singan_insert.insertion.annotation.rim_scale`), before the pyramid
   sees it: shown a bare blob, the generators paint a CSF cleft of their own inside the mask's
   edge;
4. cuts every slice that intersects the tumor along ``axis`` (default: the through-plane axis,
   the one with the largest voxel size) out of a crop that extends ``context_mm`` beyond the
   tumor in the slice plane, and harmonizes all of them in ONE batched
   :meth:`~singan_insert.harmonizer.model.Harmonizer.harmonize` call with the same noise field for
   every slice (``shared_noise=True``: neighbouring slices, whose composites differ little,
   receive the same noise, so no stripes appear in the through-plane view), normalised with
   the whole volume's percentiles. With an annotated model the tumor's own voxels then keep
   their appearance, B's (``harmonize_tumor=False``): the pyramid's output is kept where the
   blend reaches beyond the mask, the tumor's edge and surroundings. On the crossMoDA
   simulation the pyramid's output inside the tumor had twice the high-pass energy of real
   hrT2 tumors (``benchmarks/bench_pipeline.py``, the texture diagnostics; downstream, row
   ``ours_tumor_harmonized``, keeping the tumor gained Dice in one of four runs). Without an annotation, and with
   ``appearance="fixed"`` (the paper's method), the tumor is harmonized too;
5. with an annotated model, brings the tumor back to the annotated level, its outermost pixels
   the annotated tumor's step above its interior (:func:`~singan_insert.insertion.annotation.tumor_edge`:
   B's edge is mixed with the bright cleft), and each rim band back to B's (the pyramid moves
   both); with ``texture`` (default with ``appearance="auto"``), adds seeded noise inside the
   tumor up to B's high-pass energy (the pyramid's own noise is too weak
   to texture a tumor; see :func:`singan_insert.insertion.appearance.inject_texture`);
6. keeps the result to the values the target can hold (the generators ring beside black bone
   or air: nothing darker than the target's darkest voxel, nothing around the tumor brighter
   than its brightest; the count is ``record["tumor"]["clipped_to_target_range"]``);
7. restacks the harmonized slices into a copy of the volume (the harmonizer already blends
   them into the background: voxels beyond ``dilation_mm + feather_mm`` of the tumor, and
   beyond the rim's 3 mm x ``rim_scale`` when ``rim`` is on, are left bit-identical) and writes
   ``label_value`` into a copy of the label map.

Overlap with existing labels (``overlap``):

``"replace"`` (default)
    the tumor's voxels take ``label_value`` whatever they held: the image shows tumor there now.
    Labelled voxels next to the tumor keep their label while the blend reaches into them, as it
    reaches all of the tumor's surroundings. The record counts, per label value, the labelled
    voxels the tumor took (``record["overlap"]``; ``None`` without a target label map).
``"keep"``
    existing non-zero labels win; the tumor is restricted to unlabelled voxels, in the image
    and in the label alike (so the two always agree): every labelled voxel keeps its image
    value, also where the tumor's edge and the blend would reach it. An error is raised if
    nothing is left.
``"error"``
    any overlap with a non-zero label raises :class:`~singan_insert.errors.SinganInsertError`.

Inputs are never modified; errors are raised before anything is written.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Literal, Sequence

import numpy as np
import torch

from singan_insert.errors import SinganInsertError
from singan_insert.harmonizer.model import Harmonizer
from singan_insert.insertion.appearance import (
    AMBIGUOUS_MARGIN,
    DEFAULT_VISIBILITY_FLOOR,
    AmbiguousLevelWarning,
    UnannotatedModelWarning,
    PatchBank,
    TextureBank,
    inplane_distance,
    partial_volume,
    spread_outward,
    inplane_box,
    choose_level,
    inject_texture,
    masked_lowpass,
    scoring_slices,
)
from singan_insert.insertion.annotation import (
    RIM_EDGES_MM,
    STRUCTURE_SIGMA_PX,
    TumorProfile,
    interior_spread,
    render_rim,
    rim_scale,
    tumor_edge,
)
from singan_insert.insertion.orientation import (Reorientation, axis_direction, check_orientation_codes,
                                                 reorientation_to)
from singan_insert.insertion.intensity import (TISSUE_THRESHOLD, IntensityMode, air_level, check_intensity_mode,
                                               map_tumor_intensities, robust_range)
from singan_insert.harmonizer.normalization import PercentileNormalization
from singan_insert.checks import check_finite, check_positive
from singan_insert.io import orientation_codes
from singan_insert.harmonizer.pyramid import resize
from singan_insert.insertion.placement import (
    DEFAULT_MAX_ANISOTROPY,
    Placement,
    SourceTumor,
    check_affine,
    intensity_quantiles,
    paste_tumor,
    spacing_from_affine,
)

OverlapPolicy = Literal["replace", "keep", "error"]
Appearance = Literal["auto", "fixed"]
#: Rim (mm) around the tumor whose mean is "the surroundings" and whose texture is B's.
SHELL_MM = 2.0
#: With an annotation, the source's internal spread is scaled to B's by at most this factor...
MAX_STRUCTURE_GAIN = 3.0
#: ... and shrunk by this one: A's structure predicts B's only in part (low-passed ceT1 and hrT2
#: correlate 0.39 on average inside the tumor, benchmarks/dev_annotation_facts.py, and a cyst is
#: dark in ceT1 but bright in hrT2), so the least-squares estimate keeps less than B's full
#: spread. benchmarks/dev_harmonizer.py (seeds 200-207): low-pass tumor error 0.046 / 0.046 /
#: 0.061 for 0 / 0.5 / 1 x B's spread; the half keeps the source's visible structure.
STRUCTURE_SHRINK = 0.5
#: With an annotation, bring the harmonized tumor back to the annotated level (the pyramid pulls
#: a tumor toward its surroundings). A module switch so that the ablation can turn it off.
RESTORE_ANNOTATED_LEVEL = True
#: Ablation only (benchmarks and the pipeline's ``no_pyramid`` variant): skip the generators,
#: keeping every other step (level, rim, texture). A module switch, not a user option.
_ABLATE_PYRAMID = False
#: Ablation only (``benchmarks/dev_harmonizer.py``): the partial-volume edge as it was before
#: 2026-12-03, in-plane only and cut to 0 at the mask's edge (up to the blur's own cut at 2 sd, a 3e-4 tail).
_ABLATE_EDGE = False
RECORD_FORMAT = "singan-insert-insertion"
RECORD_VERSION = 1

_HARMONIZE_DEFAULTS = inspect.signature(Harmonizer.harmonize).parameters


@dataclass(frozen=True)
class InsertionParameters:
    """Everything that decides the result of :func:`insert_tumor`, besides the data and model.

    Args:
        placement: where and how the source tumor goes (:class:`~singan_insert.insertion.placement.Placement`);
            ``None`` keeps its physical position.
        intensity_mode: ``"normalized"`` or ``"matched"`` (see :mod:`singan_insert.insertion.intensity`).
        contrast: the factor :math:`\\lambda > 0` of ``appearance="fixed"`` (GBA uses 0.5, 0.8,
            1.5). With ``"auto"`` the model chooses each tumor's :math:`\\lambda` itself and this
            value has no effect (the result is the same for any input :math:`\\lambda`; a
            value other than 1 warns, and the transforms and the command line refuse it).
        start_scale: harmonizer injection scale (negative counts from the finest); ``None``:
            the model's default.
        axis: array axis the slices are cut along (0, 1 or 2); ``None``: the through-plane axis
            (largest voxel size; the last of equals).
        context_mm: in-plane margin around the tumor kept in the harmonized crop (>= 0).
        seed: seed of the harmonizer noise; ``None`` draws one from torch's generator (the drawn
            seed is recorded).
        label_value: value written in the label map (> 0).
        overlap: ``"replace"``, ``"keep"`` or ``"error"`` (see the module docstring).
        dilation_mm, feather_mm: blend weight of the harmonizer; ``None``: its defaults.
        border_margin, clip_to_fov, max_anisotropy: see :func:`~singan_insert.insertion.placement.paste_tumor`.
        appearance: ``"auto"`` (default): the model picks each tumor's level in B by realism
            under a visibility constraint; ``"fixed"``: the paper's fixed :math:`\\lambda`.
            A model file without a stored training slice (written by an earlier version)
            falls back to ``"fixed"`` with a warning.
        visibility_floor: with ``"auto"``, the least tumor-vs-surroundings difference allowed,
            as a fraction of the model's intensity range, in [0, 0.5).
        texture: add B's texture inside the tumor after harmonization; ``None``: on with
            ``appearance="auto"``, off with ``"fixed"`` (the paper's method unchanged).
        rim: with a model whose training slice's tumor is annotated, give the new tumor the
            annotated tumor's rim, B's mean level in each band of
            :data:`~singan_insert.insertion.annotation.RIM_EDGES_MM` outside it (see
            :func:`~singan_insert.insertion.annotation.render_rim`); ``None``: on with
            ``appearance="auto"`` and an annotated model for a tumor left where it physically is
            (``placement`` without a ``location``: its own site, as in the cross-modal pipeline),
            off for a tumor moved to a ``location``, whose new surroundings need not be the fluid
            space the annotated rim comes from (placed in white matter or at a CSF voxel, 0 of 7
            tumors stay visible with the rim, 7 of 7 without, ``benchmarks/dev_target_conditions.py``).
            Without an annotation there is no rim to copy and this has no effect (the realism
            score cannot choose one: it prefers the tissue's level, ``benchmarks/dev_rim_realism.py``).
        rim_scale: factor on the rim's band widths; ``None``: the new tumor's size over the
            annotated tumor's (:func:`~singan_insert.insertion.annotation.rim_scale`, in
            [0.5, 2]), so that the rim keeps its proportions to the tumor; 1 keeps the annotated
            widths in mm. The resolved factor is recorded.
        harmonize_tumor: whether the tumor's own voxels take the pyramid's output (the paper's
            method) or keep the appearance chosen for them, the pyramid then harmonizing the
            blend beyond the mask (the tumor's edge and surroundings); ``None``: kept when the
            tumor's look comes from the model's annotation (level, spread, texture and rim of a
            real B tumor), harmonized otherwise (``"fixed"``, or ``"auto"`` without annotation).
    """

    placement: Placement | None = None
    intensity_mode: IntensityMode = "normalized"
    contrast: float = 1.0
    start_scale: int | None = None
    axis: int | None = None
    context_mm: float = 20.0
    seed: int | None = 0
    label_value: int = 1
    overlap: OverlapPolicy = "replace"
    dilation_mm: float | None = None
    feather_mm: float | None = None
    border_margin: int = 1
    clip_to_fov: bool = False
    max_anisotropy: float = DEFAULT_MAX_ANISOTROPY
    appearance: Appearance = "auto"
    visibility_floor: float = DEFAULT_VISIBILITY_FLOOR
    texture: bool | None = None
    rim: bool | None = None
    rim_scale: float | None = None
    harmonize_tumor: bool | None = None

    def __post_init__(self) -> None:
        if self.appearance not in ("auto", "fixed"):
            raise SinganInsertError(f"appearance must be 'auto' or 'fixed', got {self.appearance!r}.")
        if isinstance(self.visibility_floor, (bool, np.bool_)) or not (
                isinstance(self.visibility_floor, (int, float)) and 0 <= self.visibility_floor < 0.5):
            raise SinganInsertError(
                f"visibility_floor must be a number in [0, 0.5), got {self.visibility_floor!r}.")
        for name in ("texture", "rim", "harmonize_tumor"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise SinganInsertError(f"{name} must be True, False or None, got {getattr(self, name)!r}.")
        check_intensity_mode(self.intensity_mode)
        if self.rim_scale is not None:
            check_positive(self.rim_scale, "rim_scale")
        # Numbers: the checks the samplers use (NaN, booleans, fractions and overflows refused).
        from singan_insert.insertion import sampling

        sampling.check_contrast(self.contrast, "contrast")
        sampling.check_start_scale(self.start_scale)
        if self.seed is not None:
            sampling.check_seed(self.seed)
        for name in ("dilation_mm", "feather_mm"):
            if getattr(self, name) is not None:
                sampling.check_non_negative(getattr(self, name), name)
        sampling.check_integer(self.border_margin, "border_margin", 0)
        if sampling.check_number(self.max_anisotropy, "max_anisotropy") < 1:
            raise SinganInsertError(f"max_anisotropy must be >= 1, got {self.max_anisotropy!r}.")
        sampling.check_non_negative(self.context_mm, "context_mm")
        sampling.check_integer(self.label_value, "label_value", 1)
        if not isinstance(self.clip_to_fov, (bool, np.bool_)):
            raise SinganInsertError(f"clip_to_fov must be True or False, got {self.clip_to_fov!r}.")
        if self.axis is not None and (isinstance(self.axis, (bool, np.bool_)) or not isinstance(self.axis, (int, np.integer))
                                      or self.axis not in (0, 1, 2)):
            raise SinganInsertError(f"axis must be 0, 1, 2 or None, got {self.axis!r}.")
        if self.overlap not in ("replace", "keep", "error"):
            raise SinganInsertError(f"overlap must be 'replace', 'keep' or 'error', got {self.overlap!r}.")
        if self.placement is not None and not isinstance(self.placement, Placement):
            raise SinganInsertError("placement must be a singan_insert.insertion.placement.Placement or None.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (the inverse of :meth:`from_dict`)."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["placement"] = None if self.placement is None else self.placement.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InsertionParameters":
        data = dict(data)
        if data.get("placement") is not None:
            data["placement"] = Placement.from_dict(data["placement"])
        if "rim" in data and "rim_scale" not in data:
            data["rim_scale"] = 1.0  # recorded before the rim followed the tumor's size: replay as made
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SinganInsertError(f"Unknown insertion parameters {sorted(unknown)}.")
        return cls(**data)


@dataclass(frozen=True, eq=False)
class InsertionResult:
    """Output of :func:`insert_tumor`.

    Args:
        image: the new volume (same shape; the target's float dtype, else float32).
        label: the new label map (the given label's dtype, else :func:`default_label_dtype`).
        mask: where the tumor was inserted (bool, whole volume).
        record: JSON-serialisable description: ``record["parameters"]`` are the resolved
            :class:`InsertionParameters` (``InsertionParameters.from_dict`` of it replays the run
            bit for bit with the same data and model).
        composite: the naive paste before harmonization (only with ``return_composite=True``).
    """

    image: np.ndarray
    label: np.ndarray
    mask: np.ndarray
    record: dict[str, Any]
    composite: np.ndarray | None = None


def default_label_dtype(label_value: int) -> np.dtype:
    """dtype of a new label map: ``uint8`` when ``label_value`` fits, else ``int32``."""
    return np.dtype(np.uint8 if 0 <= label_value <= np.iinfo(np.uint8).max else np.int32)


def through_plane_axis(spacing: Sequence[float]) -> int:
    """The axis with the largest voxel size (the last of equals, i.e. ``2`` when isotropic)."""
    largest = max(spacing)
    return max(i for i, s in enumerate(spacing) if math.isclose(s, largest, rel_tol=1e-6))


def check_model_provenance(
    harmonizer: Harmonizer, axis: int | None = None, modality: str | None = None
) -> None:
    """Raise when the model was trained on another axis or modality than the caller declares.

    Nothing is checked for an undeclared value (``None``) or when the model does not know its
    own provenance.
    """
    if modality is not None and harmonizer.modality is not None \
            and str(modality).lower() != str(harmonizer.modality).lower():
        raise SinganInsertError(
            f"The harmonizer was trained on {harmonizer.modality!r} but the target is declared "
            f"{modality!r}. Use a model trained on that modality (or translate the image first)."
        )
    if axis is not None and harmonizer.axis is not None and int(axis) != int(harmonizer.axis):
        raise SinganInsertError(
            f"The harmonizer was trained on slices cut along axis {harmonizer.axis} but slices "
            f"along axis {axis} were requested. Pass axis={harmonizer.axis} or train a model on "
            "that axis."
        )


def insert_tumor(
    target_image: np.ndarray,
    target_affine: np.ndarray,
    source: SourceTumor,
    harmonizer: Harmonizer,
    parameters: InsertionParameters | None = None,
    *,
    target_label: np.ndarray | None = None,
    modality: str | None = None,
    normalization: PercentileNormalization | None = None,
    return_composite: bool = False,
) -> InsertionResult:
    """Insert one source tumor into a target volume (see the module docstring).

    Args:
        target_image: the target volume, 3D ``(X, Y, Z)``, finite.
        target_affine: its voxel-to-world affine (mm).
        source: the tumor to insert (:class:`~singan_insert.insertion.placement.SourceTumor`).
        harmonizer: a trained :class:`~singan_insert.harmonizer.model.Harmonizer` of the target's
            modality.
        parameters: see :class:`InsertionParameters` (default: all defaults).
        target_label: existing label map on the target grid, or ``None`` for an empty one.
        modality: the target's modality, checked against the model's when both are known.
            The axis is checked likewise when ``parameters.axis`` is given (the target's own
            through-plane axis, which the default takes, only warns: a record replays).
        normalization: intensity normalisation of the target; default: fitted on the volume.
        return_composite: also return the naive paste (the composite before harmonization).

    When the model knows its training volume's orientation, the target is inserted in that
    orientation and the results come back in the target's own (see
    :mod:`~singan_insert.insertion.orientation`; ``record["orientation"]`` says when it happened).

    Returns:
        An :class:`InsertionResult` (new arrays; the inputs are not modified).
    """
    image = np.asarray(target_image)
    arguments = dict(target_label=target_label, modality=modality, normalization=normalization,
                     return_composite=return_composite)
    codes = harmonizer.orientation
    labels_agree = target_label is None or np.shape(target_label) == image.shape
    if codes is None or image.ndim != 3 or not labels_agree:  # (the bad shapes are refused below)
        return _insert_tumor(image, target_affine, source, harmonizer, parameters, **arguments)
    affine = check_affine(target_affine, "target affine")
    turn = reorientation_to(affine, image.shape, check_orientation_codes(codes, "model's orientation"))
    if turn.is_identity:
        return _insert_tumor(image, affine, source, harmonizer, parameters, **arguments)
    params = parameters or InsertionParameters()
    placement = params.placement
    if placement is not None and placement.location is not None and placement.units == "voxel":
        placement = replace(placement, location=turn.point(placement.location))
    turned = replace(params, placement=placement, axis=None if params.axis is None else turn.axis(params.axis))
    arguments["target_label"] = None if target_label is None else turn.array(np.asarray(target_label))
    try:
        result = _insert_tumor(turn.array(image), turn.affine(affine), source, harmonizer, turned, **arguments)
    except SinganInsertError as error:
        # Any voxel indices, axes and shapes in the message are those of the reoriented target.
        note = (f" (Voxel indices, axes and shapes here are in the model's orientation, {codes}, in which "
                f"the target was inserted: your target of shape {image.shape} is {orientation_codes(affine)}.)")
        try:
            noted = type(error)(f"{error}{note}")
        except TypeError:  # a subclass with another constructor
            noted = SinganInsertError(f"{error}{note}")
        raise noted from error
    return _turned_back(result, turn.inverse(), params.placement, orientation_codes(affine), codes)


def _turned_back(result: InsertionResult, back: Reorientation, placement: Placement | None, target_codes: str,
                 model_codes: str) -> InsertionResult:
    """``result`` of the reoriented target in the target's own voxel frame (arrays and record)."""
    record = copy.deepcopy(result.record)
    resolved = InsertionParameters.from_dict(record["parameters"])
    record["parameters"] = replace(resolved, placement=placement, axis=back.axis(resolved.axis)).to_dict()
    tumor = record["tumor"]
    box = [back.interval(a, start, start + size) for a, (start, size)
           in enumerate(zip(tumor["box_start"], tumor["box_shape"]))]
    crop = [back.interval(a, start, stop) for a, (start, stop) in enumerate(tumor["crop"])]
    tumor["box_start"], tumor["box_shape"], tumor["crop"] = [0] * 3, [0] * 3, [None] * 3
    for axis, start, stop in box:
        tumor["box_start"][axis], tumor["box_shape"][axis] = start, stop - start
    for axis, start, stop in crop:
        tumor["crop"][axis] = [start, stop]
    tumor["slices"] = back.indices(resolved.axis, tumor["slices"])
    target = record["target"]
    target["shape"] = list(back.output_shape)
    target["spacing_mm"] = [target["spacing_mm"][back.source_axis(a)] for a in range(3)]
    record["orientation"] = {"target": target_codes, "model": model_codes,
                             "note": "inserted in the model's orientation, returned in the target's"}
    composite = None if result.composite is None else back.array(result.composite)
    return InsertionResult(image=back.array(result.image), label=back.array(result.label),
                           mask=back.array(result.mask), record=record, composite=composite)


def _plane_mismatch(axis: int, model_axis: int, codes: str | None) -> str:
    """The warning for tumor slices cut across another axis than the model's training slice."""
    if codes is None:
        return (f"The target's thickest voxel axis is {axis} but the model was trained on slices cut along "
                f"axis {model_axis}: the tumor slices are cut along axis {axis}, in a plane the model may "
                f"not have seen. Pass axis={model_axis} to harmonize in the model's plane, or train a "
                "model on this plane.")
    runs = {a: axis_direction(codes[a]) for a in range(3)}
    return (f"The target's thickest axis runs {runs[axis]} but the model was trained on slices cut across "
            f"{runs[model_axis]}: the tumor slices are cut across {runs[axis]}, in a plane the model has not "
            f"seen. Pass as axis the target's voxel axis that runs {runs[model_axis]} to harmonize in the "
            "model's plane, or train a model on this plane.")


def _check_target_label(label: np.ndarray, label_value: int) -> None:
    """Refuse a label map that cannot hold ``label_value``, or that holds what is not a label."""
    if label.dtype == np.bool_:
        if label_value != 1:
            raise SinganInsertError(
                f"The target label is boolean, which cannot hold label_value={label_value}; pass an "
                "integer label map (e.g. label.astype(numpy.uint8)).")
        return
    if not np.issubdtype(label.dtype, np.number) or np.iscomplexobj(label):
        raise SinganInsertError(f"The target label has dtype {label.dtype}; pass an integer label map.")
    if np.issubdtype(label.dtype, np.integer):
        if label_value > np.iinfo(label.dtype).max:
            raise SinganInsertError(
                f"label_value={label_value} does not fit the label map's dtype {label.dtype}.")
        return
    check_finite(label, "target label")
    if not np.array_equal(label, np.round(label)):
        raise SinganInsertError(
            "The target label holds fractional values: a label map holds whole numbers (0 = "
            "background). Threshold or round it first (e.g. numpy.rint(label)).")


def _insert_tumor(target_image, target_affine, source, harmonizer, parameters, *, target_label, modality,
                  normalization, return_composite) -> InsertionResult:
    """:func:`insert_tumor` (same arguments) on the target as its voxels are stored."""
    params = parameters or InsertionParameters()
    image = np.asarray(target_image)
    if image.ndim != 3:
        raise SinganInsertError(f"The target image must be a 3D volume, got shape {image.shape}.")
    if not (np.issubdtype(image.dtype, np.number)) or np.iscomplexobj(image):
        raise SinganInsertError(f"The target image has dtype {image.dtype}; pass real numbers.")
    affine = check_affine(target_affine, "target affine")
    if target_label is not None:
        target_label = np.asarray(target_label)
        if target_label.shape != image.shape:
            raise SinganInsertError(
                f"The target label has shape {target_label.shape} but the image {image.shape}; "
                "they must be on the same voxel grid.")
        _check_target_label(target_label, params.label_value)
    spacing = spacing_from_affine(affine)
    natural_axis = through_plane_axis(spacing)
    # An axis other than the model's is refused when asked for, except the target's own
    # through-plane axis: the default takes that one with a warning, and a record of such an
    # insertion, which holds the axis resolved, must replay (InsertionParameters.from_dict).
    check_model_provenance(harmonizer, None if params.axis == natural_axis else params.axis, modality)
    axis = natural_axis if params.axis is None else int(params.axis)
    if axis == natural_axis and harmonizer.axis is not None and axis != int(harmonizer.axis):
        codes = orientation_codes(affine) if harmonizer.orientation else None  # here the model's, when known
        warnings.warn(_plane_mismatch(axis, int(harmonizer.axis), codes), stacklevel=3)
    seed = int(torch.randint(0, 2**31 - 1, ()).item()) if params.seed is None else int(params.seed)
    start_scale = harmonizer.default_start_scale if params.start_scale is None else params.start_scale
    dilation_mm = _HARMONIZE_DEFAULTS["dilation_mm"].default if params.dilation_mm is None \
        else float(params.dilation_mm)
    feather_mm = _HARMONIZE_DEFAULTS["feather_mm"].default if params.feather_mm is None \
        else float(params.feather_mm)
    resolved = replace(params, axis=axis, seed=seed, start_scale=start_scale,
                       dilation_mm=dilation_mm, feather_mm=feather_mm)

    # 1. geometry
    pasted = paste_tumor(
        source, image.shape, affine, params.placement, border_margin=params.border_margin,
        clip_to_fov=params.clip_to_fov, max_anisotropy=params.max_anisotropy,
    )
    box = pasted.slices
    mask_box = pasted.mask.copy()
    overlap_record = None
    if target_label is not None:
        labelled = target_label[box] != 0
        overlapping = int(np.count_nonzero(labelled & mask_box))
        values, counts = np.unique(target_label[box][labelled & mask_box], return_counts=True)
        # What the tumor met of the existing labels: taken under "replace", left under "keep".
        overlap_record = {"policy": params.overlap, "labelled_voxels": overlapping,
                          "by_label": {_label_name(v): int(c) for v, c in zip(values, counts)}}
        if overlapping and params.overlap == "error":
            raise SinganInsertError(
                f"The tumor overlaps {overlapping} labelled voxel(s) of the target label map "
                "(overlap='error'). Move it, or use overlap='replace' or 'keep'.")
        if params.overlap == "keep":
            mask_box &= ~labelled
            if not mask_box.any():
                raise SinganInsertError(
                    "With overlap='keep', nothing of the tumor is left: every voxel it would "
                    "cover is already labelled. Move it or use overlap='replace'.")

    # 2. intensities, mapped on quantile tables (see the module docstring)
    target_quantiles = intensity_quantiles(image, name="target image")  # also checks it is finite
    in_background = _background_fraction(image[box][mask_box], target_quantiles)
    if in_background > 0.5:
        warnings.warn(
            f"{100 * in_background:.0f} % of the tumor lies in the target's background (air, or tissue "
            f"as dark as air: below {100 * TISSUE_THRESHOLD:g} % of its 99.5th percentile). With no "
            "placement location the tumor goes where it physically is in the source: are source and "
            "target co-registered? Otherwise pass Placement(location=...).", stacklevel=3)
    if normalization is None:
        normalization = PercentileNormalization.fit(target_quantiles)
    appearance = params.appearance
    bank = PatchBank.of(harmonizer) if appearance == "auto" else None
    if appearance == "auto" and bank is None:
        warnings.warn("This harmonizer file stores no training slice (it was written by an earlier "
                      "version), so the tumor's appearance cannot be chosen automatically: using "
                      f"appearance='fixed' with contrast={params.contrast:g}. Retrain the model to "
                      "get the automatic appearance.", stacklevel=2)
        appearance = "fixed"
    if appearance == "auto" and float(params.contrast) != 1.0:
        warnings.warn(f"contrast={params.contrast:g} has no effect with appearance='auto' (the default), where "
                      "the model chooses the tumor's level in the target modality itself. Pass "
                      "InsertionParameters(appearance='fixed', contrast=...) to insert with your contrast "
                      "factor (the paper's method), or leave contrast out.", stacklevel=3)
    texture = (appearance == "auto") if params.texture is None else params.texture
    resolved = replace(resolved, appearance=appearance, texture=texture)
    mapped = _map_intensities(pasted.image[mask_box], source.quantiles, target_quantiles,
                              params.intensity_mode, float(params.contrast) if appearance == "fixed" else 1.0)

    # 3. crop of the tumor slices with in-plane context
    work_dtype = image.dtype if np.issubdtype(image.dtype, np.floating) else np.float32
    full_mask = np.zeros(image.shape, dtype=bool)
    full_mask[box] = mask_box
    crop, slice_indices = _harmonization_crop(full_mask, box, axis, spacing, params.context_mm)
    background_crop = image[crop].astype(work_dtype, copy=True)
    background = np.moveaxis(background_crop, axis, 0)[slice_indices]
    crop_mask = np.moveaxis(full_mask[crop], axis, 0)[slice_indices]
    plane_axes = [a for a in range(3) if a != axis]
    plane_spacing = (spacing[plane_axes[0]], spacing[plane_axes[1]])
    # One distance transform per insertion: the shell and both rim renders use it.
    distance = inplane_distance(crop_mask, plane_spacing)
    fraction = None  # the partial-volume edge: the automatic appearance's only
    if appearance == "auto":
        fraction = _tumor_fraction(full_mask, crop, axis)[slice_indices]
        if _ABLATE_EDGE:  # the edge before 2026-12-03, for the ablation: in-plane only, cut at the mask
            fraction = np.where(crop_mask > 0, partial_volume(crop_mask, through_plane_px=0.0), 0.0).astype(np.float32)
    shell = (distance > 0) & (distance <= SHELL_MM)
    box_in_crop = tuple(slice(b.start - c.start, b.stop - c.start) for b, c in zip(box, crop))
    appearance_record: dict[str, Any] = {"mode": appearance}

    def composite_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        crop_values = background_crop.copy()
        crop_values[box_in_crop][mask_box] = values  # basic then boolean indexing: writes the copy
        return crop_values, np.moveaxis(crop_values, axis, 0)[slice_indices]

    def smoothed(values: np.ndarray, sigma_mm: float) -> np.ndarray:
        """In-plane low-pass of the tumor's values from inside the mask only."""
        from scipy.ndimage import binary_erosion, generate_binary_structure

        sigmas = [0.0 if a == axis else sigma_mm / spacing[a] for a in range(3)]
        # From the tumor's interior (eroded by one voxel in-plane): its edge voxels carry A's
        # partial volume with A's dark surroundings, not tumor structure.
        support = full_mask[crop]
        eroded = binary_erosion(support, np.expand_dims(generate_binary_structure(2, 1), axis))
        support = eroded if eroded.any() else support
        return masked_lowpass(composite_of(values)[0], support, sigmas)[box_in_crop][mask_box]

    if appearance == "auto":
        mapped, appearance_record = _automatic_level(
            mapped, composite_of, smoothed, background, crop_mask, shell, plane_spacing, harmonizer,
            bank, normalization, target_quantiles, params)

    # 4. composite, and every tumor slice along `axis` harmonized in one call
    composite_crop, composite = composite_of(mapped)
    if appearance == "auto":
        # The tumor's values spread only where its edge reaches (a clinical crop is mostly context).
        near = inplane_box(fraction > 0, 0)
        spread = composite.copy()
        spread[near] = spread_outward(composite[near], crop_mask[near])
        composite = background + fraction * (spread - background)
        np.moveaxis(composite_crop, axis, 0)[slice_indices] = composite  # the returned composite
    profile = TumorProfile.of(harmonizer, SHELL_MM) if appearance_record.get("by") == "annotation" else None
    if params.rim and profile is None:
        warnings.warn("rim=True has no effect: the model's training slice has no tumor annotation "
                      "(Harmonizer.annotate) or the appearance is not 'auto'.", stacklevel=2)
    moved = params.placement is not None and params.placement.location is not None
    rim = (profile is not None and not moved) if params.rim is None else (params.rim and profile is not None)
    # Default: kept where the appearance is B's own (annotated); without an annotation the
    # pyramid's pull still corrects a realism-chosen level (bench_quality: W1 and seam worse when
    # kept, and no gain downstream, bench_pipeline's ours_unannotated, one-off runs 2026-12-02).
    harmonize_tumor = (profile is None) if params.harmonize_tumor is None else params.harmonize_tumor
    scale = params.rim_scale
    if rim:
        scale = rim_scale(profile, crop_mask, plane_spacing) if scale is None else scale
        rim_edges = tuple(float(e) * scale for e in RIM_EDGES_MM)
    resolved = replace(resolved, rim=rim, rim_scale=scale, harmonize_tumor=harmonize_tumor)
    if rim:
        # The pyramid is shown the tumor with B's rim: shown a bare blob, it paints a cleft of
        # its own INSIDE the mask's edge (see render_rim).
        composite, _ = render_rim(composite, crop_mask, plane_spacing, profile.rim_levels, normalization,
                                  rim_edges, distance)
    try:
        harmonized = composite.copy() if _ABLATE_PYRAMID else harmonizer.harmonize(
            background, composite, crop_mask.astype(np.float32), start_scale,
            spacing=plane_spacing, normalization=normalization, dilation_mm=dilation_mm,
            feather_mm=feather_mm, seed=seed, shared_noise=True,
        )
    except SinganInsertError as error:
        raise SinganInsertError(
            f"Harmonizing the {background.shape[0]} tumor slice(s) of {background.shape[1]}x"
            f"{background.shape[2]} px (the tumor plus {params.context_mm:g} mm of context, cut "
            f"to the {image.shape} target) failed: {error}") from error
    if not harmonize_tumor:
        # The tumor keeps the appearance chosen for it; the pyramid's output is kept only where
        # the blend reaches beyond the mask (the edge and the surroundings).
        harmonized = np.where(crop_mask > 0, composite, harmonized).astype(harmonized.dtype)
    if appearance_record.get("by") == "annotation" and RESTORE_ANNOTATED_LEVEL:
        harmonized = _restore_annotated_look(harmonized, crop_mask, fraction, profile, appearance_record,
                                             normalization)
    if rim:  # again: the pyramid moves the bands' levels too
        harmonized, appearance_record["rim"] = render_rim(harmonized, crop_mask, plane_spacing, profile.rim_levels,
                                                          normalization, rim_edges, distance)
    if texture:
        target_std = None
        width, texture_sigma = None, 1.0
        if profile is not None:  # B's tumor texture, amplitude and grain, from the annotated slice
            target_std = profile.texture_std * (normalization.high - normalization.low) / 2
            model_px = harmonizer.spacing[0] if harmonizer.spacing is not None else plane_spacing[0]
            width = profile.texture_width_px * model_px / plane_spacing[0]
            texture_sigma = STRUCTURE_SIGMA_PX * model_px / plane_spacing[0]  # texture = all below the structure
        elif bank is not None:
            target_std = _texture_std(harmonized, crop_mask, plane_spacing, harmonizer, normalization)
        harmonized, appearance_record["texture"] = inject_texture(
            harmonized, background, crop_mask, shell, seed, target_std, in_plane_width=width,
            highpass_sigma=texture_sigma)

    # 5. keep to the values the target can hold, restack and label
    harmonized, clipped = _within_target_range(harmonized, crop_mask, target_quantiles[0], target_quantiles[-1])
    out = image.astype(work_dtype, copy=True)
    np.moveaxis(out[crop], axis, 0)[slice_indices] = harmonized  # basic slicing: views of `out`
    if target_label is not None and params.overlap == "keep":
        # The labelled structures keep their image too: the tumor's partial-volume edge and the
        # blend reach past the mask, and would paint tumor over voxels still labelled as before.
        kept = target_label[crop] != 0
        out[crop][kept] = image[crop][kept]
    label_dtype = target_label.dtype if target_label is not None else default_label_dtype(params.label_value)
    new_label = np.zeros(image.shape, dtype=label_dtype) if target_label is None \
        else target_label.copy()
    new_label[box][mask_box] = params.label_value  # within the box: a clinical volume is 31 M voxels

    record = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "parameters": resolved.to_dict(),
        "source": source.describe(),
        "model": {
            "num_scales": harmonizer.num_scales,
            "spacing": None if harmonizer.spacing is None else list(harmonizer.spacing),
            "axis": harmonizer.axis,
            "modality": harmonizer.modality,
            "start_scale_resolved": start_scale if start_scale >= 0 else start_scale + harmonizer.num_scales,
        },
        "target": {"shape": list(image.shape), "spacing_mm": [round(s, 6) for s in spacing],
                   "declared_modality": modality},
        "normalization": normalization.to_dict(),
        "tumor": {
            "box_start": list(pasted.start),
            "box_shape": list(pasted.mask.shape),
            "num_voxels": int(mask_box.sum()),
            "slices": [int(crop[axis].start + i) for i in slice_indices],
            "crop": [[int(s.start), int(s.stop)] for s in crop],
            "mapped_intensity_mean": float(np.mean(mapped)),
            # What the tumor came out at: the appearance's "level" is the level chosen before the
            # pyramid, which (without an annotation) pulls the tumor toward its surroundings.
            "output_mean": float(harmonized[crop_mask > 0].mean()),
            "background_fraction": in_background,
            "clipped_to_target_range": clipped,
        },
        "appearance": appearance_record,
        "overlap": overlap_record,
    }
    composite_volume = None
    if return_composite:
        composite_volume = image.astype(work_dtype, copy=True)
        composite_volume[crop] = composite_crop
        if target_label is not None and params.overlap == "keep":
            composite_volume[crop][kept] = image[crop][kept]  # as in the image
    return InsertionResult(image=out, label=new_label, mask=full_mask, record=record,
                           composite=composite_volume)


def _restore_annotated_look(harmonized, crop_mask, fraction, profile, appearance_record, normalization):
    """Bring the harmonized tumor back to B's annotated look: the pyramid pulls a tumor toward its
    surroundings' brightness, and the composite's edge mixed it with the washed-out target.

    The tumor's mean goes to the chosen level :math:`\\ell` (the harmonized slices shifted with the
    partial-volume edge, by the mean fraction so that it lands exactly), and its outermost
    pixels :math:`E` (:func:`~singan_insert.insertion.annotation.tumor_edge`) stand above the
    rest, its interior :math:`I`, by the annotated tumor's :math:`\\Delta = \\bar x_E - \\bar x_I`
    (B's edge is mixed with B's cleft): :math:`\\bar v_I = \\ell - \\frac{|E|}{|E| + |I|}\\Delta` and
    :math:`\\bar v_E = \\bar v_I + \\Delta`, each by an additive shift, so that the mean stays
    :math:`\\ell`. Without an interior (a tumor one or two pixels wide, here or on the annotated
    slice), or without an edge (a tumor filling its slices), only the mean is set. Records the
    shifts.
    """
    inside = crop_mask > 0
    level = appearance_record["level"]
    shift = (level - float(np.mean(harmonized[inside]))) / float(np.mean(fraction[inside]))
    harmonized = (harmonized + fraction * shift).astype(harmonized.dtype)
    appearance_record["level_restored_by"] = shift
    edge = tumor_edge(inside)
    interior = inside & ~edge
    if interior.any() and edge.any() and np.isfinite(profile.interior_mean) and np.isfinite(profile.edge_mean):
        step = (profile.edge_mean - profile.interior_mean) * (normalization.high - normalization.low) / 2
        interior_goal = level - step * np.count_nonzero(edge) / np.count_nonzero(inside)
        harmonized[interior] += np.asarray(interior_goal - float(np.mean(harmonized[interior])), harmonized.dtype)
        harmonized[edge] += np.asarray(interior_goal + step - float(np.mean(harmonized[edge])), harmonized.dtype)
        appearance_record["edge_step"] = step
    return harmonized


def _within_target_range(harmonized: np.ndarray, mask: np.ndarray, low: float, high: float) -> tuple[np.ndarray, int]:
    """Clip the harmonized slices to what the target can hold; returns them and the count clipped.

    The generators ring at sharp edges (a dark bone or air next to bright CSF) and the rim's
    band shifts move a dark pixel further down, which gave voxels darker than anything in the
    target (negative values in a magnitude image: up to -17 % of its maximum beside the petrous
    bone of a simulated subject) and, more rarely, surroundings brighter than its brightest.
    Outside the tumor every voxel is kept within the target's own ``[low, high]`` (its minimum and
    maximum); inside, above its minimum only: a tumor may be brighter than anything in the
    target (the paper's :math:`\\lambda = 1.5`).
    """
    upper = np.where(mask > 0, np.inf, high)
    clipped = int(np.count_nonzero((harmonized < low) | (harmonized > upper)))
    if clipped:
        harmonized = np.clip(harmonized, low, upper).astype(harmonized.dtype)
    return harmonized, clipped


def _background_fraction(values: np.ndarray, quantiles: np.ndarray) -> float:
    """Fraction of the target ``values`` under the tumor that are background, as
    :func:`~singan_insert.insertion.intensity.tissue_values` tells it (0 for an image with negative
    values, whose air cannot be told by intensity)."""
    level = air_level(float(np.interp(0.995, np.linspace(0.0, 1.0, len(quantiles)), quantiles)), quantiles[0])
    return 0.0 if level is None else float(np.mean(values <= level))


def _model_grid(slices, plane_spacing, harmonizer) -> torch.Tensor:
    """``(..., S, H, W)`` slices resampled to the model's pixel size (bicubic), float32."""
    x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
    if harmonizer.spacing is None:
        return x
    lead, (height, width) = x.shape[:-2], x.shape[-2:]
    shape = (max(round(height * plane_spacing[0] / harmonizer.spacing[0]), 1),
             max(round(width * plane_spacing[1] / harmonizer.spacing[1]), 1))
    return resize(x.reshape(-1, 1, height, width), shape).reshape(*lead, *shape)


def _texture_std(harmonized, mask, plane_spacing, harmonizer, normalization) -> float | None:
    """B's texture sd (intensity units) for the harmonized tumor, read from the training slice."""
    from scipy.ndimage import binary_erosion  # the tumor's one-pixel border is no texture

    picked = scoring_slices(mask)
    interior = np.stack([binary_erosion(m) for m in mask[picked]])
    if not interior.any():
        interior = mask[picked]
    images = normalization.to_model(_model_grid(harmonized[picked], plane_spacing, harmonizer))
    region = _model_grid(interior.astype(np.float32), plane_spacing, harmonizer) > 0.5
    std = TextureBank.of(harmonizer).texture_std(images.numpy(), region.numpy())
    return None if std is None else std * (normalization.high - normalization.low) / 2


def _automatic_level(mapped, composite_of, smoothed, background, mask, shell, plane_spacing, harmonizer, bank,
                     normalization, target_quantiles, params):
    """Rescale the mapped tumor (lambda = 1) to the level chosen by the annotation or by realism."""
    to_model = lambda x: normalization.to_model(torch.from_numpy(np.asarray(x, np.float32)))  # noqa: E731
    shell_model = float(to_model(background[shell]).mean()) if shell.any() else \
        float(to_model(background[mask]).mean())
    t_low = robust_range(target_quantiles)[0]
    mean = float(np.mean(mapped))
    picked = scoring_slices(mask)
    profile = TumorProfile.of(harmonizer, SHELL_MM)
    record: dict[str, Any] = {"mode": "auto"}
    if profile is not None:
        # The annotated slice shows B's tumor: its level and its spread. Its level in model units, not its contrast to the ring: what surrounds a tumor varies
        # (CSF, brainstem, bone), its own normalised level much less (see annotation's docstring).
        floor = 2 * params.visibility_floor
        level_model = profile.tumor_mean
        if abs(level_model - shell_model) < floor:
            level_model = shell_model + math.copysign(floor, level_model - shell_model)
        source_slices = composite_of(mapped)[1]
        source = _model_grid(to_model(source_slices[picked]).numpy(), plane_spacing, harmonizer).numpy()
        inside = _model_grid(mask[picked].astype(np.float32), plane_spacing, harmonizer).numpy() > 0.5
        source_spread = interior_spread(source, inside)[0] if inside.any() else 0.0
        gain = STRUCTURE_SHRINK * min(profile.structure_std / source_spread, MAX_STRUCTURE_GAIN) \
            if source_spread > 1e-6 else 0.0
        # Only the source's structure is kept: its fine grain is A's noise, not B's texture, which
        # the texture step adds at B's amplitude.
        pixel_mm = harmonizer.spacing[0] if harmonizer.spacing is not None else plane_spacing[0]
        mapped = smoothed(mapped, STRUCTURE_SIGMA_PX * pixel_mm)
        record.update(by="annotation", profile=profile.to_dict(), source_spread=source_spread)
    else:
        region = (mask | shell)[picked]
        bg = _model_grid(to_model(background[picked]).numpy(), plane_spacing, harmonizer)
        # In-plane only: the scored slices are spread over the tumor, not neighbours.
        m = _model_grid(partial_volume(mask[picked], through_plane_px=0.0), plane_spacing, harmonizer).clamp(0, 1)
        rg = _model_grid(region.astype(np.float32), plane_spacing, harmonizer)
        choice = choose_level(bank, bg, m, rg, shell_model, params.visibility_floor)
        level_model, gain = choice.level, None
        record.update(by="realism", choice=choice.to_dict())
        _warn_unannotated(harmonizer)
        if choice.ambiguous:
            side = "brighter" if choice.level > shell_model else "darker"
            warnings.warn(
                f"The model could hardly tell whether this tumor should be darker or brighter than its "
                f"surroundings in the target modality: it made it {side}, but realism alone rates that "
                f"side's best level only {100 * choice.other_side_margin:+.1f} % against the other side's "
                f"(it takes {100 * AMBIGUOUS_MARGIN:g} % to confirm a side; below 0, realism alone prefers the "
                "other side), so it may be the wrong side. Annotate the tumor on the model's training slice (a rough mask: "
                "Harmonizer.annotate, or singan-insert annotate) so that the level comes from a real "
                "tumor of that modality, or pass InsertionParameters(appearance='fixed', contrast=...).",
                AmbiguousLevelWarning, stacklevel=4)
    level = float(normalization.from_model(torch.tensor(level_model)))
    surroundings = float(normalization.from_model(torch.tensor(shell_model)))
    factor = (level - t_low) / (mean - t_low) if mean - t_low > 1e-3 * (normalization.high - normalization.low) \
        else math.inf
    if gain is None:
        # lambda about the dark reference, as in the paper, but the source's internal structure is
        # never stretched beyond its lambda = 1 mapping: a tumor brightened (lambda > 1) is shifted.
        gain = min(max(factor, 0.0), 1.0)
    out = level + gain * (mapped.astype(np.float64) - float(np.mean(mapped)))
    factor = None if not math.isfinite(factor) else factor
    record.update({"lambda": factor, "structure_gain": gain, "level": level, "surroundings": surroundings})
    return out.astype(np.float32), record


def _label_name(value: np.generic) -> str:
    """A label value as the record's key: ``"2"`` whether the map holds integers, floats or bools."""
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


def _warn_unannotated(harmonizer: Harmonizer) -> None:
    """:class:`UnannotatedModelWarning`, once per model object (a batch or a data loader inserts
    thousands of tumors with one model)."""
    if harmonizer.__dict__.get("_warned_unannotated"):
        return
    modality = harmonizer.modality or "the target modality"
    warnings.warn(
        f"This model has no tumor annotation, so each tumor's level in {modality} is chosen by realism "
        "alone against its training slice. That finds the tumor's level where the modality's tumors look "
        "like one of its tissues (simulated hrT2), not where they are brighter or darker than every tissue "
        "around them: there it gives a tissue's level (simulated enhancing tumors in ceT1: the right side "
        "of their surroundings, but about a quarter of the true contrast, less than a fixed contrast "
        "factor gives; benchmarks/results/bench_quality_cet1.md), nor for a tumor moved away from where such "
        "tumors grow (simulated hrT2 tumors centred in white matter or on a random CSF voxel: 4 and 2 of 7 "
        "visible, most of the others darker than the tissue around them where the truth is brighter; "
        "annotated: 7 of 7; benchmarks/results/dev_target_conditions.md). Annotate the tumor on the model's "
        "training slice (a rough mask: Harmonizer.annotate, singan-insert annotate, or train with "
        "--label) so that the level comes from a real tumor of that modality. Shown once per model.",
        UnannotatedModelWarning, stacklevel=5)
    # Only once said: a warning turned into an error must stop every insertion, not the first.
    harmonizer.__dict__["_warned_unannotated"] = True


def _map_intensities(values, source_quantiles, target_quantiles, mode, contrast) -> np.ndarray:
    """Apply ``map_tumor_intensities`` (built on quantile tables) to tumor voxel values."""
    table = map_tumor_intensities(
        source_quantiles, np.ones(source_quantiles.shape, dtype=bool), target_quantiles,
        mode=mode, contrast=contrast,
    ).astype(np.float64)
    knots, first = np.unique(source_quantiles, return_index=True)
    return np.interp(values.astype(np.float64), knots, table[first]).astype(np.float32)


def _tumor_fraction(full_mask, crop, axis):
    """:func:`~singan_insert.insertion.appearance.partial_volume` of the ``crop`` of the mask,
    ``(S, H, W)`` with the slices along ``axis`` first.

    Blurred across the crop's slices, not across the tumor slices' stack: a tumor with a gap has
    non-adjacent slices. Where the crop ends at the volume's edge the tumor was cut there
    (``clip_to_fov``; otherwise ``border_margin`` keeps it off the edge) and goes on beyond it, so
    the mask is extended by its edge values rather than by zeros (the blur reaches one voxel).
    The same rule leaves a single-slice target (a 2D image) without through-plane mixing.
    """
    mask = full_mask[crop]
    pads = [(int(c.start == 0), int(c.stop == n)) for c, n in zip(crop, full_mask.shape)]
    padded = np.moveaxis(np.pad(mask, pads, mode="edge"), axis, 0)
    pads.insert(0, pads.pop(axis))
    kept = tuple(slice(low, size - high) for (low, high), size in zip(pads, padded.shape))
    return partial_volume(padded)[kept]


def _harmonization_crop(full_mask, box, axis, spacing, context_mm):
    """The crop (slices of the volume) and the indices, within it along ``axis``, of tumor slices."""
    crop = []
    for a in range(3):
        start, stop = box[a].start, box[a].stop
        if a != axis:
            margin = int(math.ceil(context_mm / spacing[a] - 1e-9))
            start, stop = max(start - margin, 0), min(stop + margin, full_mask.shape[a])
        crop.append(slice(start, stop))
    crop = tuple(crop)
    other = tuple(a for a in range(3) if a != axis)
    present = full_mask[crop].any(axis=other)
    return crop, np.flatnonzero(present)
