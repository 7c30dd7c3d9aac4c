"""Insertion experiments on simulated subjects with ground truth (used by the demo and benchmarks).

One experiment case follows the paper's Fig. 2 on a simulated subject:

(a) the modality-A source (ceT1-like) with its tumor label; (b) modality B with the tumor
washed out (the stand-in for a CycleGAN translation in which tumors vanish); (c) the A tumor
naively pasted into (b); (d) the paste harmonized by the SinGAN pyramid; and the truth: the
simulator's rendering of modality B with that very tumor (same mask, same noise realisation).
Every method is scored against the truth with :func:`singan_insert.evaluation.metrics.harmonization_fidelity`.

Methods (all through the same paste geometry, :func:`singan_insert.insertion.placement.paste_tumor`):

``naive_raw``        the source's own normalised intensities pasted (``contrast=1``);
``naive_mapped``     the intensity-mapped paste (``intensity_mode`` and ``contrast``), i.e. the
                     composite the harmonizer receives;
``blurred_mapped``   the simplest rival of the pyramid: ``naive_mapped`` blurred within slices
                     (sd :data:`CASE_BLUR_SIGMA_PX`) and blended with the harmonizer's weight;
``poisson``          gradient-domain blending of the mapped paste, slice by slice;
``singan_s<k>``      the mapped paste harmonized from start scale ``k``.

The quality benchmark (:func:`run_quality`, ``benchmarks/bench_quality.py``) asks more of every
method, on several subjects and several *inputs* (the paste handed to the method: the mapped
paste at a contrast factor :math:`\\lambda`, or ``"raw"``, no :math:`\\lambda` given, i.e.
:class:`~singan_insert.insertion.insert.InsertionParameters`' own intensity defaults). Rows of
each input's table:

``naive``        the source's raw (unmapped) intensities pasted: the same in every table;
``mapped``       the input paste itself (``"normalized"`` mode at this :math:`\\lambda`);
``matched``      the histogram-matched paste at this :math:`\\lambda`;
``poisson``      gradient-domain blending of the mapped source;
``blurred``      the mapped paste blurred within slices (:func:`~singan_insert.evaluation.baselines.blurred_paste`)
                 and blended with the harmonizer's weight; its sd is chosen on a SEPARATE
                 validation subject (lowest low-pass error over ``blur_sigmas``), never on the
                 test subjects;
``best_fixed_lambda``  ORACLE-ISH: the blurred mapped paste at the one :math:`\\lambda^*` of
                 ``lambda_grid`` with the lowest mean low-pass error ON THE TEST SUBJECTS
                 (hindsight no user has; its sd chosen on the validation subject): the same in
                 every table;
``oracle_level`` ORACLE bound: a flat tumor at the truth's own mean level (partial-volume edge,
                 not harmonized): what the exact level alone, without B's internal structure, gives;
``oracle``       the simulator's true B rendering of the tumor and its surroundings, blended
                 with the harmonizer's weight (:func:`~singan_insert.evaluation.baselines.oracle_paste`).
                 In this simulation the washed-out target is the truth minus the tumor, so the
                 oracle is the truth up to the blend: a floor for every metric, not a method;
``harmonized``   the paper's mode: this input paste harmonized from a fixed start scale
                 (:func:`paper_parameters`);
``annotated``    (with ``annotated=``) the default insertion by the same model with its training
                 slice's tumor annotated (:mod:`singan_insert.insertion.annotation`);
``default``      whatever :class:`~singan_insert.insertion.insert.InsertionParameters` defaults give
                 for this input (:func:`default_parameters`: the automatic appearance, which
                 ignores the input's :math:`\\lambda`).

The last two are run with two noise seeds, for :func:`~singan_insert.evaluation.metrics.seed_difference`.
Metrics are computed on a box around the tumor (a margin of :data:`METRIC_MARGIN` voxels, far
beyond the shell, the blend and the smoothing), with the truth's whole-volume robust range as
the unit, so they equal the whole-volume ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence, Union

import numpy as np

from singan_insert.errors import SinganInsertError
from singan_insert.evaluation.baselines import blurred_paste, naive_paste, oracle_paste, poisson_blend
from singan_insert.harmonizer.model import Harmonizer
from singan_insert.insertion.intensity import map_tumor_intensities
from singan_insert.evaluation.metrics import harmonization_fidelity, seed_difference
from singan_insert.insertion.placement import Placement, SourceTumor
from singan_insert.datasets.phantom import MODALITY_A, MODALITY_B, SimulatedSubject
from singan_insert.insertion.insert import InsertionParameters, insert_tumor, through_plane_axis

#: Blur sd (px, within slices) of the ``blurred_mapped`` rival in :func:`run_case`: the sd of the
#: outside report that found a blur of the mapped paste scoring as well as the pyramid (the
#: quality benchmark chooses its blur on a separate subject instead).
CASE_BLUR_SIGMA_PX = 1.0
#: Sd (px) of the low-pass error and the high-pass energy, within slices (none across them).
TEXTURE_SIGMA_PX = 1.5


def in_plane_sigma(axis: int) -> tuple[float, ...]:
    """:data:`TEXTURE_SIGMA_PX` along the two in-plane axes of slices cut along ``axis``, 0 across."""
    return tuple(0.0 if a == axis else TEXTURE_SIGMA_PX for a in range(3))


@dataclass
class InsertionCase:
    """Volumes of one experiment case, all on the modality-B grid."""

    name: str
    source_on_target: np.ndarray
    washed_out: np.ndarray
    mask: np.ndarray
    truth: np.ndarray
    spacing: tuple[float, float, float]
    axis: int
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    label: np.ndarray | None = None

    def fidelity(self) -> dict[str, dict[str, float]]:
        """Fidelity of every method against the truth (see :mod:`singan_insert.evaluation.metrics`);
        low-pass error and high-pass energy within slices, as in the quality benchmark."""
        return {method: harmonization_fidelity(volume, self.truth, self.mask, self.spacing,
                                               sigma_px=in_plane_sigma(self.axis)).to_dict()
                for method, volume in self.outputs.items()}

    def center_slice(self) -> int:
        areas = self.mask.sum(axis=tuple(a for a in range(3) if a != self.axis))
        return int(np.argmax(areas))

    def panel_row(self, methods: Sequence[str]) -> list[np.ndarray]:
        """2D slices through the tumor: A source, washed-out B, then ``methods``, then truth."""
        index = self.center_slice()
        pick = lambda volume: np.take(volume, index, axis=self.axis)  # noqa: E731
        return [pick(self.source_on_target), pick(self.washed_out),
                *[pick(self.outputs[m]) for m in methods], pick(self.truth)]


def training_slice_from_subject(subject: SimulatedSubject, axis: int = 2,
                                modality: str = MODALITY_B) -> tuple[np.ndarray, tuple[float, float], int]:
    """The slice of ``modality`` (the simulator's ``"hrT2"``, default, or ``"ceT1"``) with the
    largest tumor area (every crossMoDA scan shows its tumor): ``(slice, in-plane spacing, index)``."""
    image, label, _, spacing3d = _modality_arrays(subject, modality)
    areas = (label == 1).sum(axis=tuple(a for a in range(3) if a != axis))
    index = int(np.argmax(areas))
    spacing = tuple(s for a, s in enumerate(spacing3d) if a != axis)
    return np.take(image, index, axis=axis).astype(np.float32), (float(spacing[0]), float(spacing[1])), index


def _modality_arrays(subject: SimulatedSubject, modality: str):
    """``(image, label, affine, spacing)`` of one of the simulator's two modalities."""
    if modality == MODALITY_B:
        return subject.image_b, subject.label_b, subject.affine_b, subject.spacing_b
    if modality == MODALITY_A:
        return subject.image_a, subject.label_a, subject.affine_a, subject.spacing_a
    raise SinganInsertError(f"modality must be {MODALITY_B!r} or {MODALITY_A!r}, got {modality!r}.")


def run_case(
    name: str,
    subject: SimulatedSubject,
    harmonizer: Harmonizer,
    start_scales: Sequence[int],
    parameters: InsertionParameters | None = None,
    baselines: bool = True,
) -> InsertionCase:
    """Insert ``subject``'s A tumor into its washed-out B and collect every method's output."""
    from scipy.ndimage import affine_transform

    parameters = parameters or InsertionParameters(seed=0)
    washed = subject.render_b_washed_out()
    source = SourceTumor.from_arrays(subject.image_a, subject.label_a, subject.affine_a, label_value=1)
    spacing = tuple(float(s) for s in subject.spacing_b)
    axis = through_plane_axis(spacing) if parameters.axis is None else parameters.axis
    a_to_b = np.linalg.inv(subject.affine_a) @ subject.affine_b
    source_on_target = affine_transform(subject.image_a, a_to_b[:3, :3], a_to_b[:3, 3],
                                        output_shape=washed.shape, order=1).astype(np.float32)
    outputs: dict[str, np.ndarray] = {}
    mask = truth = label = None
    for scale in start_scales:
        result = insert_tumor(washed, subject.affine_b, source, harmonizer,
                              replace(parameters, start_scale=scale), return_composite=mask is None)
        if mask is None:
            mask, label = result.mask, result.label
            truth = subject.render_b(mask)
            if baselines:
                raw = insert_tumor(washed, subject.affine_b, source, harmonizer,
                                   replace(parameters, contrast=1.0, appearance="fixed", start_scale=scale),
                                   return_composite=True)
                outputs["naive_raw"] = raw.composite
                outputs["naive_mapped"] = result.composite
                outputs["blurred_mapped"] = blurred_paste(washed, result.composite, mask, CASE_BLUR_SIGMA_PX,
                                                          axis=axis, spacing=spacing)
                # Poisson needs the mapped source itself (not the composite, which already
                # agrees with the target on the mask border and would come back unchanged).
                mapped_source = map_tumor_intensities(source_on_target, mask, washed, parameters.intensity_mode,
                                                      parameters.contrast)
                outputs["poisson"] = poisson_blend(washed, mapped_source, mask, slice_axis=axis, spacing=spacing)
        outputs[f"singan_s{scale}"] = result.image
    return InsertionCase(name, source_on_target, washed, mask, truth, spacing, axis, outputs, label)


def summarize_fidelity(cases: Sequence[InsertionCase]) -> dict[str, dict[str, Any]]:
    """Mean (and per-case values) of every fidelity metric per method, over ``cases``."""
    per_case = [case.fidelity() for case in cases]
    methods = list(per_case[0])
    summary: dict[str, dict[str, Any]] = {}
    for method in methods:
        metrics = per_case[0][method].keys()
        summary[method] = {
            metric: {
                "mean": float(np.nanmean([c[method][metric] for c in per_case])),
                "values": [float(c[method][metric]) for c in per_case],
            }
            for metric in metrics
        }
    return summary


#: Columns of :func:`fidelity_markdown`: the fair comparisons first (a texture of B's statistics
#: in another phase is not penalised by the low-pass error, W1 or the high-pass ratio), the
#: plain pixel errors last (they penalise any texture that is not the truth's own).
FIDELITY_COLUMNS = ("lowpass_nmae_tumor", "wasserstein_tumor", "contrast_ratio", "seam_ratio", "highpass_ratio",
                    "nmae_tumor", "nmae_shell", "wasserstein_shell")

#: How :func:`fidelity_markdown` reads its columns (appended under the table).
FIDELITY_LEGEND = (
    "Every metric compares the method with the simulator's truth (B with this very tumor). "
    f"lowpass_nmae_tumor: tumor error after smoothing both (sd {TEXTURE_SIGMA_PX:g} px within slices), so a texture of "
    "the right statistics but another phase costs nothing; wasserstein_tumor (W1): distance between "
    "the tumor's histograms. Both: lower is better, 0 is the truth. contrast_ratio: tumor-vs-shell "
    "contrast over the truth's (1 is the truth, near 0 or negative: the tumor vanished). seam_ratio: "
    "gradient on the tumor's border over the truth's (1: as sharp as the truth). highpass_ratio: "
    "texture energy inside the tumor over the truth's (1: as textured; a flat paste is near 0). "
    "nmae_tumor, nmae_shell: plain pixel errors in the tumor and its 2 mm shell; a generated texture "
    "or surroundings that are not the truth's own pixels pay here twice, which is why the low-pass "
    "error and W1 are the fair ones. All errors are in units of the truth's robust intensity range."
)


def fidelity_markdown(summary: dict[str, dict[str, Any]], reference: str = "naive_mapped",
                      labels: dict[str, str] | None = None,
                      columns: Sequence[str] = FIDELITY_COLUMNS) -> str:
    """A markdown table: one row per method (``labels``: names to show), the mean of each of
    ``columns``, and the low-pass tumor error relative to ``reference``'s."""
    labels = labels or {}
    header = "| method | " + " | ".join(columns) + " | low-pass vs reference |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    ref = summary.get(reference, {}).get("lowpass_nmae_tumor", {}).get("mean")
    for method, values in summary.items():
        cells = [f"{values[m]['mean']:.3f}" for m in columns]
        ratio = f"{values['lowpass_nmae_tumor']['mean'] / ref:.2f}" if ref else "-"
        lines.append(f"| {labels.get(method, method)} | " + " | ".join(cells) + f" | {ratio} |")
    lines += ["", f"Last column: lowpass_nmae_tumor relative to that of: {labels.get(reference, reference)}."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The quality benchmark (issue 10): baselines, oracle, paper mode and default on many inputs
# ----------------------------------------------------------------------------------------------
InputPaste = Union[float, str]
QUALITY_INPUTS: tuple[InputPaste, ...] = (0.5, 0.8, 1.0, 1.5, "raw")
LAMBDA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5)
BLUR_SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
METRIC_MARGIN = 12
SEEDED_ROWS = ("harmonized", "default")
QUALITY_ROWS = ("naive", "mapped", "matched", "poisson", "blurred", "best_fixed_lambda", "oracle", "oracle_level",
                "harmonized", "default")

# The targets, evaluated on the mean over subjects (except the per-subject vanishing count).
VANISH_CONTRAST_RATIO = 0.6
VANISH_SUBJECT_FRACTION = 0.9
LOWPASS_VS_BEST_FIXED = 0.7
W1_VS_MAPPED = 0.7
SEAM_RANGE = (0.9, 1.1)
HIGHPASS_RANGE = (0.7, 1.3)
SEED_TEXTURE_MIN = 0.3
SEED_MEAN_LEVEL_MAX = 0.05


def input_key(value: InputPaste) -> str:
    """The name of an input paste in tables and JSON: ``"lambda=0.5"`` or ``"raw"``."""
    return "raw" if value == "raw" else f"lambda={float(value):g}"


def input_contrast(value: InputPaste) -> float:
    """The :math:`\\lambda` of an input paste: its own, or for ``"raw"`` the parameters' default."""
    return InsertionParameters().contrast if value == "raw" else float(value)


def default_parameters(value: InputPaste, seed: int) -> InsertionParameters:
    """The library's default insertion for an input: ``InsertionParameters()`` with only the
    noise seed set. The automatic appearance takes no contrast factor (it chooses each tumor's
    own), so every input gets the same insertion: that the input does not matter is the point."""
    return InsertionParameters(seed=seed)


def paper_parameters(value: InputPaste, start_scale: int, seed: int) -> InsertionParameters:
    """The paper's mode: the input paste (its :math:`\\lambda`; ``"raw"``: 1) harmonized from a
    fixed ``start_scale``."""
    return InsertionParameters(seed=seed, appearance="fixed", contrast=input_contrast(value),
                               intensity_mode="normalized", start_scale=start_scale)


@dataclass
class QualitySubject:
    """One test (or validation) subject of :func:`run_quality`, on its target modality's grid (hrT2 by default)."""

    name: str
    subject: SimulatedSubject
    washed_out: np.ndarray
    source: SourceTumor
    source_on_target: np.ndarray
    mask: np.ndarray
    truth: np.ndarray
    spacing: tuple[float, float, float]
    axis: int
    value_range: float
    box: tuple[slice, ...]
    affine: np.ndarray
    placement: Placement | None = None
    panels: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def prepare(cls, name: str, subject: SimulatedSubject, harmonizer: Harmonizer,
                target: str = MODALITY_B, placement: Placement | None = None) -> "QualitySubject":
        """Paste ``subject``'s tumor of the other modality at its own place (or at ``placement``)
        in its washed-out ``target`` volume (default hrT2, the crossMoDA direction; ``"ceT1"`` the
        other way round); truth = the simulator's ``target`` render of that tumor there."""
        from scipy.ndimage import affine_transform

        _, label, affine, target_spacing = _modality_arrays(subject, target)
        other = MODALITY_A if target == MODALITY_B else MODALITY_B
        source_image, source_label, source_affine, _ = _modality_arrays(subject, other)
        render = subject.render_b if target == MODALITY_B else subject.render_a
        washed = render(np.zeros(label.shape, bool))  # the tumor-free target (render_b_washed_out)
        source = SourceTumor.from_arrays(source_image, source_label, source_affine, label_value=1)
        spacing = tuple(float(s) for s in target_spacing)
        axis = through_plane_axis(spacing)
        source_to_target = np.linalg.inv(source_affine) @ affine
        source_on_target = affine_transform(source_image, source_to_target[:3, :3], source_to_target[:3, 3],
                                            output_shape=washed.shape, order=1).astype(np.float32)
        finest = harmonizer.valid_start_scales[-1]
        mask = insert_tumor(washed, affine, source, harmonizer,
                            InsertionParameters(seed=0, start_scale=finest, placement=placement)).mask
        truth = render(mask)
        low, high = np.percentile(truth, (0.5, 99.5))
        box = tuple(slice(max(int(i.min()) - METRIC_MARGIN, 0), min(int(i.max()) + METRIC_MARGIN + 1, n))
                    for i, n in zip(np.nonzero(mask), mask.shape))
        return cls(name, subject, washed, source, source_on_target, mask, truth, spacing, axis,
                   float(high - low), box, affine, placement)

    @property
    def sigma_px(self) -> tuple[float, ...]:
        return in_plane_sigma(self.axis)

    def insert(self, harmonizer: Harmonizer, parameters: InsertionParameters, composite: bool = False) -> np.ndarray:
        """The harmonized volume (or, with ``composite``, the paste handed to the harmonizer)."""
        if composite:  # the finest start scale is the cheapest; only the composite is kept
            parameters = replace(parameters, start_scale=harmonizer.valid_start_scales[-1])
        if self.placement is not None:
            parameters = replace(parameters, placement=self.placement)
        result = insert_tumor(self.washed_out, self.affine, self.source, harmonizer, parameters,
                              return_composite=composite)
        if not np.array_equal(result.mask, self.mask):
            raise SinganInsertError(f"{self.name}: the insertion placed the tumor elsewhere than expected.")
        return result.composite if composite else result.image

    def flat_at_truth_level(self) -> np.ndarray:
        """ORACLE bound: a flat tumor whose mean over the mask is the truth's (with the automatic
        appearance's partial-volume edge), not harmonized: what knowing B's exact level alone
        would score."""
        from singan_insert.insertion.appearance import partial_volume

        fraction = np.moveaxis(partial_volume(np.moveaxis(self.mask, self.axis, 0)), 0, self.axis)
        level = float(self.truth[self.mask].mean())
        # The tumor's own value is set so that the mean over the mask, edge voxels mixed with
        # their surroundings, is the truth's mean (which is itself such a mix).
        inside = fraction[self.mask]
        mixed = float(np.mean((1.0 - inside) * self.washed_out[self.mask]))
        value = (level - mixed) / float(np.mean(inside))
        return (self.washed_out + fraction * (value - self.washed_out)).astype(self.washed_out.dtype)

    def blurred(self, composite: np.ndarray, sigma_px: float) -> np.ndarray:
        return blurred_paste(self.washed_out, composite, self.mask, sigma_px, axis=self.axis, spacing=self.spacing)

    def score(self, image: np.ndarray) -> dict[str, float]:
        """Every fidelity metric of ``image`` against the truth (on the metric box)."""
        b = self.box
        return harmonization_fidelity(image[b], self.truth[b], self.mask[b], self.spacing,
                                      value_range=self.value_range, sigma_px=self.sigma_px).to_dict()

    def seeds(self, first: np.ndarray, second: np.ndarray) -> dict[str, float]:
        b = self.box
        return seed_difference(first[b], second[b], self.truth[b], self.mask[b], value_range=self.value_range,
                               sigma_px=self.sigma_px)


def choose_blur_sigma(validation: QualitySubject, harmonizer: Harmonizer, value: InputPaste,
                      sigmas: Sequence[float] = BLUR_SIGMAS) -> tuple[float, dict[str, float]]:
    """The blur sd with the lowest low-pass tumor error on the validation subject, and every error."""
    composite = validation.insert(harmonizer, _mapped_parameters(value, "normalized"), composite=True)
    errors = {f"{s:g}": validation.score(validation.blurred(composite, s))["lowpass_nmae_tumor"] for s in sigmas}
    best = min(sigmas, key=lambda s: errors[f"{s:g}"])
    return float(best), errors


def run_quality(
    subjects: Sequence[QualitySubject],
    validation: QualitySubject,
    harmonizer: Harmonizer,
    *,
    inputs: Sequence[InputPaste] = QUALITY_INPUTS,
    lambda_grid: Sequence[float] = LAMBDA_GRID,
    blur_sigmas: Sequence[float] = BLUR_SIGMAS,
    start_scale: int | None = None,
    seeds: tuple[int, int] = (0, 1),
    figure_input: InputPaste | None = None,
    progress=None,
    annotated: Harmonizer | None = None,
) -> dict[str, Any]:
    """Every row of the module docstring on every input, per subject, and the issue's targets.

    Args:
        subjects: the test subjects (:meth:`QualitySubject.prepare`).
        validation: a separate subject, used only to choose the blur sd of the blurred baselines.
        harmonizer: the trained model (of modality B).
        inputs: contrast factors :math:`\\lambda > 0` and/or ``"raw"``.
        lambda_grid: candidates of the hindsight ``best_fixed_lambda`` baseline.
        blur_sigmas: candidate blur sds (voxels) of the blurred baselines.
        start_scale: the paper mode's start scale; default the model's default.
        seeds: the two noise seeds of the seeded rows (the first is the one scored).
        figure_input: one of ``inputs``: each subject's ``panels`` then holds, for the figure,
            the slice through the tumor's centre of the source, the target, every row's output
            (the first seed's) and the truth.
        progress: optional ``print``-like callable for progress lines.
        annotated: the same model with its training slice's tumor annotated
            (:meth:`~singan_insert.Harmonizer.annotate`): adds the seeded row ``"annotated"`` (the
            default insertion with that model), to measure what the one-slice annotation adds.

    Returns:
        A JSON-ready dict: ``{"tables": {input: {"rows": {row: {metric: {"mean", "values"}}},
        "targets": {row: {target: {...}}}}}, "best_fixed_lambda": {...}, "blur_sigma": {...}, ...}``.
    """
    if not subjects:
        raise SinganInsertError("run_quality needs at least one test subject.")
    for value in inputs:
        if value != "raw" and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise SinganInsertError(f"Inputs are contrast factors > 0 or 'raw', got {value!r}.")
    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise SinganInsertError(f"seeds must be two different integers, got {seeds!r}.")
    say = progress or (lambda *a, **k: None)
    start_scale = harmonizer.default_start_scale if start_scale is None else int(start_scale)

    # The blur sd per candidate paste, on the validation subject only.
    blur = {}
    for value in dict.fromkeys([*inputs, *lambda_grid]):
        blur[input_key(value)] = choose_blur_sigma(validation, harmonizer, value, blur_sigmas)
    say(f"blur sd chosen on {validation.name}: " + ", ".join(f"{k}: {v[0]:g}" for k, v in blur.items()))

    # Hindsight: the one lambda whose blurred mapped paste has the lowest mean low-pass error.
    grid_scores: dict[str, list[dict[str, float]]] = {}
    for value in lambda_grid:
        key = input_key(value)
        grid_scores[key] = [case.score(case.blurred(case.insert(harmonizer, _mapped_parameters(value, "normalized"),
                                                                composite=True), blur[key][0]))
                            for case in subjects]
    grid_errors = {k: float(np.mean([s["lowpass_nmae_tumor"] for s in v])) for k, v in grid_scores.items()}
    best_lambda = min(lambda_grid, key=lambda v: grid_errors[input_key(v)])
    say(f"best fixed lambda (hindsight, test subjects): {best_lambda:g}")

    row_names = (*QUALITY_ROWS, "annotated") if annotated is not None else QUALITY_ROWS
    seeded_rows = (*SEEDED_ROWS, "annotated") if annotated is not None else SEEDED_ROWS
    tables = {}
    for value in inputs:
        key = input_key(value)
        per_row: dict[str, list[dict[str, float]]] = {row: [] for row in row_names}
        for index, case in enumerate(subjects):
            mapped = case.insert(harmonizer, _mapped_parameters(value, "normalized"), composite=True)
            matched = case.insert(harmonizer, _mapped_parameters(value, "matched"), composite=True)
            mapped_source = map_tumor_intensities(case.source_on_target, case.mask, case.washed_out, "normalized",
                                                  input_contrast(value))
            outputs = {
                "naive": naive_paste(case.washed_out, case.source_on_target, case.mask),
                "mapped": mapped,
                "matched": matched,
                "poisson": poisson_blend(case.washed_out, mapped_source, case.mask, slice_axis=case.axis,
                                         spacing=case.spacing),
                "blurred": case.blurred(mapped, blur[key][0]),
                "oracle": oracle_paste(case.washed_out, case.truth, case.mask, axis=case.axis, spacing=case.spacing),
                "oracle_level": case.flat_at_truth_level(),
            }
            scores = {row: case.score(image) for row, image in outputs.items()}
            scores["best_fixed_lambda"] = grid_scores[input_key(best_lambda)][index]
            seeded = [("harmonized", harmonizer, lambda s: paper_parameters(value, start_scale, s)),
                      ("default", harmonizer, lambda s: default_parameters(value, s))]
            if annotated is not None:
                seeded.append(("annotated", annotated, lambda s: default_parameters(value, s)))
            for row, model, make in seeded:
                first, second = (case.insert(model, make(s)) for s in seeds)
                scores[row] = {**case.score(first), **case.seeds(first, second)}
                outputs[row] = first
            if figure_input is not None and input_key(figure_input) == key:
                center = int(np.argmax(case.mask.sum(axis=tuple(a for a in range(3) if a != case.axis))))
                plane = [b for a, b in enumerate(case.box) if a != case.axis]  # the tumor and its surroundings
                pick = lambda volume: np.take(volume, center, axis=case.axis)[tuple(plane)]  # noqa: E731
                case.panels = {"source": pick(case.source_on_target), "washed out": pick(case.washed_out),
                               **{row: pick(image) for row, image in outputs.items()},
                               "truth": pick(case.truth), "mask": pick(case.mask)}
            for row in row_names:
                per_row[row].append(scores[row])
        rows = {row: _aggregate(values) for row, values in per_row.items()}
        tables[key] = {"input": value, "blur_sigma_px": blur[key][0], "rows": rows,
                       "targets": {row: quality_targets(rows, row) for row in seeded_rows}}
        say(f"{key}: done")
    return {
        "inputs": [input_key(v) for v in inputs],
        "subjects": [case.name for case in subjects],
        "validation_subject": validation.name,
        "start_scale": start_scale,
        "seeds": list(seeds),
        "texture_sigma_px": TEXTURE_SIGMA_PX,
        "blur_sigma": {k: {"chosen": v[0], "validation_lowpass_error": v[1]} for k, v in blur.items()},
        "best_fixed_lambda": {"lambda": float(best_lambda), "sigma_px": blur[input_key(best_lambda)][0],
                              "mean_lowpass_error_by_lambda": grid_errors,
                              "note": "chosen with hindsight on the test subjects (oracle-ish)"},
        "tables": tables,
    }


def quality_targets(rows: dict[str, dict[str, Any]], row: str) -> dict[str, dict[str, Any]]:
    """The issue's targets 2-4 for ``row`` of one table, each ``{"value", "threshold", "pass"}``.

    Computed from the numbers of ``rows`` (:func:`run_quality`'s aggregated rows): means over
    subjects, except "no vanishing", which counts subjects with a contrast ratio (the truth's
    sign and magnitude) of at least :data:`VANISH_CONTRAST_RATIO`. A target whose value is NaN
    (e.g. no subject with a measurable interior) fails.
    """
    values = rows[row]
    mean = lambda metric, r=row: rows[r][metric]["mean"]  # noqa: E731
    ratios = np.asarray(values["contrast_ratio"]["values"], np.float64)
    measurable = ratios[np.isfinite(ratios)]
    visible = float(np.mean(measurable >= VANISH_CONTRAST_RATIO)) if measurable.size else math.nan
    checks = {
        "2_no_vanishing": (visible, f">= {VANISH_SUBJECT_FRACTION:g} of subjects with contrast ratio "
                                    f">= {VANISH_CONTRAST_RATIO:g}", visible >= VANISH_SUBJECT_FRACTION),
        "3_lowpass_vs_best_fixed_lambda": _ratio_check(mean("lowpass_nmae_tumor"),
                                                       mean("lowpass_nmae_tumor", "best_fixed_lambda"),
                                                       LOWPASS_VS_BEST_FIXED),
        "3_w1_vs_mapped": _ratio_check(mean("wasserstein_tumor"), mean("wasserstein_tumor", "mapped"), W1_VS_MAPPED),
        "3_seam_ratio": _range_check(mean("seam_ratio"), SEAM_RANGE),
        "4_highpass_ratio": _range_check(mean("highpass_ratio"), HIGHPASS_RANGE),
        "4_seeds_differ": (mean("texture_difference"), f">= {SEED_TEXTURE_MIN:g} x truth's texture sd",
                           mean("texture_difference") >= SEED_TEXTURE_MIN),
        "4_seed_mean_level": (mean("mean_level_difference"), f"<= {SEED_MEAN_LEVEL_MAX:g} of the robust range",
                              mean("mean_level_difference") <= SEED_MEAN_LEVEL_MAX),
    }
    return {name: {"value": float(v), "threshold": t, "pass": bool(p)} for name, (v, t, p) in checks.items()}


def quality_markdown(report: dict[str, Any]) -> str:
    """Markdown tables of :func:`run_quality`'s report: one per input, then its PASS/FAIL lines."""
    metrics = ["lowpass_nmae_tumor", "nmae_tumor", "wasserstein_tumor", "nmae_shell", "contrast",
               "contrast_ratio", "seam_ratio", "highpass_ratio", "texture_difference", "mean_level_difference"]
    best = report["best_fixed_lambda"]
    lines = [f"best_fixed_lambda = blurred mapped paste at lambda* = {best['lambda']:g} "
             f"(sigma {best['sigma_px']:g} px), "
             "chosen WITH HINDSIGHT on the test subjects (oracle-ish); blur sds chosen on the separate subject "
             f"{report['validation_subject']}; harmonized = paper mode from start scale {report['start_scale']}; "
             "oracle = the truth render blended with our weight (a floor, not a method).", ""]
    for key, table in report["tables"].items():
        truth_contrast = table["rows"]["oracle"]["truth_contrast"]["mean"]
        lines += [f"## Input paste: {key} (blur sd {table['blur_sigma_px']:g} px; truth's tumor-vs-shell contrast "
                  f"{truth_contrast:+.3f} of the robust range)", "",
                  "| row | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
        for row, values in table["rows"].items():
            cells = ["–" if values.get(m, {}).get("mean") is None or not math.isfinite(values[m]["mean"])
                     else f"{values[m]['mean']:.3f}" for m in metrics]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        rows = table["rows"]
        if "oracle_level" in rows:
            bound = rows["oracle_level"]["lowpass_nmae_tumor"]["mean"] / rows["best_fixed_lambda"]["lowpass_nmae_tumor"]["mean"]
            lines += ["", f"Bound for target 3: the ORACLE level (a flat tumor at the truth's own mean) has "
                          f"{bound:.2f} x the best fixed lambda's low-pass error (target <= {LOWPASS_VS_BEST_FIXED:g} x)."]
        lines += ["", "| target | " + " | ".join(table["targets"]) + " |", "|---|" + "---|" * len(table["targets"])]
        names = list(next(iter(table["targets"].values())))
        for name in names:
            cells = []
            for row in table["targets"]:
                check = table["targets"][row][name]
                cells.append(f"{'PASS' if check['pass'] else 'FAIL'} ({check['value']:.3g})")
            threshold = next(iter(table["targets"].values()))[name]["threshold"]
            lines.append(f"| {name} [{threshold}] | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _mapped_parameters(value: InputPaste, mode: str) -> InsertionParameters:
    """The paste at the input's own :math:`\\lambda` (fixed appearance): what the baselines map."""
    return InsertionParameters(seed=0, intensity_mode=mode, contrast=input_contrast(value), appearance="fixed")


def _aggregate(values: Sequence[dict[str, float]]) -> dict[str, dict[str, Any]]:
    metrics = list(dict.fromkeys(k for v in values for k in v))
    out = {}
    for metric in metrics:
        column = np.asarray([v.get(metric, math.nan) for v in values], np.float64)
        finite = column[np.isfinite(column)]
        out[metric] = {"mean": float(finite.mean()) if finite.size else math.nan,
                       "values": [float(x) for x in column]}
    return out


def _ratio_check(value: float, reference: float, factor: float) -> tuple[float, str, bool]:
    ratio = value / reference if reference > 0 else math.nan
    return ratio, f"<= {factor:g} x", bool(ratio <= factor)


def _range_check(value: float, bounds: tuple[float, float]) -> tuple[float, str, bool]:
    return value, f"in [{bounds[0]:g}, {bounds[1]:g}]", bool(bounds[0] <= value <= bounds[1])
