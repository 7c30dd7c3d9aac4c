r"""MONAI dictionary transforms that insert a harmonized tumor: :class:`TumorInsertiond`
(deterministic) and :class:`RandTumorInsertiond` (draws the tumor, its placement and the
parameters).

They follow MONAI's conventions (``RandGaussianNoised`` is the model):

* ``MapTransform``: ``keys`` names the image that receives the tumor (one key: a tumor is
  harmonized by a model of ONE modality; chain two transforms for two images) and
  ``allow_missing_keys`` lets a dictionary without it pass through.
* ``RandomizableTransform``: ``prob``, ``set_random_state`` and ``monai.utils.set_determinism``
  reproduce a run; every draw (the source, the placement, :math:`\lambda`, the start scale and
  the harmonizer's noise seed) comes from the transform's own ``self.R``. Being randomizable,
  :class:`RandTumorInsertiond` is where ``CacheDataset`` / ``PersistentDataset`` stop caching,
  so every epoch gets fresh tumors; the deterministic :class:`TumorInsertiond` is cached.
* MetaTensor in, MetaTensor out: the image keeps its affine and metadata; the label map
  ``label_key`` is a MetaTensor on the image's grid (its own metadata when it existed, else a
  copy of the image's), so ``Spacingd`` / ``Orientationd`` afterwards keep both on one grid.
  Without a MetaTensor image, each value keeps its container (a numpy array stays an array, a
  tensor a tensor; a new label takes the image's). The label is always present in the output,
  also when ``prob`` skips the insertion (an all-zero map is created if the dictionary had
  none), and inserted and skipped samples have the same types (an integer image comes out
  float32 in both), so samples always collate.
* Physical units come from the MetaTensor's affine (MONAI's affines are voxel-to-world RAS
  millimetres, like TorchIO's), so the harmonizer sees slices at their real pixel size and
  ``context_mm`` means millimetres. A plain array has no affine and is taken as 1 mm isotropic,
  stored like the model's training file (:func:`~singan_insert.insertion.orientation.in_model_frame`);
  an affine in ITK's LPS world (meta ``space``) is converted to RAS.
* The network is never carried by a transform: transforms hold the model file's path and load
  it lazily, once per process and device
  (:func:`singan_insert.integrations.torchio.load_harmonizer`), so they pickle small and work in
  ``DataLoader`` workers started by ``fork`` or ``spawn``. Sources are compact
  :class:`~singan_insert.insertion.placement.SourceTumor` crops.

The inserted tumor follows :func:`singan_insert.insertion.insert.insert_tumor`: the source tumor
is placed, its intensities mapped into the target's units (``intensity_mode``, then the contrast
factor :math:`\lambda`: :math:`v \mapsto \mu + \lambda (v - \mu)` around the target's reference),
every tumor slice is harmonized by the model, and ``label_value`` is written into the label.

Install the extra: ``pip install 'singan-insert[monai]'``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from singan_insert.errors import MissingExtraError, SinganInsertError

try:
    from monai.config import KeysCollection
    from monai.data import MetaTensor
    from monai.transforms import MapTransform, RandomizableTransform
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError("monai", "monai", "The MONAI transforms") from error

from singan_insert.checks import check_placement_region
from singan_insert.insertion.insert import InsertionParameters, default_label_dtype, insert_tumor
from singan_insert.insertion.orientation import in_model_frame
from singan_insert.insertion.placement import DEFAULT_MAX_ANISOTROPY, SourceTumor, check_affine, check_same_grid
from singan_insert.integrations._draw import (
    check_device,
    check_key,
    check_placement,
    draw_parameters,
    patch_ranges,
)
from singan_insert.insertion.sampling import check_integer, check_probability
from singan_insert.insertion.model_cache import load_harmonizer, resolve_model_file

__all__ = ["RandTumorInsertiond", "TumorInsertiond"]

SourceLike = SourceTumor | tuple[str | os.PathLike, str | os.PathLike]


def _as_source(source: Any, label_value: int | None, max_anisotropy: float) -> SourceTumor:
    if isinstance(source, SourceTumor):
        return source
    if isinstance(source, Sequence) and not isinstance(source, str) and len(source) == 2:
        return SourceTumor.from_files(source[0], source[1], label_value=label_value,
                                      max_anisotropy=max_anisotropy)
    raise SinganInsertError(
        f"Unsupported source {source!r}: pass a SourceTumor or an (image_path, label_path) pair.")


def _single_key(keys: KeysCollection) -> Hashable:
    keys = (keys,) if isinstance(keys, (str, int)) else tuple(keys)
    if len(keys) != 1:
        raise SinganInsertError(
            f"keys must name ONE image (the harmonizer is trained on one modality), got {keys}. "
            "Chain one transform per image, each with a model of that image's modality.")
    return keys[0]


def _volume_and_affine(value: Any, key: Hashable) -> tuple[np.ndarray, np.ndarray | None]:
    """The (X, Y, Z) array of a channel-first image and its RAS affine (``None`` without one)."""
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim != 4 or array.shape[0] != 1:
        raise SinganInsertError(
            f"{key!r} must be a channel-first 3D image of shape (1, X, Y, Z), got {array.shape}. "
            "Put EnsureChannelFirstd before the insertion (one channel per image).")
    affine = getattr(value, "affine", None)
    if affine is None:
        return array[0], None
    affine = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    # MONAI's ITK reader can keep ITK's LPS world (meta "space"); the library's world is RAS, as
    # NIfTI's, TorchIO's and MONAI's default: an LPS affine would mirror placements and orientation.
    space = str(getattr(value, "meta", {}).get("space", "RAS")).upper()
    if space == "LPS":
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    elif space != "RAS":
        raise SinganInsertError(f"{key!r} has an affine in the space {space!r}; RAS or LPS are understood.")
    return array[0], check_affine(affine, f"affine of {key!r}")


def _on_same_grid(value: Any, key: Hashable, image: Any, image_key: Hashable) -> np.ndarray:
    """``value`` as an (X, Y, Z) array, checked to lie on ``image``'s grid (affines when both have one)."""
    array, affine = _volume_and_affine(value, key)
    image_array, image_affine = _volume_and_affine(image, image_key)
    if isinstance(value, MetaTensor) and isinstance(image, MetaTensor):
        check_same_grid(array.shape, affine, image_array.shape, image_affine, repr(key), repr(image_key))
    elif array.shape != image_array.shape:
        raise SinganInsertError(
            f"{key!r} has shape {array.shape} but {image_key!r} {image_array.shape}; they must be "
            "on one voxel grid.")
    return array


