"""Unpaired image translation with CycleGAN (Zhu et al., ICCV 2017), slice-wise on volumes.

Two generators, :math:`G: A \\to B` and :math:`F: B \\to A` (:class:`ResnetGenerator`), and two
PatchGAN critics, :math:`D_A` and :math:`D_B`, are trained on unpaired slices ``a`` and ``b``.
The generators minimise

.. math::

    \\mathcal L_G = \\underbrace{(D_B(G(a)) - 1)^2 + (D_A(F(b)) - 1)^2}_{\\text{LSGAN}}
    + \\lambda_{cyc} \\left(\\|F(G(a)) - a\\|_1 + \\|G(F(b)) - b\\|_1\\right)
    + \\lambda_{cyc} \\lambda_{id} \\left(\\|G(b) - b\\|_1 + \\|F(a) - a\\|_1\\right)

(means over pixels), and each critic minimises
:math:`\\tfrac12 \\left[(D(x) - 1)^2 + D(\\tilde y)^2\\right]`, where :math:`\\tilde y` is drawn
from a pool of the last ``pool_size`` generated images (half the time an older one), which
damps oscillation. The reference defaults are kept: :math:`\\lambda_{cyc} = 10`,
:math:`\\lambda_{id} = 0.5`, pool 50, Adam :math:`2 \\cdot 10^{-4}`, betas (0.5, 0.999), a
constant then linearly decaying learning rate, ResNet-9 generators with 64 filters and the
70x70 PatchGAN.

In this method CycleGAN is the baseline (translate the target modality B into A, then segment
with the source-trained model) and a preprocessing option. Presets: ``"reference"``
(the paper's settings, 256 px; for GPUs), ``"cpu"`` (``ngf=8``, 2 blocks, 64 px: about 45 ms
per iteration on 2 CPU cores) and ``"tiny"`` (for tests and smoke runs).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

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
from singan_insert.stages.networks import NormName, PatchDiscriminator, ResnetGenerator
from singan_insert.stages.slices import SliceDataset, VolumeLike, VolumeSource

__all__ = ["CycleGAN", "CycleGANConfig", "ImagePool", "train_cyclegan"]

MODEL_NAME = "cyclegan.safetensors"
Direction = Literal["a_to_b", "b_to_a"]


@dataclass(frozen=True)
class CycleGANConfig(StageTrainingConfig):
    """CycleGAN settings; the defaults are the reference ones (see :class:`StageTrainingConfig`).

    Args:
        ngf: generator filters of the first layer (reference 64).
        n_blocks: residual blocks per generator (reference 9).
        ndf: critic filters of the first layer (reference 64).
        discriminator_layers: stride-2 critic layers (3 gives the 70x70 PatchGAN). Slices must be
            large enough for a logit map: at least 32 px for 3 layers, 16 px for 2.
        norm: ``"instance"`` (reference) or ``"batch"``.
        gan_mode: ``"lsgan"`` (reference) or ``"vanilla"``.
        lambda_cycle: weight :math:`\\lambda_{cyc} \\ge 0` of the cycle losses (reference 10).
        lambda_identity: :math:`\\lambda_{id} \\ge 0`, identity weight relative to
            :math:`\\lambda_{cyc}` (reference 0.5; 0 disables it and saves two passes).
        pool_size: generated images kept for the critics (reference 50; 0 disables the pool).
    """

    ngf: int = 64
    n_blocks: int = 9
    ndf: int = 64
    discriminator_layers: int = 3
    norm: NormName = "instance"
    gan_mode: str = "lsgan"
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5
    pool_size: int = 50

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "reference": {},
        "cpu": {**CPU_PRESET, "n_blocks": 2},
        "tiny": {**TINY_PRESET, "n_blocks": 1, "discriminator_layers": 2, "image_size": 16, "pool_size": 4},
    }

    def validate(self) -> None:
        super().validate()
        check_gan_settings(self)
        if not isinstance(self.n_blocks, int) or self.n_blocks < 0:
            raise SinganInsertError(f"n_blocks must be an integer >= 0, got {self.n_blocks!r}.")
        if not isinstance(self.pool_size, int) or self.pool_size < 0:
            raise SinganInsertError(f"pool_size must be an integer >= 0, got {self.pool_size!r}.")
        if self.lambda_cycle < 0 or self.lambda_identity < 0:
            raise SinganInsertError("lambda_cycle and lambda_identity must be >= 0.")
        if self.image_size is not None:
            check_slice_shape(self, (self.image_size, self.image_size))


def check_slice_shape(config: CycleGANConfig, shape: tuple[int, int]) -> None:
    """Raise when the networks cannot process slices of ``shape`` (H, W)."""
    divisor = 4  # two stride-2 stages in the generator
    if shape[0] % divisor or shape[1] % divisor:
        raise SinganInsertError(
            f"CycleGAN needs slice sides that are multiples of {divisor}, got {tuple(shape)}; "
            "set image_size (e.g. 64, 128, 256)."
        )
    check_critic_fits(shape, config.discriminator_layers)


class ImagePool:
    """The history of generated images shown to a critic (Shrivastava et al., 2017).

    Until ``size`` images are stored, every query image is stored and returned. Then each
    query image is, with probability 1/2, returned as is, and otherwise swapped with a stored
    image chosen uniformly, which is returned instead. ``size=0`` returns the query unchanged.

    Args:
        size: images kept (>= 0).
        generator: the random generator of the draws (checkpointed with the pool).
    """

    def __init__(self, size: int, generator: torch.Generator):
        self.size = size
        self.generator = generator
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` for the critic, drawn as described above."""
        if self.size == 0:
            return images
        returned = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                returned.append(image)
            elif torch.rand((), generator=self.generator).item() > 0.5:
                index = int(torch.randint(self.size, (), generator=self.generator).item())
                returned.append(self.images[index].clone())
                self.images[index] = image.clone()
            else:
                returned.append(image)
        return torch.cat(returned)

    def state(self) -> dict[str, torch.Tensor]:
        state = {"rng": self.generator.get_state()}
        if self.images:
            state["images"] = torch.cat(self.images).cpu()
        return state

    def load_state(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        self.generator.set_state(state["rng"].to(torch.uint8).cpu())
        images = state.get("images")
        self.images = [] if images is None else [i.unsqueeze(0).to(device) for i in images]


class CycleGAN(StageModel):
    """The two CycleGAN generators: ``generator_ab`` (A -> B) and ``generator_ba`` (B -> A).

    Built from a config with the initial weights of a training run with that config; trained
    by :func:`train_cyclegan`, saved by :meth:`save`, read by :meth:`load`.
    """

    model_kind = "singan-insert-cyclegan"
    config_class = CycleGANConfig

    def __init__(self, config: CycleGANConfig | None = None):
        config = CycleGANConfig() if config is None else config
        super().__init__(config)
        with seeded(config.seed):
            self.generator_ab = _generator(config)
            self.generator_ba = _generator(config)

    def networks(self) -> dict[str, nn.Module]:
        return {"generator_ab": self.generator_ab, "generator_ba": self.generator_ba}

    def translate(
        self,
        image: VolumeLike,
        direction: Direction = "a_to_b",
        *,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        output_normalization: PercentileNormalization | None = None,
    ) -> nib.Nifti1Image:
        """Translate a volume slice by slice (see :func:`~.slices.translate_volume`).

        Args:
            image: a NIfTI file or image of the source domain.
            direction: ``"a_to_b"`` uses ``generator_ab``, ``"b_to_a"`` uses ``generator_ba``.
            batch_size, device, output_normalization: as in ``translate_volume``.

        Returns:
            The translated volume in :math:`[-1, 1]` (or mapped by ``output_normalization``),
            on the input's grid.
        """
        if direction not in ("a_to_b", "b_to_a"):
            raise SinganInsertError(f"direction must be 'a_to_b' or 'b_to_a', got {direction!r}.")
        generator = self.generator_ab if direction == "a_to_b" else self.generator_ba
        return self._translate(generator, image, batch_size=batch_size, device=device,
                               output_normalization=output_normalization)


def _generator(config: CycleGANConfig) -> ResnetGenerator:
    return ResnetGenerator(1, 1, config.ngf, config.n_blocks, norm=config.norm)


def _critic(config: CycleGANConfig) -> PatchDiscriminator:
    return PatchDiscriminator(1, config.ndf, config.discriminator_layers, config.norm)


class _CycleGANTrainer(StageTrainer):
    checkpoint_kind = "singan-insert-cyclegan-checkpoint"
    description = "CycleGAN"

    def __init__(
        self,
        config: CycleGANConfig,
        data_a: SliceDataset,
        data_b: SliceDataset,
        context: DistributedContext,
    ):
        super().__init__(config, context)
        for data in (data_a, data_b):
            check_slice_shape(config, data.slice_shape)
        self.data_a, self.data_b = data_a, data_b
        device = context.device
        self.model = CycleGAN(config).to(device)
        with seeded(rank_seed(config.seed, 0, stream=1)):
            self.critic_a = _critic(config).to(device)
            self.critic_b = _critic(config).to(device)
        self.modules = {
            **self.model.networks(),
            "discriminator_a": self.critic_a,
            "discriminator_b": self.critic_b,
        }
        self.optimizers = {
            "generators": self.adam(
                itertools.chain(self.model.generator_ab.parameters(), self.model.generator_ba.parameters())
            ),
            "discriminators": self.adam(
                itertools.chain(self.critic_a.parameters(), self.critic_b.parameters())
            ),
        }
        # A and B are unpaired: two independent data orders.
        self.sampler_a = StepSampler(len(data_a), config.batch_size, config.seed, context)
        self.sampler_b = StepSampler(len(data_b), config.batch_size, config.seed + 1, context)
        self.pool_a, self.pool_b = (
            ImagePool(config.pool_size, torch.Generator().manual_seed(rank_seed(config.seed, context.rank, stream)))
            for stream in (2, 3)
        )
        self.gan_loss = GANLoss(config.gan_mode)
        self.l1 = nn.L1Loss()
        self.g_ab, self.g_ba = self.model.generator_ab, self.model.generator_ba
        self.d_a, self.d_b = self.critic_a, self.critic_b

    def distribute(self) -> None:
        self.g_ab, self.g_ba = self.wrap(self.model.generator_ab), self.wrap(self.model.generator_ba)
        self.d_a, self.d_b = self.wrap(self.critic_a), self.wrap(self.critic_b)

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        config, device = self.config, self.context.device
        real_a = self.data_a.slices[self.sampler_a.indices(step)].to(device)
        real_b = self.data_b.slices[self.sampler_b.indices(step)].to(device)

        # Generators, with the critics frozen (their gradients are not needed here).
        fake_b, fake_a = self.g_ab(real_a), self.g_ba(real_b)
        cycle_a, cycle_b = self.g_ba(fake_b), self.g_ab(fake_a)
        set_requires_grad([self.critic_a, self.critic_b], False)
        # The critics are called unwrapped: DistributedDataParallel would expect gradients.
        loss_gan = self.gan_loss(self.critic_b(fake_b), True) + self.gan_loss(self.critic_a(fake_a), True)
        loss_cycle = config.lambda_cycle * (self.l1(cycle_a, real_a) + self.l1(cycle_b, real_b))
        loss_generators = loss_gan + loss_cycle
        losses = {"G_gan": loss_gan, "cycle": loss_cycle}
        if config.lambda_identity > 0:
            same_b, same_a = self.g_ab(real_b), self.g_ba(real_a)
            loss_identity = (
                config.lambda_cycle
                * config.lambda_identity
                * (self.l1(same_b, real_b) + self.l1(same_a, real_a))
            )
            loss_generators = loss_generators + loss_identity
            losses["identity"] = loss_identity
        optimizer = self.optimizers["generators"]
        optimizer.zero_grad(set_to_none=True)
        loss_generators.backward()
        optimizer.step()
        set_requires_grad([self.critic_a, self.critic_b], True)

        # Critics, on real images and on (pooled) generated ones.
        pooled_b, pooled_a = self.pool_b.query(fake_b), self.pool_a.query(fake_a)
        loss_d_b = 0.5 * (self.gan_loss(self.d_b(real_b), True) + self.gan_loss(self.d_b(pooled_b), False))
        loss_d_a = 0.5 * (self.gan_loss(self.d_a(real_a), True) + self.gan_loss(self.d_a(pooled_a), False))
        optimizer = self.optimizers["discriminators"]
        optimizer.zero_grad(set_to_none=True)
        (loss_d_a + loss_d_b).backward()
        optimizer.step()
        losses.update(D_a=loss_d_a, D_b=loss_d_b)
        return {name: value.detach() for name, value in losses.items()}

    def rank_state(self) -> dict[str, torch.Tensor]:
        state = {f"pool_a.{k}": v for k, v in self.pool_a.state().items()}
        state.update({f"pool_b.{k}": v for k, v in self.pool_b.state().items()})
        return state

    def load_rank_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, pool in (("pool_a", self.pool_a), ("pool_b", self.pool_b)):
            prefix = name + "."
            pool.load_state(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)},
                self.context.device,
            )

    def training_data(self) -> dict[str, tuple[torch.Tensor, ...]]:
        return {"domain_a": (self.data_a.slices,), "domain_b": (self.data_b.slices,)}


