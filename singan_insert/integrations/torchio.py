"""TorchIO 1.x transforms that insert a harmonized tumor: :class:`TumorInsertion` (deterministic)
and :class:`RandomTumorInsertion` (samples the tumor, its placement and the parameters).

They follow TorchIO's conventions:

* :class:`RandomTumorInsertion` draws every random value from torch's global generator
  (``torch.manual_seed`` reproduces a run) and applies its deterministic twin
  :class:`TumorInsertion`, whose ``args_names`` are both attributes and ``__init__`` keyword
  arguments; the twin is what the subject's history records, so
  ``subject.get_composed_history()`` replays the insertion bit for bit (same data, same model
  file). The harmonizer noise is seeded by the recorded ``seed``.
* The network is never carried by a transform or a sample: transforms hold the model's file
  path and load it lazily, once per process (and device), through :func:`load_harmonizer`.
  Transforms pickle and deep-copy cheaply, so they work in ``DataLoader`` workers started by
  ``fork`` or ``spawn``.
* The label map ``label_key`` is always present in the output, also when the transform is
  skipped by ``p``: an all-zero map is created if the subject had none (and the skip is
  recorded as ``TumorInsertion(source=None, ...)``), so samples always collate.
* ``include``/``exclude`` select the target image among the subject's scalar images (exactly
  one must remain; a same-subject source image is not counted unless it is the only one);
  ``copy`` and ``keep`` behave as in every TorchIO transform.
* The transforms are not invertible (a tumor cannot be un-inserted): ``Compose.inverse()``
  skips them with TorchIO's usual warning.

Dictionaries (e.g. in a MONAI pipeline) work as with any TorchIO transform: pass the keys of
the image and of the label map in ``include`` and the label's in ``label_keys``; the values
are ``(1, X, Y, Z)`` tensors or arrays and the output is a plain dictionary of tensors,
with the label key added when it was missing. Such tensors carry no affine, so voxels are
taken as 1 mm isotropic (give locations in voxels)::

    transform = RandomTumorInsertion("model.safetensors", sources=bank, label_key="label",
                                     include=["image", "label"], label_keys=["label"])
    sample = transform({"image": image_tensor, "label": label_tensor})  # a dict, as given

Placing a tumor near the border starves patch samplers: ``tio.LabelSampler`` never centres a
patch closer than half a patch to the border, so keep ``border_margin`` at least half the patch
size when training on patches of the inserted label.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchio as tio
from torchio.transforms.augmentation import RandomTransform
from torchio.transforms.transform import Transform

from singan_insert.errors import SinganInsertError
from singan_insert.harmonizer.model import Harmonizer
from singan_insert.devices import select_device
from singan_insert.insertion.intensity import IntensityMode
from singan_insert.insertion.placement import (
    DEFAULT_MAX_ANISOTROPY,
    Placement,
    SourceTumor,
    check_same_grid,
    placed_bounds,
)
from singan_insert.insertion.insert import InsertionParameters, default_label_dtype, insert_tumor

__all__ = ["RandomTumorInsertion", "TumorInsertion", "load_harmonizer"]

SourceSpec = str | tuple[str, str] | SourceTumor | tio.Subject | None

# (resolved path, file mtime_ns, device, pid) -> Harmonizer. Keyed by pid so that a forked
# DataLoader worker loads its own copy instead of sharing the parent's torch state.
_MODEL_CACHE: dict[tuple[str, int, str, int], Harmonizer] = {}


def load_harmonizer(path: str | os.PathLike, device: str | torch.device | None = "cpu") -> Harmonizer:
    """Load a harmonizer once per process and device (later calls return the same object).

    The file's modification time is part of the key, so a retrained model is reloaded.
    """
    resolved = Path(path)
    if resolved.is_dir():
        resolved = resolved / "harmonizer.safetensors"
    if not resolved.is_file():
        raise SinganInsertError(
            f"The harmonizer model {os.fspath(path)!r} does not exist. Pass the path of a model "
            "file (or a training output folder) written by `singan-insert train`.")
    device = str(select_device(device))
    pid = os.getpid()
    key = (str(resolved.resolve()), resolved.stat().st_mtime_ns, device, pid)
    if key not in _MODEL_CACHE:
        for stale in [k for k in _MODEL_CACHE if k[3] != pid]:  # inherited from a parent
            del _MODEL_CACHE[stale]
        _MODEL_CACHE[key] = Harmonizer.load(resolved, device=device)
    return _MODEL_CACHE[key]


@functools.lru_cache(maxsize=64)
def _load_source_files(image_path: str, image_mtime: int, label_path: str, label_mtime: int,
                       label_value: int | None, max_anisotropy: float) -> SourceTumor:
    return SourceTumor.from_files(image_path, label_path, label_value=label_value,
                                  max_anisotropy=max_anisotropy)


def _source_from_files(paths: tuple[str, str], label_value: int | None, max_anisotropy: float) -> SourceTumor:
    stats = []
    for path in paths:
        try:
            stats.append(os.stat(path).st_mtime_ns)
        except OSError:
            raise SinganInsertError(f"The source file {path!r} does not exist.") from None
    return _load_source_files(paths[0], stats[0], paths[1], stats[1], label_value, max_anisotropy)


def _source_from_subject(subject: tio.Subject, image_key: str | None, label_key: str,
                         label_value: int | None, max_anisotropy: float, origin: str) -> SourceTumor:
    if image_key is None:
        scalars = list(subject.get_images_dict(intensity_only=True))
        if len(scalars) != 1:
            raise SinganInsertError(
                f"The source subject has the scalar images {scalars}; pass source_image_key to "
                "say which one holds the tumor.")
        image_key = scalars[0]
    for key in (image_key, label_key):
        if key not in subject or not isinstance(subject[key], tio.Image):
            raise SinganInsertError(
                f"The source subject has no image {key!r} (it has {list(subject.get_images_dict(False))}).")
    image, label = subject[image_key], subject[label_key]
    if image.data.shape[0] != 1 or label.data.shape[0] != 1:
        raise SinganInsertError("Source image and label must have a single channel.")
    return SourceTumor.from_arrays(
        image.data[0].numpy(), label.data[0].numpy(), image.affine, label_value=label_value,
        label_affine=label.affine, max_anisotropy=max_anisotropy, origin=origin,
    )


def _normalize_source(source: Any, image_key: str | None, label_key: str, label_value: int | None,
                      max_anisotropy: float) -> SourceSpec:
    """The compact, picklable form a transform stores for a source."""
    if source is None or isinstance(source, (str, SourceTumor)):
        return source
    if isinstance(source, tio.Subject):
        return _source_from_subject(source, image_key, label_key, label_value, max_anisotropy,
                                    origin="subject")
    if isinstance(source, os.PathLike):
        raise SinganInsertError(
            "A source file needs its label: pass source=(image_path, label_path).")
    if isinstance(source, Sequence) and len(source) == 2 and \
            all(isinstance(p, (str, os.PathLike)) for p in source):
        return (os.fspath(source[0]), os.fspath(source[1]))
    raise SinganInsertError(
        f"Unsupported source {source!r}: use an image key of the subject (str), an "
        "(image_path, label_path) pair, a torchio.Subject or a SourceTumor.")


class TumorInsertion(Transform):
    r"""Insert one tumor, harmonized by a SinGAN harmonizer, into a subject's image.

    The target image (see ``include``/``exclude``) receives the source tumor, whose intensities
    are mapped into the target's units (``intensity_mode``, then the contrast factor
    :math:`\lambda`), pasted at ``location`` (or where it physically is) and harmonized slice by
    slice along ``axis``; ``label_value`` is written into the label map ``label_key`` (created
    when missing). See :func:`singan_insert.insertion.insert.insert_tumor` for the method.

    Args:
        model: path of the harmonizer model file (or training folder). Loaded lazily, once per
            process (:func:`load_harmonizer`); the transform carries only the path.
        source: the tumor: the key of a scalar image of the same subject (its label is
            ``source_label_key``), an ``(image_path, label_path)`` pair of files, a
            :class:`~singan_insert.insertion.placement.SourceTumor`, or a ``torchio.Subject`` (converted
            to a compact ``SourceTumor`` at construction). ``None`` inserts nothing but still
            creates the label map: this is what :class:`RandomTumorInsertion` records when it
            is skipped.
        location: target position of the tumor's centroid, ``(i, j, k)`` in ``location_units``;
            ``None`` keeps the tumor's physical position (co-registered source, or in place).
        location_units: ``"voxel"`` or ``"mm"``.
        start_scale: harmonizer start scale; ``None``: the model's default.
        contrast: :math:`\lambda > 0` (GBA: 0.5, 0.8, 1.5), with ``appearance="fixed"`` only.
        intensity_mode: ``"normalized"`` or ``"matched"``.
        appearance: ``"auto"`` (default: the model chooses the tumor's level, see
            :mod:`singan_insert.insertion.appearance`) or ``"fixed"`` (the paper's :math:`\lambda`).
        seed: seed of the harmonizer noise (an int).
        flip: flip the tumor along world axes x, y, z.
        rotation: rotation about world axes x, y, z in degrees.
        scale: scale factor (one, or one per world axis), > 0.
        label_key: name of the label map that receives the tumor.
        label_value: value written for the tumor (> 0).
        source_label_key: label map of the source (same subject, or source subject).
        source_label_value: the tumor's value in the source label when it holds several.
        source_image_key: for a ``torchio.Subject`` source, which image holds the tumor
            (``None``: its only scalar image).
        axis: slicing axis for the harmonization; ``None``: the through-plane axis.
        context_mm: in-plane context kept around the tumor for the harmonizer.
        overlap: ``"replace"``, ``"keep"`` or ``"error"`` (see :mod:`singan_insert.insertion.insert`).
        border_margin: minimum voxels between the tumor and the border of the volume.
        clip_to_fov: cut the tumor at the border instead of raising.
        modality: declared modality of the target, checked against the model's.
        device: where the harmonizer runs (default ``"cpu"``: right for DataLoader workers).
        max_anisotropy: see :func:`singan_insert.insertion.placement.check_anisotropy`.
        **kwargs: see :class:`torchio.transforms.Transform` (``p``, ``include``, ``exclude``,
            ``copy``, ``keep``, ``label_keys``). When ``p`` skips the insertion, the label map is
            still created.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        source: SourceSpec,
        location: Sequence[float] | None = None,
        *,
        location_units: str = "voxel",
        start_scale: int | None = None,
        contrast: float = 1.0,
        intensity_mode: IntensityMode = "normalized",
        appearance: str = "auto",
        seed: int = 0,
        flip: Sequence[bool] = (False, False, False),
        rotation: Sequence[float] = (0.0, 0.0, 0.0),
        scale: float | Sequence[float] = 1.0,
        label_key: str = "label",
        label_value: int = 1,
        source_label_key: str = "label",
        source_label_value: int | None = None,
        source_image_key: str | None = None,
        axis: int | None = None,
        context_mm: float = 20.0,
        overlap: str = "replace",
        border_margin: int = 1,
        clip_to_fov: bool = False,
        modality: str | None = None,
        device: str = "cpu",
        max_anisotropy: float = DEFAULT_MAX_ANISOTROPY,
        **kwargs,
    ):
        # TorchIO's own `p` would return the input untouched, without the label map; the
        # probability is applied in __call__ instead, which records the skip.
        self.insertion_probability = self.parse_probability(kwargs.pop("p", 1))
        super().__init__(**kwargs)
        self.model = os.fspath(model)
        self.source = _normalize_source(source, source_image_key, source_label_key,
                                        source_label_value, max_anisotropy)
        self.location = None if location is None else tuple(float(v) for v in location)
        self.location_units = location_units
        self.start_scale = None if start_scale is None else int(start_scale)
        self.contrast = float(contrast)
        self.intensity_mode = intensity_mode
        self.appearance = appearance
        self.seed = int(seed)
        self.flip = tuple(bool(v) for v in flip)
        self.rotation = tuple(float(v) for v in rotation)
        self.scale = (float(scale),) * 3 if np.isscalar(scale) else tuple(float(v) for v in scale)
        self.label_key = label_key
        self.label_value = int(label_value)
        self.source_label_key = source_label_key
        self.source_label_value = None if source_label_value is None else int(source_label_value)
        self.axis = axis
        self.context_mm = float(context_mm)
        self.overlap = overlap
        self.border_margin = int(border_margin)
        self.clip_to_fov = bool(clip_to_fov)
        self.modality = modality
        self.device = device
        self.max_anisotropy = float(max_anisotropy)
        self.args_names = [
            "model", "source", "location", "location_units", "start_scale", "contrast",
            "intensity_mode", "seed", "flip", "rotation", "scale", "label_key", "label_value",
            "source_label_key", "source_label_value", "axis", "context_mm", "overlap",
            "border_margin", "clip_to_fov", "modality", "device", "max_anisotropy", "appearance",
        ]
        # Validate every parameter now rather than in a DataLoader worker.
        self.insertion_parameters()

    def __call__(self, data):
        if self.insertion_probability < 1 and torch.rand(1).item() > self.insertion_probability:
            skipped = TumorInsertion(**{**self._get_named_arguments(), "source": None},
                                     **self._get_base_args())
            return skipped(data)
        return super().__call__(data)

    def insertion_parameters(self) -> InsertionParameters:
        """The :class:`~singan_insert.insertion.insert.InsertionParameters` this transform applies."""
        placement = Placement(
            location=self.location, units=self.location_units, flips=self.flip,
            rotation_degrees=self.rotation, scale=self.scale,
        )
        return InsertionParameters(
            placement=placement, intensity_mode=self.intensity_mode, contrast=self.contrast,
            start_scale=self.start_scale, axis=self.axis, context_mm=self.context_mm,
            seed=self.seed, label_value=self.label_value, overlap=self.overlap,
            border_margin=self.border_margin, clip_to_fov=self.clip_to_fov,
            max_anisotropy=self.max_anisotropy, appearance=self.appearance,
        )

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        target_name, target = _select_target(self, subject)
        label = _existing_label(subject, self.label_key, target)
        if self.source is None:
            if label is None:
                _add_empty_label(subject, self.label_key, self.label_value, target)
            return subject
        source = self.resolve_source(subject)
        harmonizer = load_harmonizer(self.model, self.device)
        result = insert_tumor(
            target.data[0].numpy(), target.affine, source, harmonizer, self.insertion_parameters(),
            target_label=None if label is None else label.data[0].numpy(), modality=self.modality,
        )
        target.set_data(torch.from_numpy(result.image[np.newaxis]))
        new_label = torch.from_numpy(result.label[np.newaxis])
        if label is None:
            subject.add_image(tio.LabelMap(tensor=new_label, affine=target.affine), self.label_key)
        else:
            label.set_data(new_label)
        return subject

    def resolve_source(self, subject: tio.Subject) -> SourceTumor:
        """The :class:`~singan_insert.insertion.placement.SourceTumor` this transform inserts into ``subject``."""
        if isinstance(self.source, SourceTumor):
            return self.source
        if isinstance(self.source, tuple):
            return _source_from_files(self.source, self.source_label_value, self.max_anisotropy)
        return _source_from_subject(subject, self.source, self.source_label_key,
                                    self.source_label_value, self.max_anisotropy,
                                    origin=f"subject[{self.source!r}]")


