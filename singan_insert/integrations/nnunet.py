r"""Tumor insertion on the fly inside nnU-Net v2 training (TumorCP-style, harmonized, cross-modal).

:class:`nnUNetTrainerTumorInsertion` adds one transform, :class:`TumorInsertionTransform`, at the
head of nnU-Net's own training augmentation: every patch the data loader samples receives, with
probability ``probability``, a tumor that is placed inside the patch, intensity-mapped
(``intensity_mode``, then :math:`\lambda`) and harmonized slice by slice by a SinGAN harmonizer,
and its label is written into the patch's segmentation. nnU-Net's spatial and intensity
augmentation then acts on the result, as on any patch. Validation patches are never touched.

All settings live in ONE place, an :class:`OnlineInsertionSettings` JSON file: the trainer reads
``$SINGAN_INSERT_ONLINE_SETTINGS`` when that variable names a file, else
``<nnUNet_preprocessed>/<dataset>/singan_insert_online.json`` (write it with
:func:`write_online_settings`). The file travels with the dataset, so ``nnUNetv2_train`` and
:meth:`singan_insert.stages.nnunet.NnUNetWorkspace.train` (trainer given as the dotted path
``"singan_insert.integrations.nnunet.nnUNetTrainerTumorInsertion"``) train alike.

Sources of the tumors (``sources``):

``"training"``
    the labelled cases of the fold's TRAINING split themselves (TumorCP: same modality, here
    harmonized): their tumors (label ``source_label``) are cropped from the preprocessed data
    once, when the data loaders are built. The fold's validation cases are never read, so
    nothing of them leaks into training.
a folder
    cases of another modality (the cross-modal method): every ``<name>_Label.nii.gz`` with its
    ``<name>_<source_suffix>.nii.gz`` (crossMoDA's layout; e.g. ceT1 tumors into hrT2 training).

Geometry: patches carry no affine, so the voxel size is the configuration's ``spacing`` from the
plans, and each patch axis is mapped to the world axis it came from (nnU-Net reads images as
``(z, y, x)`` and then applies ``transpose_forward``), so that a source tumor's through-plane
axis stays the patch's through-plane axis. The harmonizer (``model``, trained on one slice of
the dataset's modality) harmonizes along the through-plane axis (the largest spacing). A model
that records its training file's orientation sees each patch in that orientation: the dataset's
files are taken to be stored as that file, so only nnU-Net's transpose is undone
(:func:`~singan_insert.insertion.orientation.in_model_frame`; with a reader that reorients to
RAS, train the model on a RAS file).

Placement (``placement``): ``"foreground"`` puts the tumor's centroid on a voxel of nnU-Net's
foreground (the non-zero region it cropped to; outside it the segmentation holds -1), a list
of label values puts it inside those labels (e.g. an organ, for tumors of that organ).

nnU-Net's background workers: the transform holds the model's path and the compact source crops,
pickles small and loads the harmonizer once per worker process; its random draws come from
numpy's global state, as nnU-Net's own transforms' do (nnU-Net v2 starts its workers without fixed
seeds: draws differ between workers, and a run is not reproducible). A
patch where the tumor does not fit (or the harmonizer cannot work at that size) is passed on
unchanged and counted (:attr:`TumorInsertionTransform.failures`); the first such case is
reported with a warning.

Needs the optional package ``nnunetv2`` (``pip install 'singan-insert[nnunet]'``). Only
3D configurations are supported (``3d_fullres``, ``3d_lowres``).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from singan_insert.errors import MissingExtraError, SinganInsertError

try:
    from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError("nnunetv2", "nnunet", "On-the-fly tumor insertion in nnU-Net") from error

from singan_insert.insertion.insert import InsertionParameters, insert_tumor
from singan_insert.insertion.orientation import in_model_frame
from singan_insert.insertion.placement import SourceTumor
from singan_insert.insertion.sampling import InsertionRanges
from singan_insert.integrations._draw import draw_parameters, patch_ranges
from singan_insert.insertion.model_cache import load_harmonizer, resolve_model_file
from singan_insert.checks import check_int
from singan_insert.stages.nnunet_trainers import nnUNetTrainer_SinganInsertShort, nnUNetTrainer_SinganInsertSmoke

__all__ = [
    "SETTINGS_FILE_NAME",
    "SETTINGS_VARIABLE",
    "OnlineInsertionSettings",
    "TumorInsertionTransform",
    "nnUNetTrainerTumorInsertion",
    "nnUNetTrainerTumorInsertion_Short",
    "nnUNetTrainerTumorInsertion_Smoke",
    "patch_affine",
    "read_online_settings",
    "write_online_settings",
]

SETTINGS_FILE_NAME = "singan_insert_online.json"
SETTINGS_VARIABLE = "SINGAN_INSERT_ONLINE_SETTINGS"


@dataclass(frozen=True)
class OnlineInsertionSettings:
    r"""Every setting of on-the-fly insertion in nnU-Net (the JSON file holds these fields).

    Args:
        model: path of the harmonizer model file (or training folder), trained on one slice of
            the dataset's modality.
        probability: probability that a training patch receives a tumor, in [0, 1].
        sources: ``"training"`` (the fold's training cases) or a folder of another modality's
            cases (``<name>_Label.nii.gz`` + ``<name>_<source_suffix>.nii.gz``).
        source_suffix: image suffix of the cases in a source folder (e.g. ``"ceT1"``).
        source_label: the tumor's value in the sources' labels (> 0).
        label_value: value written for the inserted tumor in the patch's segmentation (> 0).
        placement: ``"foreground"`` (nnU-Net's non-zero region) or a list of label values of the
            patch's segmentation that may receive the tumor's centroid.
        contrast: :math:`\lambda` for ``appearance="fixed"``: ``[a, b]`` for :math:`U(a, b)`
            (JSON lists are ranges), a number; ``None``: the default of
            :class:`~singan_insert.insertion.insert.InsertionParameters`.
        start_scale: harmonizer start scale drawn uniformly in ``[a, b]``; ``None``: the model's
            default.
        intensity_mode: ``"normalized"`` or ``"matched"``.
        appearance: ``"auto"`` (default: the harmonizer chooses each tumor's level; a
            ``contrast`` is then refused, as it would do nothing) or ``"fixed"`` (the paper's :math:`\lambda`).
        degrees: rotation range :math:`d`: :math:`\theta_i \sim U(-d, d)` about each axis.
        scale: isotropic scale range :math:`v`: :math:`s \sim U(1 - v, 1 + v)`, ``0 <= v < 1``.
        flip_probability: probability of flipping the tumor along each axis.
        channel: input channel that receives the tumor (the harmonizer's modality).
        context_mm: in-plane context around the tumor given to the harmonizer (mm).
        overlap: ``"replace"``, ``"keep"`` or ``"error"`` (see :mod:`singan_insert.insertion.insert`).
        border_margin: voxels between the tumor and the patch border (>= 0).
        rim: with an annotated model, whether the new tumor gets the annotated tumor's rim (its
            fluid cleft; see :class:`~singan_insert.insertion.insert.InsertionParameters`).
            ``None``: the insertion's default, off for every placement here, as each moves the
            tumor to a voxel of the region, inside tissue too, where no such cleft exists (an
            annotated model's tumors placed in white matter or at a CSF voxel: 0 of 7 visible
            with it, 7 of 7 without, ``benchmarks/dev_target_conditions.py``); ``True`` where the
            region holds only the fluid spaces such tumors grow in.
    """

    model: str
    probability: float = 0.5
    sources: str = "training"
    source_suffix: str = "ceT1"
    source_label: int = 1
    label_value: int = 1
    placement: str | tuple[int, ...] = "foreground"
    contrast: tuple[float, float] | None = None
    start_scale: tuple[int, int] | None = None
    intensity_mode: str = "normalized"
    appearance: str = "auto"
    degrees: float = 10.0
    scale: float = 0.1
    flip_probability: float = 0.5
    channel: int = 0
    context_mm: float = 20.0
    overlap: str = "replace"
    border_margin: int = 1
    rim: bool | None = None
    _ranges: InsertionRanges = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A missing model must fail here: in nnU-Net's workers its load error would only skip
        # every patch, and the network would train with no insertion at all.
        resolve_model_file(self.model)
        if not 0 <= float(self.probability) <= 1:
            raise SinganInsertError(f"probability must be in [0, 1], got {self.probability!r}.")
        if self.placement != "foreground":
            if isinstance(self.placement, str):
                raise SinganInsertError(
                    f"placement must be 'foreground' or a list of label values, got {self.placement!r}.")
            values = tuple(int(v) for v in self.placement)
            if not values or min(values) < 0:
                raise SinganInsertError(f"placement label values must be >= 0, got {self.placement!r}.")
            object.__setattr__(self, "placement", values)
        for name, kind in (("contrast", float), ("start_scale", int)):
            if getattr(self, name) is not None:  # JSON gives lists
                object.__setattr__(self, name, tuple(kind(v) for v in getattr(self, name)))
        for name in ("source_label", "label_value"):
            object.__setattr__(self, name, check_int(getattr(self, name), name, 1))
        object.__setattr__(self, "channel", check_int(self.channel, "channel", 0))
        # The fixed part and the ranges are validated now, not in an augmentation worker.
        object.__setattr__(self, "_ranges", patch_ranges(
            self.insertion_parameters(), self.contrast, self.start_scale, self.degrees, self.scale,
            flip_probability=self.flip_probability))

    def insertion_parameters(self) -> InsertionParameters:
        """The fixed part of every insertion (placement, contrast, scale and seed are drawn)."""
        return InsertionParameters(
            intensity_mode=self.intensity_mode, appearance=self.appearance, label_value=int(self.label_value),
            context_mm=float(self.context_mm), overlap=self.overlap,
            border_margin=int(self.border_margin), rim=self.rim)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_ranges")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OnlineInsertionSettings":
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        unknown = set(data) - known
        if unknown:
            raise SinganInsertError(f"Unknown on-the-fly insertion settings {sorted(unknown)}; "
                                    f"the known ones are {sorted(known)}.")
        if "model" not in data:
            raise SinganInsertError("The on-the-fly insertion settings need 'model' (a harmonizer path).")
        return cls(**data)


def write_online_settings(preprocessed_dataset: str | os.PathLike,
                          settings: OnlineInsertionSettings) -> Path:
    """Write ``settings`` where the trainer finds them: ``<preprocessed_dataset>/singan_insert_online.json``."""
    folder = Path(preprocessed_dataset)
    if not folder.is_dir():
        raise SinganInsertError(
            f"{folder} is not a folder: pass nnUNet_preprocessed/Dataset<ID>_<name> (after "
            "plan and preprocess).")
    path = folder / SETTINGS_FILE_NAME
    path.write_text(json.dumps(settings.to_dict(), indent=2))
    return path


def read_online_settings(preprocessed_dataset: str | os.PathLike) -> OnlineInsertionSettings:
    """The settings the trainer uses: ``$SINGAN_INSERT_ONLINE_SETTINGS``, else the dataset's file."""
    path = Path(os.environ.get(SETTINGS_VARIABLE) or Path(preprocessed_dataset) / SETTINGS_FILE_NAME)
    if not path.is_file():
        raise SinganInsertError(
            f"No on-the-fly insertion settings: {path} does not exist. Write them with "
            "singan_insert.integrations.nnunet.write_online_settings(<preprocessed dataset "
            f"folder>, OnlineInsertionSettings(model=...)) or set {SETTINGS_VARIABLE}.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SinganInsertError(f"{path} is not valid JSON ({error}).") from error
    return OnlineInsertionSettings.from_dict(data)


def patch_affine(spacing: Sequence[float], transpose_forward: Sequence[int]) -> np.ndarray:
    """Voxel-to-world affine of a preprocessed patch: axis ``i`` along world axis ``2 - t[i]``.

    nnU-Net's arrays are the images' ``(z, y, x)`` view permuted by ``transpose_forward`` ``t``,
    with ``spacing`` given per array axis. The directions' signs and the origin are unknown to
    a patch and do not matter here (tumor orientations are drawn at random).
    """
    affine = np.zeros((4, 4))
    for axis, (size, source_axis) in enumerate(zip(spacing, transpose_forward)):
        affine[2 - int(source_axis), axis] = float(size)
    affine[3, 3] = 1.0
    return affine


class TumorInsertionTransform(BasicTransform):
    """batchgenerators-v2 transform: insert a harmonized tumor into one patch (see the module).

    Args:
        settings: the :class:`OnlineInsertionSettings`.
        sources: the tumor bank (compact crops), at least one.
        affine: the patches' voxel-to-world affine (:func:`patch_affine`).
    """

    def __init__(self, settings: OnlineInsertionSettings, sources: Sequence[SourceTumor],
                 affine: np.ndarray):
        super().__init__()
        if not sources:
            raise SinganInsertError(
                f"No source tumor (label {settings.source_label}) in {settings.sources!r}: "
                "nothing to insert.")
        self.settings = settings
        self.sources = list(sources)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.parameters = settings.insertion_parameters()
        self.inserted = 0
        self.failures = 0

    def apply(self, data_dict: dict, **params) -> dict:
        image, segmentation = data_dict.get("image"), data_dict.get("segmentation")
        # probability 0 draws nothing, so that nnU-Net's own augmentations see the random stream
        # they would see without this transform.
        if image is None or segmentation is None or self.settings.probability == 0 \
                or np.random.random_sample() >= self.settings.probability:
            return data_dict
        if image.ndim != 4:
            raise SinganInsertError(
                f"On-the-fly insertion needs 3D patches (C, X, Y, Z), got {tuple(image.shape)}: "
                "use a 3D configuration (3d_fullres or 3d_lowres).")
        channel = self.settings.channel
        volume = image[channel].numpy()
        label = segmentation[0].numpy()
        placement = self.settings.placement
        region = label >= 0 if placement == "foreground" else np.isin(label, placement)
        source = self.sources[np.random.randint(len(self.sources))]
        # Outside the try: a model that does not load is an error, not a patch to skip.
        harmonizer = load_harmonizer(self.settings.model)
        try:
            if not region.any():
                raise SinganInsertError("the patch holds no voxel of the placement region")
            affine = in_model_frame(self.affine, harmonizer.orientation)
            parameters = draw_parameters(np.random.mtrand._rand, source, affine, volume.shape,
                                         self.parameters, self.settings._ranges, region)
            result = insert_tumor(volume, affine, source, harmonizer, parameters, target_label=label)
        except SinganInsertError as error:
            self.failures += 1
            if self.failures == 1:
                warnings.warn(f"Tumor insertion skipped for a patch of shape {volume.shape} "
                              f"({error}); further skips are only counted.", stacklevel=2)
            return data_dict
        image = image.clone()
        image[channel] = torch.from_numpy(result.image.astype(np.float32, copy=False))
        data_dict["image"] = image
        data_dict["segmentation"] = torch.from_numpy(result.label[None]).to(segmentation.dtype)
        self.inserted += 1
        return data_dict


def check_against_dataset(settings: OnlineInsertionSettings, dataset_json: dict) -> None:
    """Refuse, when the trainer is built, what would fail (or silently mislabel) in a worker.

    The model must load (its error would otherwise only skip patches); the channel must exist;
    ``label_value`` and the placement values must be labels the dataset declares (an undeclared
    value fails in the loss, deep in training); a model trained on another modality than the
    channel's name is warned about (names in dataset.json are free text).
    """
    harmonizer = load_harmonizer(settings.model)
    channels = {int(k): str(v) for k, v in dataset_json.get("channel_names", {}).items()}
    if channels and settings.channel not in channels:
        raise SinganInsertError(f"channel={settings.channel}, but the dataset has channels {sorted(channels)} "
                                f"({channels}): choose the channel of the harmonizer's modality.")
    name = channels.get(settings.channel)
    if name is not None and harmonizer.modality is not None and name.lower() != str(harmonizer.modality).lower():
        warnings.warn(f"The harmonizer was trained on {harmonizer.modality!r} but channel {settings.channel} is "
                      f"{name!r}: the tumors go into that channel. If that is not the harmonizer's modality, "
                      "set 'channel' (or train the harmonizer on that modality).", stacklevel=3)
    if settings.sources == "training" and settings.label_value != settings.source_label:
        warnings.warn(f"label_value={settings.label_value} differs from source_label={settings.source_label}, the "
                      "tumor's value in the training cases the tumors come from: inserted tumors get another "
                      "label than the dataset's own (another structure's, if that value is one).", stacklevel=3)
    declared = {int(v) for v in dataset_json.get("labels", {}).values() if isinstance(v, (int, float))}
    if declared:
        wanted = {"label_value": [settings.label_value]}
        if settings.placement != "foreground":
            wanted["placement"] = list(settings.placement)
        for field_name, values in wanted.items():
            missing = sorted(set(values) - declared)
            if missing:
                raise SinganInsertError(
                    f"{field_name} {missing} is not a label of the dataset (dataset.json labels: "
                    f"{dataset_json['labels']}): use the tumor's own label value.")


def sources_from_folder(settings: OnlineInsertionSettings) -> list[SourceTumor]:
    """Tumor crops of the ``<name>_Label`` / ``<name>_<source_suffix>`` cases of a folder."""
    folder = Path(settings.sources)
    if not folder.is_dir():
        raise SinganInsertError(
            f"sources must be 'training' or a folder of source cases; {folder} is not a folder.")
    sources = []
    for label_path in sorted(folder.glob("*_Label.nii*")):
        name = label_path.name.split("_Label.nii")[0]
        extension = label_path.name[len(name) + len("_Label"):]
        image_path = folder / f"{name}_{settings.source_suffix}{extension}"
        if image_path.is_file():
            sources.append(SourceTumor.from_files(image_path, label_path, label_value=settings.source_label))
    if not sources:
        raise SinganInsertError(
            f"No source case in {folder}: each needs <name>_Label.nii.gz and "
            f"<name>_{settings.source_suffix}.nii.gz.")
    return sources


class nnUNetTrainerTumorInsertion(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming scheme
    """nnU-Net's trainer plus on-the-fly tumor insertion in its training augmentation.

    The settings are read at construction (:func:`read_online_settings`); the tumor bank is
    built when the data loaders are (from the fold's training split only, for
    ``sources="training"``). Everything else is nnU-Net's own. At the end of each epoch the
    training log says how many training patches that reached the network held the tumor label,
    and how many of those came from cases that have none of their own (so the tumor there was
    inserted).
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.insertion_settings = read_online_settings(self.preprocessed_dataset_folder_base)
        check_against_dataset(self.insertion_settings, dataset_json)
        self.insertion_transform: TumorInsertionTransform | None = None
        self.cases_with_tumor: set[str] = set()
        self._tumor_patches = [0, 0, 0]  # patches, with the tumor label, of those from tumor-free cases

    def patch_affine(self) -> np.ndarray:
        return patch_affine(self.configuration_manager.spacing, self.plans_manager.transpose_forward)

    def tumor_sources(self) -> list[SourceTumor]:
        """The bank: the training split's tumors, or the source folder's (never validation cases).

        Also records which training cases hold the tumor label themselves.
        """
        settings = self.insertion_settings
        dataset_tr, _ = self.get_tr_and_val_datasets()
        self.cases_with_tumor = set()
        sources = []
        for identifier in dataset_tr.identifiers:
            data, seg, _, _ = dataset_tr.load_case(identifier)
            seg = np.asarray(seg[0])
            if (seg == settings.label_value).any():
                self.cases_with_tumor.add(identifier)
            if settings.sources == "training" and (seg == settings.source_label).any():
                sources.append(SourceTumor.from_arrays(
                    np.asarray(data[settings.channel]), seg, self.patch_affine(),
                    label_value=settings.source_label, origin=f"nnU-Net training case {identifier}"))
        return sources if settings.sources == "training" else sources_from_folder(settings)

    def get_dataloaders(self):
        if len(self.configuration_manager.patch_size) != 3:
            raise SinganInsertError(
                f"On-the-fly tumor insertion needs a 3D configuration; {self.configuration_name!r} "
                "is 2D.")
        self.insertion_transform = TumorInsertionTransform(
            self.insertion_settings, self.tumor_sources(), self.patch_affine())
        origins = sorted({s.origin for s in self.insertion_transform.sources})
        self.print_to_log_file(
            f"singan-insert: on-the-fly tumor insertion, {len(self.insertion_transform.sources)} "
            f"source tumor(s) from {origins}; settings {json.dumps(self.insertion_settings.to_dict())}")
        return super().get_dataloaders()

    def get_training_transforms(self, *args, **kwargs):  # an instance method: needs the bank
        transforms = nnUNetTrainer.get_training_transforms(*args, **kwargs)
        if self.insertion_transform is None:
            return transforms
        return ComposeTransforms([self.insertion_transform, *transforms.transforms])

    def train_step(self, batch: dict) -> dict:
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        for index, key in enumerate(batch.get("keys", [])):
            if bool((target[index] == self.insertion_settings.label_value).any()):
                self._tumor_patches[1] += 1
                self._tumor_patches[2] += key not in self.cases_with_tumor
        self._tumor_patches[0] += len(target)
        return super().train_step(batch)

    def on_train_epoch_end(self, train_outputs):
        patches, with_tumor, inserted = self._tumor_patches
        self.print_to_log_file(
            f"singan-insert: {with_tumor} of {patches} training patches held the tumor label, "
            f"{inserted} of them from cases without one")
        self._tumor_patches = [0, 0, 0]
        return super().on_train_epoch_end(train_outputs)


# The schedules are those of the shipped Smoke and Short trainers, whose __init__ sets them;
# nnUNetTrainerTumorInsertion comes first in the MRO, so its methods (and __init__'s signature,
# which nnU-Net records) are the ones used.
class nnUNetTrainerTumorInsertion_Smoke(  # noqa: N801 - nnU-Net's naming scheme
        nnUNetTrainerTumorInsertion, nnUNetTrainer_SinganInsertSmoke):
    """On-the-fly insertion, 1 epoch of 5 training and 2 validation iterations (smoke runs)."""


class nnUNetTrainerTumorInsertion_Short(  # noqa: N801 - nnU-Net's naming scheme
        nnUNetTrainerTumorInsertion, nnUNetTrainer_SinganInsertShort):
    """On-the-fly insertion, 20 epochs of 25 iterations (small CPU runs)."""