def train_cyclegan(
    domain_a: VolumeSource | SliceDataset,
    domain_b: VolumeSource | SliceDataset,
    out_dir: str | os.PathLike,
    config: CycleGANConfig | None = None,
    *,
    stop_at: int | None = None,
) -> CycleGAN:
    """Train a CycleGAN between the slices of two unpaired sets of volumes.

    Re-running with the same ``out_dir`` resumes from its checkpoint (written every
    ``config.checkpoint_every`` iterations); with the same seed the result is the same as an
    uninterrupted run. Under ``torchrun`` every process calls this and trains one shard of the
    data (see :mod:`._training`).

    Args:
        domain_a: modality A: a folder of NIfTI volumes, a list of files or images, or a
            :class:`SliceDataset` built with the config's axis, size and percentiles.
        domain_b: modality B, likewise; it need not be paired with A.
        out_dir: the run's folder: ``checkpoint.safetensors`` and, at the end,
            ``cyclegan.safetensors`` (written by rank 0).
        config: the settings; default :class:`CycleGANConfig` (the reference, 256 px; on a CPU
            use ``CycleGANConfig.preset("cpu")``).
        stop_at: stop with a checkpoint once this many iterations are done in total (to split
            a long run into jobs); the final model file is only written when training ends.

    Returns:
        The :class:`CycleGAN` (in ``eval`` mode, on the training device), with :attr:`info`
        holding the iterations done and the last losses.
    """
    config = CycleGANConfig.or_default(config)
    data_a = as_dataset(domain_a, SliceDataset, config, "domain_a SliceDataset")
    data_b = as_dataset(domain_b, SliceDataset, config, "domain_b SliceDataset")
    return train_stage(config, lambda context: _CycleGANTrainer(config, data_a, data_b, context),
                       out_dir, MODEL_NAME, stop_at)
