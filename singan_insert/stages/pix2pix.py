"""Paired image translation with pix2pix (Isola et al., CVPR 2017), slice-wise on volumes.

In this method pix2pix learns :math:`B' \\to A`: its pairs are the insertion outputs
:math:`B'` (modality B, with harmonized tumors) and the modality-A volumes they were made from,
on the same grid. A U-Net generator :math:`G` (:class:`UnetGenerator`) and a conditional
PatchGAN critic :math:`D`, which sees the input beside the output, are trained with

.. math::

    \\mathcal L_G = \\ell\\big(D(x, G(x)), 1\\big) + \\lambda_{L1} \\, \\|G(x) - y\\|_1, \\qquad
    \\mathcal L_D = \\tfrac12 \\left[\\ell\\big(D(x, y), 1\\big) + \\ell\\big(D(x, G(x)), 0\\big)\\right],

where :math:`(x, y)` is a slice pair, :math:`\\ell` the GAN loss (binary cross-entropy on
logits in the reference, ``gan_mode="vanilla"``) and :math:`\\lambda_{L1} = 100`. Adam
:math:`2 \\cdot 10^{-4}`, betas (0.5, 0.999), constant then linearly decaying learning rate,
``unet_256`` (8 levels, 64 filters, dropout 0.5) and the 70x70 PatchGAN are the reference.

Normalisation: the reference uses batch norm with batch size 1 and, at test time, normalises
each image with its own statistics (Isola et al., Sec. 3.3) - which is instance normalisation.
The default here is therefore ``norm="instance"``, identical in training and inference and
independent of the batch size. Inference runs in ``eval`` mode (no dropout), so it is
deterministic; the reference keeps dropout on at test time as a source of noise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import nibabel as nib
import torch
from torch import nn

from singan_insert.errors import SinganInsertError
from singan_insert.harmonizer.normalization import PercentileNormalization
from singan_insert.stages._training import (
    CPU_PRESET,
    TINY_PRESET,
    DistributedContext,
    GANLoss,
    StageModel,
    StageTrainer,
    StageTrainingConfig,
    StepSampler,
    as_dataset,
    check_critic_fits,
    check_gan_settings,
    rank_seed,
    seeded,
    set_requires_grad,
    train_stage,
)
from singan_insert.stages.networks import NormName, PatchDiscriminator, UnetGenerator
from singan_insert.stages.slices import PairedSliceDataset, VolumeLike

__all__ = ["Pix2Pix", "Pix2PixConfig", "train_pix2pix"]

MODEL_NAME = "pix2pix.safetensors"


@dataclass(frozen=True)
class Pix2PixConfig(StageTrainingConfig):
    """pix2pix settings; the defaults are the reference ones (see :class:`StageTrainingConfig`).

    Args:
        ngf: generator filters of the outermost level (reference 64).
        num_downs: U-Net levels (>= 5; reference 8 for 256 px). Slice sides must be multiples
            of :math:`2^{\\mathrm{num\\_downs}}`.
        ndf: critic filters of the first layer (reference 64).
        discriminator_layers: stride-2 critic layers (3: the 70x70 PatchGAN).
        norm: ``"instance"`` (default, see the module docstring) or ``"batch"``.
        dropout: dropout of the middle decoder levels during training (reference 0.5); there
            are ``num_downs - 5`` such levels.
        gan_mode: ``"vanilla"`` (reference) or ``"lsgan"``.
        lambda_l1: weight :math:`\\lambda_{L1} \\ge 0` of the pixel loss (reference 100).
    """

    ngf: int = 64
    num_downs: int = 8
    ndf: int = 64
    discriminator_layers: int = 3
    norm: NormName = "instance"
    dropout: float = 0.5
    gan_mode: str = "vanilla"
    lambda_l1: float = 100.0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "reference": {},
        "cpu": {**CPU_PRESET, "num_downs": 6},
        "tiny": {**TINY_PRESET, "num_downs": 5, "image_size": 32},
    }

    def validate(self) -> None:
        super().validate()
        check_gan_settings(self)
        if not isinstance(self.num_downs, int) or self.num_downs < 5:
            raise SinganInsertError(f"num_downs must be an integer >= 5, got {self.num_downs!r}.")
        if not 0 <= self.dropout < 1:
            raise SinganInsertError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if self.lambda_l1 < 0:
            raise SinganInsertError(f"lambda_l1 must be >= 0, got {self.lambda_l1!r}.")
        if self.image_size is not None:
            check_slice_shape(self, (self.image_size, self.image_size))


def check_slice_shape(config: Pix2PixConfig, shape: tuple[int, int]) -> None:
    """Raise when the networks cannot process slices of ``shape`` (H, W)."""
    divisor = 2**config.num_downs
    if shape[0] % divisor or shape[1] % divisor:
        raise SinganInsertError(
            f"A {config.num_downs}-level U-Net needs slice sides that are multiples of {divisor}, "
            f"got {tuple(shape)}; set image_size to a multiple or lower num_downs."
        )
    check_critic_fits(shape, config.discriminator_layers)


class Pix2Pix(StageModel):
    """The pix2pix generator (``generator``: source -> target, here B' -> A) with its config.

    Built from a config with the initial weights of a training run with that config; trained
    by :func:`train_pix2pix`, saved by :meth:`save`, read by :meth:`load`.
    """

    model_kind = "singan-insert-pix2pix"
    config_class = Pix2PixConfig

    def __init__(self, config: Pix2PixConfig | None = None):
        config = Pix2PixConfig() if config is None else config
        super().__init__(config)
        with seeded(config.seed):
            self.generator = UnetGenerator(
                1, 1, config.num_downs, config.ngf, norm=config.norm, dropout=config.dropout
            )

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def translate(
        self,
        image: VolumeLike,
        *,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        output_normalization: PercentileNormalization | None = None,
    ) -> nib.Nifti1Image:
        """Translate a source-modality volume slice by slice (see ``translate_volume``)."""
        return self._translate(self.generator, image, batch_size=batch_size, device=device,
                               output_normalization=output_normalization)


class _Pix2PixTrainer(StageTrainer):
    checkpoint_kind = "singan-insert-pix2pix-checkpoint"
    description = "pix2pix"

    def __init__(self, config: Pix2PixConfig, data: PairedSliceDataset, context: DistributedContext):
        super().__init__(config, context)
        check_slice_shape(config, data.slice_shape)
        self.data = data
        device = context.device
        self.model = Pix2Pix(config).to(device)
        with seeded(rank_seed(config.seed, 0, stream=1)):
            # Conditional critic: it judges (input, output) stacked as two channels.
            self.critic = PatchDiscriminator(2, config.ndf, config.discriminator_layers, config.norm).to(device)
        self.modules = {"generator": self.model.generator, "discriminator": self.critic}
        self.optimizers = {
            "generator": self.adam(self.model.generator.parameters()),
            "discriminator": self.adam(self.critic.parameters()),
        }
        self.sampler = StepSampler(len(data), config.batch_size, config.seed, context)
        self.gan_loss = GANLoss(config.gan_mode)
        self.l1 = nn.L1Loss()
        self.g, self.d = self.model.generator, self.critic

    def distribute(self) -> None:
        self.g, self.d = self.wrap(self.model.generator), self.wrap(self.critic)

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        indices = self.sampler.indices(step)
        device = self.context.device
        source = self.data.sources[indices].to(device)
        target = self.data.targets[indices].to(device)
        fake = self.g(source)

        # Critic first, as in the reference.
        loss_d = 0.5 * (
            self.gan_loss(self.d(torch.cat([source, target], 1)), True)
            + self.gan_loss(self.d(torch.cat([source, fake.detach()], 1)), False)
        )
        optimizer = self.optimizers["discriminator"]
        optimizer.zero_grad(set_to_none=True)
        loss_d.backward()
        optimizer.step()

        # Generator, with the (updated) critic frozen and called unwrapped (no DDP gradients).
        set_requires_grad([self.critic], False)
        loss_gan = self.gan_loss(self.critic(torch.cat([source, fake], 1)), True)
        loss_l1 = self.config.lambda_l1 * self.l1(fake, target)
        optimizer = self.optimizers["generator"]
        optimizer.zero_grad(set_to_none=True)
        (loss_gan + loss_l1).backward()
        optimizer.step()
        set_requires_grad([self.critic], True)
        return {"G_gan": loss_gan.detach(), "L1": loss_l1.detach(), "D": loss_d.detach()}

    def training_data(self) -> dict[str, tuple[torch.Tensor, ...]]:
        return {"pairs": (self.data.sources, self.data.targets)}


def train_pix2pix(
    pairs: Sequence[tuple[VolumeLike, VolumeLike]] | PairedSliceDataset,
    out_dir: str | os.PathLike,
    config: Pix2PixConfig | None = None,
    *,
    stop_at: int | None = None,
) -> Pix2Pix:
    """Train pix2pix on aligned ``(source, target)`` volume pairs - here ``(B', A)``.

    Checkpoints, resume, determinism and torchrun support are as in
    :func:`~.cyclegan.train_cyclegan`.

    Args:
        pairs: ``(source, target)`` NIfTI files or images on the same grid, or a
            :class:`PairedSliceDataset` built with the config's axis, size and percentiles.
        out_dir: the run's folder: ``checkpoint.safetensors`` and, at the end,
            ``pix2pix.safetensors`` (written by rank 0).
        config: the settings; default :class:`Pix2PixConfig` (the reference, 256 px; on a CPU
            use ``Pix2PixConfig.preset("cpu")``).
        stop_at: stop with a checkpoint once this many iterations are done in total.

    Returns:
        The :class:`Pix2Pix` model (in ``eval`` mode, on the training device), with
        :attr:`info` holding the iterations done and the last losses.
    """
    config = Pix2PixConfig.or_default(config)
    data = as_dataset(pairs, PairedSliceDataset, config, "PairedSliceDataset")
    return train_stage(config, lambda context: _Pix2PixTrainer(config, data, context), out_dir,
                       MODEL_NAME, stop_at)
