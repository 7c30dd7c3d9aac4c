"""The :class:`Harmonizer`: a trained pyramid that makes pasted tumors look native.

Harmonization by injection (SinGAN, Shaham et al. 2019, as modified in the paper): a composite
:math:`c` (the target slice with a tumor naively pasted) is brought to the model's range,
downsampled to scale :math:`n-1` and upsampled to scale :math:`n`, then run through
:math:`G_n, \\dots, G_N` with fresh noise,

.. math:: y = (G_N \\circ \\dots \\circ G_n)(\\uparrow \\downarrow_{n-1} c),

and blended back into the target only near the tumor,

.. math:: \\text{out} = (1 - w) \\cdot \\text{background} + w \\cdot y,

where :math:`w = 1` on the mask and within ``dilation_mm`` of it, falls smoothly (a smoothstep
of the distance) to 0 over ``feather_mm``, and is exactly 0 beyond, where the output is the
input bit for bit. The coarser the start scale, the more the generators re-synthesise (and
the more of the paste's own intensity they may override).

Slices of any size are accepted: the scale shapes are derived from the slice's own shape by the
trained pyramid's ratios, and when both the model and the slices have a known pixel spacing the
slices are resampled to the model's spacing first (and the result back), so that one model pixel
covers the same physical size as in training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from singan_insert.devices import select_device
from singan_insert.errors import SinganInsertError
from singan_insert.harmonizer.normalization import PercentileNormalization
from singan_insert.checks import check_finite, check_non_negative, check_spacing
from singan_insert.harmonizer.model_file import load_tensors, save_tensors, state_dict_to_tensors, tensors_to_state_dict
from singan_insert.harmonizer.networks import Box, GeneratorPyramid, build_generator
from singan_insert.harmonizer.pyramid import PyramidGeometry, resize, resize_source_span

MODEL_KIND = "singan-insert-harmonizer"
MODEL_FILE_NAME = "harmonizer.safetensors"


#: An annotation whose non-zero values are several whole numbers up to this is a label map of
#: several structures, refused by :meth:`Harmonizer.annotate`; above it, a drawn 8-bit mask.
MAX_LABEL_IN_ANNOTATION = 32


class Harmonizer:
    """A trained generator pyramid plus everything needed to apply it to new slices.

    Build one with :func:`singan_insert.harmonizer.training.train_harmonizer` or :meth:`load`.
    """

    def __init__(
        self,
        pyramid: GeneratorPyramid,
        geometry: PyramidGeometry,
        normalization: PercentileNormalization,
        spacing: tuple[float, float] | None = None,
        reconstruction_noise: torch.Tensor | None = None,
        metadata: dict[str, Any] | None = None,
        training_slice: torch.Tensor | None = None,
        tumor_annotation: torch.Tensor | None = None,
    ):
        self.pyramid = pyramid.requires_grad_(False).eval()
        self.geometry = geometry
        self.normalization = normalization
        self.spacing = tuple(float(v) for v in spacing) if spacing is not None else None
        self.reconstruction_noise = reconstruction_noise
        self.metadata = metadata or {}
        # The training slice in model units at the finest scale: the automatic appearance
        # compares a pasted tumor's patches with it (model files of earlier versions have none).
        self.training_slice = None if training_slice is None else \
            torch.as_tensor(training_slice, dtype=torch.float32).detach().cpu().reshape(geometry.finest)
        self.tumor_annotation: torch.Tensor | None = None
        if tumor_annotation is not None:
            self.annotate(tumor_annotation)
        self.device = next(pyramid.parameters()).device

    # ------------------------------------------------------------------ properties
    @property
    def num_scales(self) -> int:
        """Number of scales of the pyramid (``0`` coarsest .. ``num_scales - 1`` finest)."""
        return self.geometry.num_scales

    @property
    def first_trained_scale(self) -> int:
        return self.pyramid.first_scale

    @property
    def valid_start_scales(self) -> range:
        """Start scales this model can harmonize from (injection needs a coarser scale, so >= 1)."""
        return range(max(self.first_trained_scale, 1), self.num_scales)

    @property
    def default_start_scale(self) -> int:
        """Three generators below the finest: GBA's choice for tumors (see the docs' concepts)."""
        return max(self.num_scales - 3, self.valid_start_scales.start)

    @property
    def provenance(self) -> dict[str, Any]:
        return self.metadata.get("provenance", {})

    @property
    def axis(self) -> int | None:
        """Axis of the training volume the slice was cut along, if it came from a volume."""
        return self.provenance.get("axis")

    @property
    def modality(self) -> str | None:
        return self.provenance.get("modality")

    @property
    def orientation(self) -> str | None:
        """Axis codes of the training volume (``"RAS"``, ``"LPS"``...), if it came from a NIfTI
        volume: insertion brings a target into this orientation first
        (:mod:`singan_insert.insertion.orientation`)."""
        return self.provenance.get("orientation")

    def copy(self) -> "Harmonizer":
        """A second harmonizer on the same (frozen) generators, with its own annotation and caches:
        e.g. ``model.copy().annotate(mask)`` beside the unannotated ``model``."""
        return Harmonizer(self.pyramid, self.geometry, self.normalization, self.spacing,
                          self.reconstruction_noise, dict(self.metadata), self.training_slice,
                          self.tumor_annotation)

    def annotate(self, mask: Any | None) -> "Harmonizer":
        """Mark the tumor on the training slice (optional): the automatic appearance then takes
        B's tumor level, internal spread and texture from it (:mod:`singan_insert.insertion.annotation`).

        Args:
            mask: a 2D mask of the training slice, non-zero (or fractions > 0.5 after resizing)
                on the tumor: either on the slice as it was passed to training (after any crop;
                it is resized to the model's finest scale) or already at the finest scale.
                Model files written before 2026-12-07 do not record the slice's size: there any
                size with the slice's aspect ratio is taken. ``None`` removes the annotation.

        Returns:
            ``self`` (save it to keep the annotation in the model file).

        Raises:
            SinganInsertError: no training slice stored (a model file of an earlier version),
                a mask that is not 2D, not finite, of another aspect ratio, or empty, or a label
                map that holds several labels.
        """
        if mask is None:
            self.tumor_annotation = None
            self.__dict__.pop("_tumor_profile", None)
            return self
        if self.training_slice is None:
            raise SinganInsertError("This model stores no training slice (it was written by an earlier "
                                    "version), so there is nothing to annotate: retrain it.")
        array = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
        if array.ndim != 2:
            raise SinganInsertError(f"The tumor annotation must be a 2D mask of the training slice, got shape "
                                    f"{array.shape}.")
        if array.dtype == bool:
            array = array.astype(np.float32)
        if not np.issubdtype(array.dtype, np.number):
            raise SinganInsertError(f"The tumor annotation has dtype {array.dtype}; pass a 0/1 or boolean mask.")
        check_finite(array, "tumor annotation")
        # A label map of several structures (crossMoDA: 1 = schwannoma, 2 = cochlea) is not a
        # tumor mask: counting every non-zero value would add the other structures to the tumor.
        # A soft mask has fractions, a drawn image 255 (or grey anti-aliased edges up to it); a
        # label map small whole numbers.
        nonzero = array[array != 0]
        if nonzero.size and np.array_equal(nonzero, np.round(nonzero)) and nonzero.max() <= MAX_LABEL_IN_ANNOTATION:
            present = np.unique(nonzero)
            if present.size > 1:
                shown = ", ".join(f"{v:g}" for v in present[:10].astype(float))
                raise SinganInsertError(
                    f"The tumor annotation holds several labels ({shown}); pass the tumor's own mask, "
                    "e.g. label_slice == 1 (crossMoDA: 1 = schwannoma, 2 = cochlea).")
        finest = tuple(self.geometry.finest)
        trained = self.metadata.get("training", {}).get("slice_shape")
        if trained is not None and tuple(array.shape) not in (tuple(trained), finest):
            # A mask of another size cannot be placed by its aspect ratio alone: a full slice's mask
            # given to a model trained on a crop of it would be squeezed into the crop.
            crop = self.provenance.get("crop")
            raise SinganInsertError(
                f"The tumor annotation is {array.shape[0]}x{array.shape[1]} px but the model was trained on a "
                f"{trained[0]}x{trained[1]} px slice (finest scale {finest[0]}x{finest[1]}): draw the mask on that "
                "slice" + (f"; the model was trained on rows {crop[0]}:{crop[1]} and columns {crop[2]}:{crop[3]} of "
                           f"its slice (--crop), so cut the mask the same way, e.g. mask[{crop[0]}:{crop[1]}, "
                           f"{crop[2]}:{crop[3]}]." if crop else "."))
        if tuple(array.shape) != finest:
            if abs(array.shape[0] / array.shape[1] - finest[0] / finest[1]) > 0.03 * finest[0] / finest[1]:
                raise SinganInsertError(
                    f"The tumor annotation is {array.shape[0]}x{array.shape[1]} px but the training slice "
                    f"has the aspect ratio of {finest[0]}x{finest[1]} (the model's finest scale): draw the "
                    "mask on the training slice itself (after any crop).")
            resized = resize(torch.from_numpy((array > 0).astype(np.float32))[None, None], finest)[0, 0]
            array = resized.clamp(0, 1).numpy()
        else:
            array = np.clip(array.astype(np.float32), 0, 1) if array.max() <= 1 else (array > 0).astype(np.float32)
        if not (array > 0.5).any():
            raise SinganInsertError("The tumor annotation is empty (at the model's finest scale): mark the "
                                    "tumor on the training slice, or pass None for no annotation.")
        self.tumor_annotation = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        self.__dict__.pop("_tumor_profile", None)
        return self

    def to(self, device: str | torch.device) -> "Harmonizer":
        device = select_device(device)
        self.pyramid.to(device)
        if self.reconstruction_noise is not None:
            self.reconstruction_noise = self.reconstruction_noise.to(device)
        self.device = device
        return self

    def __repr__(self) -> str:
        sizes = "x".join(map(str, self.geometry.finest))
        return (f"Harmonizer(scales={self.num_scales}, finest={sizes}, "
                f"start_scales={self.valid_start_scales.start}..{self.num_scales - 1}, "
                f"spacing={self.spacing}, device={self.device})")

    # ------------------------------------------------------------------ harmonization
    def harmonize(
        self,
        background: np.ndarray | torch.Tensor,
        composite: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor,
        start_scale: int | None = None,
        *,
        spacing: tuple[float, float] | None = None,
        normalization: PercentileNormalization | None = None,
        dilation_mm: float = 1.0,
        feather_mm: float = 2.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        shared_noise: bool = True,
        precision: str = "auto",
    ) -> np.ndarray | torch.Tensor:
        """Harmonize a batch of pasted tumors (see the module docstring for the maths).

        Args:
            background: target slices without the paste, ``(B, H, W)`` or ``(H, W)``.
            composite: the same slices with the tumor pasted, same shape.
            mask: where the tumor was pasted, values in [0, 1], same shape, not empty.
            start_scale: injection scale ``n`` (negative: counted from the finest);
                default :attr:`default_start_scale`.
            spacing: ``(row, col)`` pixel size in mm of the slices; default: the model's.
            normalization: maps the slices' intensities to [-1, 1]; default: fitted on
                ``background`` (pass the whole volume's for 3D work).
            dilation_mm: the blend weight is 1 up to this distance from the mask (>= 0).
            feather_mm: width of the smooth fall-off of the weight beyond that (>= 0).
            seed, generator: noise source (``generator`` wins); default: a fresh random seed.
            shared_noise: the same noise field for every slice of the batch (no stripes
                across the slices of a volume; with the same ``normalization`` passed to each
                call, also makes a batch equal to one-by-one calls: the default normalization
                is fitted on whatever batch is given, so it differs between a batch and its
                slices).
            precision: ``"float32"``, ``"bfloat16"`` (convolutions in bfloat16, the rest in
                float32), or ``"auto"``: bfloat16 where the processor has native bfloat16
                units (CPUs with AVX512-BF16/AMX, CUDA GPUs that support it), else float32.
                bfloat16 changes the generated values by about 1e-3 of the model range and
                runs 2x faster on such CPUs.

        Returns:
            The harmonized slices, same type, shape and units as ``background``.
        """
        is_numpy = isinstance(background, np.ndarray)
        bg, comp, m, squeeze = _prepare_batch(background, composite, mask)
        scale = self.geometry.resolve_start_scale(
            self.default_start_scale if start_scale is None else start_scale, self.valid_start_scales.start)
        dilation_mm = check_non_negative(dilation_mm, "dilation_mm")
        feather_mm = check_non_negative(feather_mm, "feather_mm")
        slice_spacing = check_spacing(spacing, 2) if spacing is not None else self.spacing
        normalization = normalization or PercentileNormalization.fit(bg)
        if generator is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
            generator = torch.Generator().manual_seed(seed)

        weight = blend_weight(m.numpy(), slice_spacing or (1.0, 1.0), dilation_mm, feather_mm)
        weight = torch.from_numpy(weight)
        generated = self._generate(normalization.to_model(comp), scale, slice_spacing, generator, shared_noise,
                                   self._autocast_dtype(precision), mask=m, needed=support_box(weight))
        generated = normalization.from_model(generated)
        blended = bg * (1 - weight) + generated * weight
        # Pixels with zero weight are copied from the caller's array, in its own dtype, so
        # that they stay bit-identical (the float32 working copy would round float64 input).
        original = background if is_numpy else background.detach().cpu()
        if squeeze:
            blended, weight = blended[0], weight[0]
        if is_numpy:
            dtype = original.dtype if np.issubdtype(original.dtype, np.floating) else np.float32
            return np.where(weight.numpy() > 0, blended.numpy().astype(dtype), original.astype(dtype))
        dtype = original.dtype if original.is_floating_point() else torch.float32
        out = torch.where(weight > 0, blended.to(dtype), original.to(dtype))
        return out.to(background.device)

    def _autocast_dtype(self, precision: str) -> torch.dtype | None:
        if precision == "float32":
            return None
        if precision == "bfloat16":
            return torch.bfloat16
        if precision != "auto":
            raise SinganInsertError(f"precision must be 'auto', 'float32' or 'bfloat16', got {precision!r}.")
        if self.device.type == "cpu":
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
        if self.device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return None

    @torch.inference_mode()
    def _generate(self, composite: torch.Tensor, scale: int, spacing, generator, shared_noise,
                  autocast_dtype: torch.dtype | None = None, mask: torch.Tensor | None = None,
                  noise=None, needed: Box | None = None) -> torch.Tensor:
        """Run the pyramid from ``scale``; ``noise(shape)`` overrides the noise source (it lets
        :mod:`singan_insert.insertion.multicase` give each case of a batch its own fields).
        ``needed``: the box of the slices whose output is used (:func:`support_box` of the blend
        weight); elsewhere the output is only the upsampled input (see :meth:`GeneratorPyramid.run`)."""
        batch, height, width = composite.shape
        x = composite[:, None].to(self.device)
        working_shape = (height, width)
        if spacing is not None and self.spacing is not None:
            working_shape = (max(round(height * spacing[0] / self.spacing[0]), 1),
                             max(round(width * spacing[1] / self.spacing[1]), 1))
            x = resize(x, working_shape)
        sizes = self.geometry.sizes_for(working_shape)
        if min(sizes[scale - 1]) < 4:
            raise SinganInsertError(
                f"Slices of {height}x{width} px are too small for start scale {scale}: scale "
                f"{scale - 1} would be {sizes[scale - 1]} px. Use a finer start scale or a larger crop.")
        x = resize(resize(x, sizes[scale - 1]), sizes[scale])
        if self.device.type == "cpu":
            # channels_last lets oneDNN pick its fastest 3x3 convolution kernels on CPU.
            x = x.contiguous(memory_format=torch.channels_last)
            self.pyramid.to(memory_format=torch.channels_last)

        def default_noise(shape: tuple[int, ...]) -> torch.Tensor:
            noise_shape = (1, *shape[1:]) if shared_noise else shape
            z = torch.randn(noise_shape, generator=generator).to(self.device)
            return z.expand(shape) if shared_noise else z

        noise = noise or default_noise

        with torch.autocast(self.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            region = None if mask is None else mask[:, None].to(self.device)
            if needed is not None:  # the working pixels the resize back to the slices reads
                needed = (*resize_source_span(needed[0], needed[1], sizes[-1][0], height),
                          *resize_source_span(needed[2], needed[3], sizes[-1][1], width))
            y = self.pyramid.run(x, sizes, scale, self.num_scales - 1, noise, region, needed)
        y = resize(y, (height, width))
        return y[:, 0].float().cpu().contiguous()

    @torch.inference_mode()
    def sample(self, num_samples: int = 1, start_scale: int | None = None, seed: int = 0) -> torch.Tensor:
        """Random samples at the training size (from the model's own training-slice base).

        Only defined for models trained from noise (``first_trained_scale == 0``).
        """
        if self.first_trained_scale != 0 or self.reconstruction_noise is None:
            raise SinganInsertError("This model was trained for harmonization only; it has no "
                                    "unconditional sampler. Train with the 'reference' preset.")
        generator = torch.Generator().manual_seed(seed)
        sizes = self.geometry.sizes
        base = torch.zeros((num_samples, 1, *sizes[0]), device=self.device)
        out = self.pyramid.run(base, sizes, 0, self.num_scales - 1,
                               lambda shape: torch.randn(shape, generator=generator).to(self.device))
        return self.normalization.from_model(out[:, 0].cpu())

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as one safetensors file (atomic; see :mod:`singan_insert.harmonizer.model_file`)."""
        tensors: dict[str, torch.Tensor] = {}
        widths = []
        for index, generator in enumerate(self.pyramid.generators):
            tensors.update(state_dict_to_tensors(f"generators.{index}", generator))
            widths.append(generator.body[0].out_channels)
        if self.reconstruction_noise is not None:
            tensors["reconstruction_noise"] = self.reconstruction_noise
        if self.training_slice is not None:
            tensors["training_slice"] = self.training_slice
        if self.tumor_annotation is not None:
            tensors["tumor_annotation"] = self.tumor_annotation
        meta = {
            "geometry": self.geometry.to_dict(),
            "first_trained_scale": self.pyramid.first_scale,
            "noise_amplitudes": self.pyramid.noise_amplitudes,
            "widths": widths,
            "num_layers": len(self.pyramid.generators[0].body) // 2 + 1,
            "arch": self.pyramid.generators[0].arch,
            "normalization": self.normalization.to_dict(),
            "spacing": list(self.spacing) if self.spacing is not None else None,
            **self.metadata,
        }
        return save_tensors(path, tensors, MODEL_KIND, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> "Harmonizer":
        """Load a model file (or a training output folder holding ``harmonizer.safetensors``)."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE_NAME
        tensors, meta = load_tensors(path, MODEL_KIND)
        try:
            generators = []
            for index, width in enumerate(meta["widths"]):
                # Files written before the architecture was recorded hold the official one.
                generator = build_generator(meta.get("arch", "singan"), int(width), int(meta["num_layers"]))
                generator.load_state_dict(tensors_to_state_dict(f"generators.{index}", tensors))
                generators.append(generator)
            pyramid = GeneratorPyramid(generators, meta["noise_amplitudes"], meta["first_trained_scale"])
            geometry = PyramidGeometry.from_dict(meta["geometry"])
            normalization = PercentileNormalization.from_dict(meta["normalization"])
        except (KeyError, RuntimeError, TypeError) as error:
            from singan_insert.errors import ModelFileError

            raise ModelFileError(f"{str(path)!r} is an inconsistent harmonizer file ({error}).") from error
        own_keys = {"geometry", "first_trained_scale", "noise_amplitudes", "widths", "num_layers", "arch",
                    "normalization", "spacing", "format", "format_version"}
        metadata = {k: v for k, v in meta.items() if k not in own_keys}
        harmonizer = cls(pyramid, geometry, normalization, meta.get("spacing"),
                         tensors.get("reconstruction_noise"), metadata, tensors.get("training_slice"),
                         tensors.get("tumor_annotation"))
        return harmonizer.to(select_device(device))


def blend_weight(
    mask: np.ndarray, spacing: tuple[float, float], dilation_mm: float, feather_mm: float
) -> np.ndarray:
    """Blend weight per slice: 1 within ``dilation_mm`` of the mask, smoothstep to 0 over ``feather_mm``.

    Uses scipy's exact Euclidean distance transform with the pixel spacing, in mm (a disk
    dilation plus Gaussian blur, as in the official code, would leak beyond any finite radius).
    Soft masks keep their own values where they exceed the ramp.
    """
    from scipy.ndimage import distance_transform_edt

    weights = np.zeros(mask.shape, dtype=np.float32)
    reach = [int(np.ceil((dilation_mm + feather_mm) / step)) + 1 for step in spacing]
    for index, whole_mask in enumerate(mask):
        rows = np.flatnonzero((whole_mask > 0).any(axis=1))
        if rows.size == 0:
            continue
        # Only the mask's box widened by the ramp's reach: every mask pixel is in it, so the
        # distances there are the whole slice's, and beyond it the weight is 0.
        cols = np.flatnonzero((whole_mask[rows[0]:rows[-1] + 1] > 0).any(axis=0))
        box = (slice(max(rows[0] - reach[0], 0), rows[-1] + reach[0] + 1),
               slice(max(cols[0] - reach[1], 0), cols[-1] + reach[1] + 1))
        slice_mask = whole_mask[box]
        inside = slice_mask > 0
        distance = distance_transform_edt(~inside, sampling=spacing)
        if feather_mm > 0:
            t = np.clip(1 - (distance - dilation_mm) / feather_mm, 0, 1)
            ramp = t * t * (3 - 2 * t)
        else:
            ramp = (distance <= dilation_mm).astype(np.float64)
        ramp[distance > dilation_mm + feather_mm] = 0
        weights[index][box] = np.maximum(ramp, np.where(inside, slice_mask, 0))
    return weights


def support_box(weight: torch.Tensor | np.ndarray) -> Box | None:
    """``(top, bottom, left, right)``, half-open, of the pixels where any slice of a ``(B, H, W)``
    blend weight is non-zero (``None`` when it is zero everywhere)."""
    inside = torch.as_tensor(weight) > 0
    rows = torch.nonzero(inside.any(dim=-1).any(dim=0)).flatten()
    cols = torch.nonzero(inside.any(dim=-2).any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _prepare_batch(background, composite, mask):
    """Validate the three inputs and return float32 CPU tensors of shape (B, H, W)."""
    tensors = []
    for name, value in (("background", background), ("composite", composite), ("mask", mask)):
        if isinstance(value, np.ndarray):
            if not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
                raise SinganInsertError(f"The {name} has dtype {value.dtype}; pass a numeric array.")
            value = torch.from_numpy(np.ascontiguousarray(value).astype(np.float32))
        elif torch.is_tensor(value):
            if value.is_complex():
                raise SinganInsertError(f"The {name} is complex; pass real-valued slices.")
            value = value.detach().float().cpu()
        else:
            raise SinganInsertError(f"The {name} must be a numpy array or torch tensor, got {type(value).__name__}.")
        check_finite(value, name)
        tensors.append(value)
    bg, comp, m = tensors
    if bg.ndim not in (2, 3):
        raise SinganInsertError(
            f"Expected 2D slices of shape (H, W) or a batch (B, H, W); got shape {tuple(bg.shape)}. "
            "For a volume, use singan_insert.insertion.insert.insert_tumor, which harmonizes every tumor slice.")
    if comp.shape != bg.shape or m.shape != bg.shape:
        raise SinganInsertError(
            f"background {tuple(bg.shape)}, composite {tuple(comp.shape)} and mask {tuple(m.shape)} "
            "must have the same shape.")
    if m.min() < 0 or m.max() > 1:
        raise SinganInsertError(
            f"The mask must hold values in [0, 1] (got {m.min().item():g}..{m.max().item():g}); "
            "for a label map pass (label == value).")
    squeeze = bg.ndim == 2
    if squeeze:
        bg, comp, m = bg[None], comp[None], m[None]
    empty = [i for i in range(m.shape[0]) if not bool((m[i] > 0).any())]
    if empty:
        raise SinganInsertError(
            f"The mask is empty for slice(s) {empty}: there is nothing to harmonize there. "
            "Pass only the slices that contain the pasted tumor.")
    return bg, comp, m, squeeze
