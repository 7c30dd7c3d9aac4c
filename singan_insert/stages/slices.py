"""2D slices of NIfTI volumes, for the slice-wise stages (CycleGAN, pix2pix), and back to 3D.

Each volume is normalised on its own to the networks' range :math:`[-1, 1]` with
:class:`~singan_insert.harmonizer.normalization.PercentileNormalization` (robust percentiles, default
``(0.5, 99.5)``), cut into slices perpendicular to ``axis`` and, when ``size`` is given,
resampled to ``size x size`` pixels (bilinear, antialiased when shrinking). Slices are held in
memory as one ``float32`` tensor: about ``4 * size**2`` bytes per slice (256 px: 256 KiB).

:func:`translate_volume` is the inverse path for inference: it normalises a volume the same
way, runs a 2D generator on batches of its slices, resamples them back, restacks them along the
same axis and returns a NIfTI image on the input's grid (same shape and affine).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from singan_insert.errors import SinganInsertError
from singan_insert.harmonizer.normalization import PercentileNormalization
from singan_insert.checks import check_finite

VolumeLike = str | os.PathLike | nib.spatialimages.SpatialImage
VolumeSource = VolumeLike | Sequence[VolumeLike]
Generator2D = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "PairedSliceDataset",
    "SliceDataset",
    "list_volumes",
    "load_volume",
    "resize_slices",
    "translate_volume",
]

# A slice whose normalised values span less than this carries no image (background padding).
_BLANK_RANGE = 1e-3
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def list_volumes(source: VolumeSource) -> list[VolumeLike]:
    """Expand ``source`` into a list of volumes.

    Args:
        source: a folder (its ``*.nii`` and ``*.nii.gz`` files, sorted by name), one NIfTI file,
            one nibabel image, or a sequence of files and images.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.name.endswith(_NIFTI_SUFFIXES))
            if not files:
                raise SinganInsertError(
                    f"The folder {str(path)!r} holds no .nii or .nii.gz files; pass a folder of "
                    "NIfTI volumes or a list of files."
                )
            return list(files)
        if not path.exists():
            raise SinganInsertError(f"{str(path)!r} does not exist; pass a NIfTI folder or file.")
        return [path]
    if isinstance(source, nib.spatialimages.SpatialImage):
        return [source]
    volumes = list(source)
    if not volumes:
        raise SinganInsertError("The list of volumes is empty; pass at least one NIfTI volume.")
    return volumes


def load_volume(volume: VolumeLike) -> tuple[np.ndarray, nib.spatialimages.SpatialImage, str]:
    """Read a 3D volume: ``(float32 data, image, name)``; trailing singleton axes are dropped."""
    if isinstance(volume, nib.spatialimages.SpatialImage):
        image, name = volume, f"<{type(volume).__name__} in memory>"
    else:
        path = Path(volume)
        if not path.is_file():
            raise SinganInsertError(f"The volume {str(path)!r} does not exist.")
        try:
            image = nib.load(path)
        except Exception as error:  # nibabel raises several types for unreadable files
            raise SinganInsertError(
                f"Could not read {str(path)!r} as a NIfTI volume ({error})."
            ) from error
        name = str(path)
    data = np.asarray(image.get_fdata(dtype=np.float32))
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SinganInsertError(
            f"{name} has shape {data.shape}; the slice-wise stages need 3D volumes "
            "(one channel)."
        )
    check_finite(data, f"volume {name}")
    return data, image, name


def _check_axis(axis: int) -> int:
    if axis not in (0, 1, 2, -1, -2, -3):
        raise SinganInsertError(f"axis must be 0, 1 or 2 (the slicing axis), got {axis!r}.")
    return axis % 3


