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
``poisson``          gradient-domain blending of the mapped paste, slice by slice;
``singan_s<k>``      the mapped paste harmonized from start scale ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from singan_insert.evaluation.baselines import poisson_blend
from singan_insert.harmonizer.model import Harmonizer
from singan_insert.insertion.intensity import map_tumor_intensities
from singan_insert.evaluation.metrics import harmonization_fidelity
from singan_insert.insertion.placement import SourceTumor
from singan_insert.datasets.phantom import SimulatedSubject
from singan_insert.insertion.insert import InsertionParameters, insert_tumor, through_plane_axis


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
        """Fidelity of every method against the truth (see :mod:`singan_insert.evaluation.metrics`)."""
        return {method: harmonization_fidelity(volume, self.truth, self.mask, self.spacing).to_dict()
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


def training_slice_from_subject(subject: SimulatedSubject, axis: int = 2) -> tuple[np.ndarray, tuple[float, float], int]:
    """The modality-B slice with the largest tumor area (every crossMoDA hrT2 shows its tumor)."""
    areas = (subject.label_b == 1).sum(axis=tuple(a for a in range(3) if a != axis))
    index = int(np.argmax(areas))
    spacing = tuple(s for a, s in enumerate(subject.spacing_b) if a != axis)
    return np.take(subject.image_b, index, axis=axis).astype(np.float32), (float(spacing[0]), float(spacing[1])), index


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
                                   replace(parameters, contrast=1.0, start_scale=scale), return_composite=True)
                outputs["naive_raw"] = raw.composite
                outputs["naive_mapped"] = result.composite
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


def fidelity_markdown(summary: dict[str, dict[str, Any]], reference: str = "naive_mapped") -> str:
    """A markdown table: one row per method, mean of each metric, and error relative to ``reference``."""
    metrics = ["nmae_tumor", "nmae_shell", "wasserstein_tumor", "contrast_ratio", "seam_ratio"]
    header = "| method | " + " | ".join(metrics) + f" | nmae_tumor / {reference} |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    ref = summary.get(reference, {}).get("nmae_tumor", {}).get("mean")
    for method, values in summary.items():
        cells = [f"{values[m]['mean']:.3f}" for m in metrics]
        ratio = f"{values['nmae_tumor']['mean'] / ref:.2f}" if ref else "-"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)
