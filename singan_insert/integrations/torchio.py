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
  path and load it lazily, once per process (and device), through
  :func:`singan_insert.insertion.model_cache.load_harmonizer` (re-exported here).
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

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torchio as tio
from torchio.transforms.augmentation import RandomTransform
from torchio.transforms.transform import Transform

from singan_insert.errors import SinganInsertError
from singan_insert.insertion.insert import InsertionParameters, insert_tumor
from singan_insert.insertion.model_cache import load_harmonizer, resolve_model_file
from singan_insert.insertion.placement import (
    DEFAULT_MAX_ANISOTROPY,
    Placement,
    SourceTumor,
    planar_axes,
)
from singan_insert.insertion.sampling import (
    InsertionRanges,
    check_contrast,
    check_contrast_applies,
    check_integer,
    check_non_negative,
    check_number,
    check_probability,
    check_seed,
    check_start_scale,
    uniform01,
)
from singan_insert.integrations._draw import (
    check_device,
    check_key,
    check_placement,
    draw_fitting,
)
from singan_insert.integrations.subjects import (
    SourceSpec,
    add_empty_label,
    existing_label,
    normalize_source,
    placement_weights,
    region_centre,
    select_target,
    source_from_files,
    source_from_subject,
    world_axis,
)

__all__ = ["RandomTumorInsertion", "TumorInsertion", "load_harmonizer"]


#: The arguments both transforms take, with their defaults: written once here (documented in
#: :class:`TumorInsertion`); :class:`RandomTumorInsertion` passes them on unchanged to the
#: :class:`TumorInsertion` it applies.
SHARED_ARGUMENTS: dict[str, Any] = {
    "appearance": "auto",
    "texture": None,
    "rim": None,
    "rim_scale": None,
    "harmonize_tumor": None,
    "intensity_mode": "normalized",
    "label_key": "label",
    "label_value": 1,
    "source_label_key": "label",
    "source_label_value": None,
    "axis": None,
    "context_mm": 20.0,
    "overlap": "replace",
    "border_margin": 1,
    "dilation_mm": None,
    "feather_mm": None,
    "modality": None,
    "device": "cpu",
    "max_anisotropy": DEFAULT_MAX_ANISOTROPY,
}

#: TorchIO's own keyword arguments (``torchio.transforms.Transform``) other than ``p``.
_BASE_ARGUMENTS = ("copy", "include", "exclude", "keep", "parse_input", "label_keys")