def _as_output(values: np.ndarray, value_in: Any, image: Any) -> Any:
    """``values`` (X, Y, Z) as a (1, X, Y, Z) value of the container MONAI's convention gives.

    That of ``value_in`` (the image's when the key was missing): a numpy array stays one, a
    tensor stays a tensor on its device. Whenever the image is a MetaTensor the value is one
    (with ``value_in``'s metadata when it had some, else a copy of the image's), so that
    ``Spacingd`` / ``Orientationd`` afterwards keep the label on the image's grid.
    """
    array = np.ascontiguousarray(values[None])
    like = image if value_in is None else value_in
    if isinstance(like, MetaTensor):
        return MetaTensor(torch.from_numpy(array).to(like.device), meta=dict(like.meta),
                          applied_operations=list(like.applied_operations))
    if isinstance(image, MetaTensor):
        return MetaTensor(torch.from_numpy(array).to(image.device),
                          meta={**image.meta, "affine": image.affine.clone()})
    if isinstance(like, torch.Tensor):
        return torch.from_numpy(array).to(like.device)
    return array


def _parameters(parameters: InsertionParameters | None) -> InsertionParameters:
    if parameters is not None and not isinstance(parameters, InsertionParameters):
        raise SinganInsertError("parameters must be an InsertionParameters or None.")
    return parameters or InsertionParameters()


class _InsertionBase(MapTransform):
    """What both transforms share: the target and label keys, the model, the insertion itself."""

    def __init__(self, keys: KeysCollection, model: str | os.PathLike, label_key: str,
                 device: str, modality: str | None, record_key: str | None,
                 allow_missing_keys: bool):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.image_key = _single_key(keys)
        if not isinstance(model, (str, os.PathLike)):
            raise SinganInsertError(f"model must be the path of a model file or folder, got {model!r}.")
        resolve_model_file(model)  # exists now, not only in a DataLoader worker
        self.model = os.fspath(model)
        self.label_key = check_key(label_key, "label_key")
        self.device = check_device(device)
        self.modality = check_key(modality, "modality", optional=True)
        self.record_key = check_key(record_key, "record_key", optional=True)

    def _apply(self, data: Mapping[Hashable, Any], parameters_for) -> dict[Hashable, Any]:
        """Insert with ``parameters_for(d, volume, affine, label)`` (``None``: skip, label only)."""
        d = dict(data)
        if self.image_key not in d:
            if self.allow_missing_keys:
                return d
            raise SinganInsertError(
                f"The dictionary has no image {self.image_key!r} (it has {sorted(map(str, d))}); "
                "pass allow_missing_keys=True to let such samples through.")
        image = d[self.image_key]
        volume, affine = _volume_and_affine(image, self.image_key)
        harmonizer = load_harmonizer(self.model, self.device)
        if affine is None:  # voxels of unknown directions: taken as stored like the model's file
            affine = in_model_frame(np.eye(4), harmonizer.orientation)
        label_in = d.get(self.label_key)
        label = None if label_in is None else _on_same_grid(label_in, self.label_key, image, self.image_key)
        parameters, source = parameters_for(d, volume, affine, label)
        record = ""
        if parameters is None:
            # Skipped: the same types as an insertion gives, so that the two collate.
            if not np.issubdtype(volume.dtype, np.floating):
                d[self.image_key] = _as_output(volume.astype(np.float32), image, image)
            if label is None:
                label = np.zeros(volume.shape, dtype=default_label_dtype(self.parameters.label_value))
            if label_in is None or (isinstance(image, MetaTensor) and not isinstance(label_in, MetaTensor)):
                d[self.label_key] = _as_output(label, label_in, image)
        else:
            result = insert_tumor(volume, affine, source, harmonizer, parameters, target_label=label,
                                  modality=self.modality)
            d[self.image_key] = _as_output(result.image, image, image)
            d[self.label_key] = _as_output(result.label, label_in, image)
            record = json.dumps(result.record, default=str)
        if self.record_key is not None:
            d[self.record_key] = record  # a string, so skipped and inserted samples collate
        return d


