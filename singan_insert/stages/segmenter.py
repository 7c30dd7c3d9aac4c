"""A small built-in U-Net segmenter, trained with Dice + cross-entropy in minutes on a CPU.

nnU-Net (:mod:`singan_insert.stages.nnunet`) is the paper's segmenter, but one full nnU-Net
epoch of even a tiny dataset takes minutes on a CPU. This module is the stand-in for CPU
benchmarks: the same recipe in miniature -- a U-Net, patch training with foreground
oversampling, Dice + CE, sliding-window inference -- with nothing configured automatically.

**Network.** A U-Net with ``levels`` resolutions; level :math:`l` has
:math:`c_l = c_0 2^l` channels (``c_0 = base_channels``) and two blocks of
conv 3 -> InstanceNorm -> LeakyReLU(0.01); down-sampling by 2x2(x2) max-pooling, up-sampling
by stride-2 transposed convolutions, skip connections by concatenation, a 1x1 conv head.
``spatial_dims=3`` trains on 3D patches; ``spatial_dims=2`` trains on 2D patches of the slices
along ``slice_axis`` and segments a volume slice by slice.

**Loss.** With softmax probabilities :math:`p_{k,i}` and one-hot truth :math:`g_{k,i}` over
the voxels :math:`i` of the whole batch, for the foreground classes :math:`k = 1..K-1`,

.. math::

    L = w_{CE}\\,\\mathrm{CE}(p, g) + w_{Dice}\\Bigl(1 - \\frac{1}{K-1}\\sum_{k\\ge 1}
        \\frac{2\\sum_i p_{k,i} g_{k,i} + s}{\\sum_i p_{k,i} + \\sum_i g_{k,i} + s}\\Bigr),
    \\quad s = 10^{-5}.

Summing over the batch ("batch Dice", as nnU-Net does for small structures) keeps the Dice
term defined when a patch misses a class.

**Data.** Every volume is mapped to :math:`[-1, 1]` by its own robust percentiles
(:class:`~singan_insert.harmonizer.normalization.PercentileNormalization`, 0.5/99.5), at training and at
prediction time, so no intensity statistics are stored. A ``foreground_fraction`` of the
patches is centred on a random labelled voxel (nnU-Net uses 1/3); augmentation is random
flips along every axis and a random intensity scale/shift (x s + b, s in [0.9, 1.1],
b in [-0.1, 0.1]). Spacing is ignored: train and predict on volumes of the same voxel size.

**Inference.** Sliding windows of the training patch size with 50 % overlap, softmax
probabilities averaged with a Gaussian weight (sigma = 1/8 of the patch, as nnU-Net), argmax.

**Files.** :meth:`Segmenter.save` writes one safetensors file through
:mod:`singan_insert.harmonizer.model_file` (kind ``"singan-insert-segmenter"``, the config in JSON);
:meth:`Segmenter.load` never unpickles anything.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from singan_insert.devices import select_device
from singan_insert.errors import SinganInsertError
from singan_insert.harmonizer.normalization import PercentileNormalization
from singan_insert.checks import check_finite
from singan_insert.harmonizer.model_file import (
    load_tensors,
    save_tensors,
    state_dict_to_tensors,
    tensors_to_state_dict,
)

__all__ = ["SegmenterConfig", "Segmenter", "UNet", "dice_ce_loss", "SEGMENTER_KIND"]

SEGMENTER_KIND = "singan-insert-segmenter"
ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class SegmenterConfig:
    """Architecture and training schedule of a :class:`Segmenter`.

    Args:
        spatial_dims: 3 (3D patches) or 2 (2D patches of slices along ``slice_axis``).
        in_channels: image channels (>= 1); volumes are ``(X, Y, Z)`` for one channel,
            ``(C, X, Y, Z)`` otherwise.
        num_classes: classes including background (>= 2); crossMoDA: 3 (background, VS, cochlea).
        base_channels: channels of the first level, :math:`c_0 \\ge 1`.
        levels: resolution levels (>= 1); every patch side must be divisible by
            :math:`2^{levels-1}`.
        patch_size: training/inference window, ``spatial_dims`` sides in voxels.
        slice_axis: the volume axis (0-2) sliced for ``spatial_dims=2``.
        batch_size: patches per step (>= 1).
        iterations: optimiser steps of :meth:`Segmenter.fit` (>= 1).
        learning_rate: AdamW step size, decayed polynomially, :math:`(1 - t/T)^{0.9}`.
        weight_decay: AdamW weight decay (>= 0).
        foreground_fraction: share of patches centred on a labelled voxel, in [0, 1].
        dice_weight, ce_weight: loss weights (>= 0, not both 0).
        augment: random flips and intensity scale/shift during training.
    """

    spatial_dims: int = 3
    in_channels: int = 1
    num_classes: int = 3
    base_channels: int = 8
    levels: int = 3
    patch_size: tuple[int, ...] = (48, 48, 32)
    slice_axis: int = 2
    batch_size: int = 2
    iterations: int = 400
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    foreground_fraction: float = 0.5
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    augment: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(s) for s in self.patch_size))
        if self.spatial_dims not in (2, 3):
            raise SinganInsertError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}.")
        if len(self.patch_size) != self.spatial_dims:
            raise SinganInsertError(
                f"patch_size {self.patch_size} must have {self.spatial_dims} sides "
                f"(spatial_dims={self.spatial_dims})."
            )
        factor = 2 ** (self.levels - 1) if self.levels >= 1 else 1
        checks = [
            (self.in_channels >= 1, "in_channels must be >= 1"),
            (self.num_classes >= 2, "num_classes must be >= 2 (background and one structure)"),
            (self.base_channels >= 1, "base_channels must be >= 1"),
            (self.levels >= 1, "levels must be >= 1"),
            (all(s >= 1 and s % factor == 0 for s in self.patch_size),
             f"every patch side must be a positive multiple of 2**(levels-1) = {factor}"),
            (self.slice_axis in (0, 1, 2), "slice_axis must be 0, 1 or 2"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.iterations >= 1, "iterations must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.foreground_fraction <= 1, "foreground_fraction must be in [0, 1]"),
            (self.dice_weight >= 0 and self.ce_weight >= 0
             and self.dice_weight + self.ce_weight > 0,
             "dice_weight and ce_weight must be >= 0 and not both 0"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise SinganInsertError(f"Invalid SegmenterConfig: {message} ({self}).")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "SegmenterConfig":
        """A named configuration, optionally with fields overridden.

        * ``"tiny"``: 3D, 4 channels, 2 levels, 16x16x8 patches, 60 steps (tests; seconds).
        * ``"cpu3d"``: 3D, 8 channels, 3 levels, 48x48x32 patches, 400 steps (minutes).
        * ``"cpu2d"``: 2D slices, 16 channels, 4 levels, 64x64 patches, batch 8, 600 steps.
        """
        presets = {
            "tiny": dict(base_channels=4, levels=2, patch_size=(16, 16, 8), batch_size=2,
                         iterations=60, learning_rate=1e-2),
            "cpu3d": dict(),
            "cpu2d": dict(spatial_dims=2, base_channels=16, levels=4, patch_size=(64, 64),
                          batch_size=8, iterations=600),
        }  # fmt: skip
        if name not in presets:
            raise SinganInsertError(f"Unknown preset {name!r}; choose one of {sorted(presets)}.")
        return cls(**{**presets[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["patch_size"] = list(self.patch_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SegmenterConfig":
        return cls(**{**data, "patch_size": tuple(data["patch_size"])})


# ---------------------------------------------------------------------- network
class _ConvBlock(nn.Sequential):
    def __init__(self, dims: int, in_channels: int, out_channels: int):
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        norm = nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers += [conv(c_in, out_channels, 3, padding=1), norm(out_channels, affine=True),
                       nn.LeakyReLU(0.01, inplace=True)]  # fmt: skip
        super().__init__(*layers)


class UNet(nn.Module):
    """A plain 2D/3D U-Net (see the module docstring); ``forward`` returns class logits.

    Input ``(N, in_channels, *spatial)`` with every spatial side divisible by
    :math:`2^{levels-1}`; output ``(N, num_classes, *spatial)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int,
                 base_channels: int, levels: int):  # fmt: skip
        super().__init__()
        channels = [base_channels * 2**level for level in range(levels)]
        pool = nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d
        up = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
        head = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.encoders = nn.ModuleList(
            _ConvBlock(spatial_dims, c_in, c_out)
            for c_in, c_out in zip([in_channels] + channels[:-1], channels)
        )
        self.pool = pool(2)
        self.upsamplers = nn.ModuleList(
            up(channels[level + 1], channels[level], 2, stride=2) for level in range(levels - 1)
        )
        self.decoders = nn.ModuleList(
            _ConvBlock(spatial_dims, 2 * channels[level], channels[level])
            for level in range(levels - 1)
        )
        self.head = head(channels[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else self.pool(x))
            skips.append(x)
        for level in reversed(range(len(self.decoders))):
            x = self.upsamplers[level](x)
            x = self.decoders[level](torch.cat([skips[level], x], dim=1))
        return self.head(x)


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Cross-entropy plus batch soft-Dice loss over the foreground classes (module docstring).

    Args:
        logits: ``(N, K, *spatial)`` class scores, :math:`K \\ge 2`.
        target: ``(N, *spatial)`` integer labels in ``[0, K)``.
        dice_weight, ce_weight: :math:`w_{Dice}, w_{CE} \\ge 0`.
        smooth: :math:`s > 0`, keeps the Dice of a class absent from truth and prediction at 1.

    Returns:
        a scalar; 0 is reached only for a perfect, fully confident prediction.
    """
    num_classes = logits.shape[1]
    target = target.long()
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target, num_classes).movedim(-1, 1).to(probs.dtype)
    dims = [0] + list(range(2, logits.ndim))
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return ce_weight * ce + dice_weight * (1 - dice[1:].mean())


# ---------------------------------------------------------------------- segmenter
class Segmenter:
    """Train, apply, save and load a small U-Net segmenter (see the module docstring).

    Args:
        config: architecture and schedule (default :class:`SegmenterConfig`).
        seed: initialises the weights and drives patch sampling/augmentation, so that
            ``Segmenter(c, seed=s).fit(x, y)`` is reproducible on one machine. The global
            torch/numpy random states are left untouched.
        device: where the network runs (``"cpu"``, ``"cuda"``...).
        num_threads: torch intra-op threads while training/predicting (restored afterwards);
            None keeps torch's setting. 1 is the safe choice on a busy CPU: small networks
            gain little from more threads, and when other processes load the cores the
            threads wait on each other (measured here, 2 cores under load: 10 ms per
            ``"tiny"`` step with 1 thread, 200 ms with 2).
    """

    def __init__(
        self,
        config: SegmenterConfig | None = None,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        num_threads: int | None = 1,
    ):
        if num_threads is not None and num_threads < 1:
            raise SinganInsertError(f"num_threads must be >= 1 or None, got {num_threads}.")
        self.config = config or SegmenterConfig()
        self.num_threads = num_threads
        self.seed = int(seed)
        self.device = select_device(device)  # the package's messages for an unknown or absent device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.network = UNet(
                self.config.spatial_dims, self.config.in_channels, self.config.num_classes,
                self.config.base_channels, self.config.levels,
            ).to(self.device)  # fmt: skip
        self.iterations_trained = 0
        self.loss_history: list[float] = []

    def __repr__(self) -> str:
        return f"Segmenter({self.config}, iterations_trained={self.iterations_trained})"

    # ------------------------------------------------------------------ training
    def fit(
        self,
        images: Sequence[ArrayLike],
        labels: Sequence[ArrayLike],
        *,
        iterations: int | None = None,
        progress: bool = False,
    ) -> list[float]:
        """Train on labelled volumes; returns the loss of every step.

        Args:
            images: volumes ``(X, Y, Z)`` (or ``(C, X, Y, Z)`` for several channels), any
                sizes; each is normalised by its own percentiles.
            labels: integer label maps ``(X, Y, Z)`` with values in ``[0, num_classes)``.
            iterations: steps to run (default ``config.iterations``); calling ``fit`` again
                continues training with a fresh learning-rate schedule.
            progress: show a tqdm progress bar.
        """
        cfg = self.config
        steps = cfg.iterations if iterations is None else int(iterations)
        if steps < 1:
            raise SinganInsertError(f"iterations must be >= 1, got {iterations}.")
        samples, targets = self._training_samples(images, labels)
        with _torch_threads(self.num_threads):
            return self._fit(samples, targets, steps, progress)

    def _fit(
        self, samples: list[np.ndarray], targets: list[np.ndarray], steps: int, progress: bool
    ) -> list[float]:
        cfg = self.config
        foreground = [np.argwhere(t > 0) for t in targets]
        with_foreground = [i for i, f in enumerate(foreground) if len(f)]
        rng = np.random.default_rng([self.seed, self.iterations_trained])
        optimizer = torch.optim.AdamW(
            self.network.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: (1 - step / steps) ** 0.9
        )
        self.network.train()
        losses: list[float] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="segmenter", unit="step")
        for _ in range(steps):
            batch_x, batch_y = [], []
            for _ in range(cfg.batch_size):
                centred = with_foreground and rng.random() < cfg.foreground_fraction
                index = int(rng.choice(with_foreground) if centred else rng.integers(len(samples)))
                centre = None
                if centred:
                    centre = foreground[index][rng.integers(len(foreground[index]))]
                x, y = _crop(samples[index], targets[index], cfg.patch_size, rng, centre)
                if cfg.augment:
                    x, y = _augment(x, y, rng)
                batch_x.append(x)
                batch_y.append(y)
            x = torch.from_numpy(np.stack(batch_x)).to(self.device)
            y = torch.from_numpy(np.stack(batch_y)).to(self.device)
            loss = dice_ce_loss(self.network(x), y, dice_weight=cfg.dice_weight,
                                ce_weight=cfg.ce_weight)  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if bar is not None:
            bar.close()
        self.iterations_trained += steps
        self.loss_history.extend(losses)
        return losses

    def _training_samples(
        self, images: Sequence[ArrayLike], labels: Sequence[ArrayLike]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Normalised ``(C, *spatial)`` samples and ``(*spatial)`` targets (slices in 2D)."""
        if len(images) != len(labels):
            raise SinganInsertError(
                f"Got {len(images)} images but {len(labels)} label maps; give one label map "
                "per image."
            )
        if not len(images):
            raise SinganInsertError("There is nothing to train on: `images` is empty.")
        samples, targets = [], []
        for number, (image, label) in enumerate(zip(images, labels)):
            volume = self._prepare_volume(image, f"image {number}")
            target = _as_numpy(label)
            if target.shape != volume.shape[1:]:
                raise SinganInsertError(
                    f"Label map {number} has shape {target.shape} but its image has spatial "
                    f"shape {volume.shape[1:]}; they must match voxel for voxel."
                )
            check_finite(target, f"label map {number}")
            if np.any(target != np.round(target)) or target.min() < 0 or (
                target.max() >= self.config.num_classes
            ):
                raise SinganInsertError(
                    f"Label map {number} must hold integers in [0, {self.config.num_classes}) "
                    f"(num_classes={self.config.num_classes}); found values "
                    f"{np.unique(target)[:10].tolist()}."
                )
            target = target.astype(np.int64)
            if self.config.spatial_dims == 2:
                axis = self.config.slice_axis
                volume_slices = np.moveaxis(volume, axis + 1, 1)
                target_slices = np.moveaxis(target, axis, 0)
                for k in range(target_slices.shape[0]):
                    samples.append(np.ascontiguousarray(volume_slices[:, k]))
                    targets.append(np.ascontiguousarray(target_slices[k]))
            else:
                samples.append(volume)
                targets.append(target)
        return samples, targets

    def _prepare_volume(self, image: ArrayLike, name: str) -> np.ndarray:
        """``(C, X, Y, Z)`` float32 in [-1, 1], each channel by its own percentiles."""
        volume = _as_numpy(image).astype(np.float32)
        channels = self.config.in_channels
        if channels == 1 and volume.ndim == 3:
            volume = volume[None]
        if volume.ndim != 4 or volume.shape[0] != channels:
            expected = "(X, Y, Z)" if channels == 1 else f"({channels}, X, Y, Z)"
            raise SinganInsertError(
                f"{name} has shape {volume.shape}; expected a volume {expected} "
                f"(in_channels={channels})."
            )
        normalised = [
            PercentileNormalization.fit(c).to_model(torch.from_numpy(c)).numpy() for c in volume
        ]
        return np.stack(normalised).astype(np.float32)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_proba(self, image: ArrayLike, *, batch_size: int = 4) -> np.ndarray:
        """Softmax probabilities ``(num_classes, X, Y, Z)`` (float32) for one volume."""
        volume = self._prepare_volume(image, "image")
        with _torch_threads(self.num_threads):
            return self._predict_proba(volume, batch_size)

    def _predict_proba(self, volume: np.ndarray, batch_size: int) -> np.ndarray:
        cfg = self.config
        self.network.eval()
        if cfg.spatial_dims == 3:
            return _sliding_window(self.network, volume, cfg, self.device, batch_size)
        axis = cfg.slice_axis
        slices = np.moveaxis(volume, axis + 1, 1)
        probs = [
            _sliding_window(self.network, np.ascontiguousarray(slices[:, k]), cfg, self.device,
                            batch_size)  # fmt: skip
            for k in range(slices.shape[1])
        ]
        return np.moveaxis(np.stack(probs, axis=1), 1, axis + 1)

    def predict(self, image: ArrayLike, *, batch_size: int = 4) -> np.ndarray:
        """Label map ``(X, Y, Z)`` (uint8, the most probable class per voxel) for one volume."""
        return self.predict_proba(image, batch_size=batch_size).argmax(0).astype(np.uint8)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as one safetensors file (atomic; see :mod:`singan_insert.harmonizer.model_file`)."""
        return save_tensors(
            path,
            state_dict_to_tensors("network", self.network),
            SEGMENTER_KIND,
            {
                "config": self.config.to_dict(),
                "seed": self.seed,
                "iterations_trained": self.iterations_trained,
                "final_loss": self.loss_history[-1] if self.loss_history else None,
            },
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        num_threads: int | None = 1,
    ) -> "Segmenter":
        """Read a model written by :meth:`save`.

        Raises:
            singan_insert.errors.ModelFileError: the file is missing, corrupt, or not a segmenter.
        """
        tensors, meta = load_tensors(path, SEGMENTER_KIND, device="cpu")
        segmenter = cls(SegmenterConfig.from_dict(meta["config"]), seed=meta["seed"],
                        device=device, num_threads=num_threads)  # fmt: skip
        segmenter.network.load_state_dict(tensors_to_state_dict("network", tensors))
        segmenter.iterations_trained = int(meta["iterations_trained"])
        return segmenter


# ---------------------------------------------------------------------- helpers
@contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` intra-op threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _as_numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _crop(
    sample: np.ndarray,
    target: np.ndarray,
    patch: tuple[int, ...],
    rng: np.random.Generator,
    centre: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """A patch of ``sample`` (C, *spatial) and ``target``; padded with -1 / 0 where too small."""
    starts = []
    for axis, (size, side) in enumerate(zip(target.shape, patch)):
        if centre is None:
            low, high = min(0, size - side), max(0, size - side)
            starts.append(int(rng.integers(low, high + 1)))
        else:
            starts.append(int(np.clip(centre[axis] - side // 2, min(0, size - side),
                                      max(0, size - side))))  # fmt: skip
    x = np.full((sample.shape[0], *patch), -1.0, np.float32)
    y = np.zeros(patch, np.int64)
    src, dst = [], []
    for start, size, side in zip(starts, target.shape, patch):
        lo, hi = max(start, 0), min(start + side, size)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    x[(slice(None), *dst)] = sample[(slice(None), *src)]
    y[tuple(dst)] = target[tuple(src)]
    return x, y


def _augment(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    for axis in range(y.ndim):
        if rng.random() < 0.5:
            x, y = np.flip(x, axis + 1), np.flip(y, axis)
    scale, shift = rng.uniform(0.9, 1.1), rng.uniform(-0.1, 0.1)
    return np.ascontiguousarray(x * scale + shift, dtype=np.float32), np.ascontiguousarray(y)


def _gaussian_weight(patch: tuple[int, ...]) -> np.ndarray:
    weight = np.ones(patch, np.float32)
    for axis, side in enumerate(patch):
        coords = np.arange(side) - (side - 1) / 2
        profile = np.exp(-0.5 * (coords / (side / 8)) ** 2).astype(np.float32)
        shape = [1] * len(patch)
        shape[axis] = side
        weight = weight * profile.reshape(shape)
    return np.maximum(weight / weight.max(), 1e-3)


def _window_starts(size: int, side: int) -> list[int]:
    if size <= side:
        return [0]
    count = math.ceil((size - side) / (side / 2)) + 1
    return sorted({round(v) for v in np.linspace(0, size - side, count)})


def _sliding_window(
    network: nn.Module,
    sample: np.ndarray,
    config: SegmenterConfig,
    device: torch.device,
    batch_size: int,
) -> np.ndarray:
    """Gaussian-weighted average of softmax windows over ``sample`` (C, *spatial)."""
    patch = config.patch_size
    spatial = sample.shape[1:]
    padded_shape = tuple(max(s, p) for s, p in zip(spatial, patch))
    padded = np.full((sample.shape[0], *padded_shape), -1.0, np.float32)
    padded[(slice(None), *[slice(0, s) for s in spatial])] = sample
    weight = _gaussian_weight(patch)
    total = np.zeros((config.num_classes, *padded_shape), np.float32)
    norm = np.zeros(padded_shape, np.float32)
    starts = [_window_starts(s, p) for s, p in zip(padded_shape, patch)]
    grids = np.meshgrid(*starts, indexing="ij")
    corners = np.stack([g.ravel() for g in grids], axis=1)
    for first in range(0, len(corners), batch_size):
        chunk = corners[first : first + batch_size]
        windows = [tuple(slice(c, c + p) for c, p in zip(corner, patch)) for corner in chunk]
        x = torch.from_numpy(np.stack([padded[(slice(None), *w)] for w in windows])).to(device)
        probs = network(x).softmax(dim=1).cpu().numpy()
        for window, prob in zip(windows, probs):
            total[(slice(None), *window)] += prob * weight
            norm[window] += weight
    total /= norm
    return total[(slice(None), *[slice(0, s) for s in spatial])]