def _parse_shared(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop and validate the shared arguments from ``kwargs`` (what is left is TorchIO's)."""
    values = {name: kwargs.pop(name, default) for name, default in SHARED_ARGUMENTS.items()}
    if values["appearance"] not in ("auto", "fixed"):
        raise SinganInsertError(f"appearance must be 'auto' or 'fixed', got {values['appearance']!r}.")
    for name in ("label_key", "source_label_key"):
        check_key(values[name], name)
    values["label_value"] = check_integer(values["label_value"], "label_value", 1)
    if values["source_label_value"] is not None:
        values["source_label_value"] = check_integer(values["source_label_value"], "source_label_value")
    if values["axis"] is not None:
        values["axis"] = check_integer(values["axis"], "axis", 0, 2)
    values["context_mm"] = check_non_negative(values["context_mm"], "context_mm")
    values["border_margin"] = check_integer(values["border_margin"], "border_margin", 0)
    for name in ("dilation_mm", "feather_mm"):
        if values[name] is not None:
            values[name] = check_non_negative(values[name], name)
    check_key(values["modality"], "modality", optional=True)
    values["device"] = check_device(values["device"])
    values["max_anisotropy"] = check_number(values["max_anisotropy"], "max_anisotropy")
    if values["max_anisotropy"] < 1:
        raise SinganInsertError(
            f"max_anisotropy is a ratio max(spacing) / min(spacing) and must be >= 1, got "
            f"{values['max_anisotropy']!r}.")
    return values


def _base_arguments(transform: Transform) -> dict[str, Any]:
    """The TorchIO keyword arguments a transform was built with (``p`` excluded)."""
    return {name: getattr(transform, name) for name in _BASE_ARGUMENTS}


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise SinganInsertError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def _triple(value: Any, name: str) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise SinganInsertError(f"{name} must have 3 values (one per axis), got {value!r}.")
    items = tuple(value)
    if len(items) != 3:
        raise SinganInsertError(f"{name} must have 3 values (one per axis), got {value!r}.")
    return items


class TumorInsertion(Transform):
    r"""Insert one tumor, harmonized by a SinGAN harmonizer, into a subject's image.

    The target image (see ``include``/``exclude``) receives the source tumor, whose intensities
    are mapped into the target's units (``intensity_mode``, then the contrast factor
    :math:`\lambda`), pasted at ``location`` (or where it physically is) and harmonized slice by
    slice along ``axis``; see :func:`singan_insert.insertion.insert.insert_tumor` for the method.

    **The label map** ``label_key`` receives exactly the tumor: its voxels get ``label_value``;
    every other voxel keeps the value it had (existing labels describe structures that are
    still in the image), or 0 when the subject had no such map (one is created). A placement
    region is never copied into it (see :class:`RandomTumorInsertion`). Where the tumor covers
    existing labels, ``overlap`` decides.

    **2D subjects** (one spatial axis of size 1, e.g. ``(W, H, 1)``) receive the section of the
    tumor by their plane: no border margin applies along that axis, and the plane is the
    harmonized slice (unless ``axis`` says otherwise).

    **The image's dtype.** A floating-point target keeps its dtype; an integer one (e.g. int16
    from a scanner's file) comes out float32, since harmonized intensities are not integers.
    A skip (``source=None``, or ``p``) converts it too, so that inserted and skipped samples
    have the same dtype.

    Args:
        model: path of the harmonizer model file (or training folder). Loaded lazily, once per
            process (:func:`~singan_insert.insertion.model_cache.load_harmonizer`); the
            transform carries only the path.
        source: the tumor: the key of a scalar image of the same subject (its label is
            ``source_label_key``), an ``(image_path, label_path)`` pair of files, a
            :class:`~singan_insert.insertion.placement.SourceTumor`, or a ``torchio.Subject``
            (converted to a compact ``SourceTumor`` at construction). ``None`` inserts nothing
            but still creates the label map: this is what a skipped insertion records.
        location: target position of the tumor's centroid, ``(i, j, k)`` in ``location_units``
            (finite); ``None`` keeps the tumor's physical position.
        location_units: ``"voxel"`` or ``"mm"``.
        start_scale: harmonizer start scale, an integer (negative counts from the finest);
            ``None``: the model's default.
        contrast: :math:`\lambda > 0` (GBA: 0.5, 0.8, 1.5), used with ``appearance="fixed"``.
        seed: seed of the harmonizer noise, an integer in :math:`[0, 2^{32})`.
        flip: flip the tumor along world axes x, y, z (three booleans).
        rotation: rotation about world axes x, y, z in degrees (finite).
        scale: scale factor (one, or one per world axis), > 0.
        clip_to_fov: cut the tumor at the border of the field of view instead of raising.
        source_image_key: for a ``torchio.Subject`` source, which image holds the tumor
            (``None``: its only scalar image). Used at construction only.
        appearance: ``"auto"`` (default: the model chooses the tumor's level in the target
            modality, see :mod:`singan_insert.insertion.appearance`; a ``contrast``
            other than 1 is then refused, as it would do nothing) or ``"fixed"`` (the paper's method: the given :math:`\lambda`).
        texture, rim, rim_scale, harmonize_tumor: the automatic appearance's parts
            (:class:`~singan_insert.insertion.insert.InsertionParameters`); ``None``: their
            defaults (with an annotated model: B's texture, B's rim scaled to the tumor's size
            for a tumor left where it is but none for one moved to a ``location`` or a region's
            voxel, the tumor kept through harmonization). ``rim=True`` gives a moved tumor the
            rim where the region holds only the fluid spaces such tumors grow in; ``rim=False``
            keeps the target's own surroundings, e.g. when it already shows B's cleft around
            the site.
        intensity_mode: ``"normalized"`` or ``"matched"``.
        label_key: name of the label map that receives the tumor (see above).
        label_value: value written for the tumor, an integer >= 1.
        source_label_key: label map of the source (same subject, or source subject).
        source_label_value: the tumor's value in the source label when it holds several.
        axis: slicing axis for the harmonization (0, 1, 2); ``None``: the through-plane axis
            (the plane's normal for a 2D subject).
        context_mm: in-plane context kept around the tumor for the harmonizer, >= 0 mm.
        overlap: ``"replace"``, ``"keep"`` or ``"error"`` (see :mod:`singan_insert.insertion.insert`).
        border_margin: minimum voxels (integer >= 0) between the tumor and the volume's border.
        dilation_mm, feather_mm: the harmonizer's blend weight (>= 0 mm); ``None``: its defaults.
        modality: declared modality of the target, checked against the model's.
        device: where the harmonizer runs (default ``"cpu"``: right for DataLoader workers).
        max_anisotropy: largest ``max(spacing) / min(spacing)`` accepted (>= 1), see
            :func:`singan_insert.insertion.placement.check_anisotropy`.
        **kwargs: see :class:`torchio.transforms.Transform` (``p``, ``include``, ``exclude``,
            ``copy``, ``keep``, ``label_keys``). When ``p`` skips the insertion, the label map is
            still created.

    Every argument is validated here, when the transform is built, not in a worker.
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
        seed: int = 0,
        flip: Sequence[bool] = (False, False, False),
        rotation: Sequence[float] = (0.0, 0.0, 0.0),
        scale: float | Sequence[float] = 1.0,
        clip_to_fov: bool = False,
        source_image_key: str | None = None,
        **kwargs,
    ):
        shared = _parse_shared(kwargs)
        # TorchIO's own `p` would return the input untouched, without the label map; the
        # probability is applied in __call__ instead, which records the skip.
        self.insertion_probability = check_probability(kwargs.pop("p", 1), "p")
        super().__init__(**kwargs)
        self.__dict__.update(shared)
        self.model = _check_model_path(model)
        self.source = normalize_source(source, source_image_key, self.source_label_key,
                                        self.source_label_value, self.max_anisotropy)
        self.location = None if location is None else tuple(
            check_number(v, "location") for v in _triple(location, "location"))
        self.location_units = location_units
        self.start_scale = check_start_scale(start_scale)
        self.contrast = check_contrast(contrast)
        check_contrast_applies(contrast, self.appearance)
        self.seed = check_seed(seed)
        self.flip = tuple(_check_bool(v, "flip") for v in _triple(flip, "flip"))
        self.rotation = tuple(check_number(v, "rotation") for v in _triple(rotation, "rotation"))
        scales = (scale,) * 3 if np.isscalar(scale) else _triple(scale, "scale")
        self.scale = tuple(check_number(v, "scale") for v in scales)
        self.clip_to_fov = _check_bool(clip_to_fov, "clip_to_fov")
        self.args_names = [*_OWN_ARGUMENTS, *SHARED_ARGUMENTS]
        self.insertion_parameters()  # the remaining checks (units, scale > 0, modes)

    def __call__(self, data):
        if self.insertion_probability < 1 and uniform01() > self.insertion_probability:
            named = {name: getattr(self, name) for name in self.args_names}
            skipped = TumorInsertion(**{**named, "source": None}, **_base_arguments(self))
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
            dilation_mm=self.dilation_mm, feather_mm=self.feather_mm,
            border_margin=self.border_margin, clip_to_fov=self.clip_to_fov,
            max_anisotropy=self.max_anisotropy, appearance=self.appearance, texture=self.texture,
            rim=self.rim, rim_scale=self.rim_scale, harmonize_tumor=self.harmonize_tumor,
        )

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        target_name, target = select_target(self, subject, self.label_key)
        label = existing_label(subject, self.label_key, target)
        if self.source is None:
            if not torch.is_floating_point(target.data):
                # An insertion makes an integer image float32: so does a skip, so that the
                # output's dtype does not depend on the draw.
                target.set_data(target.data.float())
            if label is None:
                add_empty_label(subject, self.label_key, self.label_value, target)
            return subject
        source = self.resolve_source(subject)
        harmonizer = load_harmonizer(self.model, self.device)
        parameters = self.insertion_parameters()
        plane = planar_axes(target.spatial_shape)
        if plane and self.axis is None:
            parameters = replace(parameters, axis=plane[0])  # the plane is the one slice
        result = insert_tumor(
            target.data[0].numpy(), target.affine, source, harmonizer, parameters,
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
            return source_from_files(self.source, self.source_label_value, self.max_anisotropy)
        return source_from_subject(subject, self.source, self.source_label_key,
                                    self.source_label_value, self.max_anisotropy,
                                    origin=f"subject[{self.source!r}]", same_subject=True)


#: TumorInsertion's own recorded arguments (its ``args_names`` are these plus SHARED_ARGUMENTS).
_OWN_ARGUMENTS = ("model", "source", "location", "location_units", "start_scale", "contrast",
                  "seed", "flip", "rotation", "scale", "clip_to_fov")


class RandomTumorInsertion(RandomTransform):
    r"""Insert a random tumor from a bank at a random place, harmonized by a SinGAN harmonizer.

    For each subject it draws (from torch's global generator): whether to insert (``p``), a
    source from ``sources``, flips, a rotation and a scale, a start scale, a contrast factor
    :math:`\lambda` and a noise seed (all with
    :class:`~singan_insert.insertion.sampling.InsertionRanges`, the sampler the command line
    uses too), and a location in the placement region, among only the voxels where the placed
    tumor stays ``border_margin`` voxels inside the volume (the MONAI and nnU-Net integrations
    share this sampler). When the tumor, with the drawn pose, fits at no voxel of the region,
    the values are drawn again (``max_attempts`` draws in all) before an error says so. Then it
    applies :class:`TumorInsertion` with those values, which the history records. An integer
    image comes out float32, inserted or skipped (see :class:`TumorInsertion`).

    **Placement and the label.** The placement region only decides where the tumor's centroid
    goes; it is never copied into the label map ``label_key``, which receives exactly the tumor
    (see :class:`TumorInsertion`). When ``placement_key`` *is* ``label_key`` (e.g. GBA's
    in-place insertion over the existing tumor), that map keeps all its values in the output,
    so ``placement_values`` must say which of its labels the tumor may go to (e.g. ``(1,)``:
    the schwannoma, never a cochlea); a region that is not a label of the image (a brain or CSF
    mask) belongs under its own key. A label map holding several values also needs
    ``placement_values``. The chosen location is always a voxel of the region: with
    ``placement_mode="centroid"``, the region's centre of mass, or the region's voxel nearest
    to it when the centre falls outside the region (e.g. a crescent).

    **2D subjects** work as in :class:`TumorInsertion`; only the rotation about the plane's
    normal is drawn for them (a tilt would cut the tumor out of its plane).

    Args:
        model: path of the harmonizer model (see :class:`TumorInsertion`).
        sources: the bank: the key of a scalar image of the same subject (the tumor is the
            subject's own, label ``source_label_key``); or a sequence of
            ``(image_path, label_path)`` pairs, ``torchio.Subject`` instances (converted to
            compact :class:`~singan_insert.insertion.placement.SourceTumor` crops at
            construction) or ``SourceTumor`` instances; one is drawn uniformly per subject.
        placement_key: where the tumor's centroid may go: the name of a label map of the
            subject (voxels whose value is in ``placement_values``), or of a scalar image used
            as a probability map (finite weights >= 0, need not sum to one). ``None``: the tumor
            keeps its physical position (co-registered source or in place).
        placement_values: label values (integers) of the region, with a label map
            ``placement_key``; ``None``: any non-zero voxel of a single-valued map.
        placement_mode: ``"sample"`` a voxel with probability proportional to the region's
            weights, among those where the tumor fits, or ``"centroid"``: the region's centre
            of mass (see above).
        start_scale: ``None`` (the model's default), an int, ``(a, b)`` (uniform integer in
            :math:`[a, b]`, both >= 0 or both < 0) or a set of ints.
        contrast: :math:`\lambda` (> 0): a number, ``(a, b)`` for :math:`\lambda \sim U(a, b)`,
            or a set such as ``{0.5, 0.8, 1.5}`` (GBA; one of them with equal probability); used
            with ``appearance="fixed"`` only (``"auto"``, the default, chooses the level itself).
        flip_axes: world axes (0 = x, 1 = y, 2 = z) that may be flipped, each with
            ``flip_probability`` (in :math:`[0, 1]`).
        degrees: rotation ranges, as in ``tio.RandomAffine``: :math:`d \ge 0` gives
            :math:`\theta_i \sim U(-d, d)`; ``(a, b)`` or six values for per-axis ranges.
        scales: scaling ranges, as in ``tio.RandomAffine``: :math:`s` gives
            :math:`U(1 - s, 1 + s)`; ``(a, b)`` or six values; factors must stay > 0.
        isotropic: one scale factor for all axes.
        max_attempts: draws of the pose (flips, rotation, scale; the other values are drawn
            again with it) before giving up when, with the drawn pose, the tumor fits at no
            voxel of the placement region (an integer >= 1; default 20). A region with room for
            the tumor never needs a second draw: the location is drawn among the voxels where
            it fits.
        p: probability of inserting a tumor, in :math:`[0, 1]`; when skipped the label map is
            still created.
        source_image_key: see :class:`TumorInsertion`.
        **kwargs: the arguments shared with :class:`TumorInsertion` (``intensity_mode``,
            ``label_key``, ``label_value``, ``source_label_key``, ``source_label_value``,
            ``axis``, ``context_mm``, ``overlap``, ``border_margin``, ``dilation_mm``,
            ``feather_mm``, ``modality``, ``device``, ``max_anisotropy``), then those of
            :class:`torchio.transforms.Transform`.
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
        flip_axes: Sequence[int] = (0, 1, 2),
        flip_probability: float = 0.5,
        degrees: float | Sequence[float] = 10.0,
        scales: float | Sequence[float] = 0.1,
        isotropic: bool = True,
        max_attempts: int = 20,
        source_image_key: str | None = None,
        p: float = 1.0,
        **kwargs,
    ):
        self.twin_arguments = _parse_shared(kwargs)
        super().__init__(**kwargs)  # TorchIO's p stays 1: the skip is applied (and recorded) below
        self.insertion_probability = check_probability(p, "p")
        self.model = _check_model_path(model)
        self.label_key = self.twin_arguments["label_key"]
        max_anisotropy = self.twin_arguments["max_anisotropy"]
        if isinstance(sources, str):
            self.sources: list[SourceSpec] = [sources]
        else:
            if isinstance(sources, (tio.Subject, SourceTumor)) or (
                    isinstance(sources, Sequence) and len(sources) == 2
                    and all(isinstance(s, (str, os.PathLike)) for s in sources)):
                sources = [sources]  # a single source, not a bank
            if not isinstance(sources, Sequence):
                raise SinganInsertError(f"sources must be a sequence, got {type(sources).__name__}.")
            self.sources = [normalize_source(s, source_image_key, self.twin_arguments["source_label_key"],
                                              self.twin_arguments["source_label_value"], max_anisotropy)
                            for s in sources]
            if not self.sources or any(isinstance(s, str) or s is None for s in self.sources):
                raise SinganInsertError(
                    "sources must be an image key (str) or a non-empty sequence of "
                    "(image_path, label_path) pairs, torchio.Subjects or SourceTumors.")
        if placement_mode not in ("sample", "centroid"):
            raise SinganInsertError(f"placement_mode must be 'sample' or 'centroid', got {placement_mode!r}.")
        self.placement_key, self.placement_values = check_placement(placement_key, placement_values,
                                                                    self.label_key)
        self.placement_mode = placement_mode
        self.ranges = InsertionRanges(
            contrast=contrast, start_scale=start_scale, flip_axes=flip_axes,
            flip_probability=flip_probability, degrees=degrees, scales=scales, isotropic=isotropic)
        check_contrast_applies(contrast, self.twin_arguments["appearance"])
        self.max_attempts = check_integer(max_attempts, "max_attempts", 1)
        # Validate the fixed arguments now (a twin with no source loads nothing).
        TumorInsertion(self.model, None, **self.twin_arguments)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        arguments: dict[str, Any] = {**self.twin_arguments, "model": self.model}
        if uniform01() > self.insertion_probability:
            transform = TumorInsertion(source=None, **arguments, **_base_arguments(self))
            return transform(subject)
        same_subject = self.sources[0] if isinstance(self.sources[0], str) else None
        _, target = select_target(self, subject, self.label_key, same_subject)
        index = int(torch.randint(0, len(self.sources), (1,)).item())
        source_spec = self.sources[index]
        plane = planar_axes(target.spatial_shape)
        normal = [world_axis(target.affine, a) for a in plane]
        if self.placement_key is None:
            drawn, location = self.ranges.sample(fixed_axes=normal), None
        else:
            probe = TumorInsertion(self.model, source_spec, **self.twin_arguments)
            source = probe.resolve_source(subject)
            drawn, location = self._draw_placement(subject, target, source, normal)
        transform = TumorInsertion(
            source=source_spec, location=location, location_units="voxel",
            start_scale=drawn.start_scale, contrast=drawn.contrast, seed=drawn.seed,
            flip=drawn.flip, rotation=drawn.rotation, scale=drawn.scale,
            **arguments, **_base_arguments(self),
        )
        return transform(subject)

    def _draw_placement(self, subject, target, source, normal):
        """The drawn values and a location of the placement region where the tumor fits."""
        weights = placement_weights(subject, self.placement_key, self.placement_values, target)
        centre = region_centre(weights) if self.placement_mode == "centroid" else None
        return draw_fitting(
            lambda: self.ranges.sample(fixed_axes=normal), _pick_by_weight, weights, source,
            target.affine, target.spatial_shape, self.twin_arguments["border_margin"],
            self.max_attempts, centre=centre, region_name=self.placement_key)


# --------------------------------------------------------------------------------------------
# Helpers shared by the two transforms
# --------------------------------------------------------------------------------------------
def _pick_by_weight(weights: np.ndarray) -> int:
    """An index drawn with probability proportional to ``weights`` (> 0), from torch's generator."""
    cumulative = torch.from_numpy(np.cumsum(weights, dtype=np.float64))
    draw = torch.rand(1, dtype=torch.float64) * cumulative[-1]
    return int(torch.searchsorted(cumulative, draw, right=True).clamp(max=len(cumulative) - 1))


def _check_model_path(model: Any) -> str:
    if not isinstance(model, (str, os.PathLike)):
        raise SinganInsertError(f"model must be the path of a model file or folder, got {model!r}.")
    resolve_model_file(model)  # exists now, not only in a DataLoader worker
    return os.fspath(model)

