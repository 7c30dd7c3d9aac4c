"""Subjects for the TorchIO transforms: their sources, target image, label map and placement region.

What :mod:`singan_insert.integrations.torchio` reads from a ``torchio.Subject`` (or stores for it):

* sources: a ``torchio.Subject`` or a pair of files becomes a compact, picklable
  :class:`~singan_insert.insertion.placement.SourceTumor` (files are read once per process and
  modification time, so a bank of files costs one read each);
* the one target image ``include``/``exclude`` select, and the label map that receives the tumor;
* the placement region's weights and, for ``placement_mode="centroid"``, a centre that is always
  a voxel of the region.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchio as tio
from torchio.transforms.transform import Transform

from singan_insert.checks import check_placement_region
from singan_insert.errors import SinganInsertError
from singan_insert.insertion.insert import default_label_dtype
from singan_insert.insertion.placement import SourceTumor, check_same_grid

SourceSpec = str | tuple[str, str] | SourceTumor | tio.Subject | None


@functools.lru_cache(maxsize=64)
def _load_source_files(image_path: str, image_mtime: int, label_path: str, label_mtime: int,
                       label_value: int | None, max_anisotropy: float) -> SourceTumor:
    return SourceTumor.from_files(image_path, label_path, label_value=label_value,
                                  max_anisotropy=max_anisotropy)


def source_from_files(paths: tuple[str, str], label_value: int | None, max_anisotropy: float) -> SourceTumor:
    stats = []
    for path in paths:
        try:
            stats.append(os.stat(path).st_mtime_ns)
        except OSError:
            raise SinganInsertError(f"The source file {path!r} does not exist.") from None
    return _load_source_files(paths[0], stats[0], paths[1], stats[1], label_value, max_anisotropy)


def source_from_subject(subject: tio.Subject, image_key: str | None, label_key: str,
                         label_value: int | None, max_anisotropy: float, origin: str,
                         same_subject: bool = False) -> SourceTumor:
    """The tumor of a source ``tio.Subject``, or (``same_subject``) of the subject being transformed."""
    if image_key is None:
        scalars = list(subject.get_images_dict(intensity_only=True))
        if len(scalars) != 1:
            raise SinganInsertError(
                f"The source subject has the scalar images {scalars}; pass source_image_key to "
                "say which one holds the tumor.")
        image_key = scalars[0]
    for key, what, argument in ((image_key, "the source tumor", "sources"),
                                (label_key, "the source tumor's label", "source_label_key")):
        if key not in subject or not isinstance(subject[key], tio.Image):
            images = list(subject.get_images_dict(False))
            if same_subject:
                raise SinganInsertError(
                    f"The subject has no image {key!r} to take {what} from (it has {images}); "
                    f"check {argument}.")
            raise SinganInsertError(f"The source subject has no image {key!r} (it has {images}).")
    image, label = subject[image_key], subject[label_key]
    if image.data.shape[0] != 1 or label.data.shape[0] != 1:
        raise SinganInsertError("Source image and label must have a single channel.")
    return SourceTumor.from_arrays(
        image.data[0].numpy(), label.data[0].numpy(), image.affine, label_value=label_value,
        label_affine=label.affine, max_anisotropy=max_anisotropy, origin=origin,
    )


def normalize_source(source: Any, image_key: str | None, label_key: str, label_value: int | None,
                      max_anisotropy: float) -> SourceSpec:
    """The compact, picklable form a transform stores for a source."""
    if source is None or isinstance(source, (str, SourceTumor)):
        return source
    if isinstance(source, tio.Subject):
        return source_from_subject(source, image_key, label_key, label_value, max_anisotropy,
                                    origin="subject")
    if isinstance(source, os.PathLike):
        raise SinganInsertError(
            "A source file needs its label: pass source=(image_path, label_path).")
    if isinstance(source, Sequence) and len(source) == 2 and \
            all(isinstance(p, (str, os.PathLike)) for p in source):
        paths = (os.fspath(source[0]), os.fspath(source[1]))
        for path, what in zip(paths, ("image", "label")):
            if not os.path.isfile(path):  # now, not in a DataLoader worker
                raise SinganInsertError(f"The source {what} file {path!r} does not exist or is not a file.")
        return paths
    raise SinganInsertError(
        f"Unsupported source {source!r}: use an image key of the subject (str), an "
        "(image_path, label_path) pair, a torchio.Subject or a SourceTumor.")


def select_target(transform: Transform, subject: tio.Subject, label_key: str,
                   source_key: str | None = None):
    """The one scalar image selected by include/exclude (a same-subject source only if alone)."""
    if source_key is None and isinstance(getattr(transform, "source", None), str):
        source_key = transform.source
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
            f"among the subject's scalar images {sorted(subject.get_images_dict(intensity_only=True))}"
            f"{_why_not_selected(transform, subject, label_key, nothing=not images)}. Pass "
            "include=[name] (plus the label keys for a dictionary input).")
    name, image = next(iter(images.items()))
    if image.data.shape[0] != 1:
        raise SinganInsertError(f"The target image {name!r} has {image.data.shape[0]} channels; "
                                "one is needed (insert per channel with include).")
    return name, image


def _why_not_selected(transform: Transform, subject: tio.Subject, label_key: str,
                      nothing: bool) -> str:
    """Why ``include`` selects no target: missing keys, label maps (``''`` when nothing to say)."""
    reasons = []
    names = list(transform.include or [])
    missing = [name for name in names if name not in subject]
    if missing:
        reasons.append(f"include names {missing}, which the subject does not have (it has "
                       f"{list(subject.get_images_dict(False))})")
    if not transform.include:  # every image was a candidate
        names = list(subject.get_images_dict(False))
    labels = [name for name in names
              if name != label_key and isinstance(subject.get(name), tio.LabelMap)]
    if labels and nothing:
        reasons.append(f"{labels} {'is a LabelMap' if len(labels) == 1 else 'are LabelMaps'}, and "
                       "the target must be a tio.ScalarImage")
    return "; " + "; ".join(reasons) if reasons else ""


def existing_label(subject: tio.Subject, label_key: str, target: tio.Image) -> tio.LabelMap | None:
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


def add_empty_label(subject: tio.Subject, label_key: str, label_value: int, target: tio.Image) -> None:
    dtype = default_label_dtype(label_value)
    empty = torch.from_numpy(np.zeros((1, *target.spatial_shape), dtype=dtype))
    subject.add_image(tio.LabelMap(tensor=empty, affine=target.affine), label_key)


def placement_weights(subject, key, values, target) -> np.ndarray:
    if key not in subject or not isinstance(subject[key], tio.Image):
        raise SinganInsertError(f"The placement region {key!r} is not an image of the subject "
                                f"(it has {list(subject.get_images_dict(False))}).")
    region = subject[key]
    check_same_grid(region.spatial_shape, region.affine, target.spatial_shape, target.affine,
                    f"placement region {key!r}", "target image")
    if region.data.shape[0] != 1:
        raise SinganInsertError(f"The placement region {key!r} must have one channel.")
    data = region.data[0].numpy()
    if isinstance(region, tio.LabelMap):
        mask = check_placement_region(data, values, key)
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


def region_centre(weights: np.ndarray) -> tuple[float, float, float]:
    """The weighted centre of mass of a region, or its nearest voxel when it lies outside."""
    voxels = np.argwhere(weights > 0)
    masses = weights[weights > 0]
    centre = voxels.T.astype(np.float64) @ masses / masses.sum()
    nearest = np.round(centre).astype(int)
    if weights[tuple(nearest)] > 0:
        return tuple(float(v) for v in centre)
    closest = voxels[np.argmin(((voxels - centre) ** 2).sum(axis=1))]
    return tuple(float(v) for v in closest)


def world_axis(affine: np.ndarray, array_axis: int) -> int:
    """The world axis (0 = x, 1 = y, 2 = z) an array axis runs closest to."""
    return int(np.argmax(np.abs(np.asarray(affine)[:3, array_axis])))