def resize_slices(slices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Resample a batch ``(N, C, H, W)`` to ``shape`` (bilinear; antialiased when shrinking)."""
    if tuple(slices.shape[-2:]) == tuple(shape):
        return slices
    shrinking = shape[0] < slices.shape[-2] or shape[1] < slices.shape[-1]
    return F.interpolate(
        slices, size=tuple(shape), mode="bilinear", align_corners=False, antialias=shrinking
    )


def _volume_slices(
    data: np.ndarray,
    normalization: PercentileNormalization,
    axis: int,
    size: int | None,
) -> torch.Tensor:
    """The normalised slices of one volume, ``(n_slices, 1, H, W)``."""
    volume = normalization.to_model(torch.from_numpy(np.ascontiguousarray(data)))
    slices = torch.movedim(volume, axis, 0).unsqueeze(1).contiguous()
    if size is not None:
        slices = resize_slices(slices, (size, size))
    return slices


def _is_blank(slices: torch.Tensor) -> torch.Tensor:
    flat = slices.flatten(1)
    return (flat.amax(dim=1) - flat.amin(dim=1)) < _BLANK_RANGE


def _check_size(size: int | None) -> None:
    if size is not None and (not isinstance(size, int) or size < 8):
        raise SinganInsertError(f"size must be None or an integer >= 8 pixels, got {size!r}.")


def _stack(chunks: list[torch.Tensor], names: list[str]) -> torch.Tensor:
    shapes = {tuple(c.shape[-2:]) for c in chunks if len(c)}
    if len(shapes) > 1:
        raise SinganInsertError(
            f"The slices have different in-plane shapes {sorted(shapes)} across {names}; pass "
            "size=<pixels> to resample every slice to one square size."
        )
    if not shapes:
        raise SinganInsertError(
            f"Every slice of {names} is blank (constant); there is nothing to train on."
        )
    return torch.cat(chunks)


class _Slicing(Dataset):
    """How volumes are cut into slices: ``axis``, ``size`` and ``percentiles`` (checked)."""

    def __init__(self, axis: int, size: int | None, percentiles: tuple[float, float]):
        _check_size(size)
        self.axis = _check_axis(axis)
        self.size = size
        self.percentiles = (float(percentiles[0]), float(percentiles[1]))


class SliceDataset(_Slicing):
    """Normalised 2D slices of a set of 3D volumes; item ``i`` is a ``(1, H, W)`` tensor.

    Args:
        volumes: a folder of NIfTI files, one file or image, or a sequence of files and images.
        axis: the axis slices are taken perpendicular to (0, 1 or 2; 2 for axial slices of an
            RAS-oriented volume).
        size: resample every slice to ``size x size`` pixels (>= 8), or ``None`` to keep the
            native in-plane shape (then all volumes must share it).
        percentiles: the robust range mapped to :math:`[-1, 1]`, per volume, in [0, 100].
        skip_blank: leave out constant slices (for example zero padding at the volume's ends).

    Attributes:
        slices: all slices, ``(N, 1, H, W)``, ``float32`` in :math:`[-1, 1]`.
        locations: ``(volume index, slice index)`` of each slice.
        normalizations: the fitted normalisation of each volume.
        names: a name for each volume (its path).
    """

    def __init__(
        self,
        volumes: VolumeSource,
        axis: int = 2,
        size: int | None = None,
        percentiles: tuple[float, float] = (0.5, 99.5),
        skip_blank: bool = True,
    ):
        super().__init__(axis, size, percentiles)
        self.normalizations: list[PercentileNormalization] = []
        self.names: list[str] = []
        self.locations: list[tuple[int, int]] = []
        chunks = []
        for index, volume in enumerate(list_volumes(volumes)):
            data, _, name = load_volume(volume)
            normalization = PercentileNormalization.fit(data, percentiles=self.percentiles)
            slices = _volume_slices(data, normalization, self.axis, size)
            keep = ~_is_blank(slices) if skip_blank else torch.ones(len(slices), dtype=torch.bool)
            chunks.append(slices[keep])
            self.locations += [(index, int(k)) for k in torch.nonzero(keep).flatten()]
            self.normalizations.append(normalization)
            self.names.append(name)
        self.slices = _stack(chunks, self.names)

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.slices[index]

    @property
    def slice_shape(self) -> tuple[int, int]:
        """In-plane shape ``(H, W)`` of the slices."""
        return tuple(self.slices.shape[-2:])


class PairedSliceDataset(_Slicing):
    """Aligned slice pairs for paired translation (pix2pix): item ``i`` is ``(source, target)``.

    Each pair is ``(source volume, target volume)`` on the same voxel grid - for this method
    ``(B', A)``: an insertion output in modality B and the modality-A volume it was made from.
    Both are normalised on their own to :math:`[-1, 1]`; slice ``k`` of the source is paired with
    slice ``k`` of the target. Slices blank in both volumes are left out when ``skip_blank``.

    Args:
        pairs: a sequence of ``(source, target)`` files or images.
        axis, size, percentiles, skip_blank: as in :class:`SliceDataset`.

    Attributes:
        sources, targets: the slices, ``(N, 1, H, W)`` each.
        locations: ``(pair index, slice index)`` of each pair of slices.
        normalizations: ``(source, target)`` normalisations of each pair.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[VolumeLike, VolumeLike]],
        axis: int = 2,
        size: int | None = None,
        percentiles: tuple[float, float] = (0.5, 99.5),
        skip_blank: bool = True,
    ):
        super().__init__(axis, size, percentiles)
        pairs = list(pairs)
        if not pairs:
            raise SinganInsertError("The list of (source, target) volume pairs is empty.")
        self.normalizations: list[tuple[PercentileNormalization, PercentileNormalization]] = []
        self.names: list[tuple[str, str]] = []
        self.locations: list[tuple[int, int]] = []
        source_chunks, target_chunks = [], []
        for index, pair in enumerate(pairs):
            if isinstance(pair, (str, os.PathLike)) or len(pair) != 2:
                raise SinganInsertError(
                    f"Pair {index} is not a (source, target) tuple; pass a list of pairs."
                )
            (source, source_image, source_name), (target, target_image, target_name) = (
                load_volume(pair[0]),
                load_volume(pair[1]),
            )
            _check_same_grid(source.shape, source_image, source_name, target.shape, target_image, target_name)
            norms = (
                PercentileNormalization.fit(source, percentiles=self.percentiles),
                PercentileNormalization.fit(target, percentiles=self.percentiles),
            )
            source_slices = _volume_slices(source, norms[0], self.axis, size)
            target_slices = _volume_slices(target, norms[1], self.axis, size)
            if skip_blank:
                keep = ~(_is_blank(source_slices) & _is_blank(target_slices))
            else:
                keep = torch.ones(len(source_slices), dtype=torch.bool)
            source_chunks.append(source_slices[keep])
            target_chunks.append(target_slices[keep])
            self.locations += [(index, int(k)) for k in torch.nonzero(keep).flatten()]
            self.normalizations.append(norms)
            self.names.append((source_name, target_name))
        flat_names = [name for pair in self.names for name in pair]
        self.sources = _stack(source_chunks, flat_names)
        self.targets = _stack(target_chunks, flat_names)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sources[index], self.targets[index]

    @property
    def slice_shape(self) -> tuple[int, int]:
        """In-plane shape ``(H, W)`` of the slices."""
        return tuple(self.sources.shape[-2:])


def _check_same_grid(shape_a, image_a, name_a, shape_b, image_b, name_b) -> None:
    if tuple(shape_a) != tuple(shape_b):
        raise SinganInsertError(
            f"{name_a} {tuple(shape_a)} and {name_b} {tuple(shape_b)} have different shapes; "
            "paired volumes must lie on the same voxel grid (resample one onto the other)."
        )
    if not np.allclose(image_a.affine, image_b.affine, atol=1e-3):
        raise SinganInsertError(
            f"{name_a} and {name_b} have different affines; paired volumes must lie on the same "
            "voxel grid (resample one onto the other)."
        )


@torch.inference_mode()
def translate_volume(
    generator: Generator2D,
    image: VolumeLike,
    axis: int = 2,
    *,
    size: int | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    output_normalization: PercentileNormalization | None = None,
) -> nib.Nifti1Image:
    """Translate a volume slice by slice with a 2D generator and restack it.

    The volume is normalised to :math:`[-1, 1]` with its own ``percentiles`` (as the training
    slices were), cut perpendicular to ``axis``, resampled to ``size x size`` when given (use
    the training size), passed through ``generator`` in batches, resampled back and restacked.
    Without ``size``, slices are reflect-padded to a multiple of the generator's
    ``size_divisor`` (when it has one) and cropped back.

    Args:
        generator: maps ``(N, C, H, W)`` in :math:`[-1, 1]` to the same shape; a module is put in
            ``eval`` mode (dropout off, batch norm with running statistics) for the call and
            restored afterwards.
        image: a NIfTI file or a nibabel image holding one 3D volume.
        axis: slicing axis (0, 1 or 2), as in training.
        size: the square slice size the generator was trained at, or ``None``.
        batch_size: slices per forward pass (>= 1); only memory and speed depend on it.
        device: where to run; default: the generator's device (CPU for a plain callable).
        percentiles: the robust range used to normalise the input, as in training.
        output_normalization: map the output from :math:`[-1, 1]` to intensities with this
            normalisation; ``None`` keeps the model range :math:`[-1, 1]`.

    Returns:
        A ``float32`` :class:`nibabel.Nifti1Image` with the input's shape, affine and header
        (orientation codes and zooms).
    """
    axis = _check_axis(axis)
    _check_size(size)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SinganInsertError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    data, source_image, _ = load_volume(image)
    normalization = PercentileNormalization.fit(data, percentiles=percentiles)
    slices = _volume_slices(data, normalization, axis, None)
    native_shape = tuple(slices.shape[-2:])
    module = getattr(generator, "module", generator)  # unwrap DistributedDataParallel
    if device is None:
        parameter = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
        device = parameter.device if parameter is not None else torch.device("cpu")
    divisor = int(getattr(module, "size_divisor", 1))
    was_training = module.training if isinstance(module, torch.nn.Module) else False
    if isinstance(module, torch.nn.Module):
        module.eval()
    try:
        outputs = []
        for start in range(0, len(slices), batch_size):
            batch = slices[start : start + batch_size].to(device)
            if size is not None:
                batch = resize_slices(batch, (size, size))
            batch, crop = _pad_to_multiple(batch, divisor)
            result = module(batch)[..., : crop[0], : crop[1]]
            outputs.append(resize_slices(result.float(), native_shape).cpu())
    finally:
        if was_training:
            module.train()
    translated = torch.cat(outputs)[:, 0]
    if output_normalization is not None:
        translated = output_normalization.from_model(translated)
    volume = torch.movedim(translated, 0, axis).numpy().astype(np.float32)
    header = source_image.header.copy() if isinstance(source_image, nib.Nifti1Image) else None
    result = nib.Nifti1Image(volume, source_image.affine, header=header)
    result.set_data_dtype(np.float32)
    if header is not None:
        result.header.set_slope_inter(1.0, 0.0)
    return result


def _pad_to_multiple(batch: torch.Tensor, divisor: int) -> tuple[torch.Tensor, tuple[int, int]]:
    height, width = batch.shape[-2:]
    pad_h, pad_w = (-height) % divisor, (-width) % divisor
    if pad_h or pad_w:
        # Reflection needs the padding to be smaller than the side; replicate otherwise.
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        batch = F.pad(batch, (0, pad_w, 0, pad_h), mode=mode)
    return batch, (height, width)