class RandomTumorInsertion(RandomTransform):
    r"""Insert a random tumor from a bank at a random place, harmonized by a SinGAN harmonizer.

    For each subject it draws (from torch's global generator): whether to insert (``p``), a
    source from ``sources``, flips, a rotation and a scale, a location in the placement region
    such that the placed tumor stays ``border_margin`` voxels inside the volume (up to
    ``max_attempts`` draws), a start scale, a contrast factor :math:`\lambda` and a noise seed;
    then it applies :class:`TumorInsertion` with those values (which the history records).

    Args:
        model: path of the harmonizer model (see :class:`TumorInsertion`).
        sources: the bank: the key of a scalar image of the same subject (the tumor is the
            subject's own, label ``source_label_key``); or a sequence of
            ``(image_path, label_path)`` pairs, ``torchio.Subject`` instances (converted to
            compact :class:`~singan_insert.insertion.placement.SourceTumor` crops at construction) or
            ``SourceTumor`` instances; one is drawn uniformly per subject.
        placement_key: where the tumor's centroid may go: the name of a label map of the
            subject (voxels whose value is in ``placement_values``, default any non-zero), or
            of a scalar image used as a probability map (non-negative weights, need not sum to
            one). ``None``: the tumor keeps its physical position (co-registered source or in
            place).
        placement_values: label values of the region (with a label map ``placement_key``).
        placement_mode: ``"sample"`` a voxel with probability proportional to the region's
            weights, or ``"centroid"``: the region's centre of mass (e.g. ``placement_key`` =
            the label map and ``placement_values=(1,)``: over the existing tumor, as in GBA).
        start_scale: ``None`` (the model's default), an int, or ``(a, b)``: uniform integer in
            ``[a, b]`` (both negative to count from the finest scale).
        contrast: :math:`\lambda`, a number or ``(a, b)``: :math:`\lambda \sim U(a, b)`, > 0;
            used with ``appearance="fixed"`` only.
        intensity_mode: ``"normalized"`` or ``"matched"``.
        appearance: ``"auto"`` (default) or ``"fixed"``, as in :class:`TumorInsertion`.
        flip_axes: world axes (0 = x, 1 = y, 2 = z) that may be flipped, each with
            ``flip_probability``.
        flip_probability: probability of flipping each axis of ``flip_axes``.
        degrees: rotation ranges, as in ``tio.RandomAffine``: :math:`d` gives
            :math:`\theta_i \sim U(-d, d)`; ``(a, b)`` or six values for per-axis ranges.
        scales: scaling ranges, as in ``tio.RandomAffine``: :math:`s` gives
            :math:`U(1 - s, 1 + s)`; ``(a, b)`` or six values.
        isotropic: one scale factor for all axes.
        max_attempts: location draws before giving up (the tumor must fit in the volume).
        p: probability of inserting a tumor; when skipped the label map is still created.
        label_key, label_value, source_label_key, source_label_value, source_image_key, axis,
        context_mm, overlap, border_margin, modality, device, max_anisotropy:
            see :class:`TumorInsertion`.
        **kwargs: see :class:`torchio.transforms.Transform`.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        sources: str | Sequence[Any],
        *,
        placement_key: str | None = None,
        placement_values: Sequence[int] | None = None,
        placement_mode: str = "sample",
        start_scale: int | tuple[int, int] | None = None,
        contrast: float | tuple[float, float] = 1.0,
        intensity_mode: IntensityMode = "normalized",
        appearance: str = "auto",
        flip_axes: Sequence[int] = (0, 1, 2),
        flip_probability: float = 0.5,
        degrees: float | Sequence[float] = 10.0,
        scales: float | Sequence[float] = 0.1,
        isotropic: bool = True,
        max_attempts: int = 20,
        label_key: str = "label",
        label_value: int = 1,
        source_label_key: str = "label",
        source_label_value: int | None = None,
        source_image_key: str | None = None,
        axis: int | None = None,
        context_mm: float = 20.0,
        overlap: str = "replace",
        border_margin: int = 1,
        modality: str | None = None,
        device: str = "cpu",
        max_anisotropy: float = DEFAULT_MAX_ANISOTROPY,
        p: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)  # TorchIO's p stays 1: the skip is applied (and recorded) below
        self.insertion_probability = self.parse_probability(p)
        self.model = os.fspath(model)
        self.source_label_key = source_label_key
        self.source_label_value = source_label_value
        self.max_anisotropy = float(max_anisotropy)
        if isinstance(sources, str):
            self.sources: list[SourceSpec] = [sources]
        else:
            if isinstance(sources, (tio.Subject, SourceTumor)) or (
                    isinstance(sources, Sequence) and len(sources) == 2
                    and all(isinstance(s, (str, os.PathLike)) for s in sources)):
                sources = [sources]  # a single source, not a bank
            self.sources = [_normalize_source(s, source_image_key, source_label_key,
                                              source_label_value, self.max_anisotropy)
                            for s in sources]
            if not self.sources or any(isinstance(s, str) or s is None for s in self.sources):
                raise SinganInsertError(
                    "sources must be an image key (str) or a non-empty sequence of "
                    "(image_path, label_path) pairs, torchio.Subjects or SourceTumors.")
        if placement_mode not in ("sample", "centroid"):
            raise SinganInsertError(f"placement_mode must be 'sample' or 'centroid', got {placement_mode!r}.")
        self.placement_key = placement_key
        self.placement_values = None if placement_values is None else tuple(int(v) for v in placement_values)
        self.placement_mode = placement_mode
        self.start_scale_range = _parse_start_scale(start_scale)
        if isinstance(contrast, (int, float)):
            contrast = (contrast, contrast)  # a number is a fixed factor, not TorchIO's (0, d)
        self.contrast_range = self._parse_range(tuple(float(c) for c in contrast), "contrast")
        if self.contrast_range[0] <= 0:
            raise SinganInsertError(f"contrast must be > 0, got {contrast!r}.")
        self.intensity_mode = intensity_mode
        self.flip_axes = tuple(int(a) for a in flip_axes)
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise SinganInsertError(f"flip_axes must be among 0, 1, 2, got {flip_axes!r}.")
        self.flip_probability = self.parse_probability(flip_probability)
        self.degrees = self.parse_params(degrees, None, "degrees")
        self.scales = self.parse_params(scales, 1, "scales", min_constraint=0)
        if min(self.scales) <= 0:
            raise SinganInsertError(f"scales must give positive factors, got {scales!r}.")
        self.isotropic = bool(isotropic)
        if max_attempts < 1:
            raise SinganInsertError("max_attempts must be >= 1.")
        self.max_attempts = int(max_attempts)
        self.twin_arguments = dict(
            intensity_mode=intensity_mode, label_key=label_key, label_value=label_value,
            source_label_key=source_label_key, source_label_value=source_label_value,
            axis=axis, context_mm=context_mm, overlap=overlap, border_margin=border_margin,
            modality=modality, device=device, max_anisotropy=self.max_anisotropy,
            appearance=appearance,
        )
        # Validate the fixed arguments now (a twin with no source loads nothing).
        TumorInsertion(self.model, None, **self.twin_arguments)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        arguments: dict[str, Any] = {**self.twin_arguments, "model": self.model}
        if torch.rand(1).item() > self.insertion_probability:
            transform = TumorInsertion(source=None, **arguments, **self._get_base_args())
            return transform(subject)
        _, target = _select_target(self, subject, self.sources[0] if isinstance(self.sources[0], str) else None)
        index = int(torch.randint(0, len(self.sources), (1,)).item())
        source_spec = self.sources[index]
        flip = tuple(bool(a in self.flip_axes and torch.rand(1).item() < self.flip_probability)
                     for a in range(3))
        rotation = self.sample_uniform_sextet(self.degrees)
        if self.isotropic:
            scale = (self.sample_uniform(*self.scales[:2]),) * 3
        else:
            scale = self.sample_uniform_sextet(self.scales)
        location = None
        if self.placement_key is not None:
            probe = TumorInsertion(self.model, source_spec, **self.twin_arguments)
            source = probe.resolve_source(subject)
            location = self._sample_location(subject, target, source, flip, rotation, scale)
        start_scale = None
        if self.start_scale_range is not None:
            low, high = self.start_scale_range
            start_scale = int(torch.randint(low, high + 1, (1,)).item())
        contrast = self.sample_uniform(*self.contrast_range)
        seed = self._get_random_seed()
        transform = TumorInsertion(
            source=source_spec, location=location, location_units="voxel",
            start_scale=start_scale, contrast=contrast, seed=seed, flip=flip,
            rotation=rotation, scale=scale, **arguments, **self._get_base_args(),
        )
        return transform(subject)

    def _sample_location(self, subject, target, source, flip, rotation, scale) -> tuple[float, float, float]:
        weights = _placement_weights(subject, self.placement_key, self.placement_values, target)
        shape = np.array(target.spatial_shape)
        margin = self.twin_arguments["border_margin"]
        if self.placement_mode == "centroid":
            candidates = [tuple(float(v) for v in
                                (np.argwhere(weights > 0) * 1.0).T @ weights[weights > 0] / weights.sum())]
        else:
            cumulative = torch.from_numpy(np.cumsum(weights.ravel(), dtype=np.float64))
            candidates = []
            for _ in range(self.max_attempts):
                draw = torch.rand(1, dtype=torch.float64) * cumulative[-1]
                flat = int(torch.searchsorted(cumulative, draw, right=True).clamp(max=len(cumulative) - 1))
                candidates.append(tuple(float(v) for v in np.unravel_index(flat, weights.shape)))
        for location in candidates:
            placement = Placement(location=location, units="voxel", flips=flip,
                                  rotation_degrees=rotation, scale=scale)
            low, high = placed_bounds(source, target.affine, placement)
            if np.all(low >= margin) and np.all(high <= shape - 1 - margin):
                return location
        raise SinganInsertError(
            f"Could not place the tumor ({source.mask.shape} crop, scale {scale[0]:.2f}) inside "
            f"the {tuple(shape)} volume with border_margin={margin} in {len(candidates)} "
            f"attempt(s) from the placement region {self.placement_key!r}. Use a larger region, "
            "smaller scales or a smaller border_margin.")


# --------------------------------------------------------------------------------------------
# Helpers shared by the two transforms
# --------------------------------------------------------------------------------------------
def _select_target(transform: Transform, subject: tio.Subject, source_key: str | None = None):
    """The one scalar image selected by include/exclude (a same-subject source only if alone)."""
    if source_key is None and isinstance(getattr(transform, "source", None), str):
        source_key = transform.source
    label_key = getattr(transform, "label_key", None) or transform.twin_arguments["label_key"]
    if label_key in subject and not isinstance(subject[label_key], tio.LabelMap):
        raise SinganInsertError(
            f"{label_key!r} must be a label map, but it is a {type(subject[label_key]).__name__}. "
            "With dictionary input, also pass label_keys=[...] naming it.")
    images = subject.get_images_dict(intensity_only=True, include=transform.include,
                                     exclude=transform.exclude)
    if len(images) > 1 and source_key in images:
        images = {k: v for k, v in images.items() if k != source_key}
    if len(images) != 1:
        raise SinganInsertError(
            f"Exactly one target image is needed, but include/exclude select {sorted(images)} "
            f"among the subject's scalar images. Pass include=[name] (plus the label keys for a "
            "dictionary input).")
    name, image = next(iter(images.items()))
    if image.data.shape[0] != 1:
        raise SinganInsertError(f"The target image {name!r} has {image.data.shape[0]} channels; "
                                "one is needed (insert per channel with include).")
    return name, image


def _existing_label(subject: tio.Subject, label_key: str, target: tio.Image) -> tio.LabelMap | None:
    if label_key not in subject:
        return None
    label = subject[label_key]
    if not isinstance(label, tio.LabelMap):
        raise SinganInsertError(f"{label_key!r} must be a torchio.LabelMap.")
    check_same_grid(label.spatial_shape, label.affine, target.spatial_shape, target.affine,
                    f"label map {label_key!r}", "target image")
    if label.data.shape[0] != 1:
        raise SinganInsertError(f"The label map {label_key!r} must have one channel.")
    return label


def _add_empty_label(subject: tio.Subject, label_key: str, label_value: int, target: tio.Image) -> None:
    dtype = default_label_dtype(label_value)
    empty = torch.from_numpy(np.zeros((1, *target.spatial_shape), dtype=dtype))
    subject.add_image(tio.LabelMap(tensor=empty, affine=target.affine), label_key)


def _placement_weights(subject, key, values, target) -> np.ndarray:
    if key not in subject or not isinstance(subject[key], tio.Image):
        raise SinganInsertError(f"The placement region {key!r} is not an image of the subject "
                                f"(it has {list(subject.get_images_dict(False))}).")
    region = subject[key]
    check_same_grid(region.spatial_shape, region.affine, target.spatial_shape, target.affine,
                    f"placement region {key!r}", "target image")
    data = region.data[0].numpy()
    if isinstance(region, tio.LabelMap):
        mask = data != 0 if values is None else np.isin(data, values)
        weights = mask.astype(np.float64)
    else:
        weights = data.astype(np.float64)
        if not np.isfinite(weights).all() or weights.min() < 0:
            raise SinganInsertError(f"The probability map {key!r} must hold finite values >= 0.")
    if not weights.any():
        raise SinganInsertError(
            f"The placement region {key!r} is empty" +
            (f" (no voxel has a value in {list(values)})." if values is not None else "."))
    return weights


def _parse_start_scale(value) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value), int(value)
    try:
        low, high = (int(v) for v in value)
    except (TypeError, ValueError):
        raise SinganInsertError(f"start_scale must be None, an int or (a, b), got {value!r}.") from None
    if low > high or (low < 0) != (high < 0):
        raise SinganInsertError(
            f"start_scale range {value!r} must satisfy a <= b with both >= 0 or both < 0.")
    return low, high