class TumorInsertiond(_InsertionBase):
    r"""Insert one given tumor, harmonized, into the image ``keys`` of a dictionary.

    A floating-point image keeps its dtype; an integer one comes out float32 (harmonized
    intensities are not integers).

    Args:
        keys: the key of the target image, a channel-first ``(1, X, Y, Z)`` MetaTensor (or
            array, then taken as 1 mm isotropic).
        model: path of the harmonizer model file (or training folder), trained on a slice of the
            target's modality; loaded lazily, once per process.
        source: the tumor, a :class:`~singan_insert.insertion.placement.SourceTumor` or an
            ``(image_path, label_path)`` pair of NIfTI files (read once, at construction).
        parameters: everything else about the insertion (placement, :math:`\lambda`, start
            scale, seed, label value, overlap policy):
            :class:`~singan_insert.insertion.insert.InsertionParameters`; default: its defaults
            (the tumor at its physical position).
        label_key: the key (a string) of the label map that receives the tumor; created (all
            zero, on the image's grid) when missing.
        source_label_value: the tumor's value in a source label file holding several.
        device: where the harmonizer runs: ``"cpu"`` (right in DataLoader workers),
            ``"cuda[:n]"`` or ``"auto"``; the name is checked when the transform is built.
        modality: declared modality of the target, checked against the model's.
        record_key: if given, the insertion's JSON record (a string; ``""`` when nothing was
            inserted) is stored under this key: it replays the insertion with the same data.
        max_anisotropy: see :func:`singan_insert.insertion.placement.check_anisotropy`.
        allow_missing_keys: let dictionaries without ``keys`` through unchanged.
    """

    def __init__(
        self,
        keys: KeysCollection,
        model: str | os.PathLike,
        source: SourceLike,
        parameters: InsertionParameters | None = None,
        *,
        label_key: str = "label",
        source_label_value: int | None = None,
        device: str = "cpu",
        modality: str | None = None,
        record_key: str | None = None,
        max_anisotropy: float = DEFAULT_MAX_ANISOTROPY,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, model, label_key, device, modality, record_key, allow_missing_keys)
        self.parameters = _parameters(parameters)
        self.source = _as_source(source, source_label_value, max_anisotropy)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self._apply(data, lambda *_: (self.parameters, self.source))


class RandTumorInsertiond(RandomizableTransform, _InsertionBase):
    r"""With probability ``prob``, insert a tumor drawn from a bank, at a random place.

    Each call draws, from the transform's random state: a source uniformly from ``sources``;
    flips (each axis of ``flip_axes`` with ``flip_probability``), rotations
    :math:`\theta_i \sim U(-d, d)` about the world axes, an isotropic scale
    :math:`s \sim U(1 - v, 1 + v)`; :math:`\lambda \sim U(a, b)`; a start scale uniformly in
    ``[a, b]``; the harmonizer's noise seed; and the tumor's centroid uniformly among the voxels
    of the placement region where the placed tumor stays ``parameters.border_margin`` voxels
    inside the volume (the sampler of the TorchIO transform too). When, with the drawn pose,
    the tumor fits at no voxel of the region, the values are drawn again (``max_attempts``
    draws in all) before an error says so. Then it applies the same insertion as :class:`TumorInsertiond`.

    An integer image comes out float32, whether the tumor is inserted or ``prob`` skips it.

    Args:
        keys: the key of the target image (see :class:`TumorInsertiond`).
        model: path of the harmonizer model file (or training folder).
        sources: a non-empty sequence of :class:`~singan_insert.insertion.placement.SourceTumor`
            or ``(image_path, label_path)`` pairs (one of those alone is one source).
        prob: probability of inserting, in [0, 1]. When skipped the label map is still created.
        placement_key: a label map of the dictionary, on the image's grid, whose voxels with a
            value in ``placement_values`` may receive the tumor's centroid (e.g. the brain mask,
            or the CSF); ``None``: the tumor keeps its physical position (a co-registered source).
        placement_values: label values (integers) of the placement region; ``None``: any
            non-zero voxel of a single-valued map (a map holding several non-zero values is
            refused when the sample arrives, as in the TorchIO transform: say which of its
            labels is meant). Required when ``placement_key`` is ``label_key`` (the map that
            receives the tumor keeps all its values: say which of its labels the tumor may go
            to, e.g. ``(1,)``).
        contrast: :math:`\lambda` for ``appearance="fixed"`` (in ``parameters``): a number,
            ``(a, b)`` for :math:`U(a, b)` or a set such as ``{0.5, 0.8, 1.5}``; ``None``:
            ``parameters``' value. The default appearance, ``"auto"``, chooses the level itself and
            refuses a contrast other than 1 (it would do nothing).
        start_scale: ``None`` (``parameters``' value, by default the model's), an int, ``(a, b)``
            (both >= 0, or both < 0 counting from the finest scale) or a set.
        degrees: rotation range :math:`d \ge 0` in degrees.
        scale: scale range :math:`0 \le v < 1`.
        flip_axes, flip_probability: see above.
        parameters: the fixed part of the insertion (intensity mode, label value, overlap policy,
            context, border margin, ...): an
            :class:`~singan_insert.insertion.insert.InsertionParameters`; its placement,
            contrast, start scale and seed are replaced by the draws.
        max_attempts: draws of the pose (flips, rotation, scale; the other values are drawn
            again with it) before giving up when, with the drawn pose, the tumor fits at no
            voxel of the placement region (>= 1). A region with room for the tumor never needs
            a second draw.
        label_key, source_label_value, device, modality, record_key, max_anisotropy,
        allow_missing_keys: see :class:`TumorInsertiond`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        model: str | os.PathLike,
        sources: SourceLike | Sequence[SourceLike],
        prob: float = 1.0,
        *,
        placement_key: str | None = None,
        placement_values: Sequence[int] | None = None,
        contrast: float | tuple[float, float] | None = None,
        start_scale: int | tuple[int, int] | None = None,
        degrees: float = 10.0,
        scale: float = 0.1,
        flip_axes: Sequence[int] = (0, 1, 2),
        flip_probability: float = 0.5,
        parameters: InsertionParameters | None = None,
        max_attempts: int = 20,
        label_key: str = "label",
        source_label_value: int | None = None,
        device: str = "cpu",
        modality: str | None = None,
        record_key: str | None = None,
        max_anisotropy: float = DEFAULT_MAX_ANISOTROPY,
        allow_missing_keys: bool = False,
    ):
        RandomizableTransform.__init__(self, check_probability(prob, "prob"))
        _InsertionBase.__init__(self, keys, model, label_key, device, modality, record_key,
                                allow_missing_keys)
        if isinstance(sources, SourceTumor) or (
                isinstance(sources, Sequence) and len(sources) == 2
                and all(isinstance(s, (str, os.PathLike)) for s in sources)):
            sources = [sources]
        self.sources = [_as_source(s, source_label_value, max_anisotropy) for s in sources]
        if not self.sources:
            raise SinganInsertError("sources must hold at least one tumor.")
        self.parameters = _parameters(parameters)
        self.ranges = patch_ranges(self.parameters, contrast, start_scale, degrees, scale, flip_axes,
                                   flip_probability)
        self.max_attempts = check_integer(max_attempts, "max_attempts", 1)
        self.placement_key, self.placement_values = check_placement(placement_key, placement_values,
                                                                    self.label_key)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)  # decides self._do_transform with probability prob

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize()
        return self._apply(data, self._draw if self._do_transform else (lambda *_: (None, None)))

    def _draw(self, d: dict, volume: np.ndarray, affine: np.ndarray, label: np.ndarray | None):
        source = self.sources[self.R.randint(len(self.sources))]
        region = None if self.placement_key is None else self._region(d)
        parameters = draw_parameters(self.R, source, affine, volume.shape, self.parameters,
                                     self.ranges, region, self.max_attempts,
                                     region_name=self.placement_key)
        return parameters, source

    def _region(self, d: dict) -> np.ndarray:
        value = d.get(self.placement_key)
        if value is None:
            raise SinganInsertError(
                f"The placement region {self.placement_key!r} is not in the dictionary.")
        region = _on_same_grid(value, self.placement_key, d[self.image_key], self.image_key)
        return check_placement_region(region, self.placement_values, self.placement_key)
