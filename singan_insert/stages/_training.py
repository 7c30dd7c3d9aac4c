"""What the slice-wise GAN stages (CycleGAN, pix2pix) share: configs, schedule, data order,
checkpoints with resume, progress and distributed (torchrun) training.

Training runs for :math:`T = T_c + T_d` iterations (``iterations + decay_iterations``) with the
reference learning-rate schedule: constant for :math:`T_c` iterations, then linearly decayed,

.. math::

    \\eta_t = \\eta \\cdot \\min\\left(1, \\frac{T - t}{T_d + 1}\\right), \\qquad t = 0, \\dots, T-1,

so it never reaches zero. The reference counts :math:`T_c, T_d` in epochs (100 + 100); here they
are iterations, which does not depend on the dataset's size.

Data order is a function of ``(seed, epoch)`` only (:class:`torch.utils.data.DistributedSampler`
with one replica when not distributed), and every other random draw comes from generators
whose state is checkpointed, so a run interrupted and resumed from its checkpoint ends with the
same weights, bit for bit on the CPU, as one that ran through.

Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised from the environment
(``gloo`` on the CPU, ``nccl`` on GPUs), each rank trains on its shard of every epoch with
``batch_size`` slices (an effective batch of ``world_size * batch_size``), the modules are
wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, and rank 0 writes the files.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from singan_insert.devices import select_device
from singan_insert.errors import ModelFileError, SinganInsertError
from singan_insert.harmonizer.model_file import (
    load_tensors,
    optimizer_to_tensors,
    save_tensors,
    state_dict_to_tensors,
    tensors_to_optimizer,
    tensors_to_state_dict,
)
from singan_insert.stages.networks import PatchDiscriminator
from singan_insert.stages.slices import translate_volume

__all__ = [
    "CHECKPOINT_NAME",
    "CPU_PRESET",
    "TINY_PRESET",
    "DistributedContext",
    "GANLoss",
    "StageModel",
    "StageTrainer",
    "StageTrainingConfig",
    "StepSampler",
    "as_dataset",
    "check_critic_fits",
    "check_gan_settings",
    "distributed_context",
    "learning_rate_factor",
    "load_checkpoint",
    "load_modules",
    "rank_seed",
    "run_training",
    "save_checkpoint",
    "seeded",
    "set_requires_grad",
    "train_stage",
]

CHECKPOINT_NAME = "checkpoint.safetensors"

#: What the slice GANs' ``"cpu"`` presets share: 8 filters, 64 px, 2000 + 2000 iterations.
CPU_PRESET: dict[str, Any] = {
    "ngf": 8, "ndf": 8, "image_size": 64, "iterations": 2000, "decay_iterations": 2000,
    "checkpoint_every": 500,
}
#: What their ``"tiny"`` presets share (tests and smoke runs): 4 filters, 4 + 4 iterations.
TINY_PRESET: dict[str, Any] = {
    "ngf": 4, "ndf": 4, "iterations": 4, "decay_iterations": 4, "checkpoint_every": 4, "progress": False,
}


@dataclass(frozen=True)
class StageTrainingConfig:
    """Settings shared by the slice-wise GAN stages (defaults: the reference setups).

    Args:
        image_size: slices are resampled to ``image_size x image_size`` pixels (>= 8), or
            ``None`` to train at the volumes' native in-plane shape.
        axis: slicing axis of the volumes (0, 1 or 2).
        percentiles: robust range of each volume mapped to :math:`[-1, 1]`.
        batch_size: slices per iteration and process (reference 1).
        iterations: iterations at the constant learning rate, :math:`T_c \\ge 0`.
        decay_iterations: iterations of linear decay that follow, :math:`T_d \\ge 0`.
        learning_rate: Adam's step size :math:`\\eta > 0` (reference 2e-4).
        betas: Adam's :math:`(\\beta_1, \\beta_2)` (reference (0.5, 0.999)).
        seed: seeds the initialisation, the data order and every random draw.
        checkpoint_every: write a resumable checkpoint every this many iterations (>= 1).
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:<n>"``; under torchrun each rank uses ``cuda:<LOCAL_RANK>``.
        progress: show a tqdm progress bar (rank 0 only).
        log_every: refresh the losses shown on the progress bar every this many iterations.
    """

    image_size: int | None = 256
    axis: int = 2
    percentiles: tuple[float, float] = (0.5, 99.5)
    batch_size: int = 1
    iterations: int = 100_000
    decay_iterations: int = 100_000
    learning_rate: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 0
    checkpoint_every: int = 1000
    device: str = "auto"
    progress: bool = True
    log_every: int = 10

    #: Named presets: ``name -> field overrides`` (set by each stage's subclass).
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Fields that may differ when a run is resumed (they do not change the result on one device).
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"checkpoint_every", "device", "progress", "log_every"}
    )

    def __post_init__(self) -> None:
        # JSON turns tuples into lists; store tuples so configs compare equal after a round trip.
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SinganInsertError` for settings out of range."""
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 8):
            raise SinganInsertError(f"image_size must be None or an integer >= 8, got {self.image_size!r}.")
        if self.axis not in (0, 1, 2):
            raise SinganInsertError(f"axis must be 0, 1 or 2, got {self.axis!r}.")
        if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise SinganInsertError(f"percentiles must be (low, high) with 0 <= low < high <= 100, got {self.percentiles}.")
        for name in ("batch_size", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SinganInsertError(f"{name} must be an integer >= 1, got {value!r}.")
        for name in ("iterations", "decay_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise SinganInsertError(f"{name} must be an integer >= 0, got {value!r}.")
        if self.total_iterations < 1:
            raise SinganInsertError("iterations + decay_iterations must be at least 1.")
        if not self.learning_rate > 0:
            raise SinganInsertError(f"learning_rate must be > 0, got {self.learning_rate!r}.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SinganInsertError(f"betas must be two numbers in [0, 1), got {self.betas}.")

    @property
    def total_iterations(self) -> int:
        """:math:`T = T_c + T_d`."""
        return self.iterations + self.decay_iterations

    @classmethod
    def preset(cls, name: str, **overrides: Any):
        """A named preset (see ``PRESETS``), with any field overridden by keyword."""
        if name not in cls.PRESETS:
            raise SinganInsertError(
                f"Unknown preset {name!r} for {cls.__name__}; choose one of {sorted(cls.PRESETS)}."
            )
        return cls(**{**cls.PRESETS[name], **overrides})

    @classmethod
    def or_default(cls, config: "StageTrainingConfig | None"):
        """``config``, or the defaults when None; a config of another stage is an error."""
        if config is None:
            return cls()
        if not isinstance(config, cls):
            raise SinganInsertError(f"config must be a {cls.__name__}, got {type(config).__name__}.")
        return config

    def replace(self, **changes: Any):
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`SinganInsertError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise SinganInsertError(
                f"Unknown {cls.__name__} fields {sorted(unknown)}: the file was written by another "
                "version of singan-insert."
            )
        return cls(**data)

    def result_fields(self) -> dict[str, Any]:
        """The fields that determine the trained weights (all but :attr:`RUNTIME_FIELDS`)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_FIELDS}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_gan_settings(config: StageTrainingConfig) -> None:
    """The checks of a slice-GAN config's shared fields: ``ngf``, ``ndf``,
    ``discriminator_layers`` (integers >= 1), ``norm`` and ``gan_mode``."""
    for name in ("ngf", "ndf", "discriminator_layers"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise SinganInsertError(f"{name} must be an integer >= 1, got {value!r}.")
    GANLoss(config.gan_mode)  # raises for an unknown mode
    if config.norm not in ("instance", "batch"):
        raise SinganInsertError(f"norm must be 'instance' or 'batch', got {config.norm!r}.")


def check_critic_fits(shape: tuple[int, int], discriminator_layers: int) -> None:
    """Raise when slices of ``shape`` (H, W) are too small for the PatchGAN to give a logit map."""
    if PatchDiscriminator.output_size(min(shape), discriminator_layers) < 1:
        raise SinganInsertError(
            f"Slices of {tuple(shape)} px are too small for a {discriminator_layers}-layer "
            "PatchGAN; use larger slices or fewer discriminator_layers."
        )


def as_dataset(data: Any, dataset_class: type, config: StageTrainingConfig, name: str):
    """``data`` as a ``dataset_class`` (a slice dataset) with the config's axis, size and
    percentiles: built from volumes, or checked when it already is one."""
    if isinstance(data, dataset_class):
        settings = (data.axis, data.size, tuple(data.percentiles))
        wanted = (config.axis, config.image_size, tuple(config.percentiles))
        if settings != wanted:
            raise SinganInsertError(
                f"The {name} has (axis, size, percentiles) = {settings}, but the config says "
                f"{wanted}; build it with the config's values or change the config."
            )
        return data
    return dataset_class(data, axis=config.axis, size=config.image_size, percentiles=config.percentiles)


def learning_rate_factor(step: int, iterations: int, decay_iterations: int) -> float:
    """The schedule's factor :math:`\\min(1, (T - t) / (T_d + 1))` at iteration ``step``."""
    total = iterations + decay_iterations
    return min(1.0, (total - step) / (decay_iterations + 1))


class GANLoss(nn.Module):
    """The adversarial loss on critic logits :math:`D(x)` against a constant target :math:`y`.

    ``"lsgan"`` (CycleGAN's reference): :math:`\\operatorname{mean}(D(x) - y)^2`;
    ``"vanilla"`` (pix2pix's reference): binary cross-entropy of :math:`\\sigma(D(x))` and
    :math:`y`; :math:`y = 1` for real, :math:`0` for fake.
    """

    def __init__(self, mode: str = "lsgan"):
        super().__init__()
        if mode == "lsgan":
            self.loss = nn.MSELoss()
        elif mode == "vanilla":
            self.loss = nn.BCEWithLogitsLoss()
        else:
            raise SinganInsertError(f"Unknown gan_mode {mode!r}; use 'lsgan' or 'vanilla'.")
        self.mode = mode

    def forward(self, logits: torch.Tensor, real: bool) -> torch.Tensor:
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        return self.loss(logits, target)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process trains: its rank, the number of processes and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def distributed_context(device_name: str = "auto") -> Iterator[DistributedContext]:
    """Join the torchrun process group when there is one (``WORLD_SIZE > 1``).

    The group is initialised from the environment variables torchrun sets (``gloo`` backend
    on the CPU, ``nccl`` on GPUs) the first time, and kept until the process exits, so that
    one script can train several stages (initialising a second group in the same torchrun job
    hangs). A group the caller initialised is used as is. Without torchrun this is a
    one-process context.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = select_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy_process_group)
    if dist.is_available() and dist.is_initialized():
        yield DistributedContext(dist.get_rank(), dist.get_world_size(), device)
    else:
        yield DistributedContext(0, 1, device)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class StepSampler:
    """The sample indices of each iteration, a pure function of ``(seed, step)``.

    Epoch :math:`e` is a permutation of the dataset drawn from ``seed + e``, sharded across
    ranks like :class:`~torch.utils.data.DistributedSampler` (which does the work); each rank's
    shard is cut into batches of ``batch_size`` (an incomplete last batch is dropped).
    """

    def __init__(self, length: int, batch_size: int, seed: int, context: DistributedContext):
        self.batch_size = batch_size
        self.sampler = DistributedSampler(
            range(length), num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=seed
        )
        self.steps_per_epoch = len(self.sampler) // batch_size
        if self.steps_per_epoch == 0:
            raise SinganInsertError(
                f"The dataset has {length} slices, fewer than batch_size ({batch_size}) x "
                f"processes ({context.world_size}); lower batch_size or add volumes."
            )
        self._epoch: int | None = None
        self._order: list[int] = []

    def indices(self, step: int) -> list[int]:
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._order = list(self.sampler)
            self._epoch = epoch
        start = position * self.batch_size
        return self._order[start : start + self.batch_size]


class StageTrainer:
    """One stage's training state; :func:`run_training` drives it.

    A subclass builds its networks and optimizers in ``__init__`` and fills:

    * ``modules``: the networks to checkpoint (unwrapped);
    * ``optimizers``: their optimizers, whose learning rate follows the schedule;
    * :meth:`train_step`: one iteration, returning the losses (detached scalar tensors);
    * :meth:`rank_state` / :meth:`load_rank_state`: per-process random state beyond the global
      torch generator (for example an image pool), for exact resume;
    * :meth:`training_data`: the tensors of the training data, whose fingerprint
      (:meth:`data_fingerprint`) is checked on resume.
    """

    checkpoint_kind: str = "singan-insert-stage-checkpoint"
    description: str = "training"

    def __init__(self, config: StageTrainingConfig, context: DistributedContext):
        self.config = config
        self.context = context
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._fingerprint: dict[str, Any] | None = None

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` ready to train in this context (DDP-wrapped when distributed)."""
        if not self.context.distributed:
            return module
        device_ids = [self.context.device.index] if self.context.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def distribute(self) -> None:
        """Wrap the networks for distributed training (called after a checkpoint is loaded)."""

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def rank_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_rank_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def training_data(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """The training data by name, each entry the tensors of one :func:`slices_fingerprint`."""
        return {}

    def data_fingerprint(self) -> dict[str, Any]:
        """What identifies the training data: the fingerprint of each :meth:`training_data` entry."""
        if self._fingerprint is None:  # hashing every slice once is enough
            self._fingerprint = {
                name: slices_fingerprint(*tensors) for name, tensors in self.training_data().items()
            }
        return self._fingerprint

    def adam(self, parameters) -> torch.optim.Adam:
        return torch.optim.Adam(
            parameters, lr=self.config.learning_rate, betas=tuple(self.config.betas)
        )


def slices_fingerprint(*tensors: torch.Tensor) -> dict[str, Any]:
    """Count, shape and SHA-256 of training slices: a resume or a finished model is reused only
    on the very same data (the count and shape alone miss other scans of the same size)."""
    import hashlib

    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"slices": len(tensors[0]), "shape": list(tensors[0].shape[-2:]), "sha256": digest.hexdigest()}


def rank_seed(seed: int, rank: int, stream: int = 0) -> int:
    """A distinct seed per (run seed, rank, stream), so ranks do not draw the same noise."""
    return (seed * 1_000_003 + rank * 7_919 + stream * 104_729 + 1) % (2**63 - 1)


def _global_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _set_global_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch_rng"].to(torch.uint8).cpu())
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"].to(torch.uint8).cpu(), device)


def _gather_rank_state(
    state: dict[str, torch.Tensor], context: DistributedContext
) -> dict[str, torch.Tensor]:
    """Every rank's ``state`` as ``rank<r>.<name>`` (meaningful on rank 0; a collective call)."""
    if not context.distributed:
        return {f"rank0.{name}": value for name, value in state.items()}
    on_device = dist.get_backend() == "nccl"
    gathered = {}
    for name in sorted(state):
        local = state[name].contiguous()
        local = local.to(context.device) if on_device else local.cpu()
        parts = [torch.empty_like(local) for _ in range(context.world_size)]
        dist.all_gather(parts, local)
        for rank, part in enumerate(parts):
            gathered[f"rank{rank}.{name}"] = part.cpu()
    return gathered


def save_checkpoint(
    path: Path, trainer: StageTrainer, step: int, losses: dict[str, float]
) -> None:
    """Write a resumable checkpoint (a collective call: every rank must call it)."""
    context = trainer.context
    rank_state = {**_global_rng_state(context.device), **trainer.rank_state()}
    gathered = _gather_rank_state(rank_state, context)
    if context.is_main:
        tensors: dict[str, torch.Tensor] = dict(gathered)
        optimizer_json = {}
        for name, module in trainer.modules.items():
            tensors.update(state_dict_to_tensors(f"module.{name}", module))
        for name, optimizer in trainer.optimizers.items():
            optimizer_tensors, optimizer_json[name] = optimizer_to_tensors(f"optimizer.{name}", optimizer)
            tensors.update(optimizer_tensors)
        save_tensors(
            path,
            tensors,
            trainer.checkpoint_kind,
            {
                "step": step,
                "world_size": context.world_size,
                "config": trainer.config.to_dict(),
                "data": trainer.data_fingerprint(),
                "optimizers": optimizer_json,
                "losses": losses,
            },
        )
    if context.distributed:
        dist.barrier()


def load_modules(
    tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module], prefix: str, path: Path
) -> None:
    """Load ``prefix.<name>.*`` tensors into each module, strictly."""
    for name, module in modules.items():
        state = tensors_to_state_dict(f"{prefix}.{name}" if prefix else name, tensors)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ModelFileError(
                f"{str(path)!r} does not match the network {name!r} this configuration builds "
                f"({error}). The file is damaged or was written for other settings."
            ) from error


def load_checkpoint(path: Path, trainer: StageTrainer) -> tuple[int, dict[str, float]]:
    """Restore ``trainer`` from ``path``; returns ``(step, last losses)``."""
    tensors, meta = load_tensors(path, trainer.checkpoint_kind)
    saved = type(trainer.config).from_dict(meta["config"])
    if saved.result_fields() != trainer.config.result_fields():
        changed = sorted(
            k for k, v in trainer.config.result_fields().items() if saved.result_fields().get(k) != v
        )
        raise SinganInsertError(
            f"{str(path.parent)!r} holds a checkpoint of a run with other settings ({changed} "
            "differ). Use another out_dir, or delete the checkpoint to start over."
        )
    if meta.get("data") != _json_roundtrip(trainer.data_fingerprint()):
        raise SinganInsertError(
            f"{str(path.parent)!r} holds a checkpoint of a run on other data "
            f"({meta.get('data')} != {trainer.data_fingerprint()}). Use another out_dir, or "
            "delete the checkpoint to start over."
        )
    load_modules(tensors, trainer.modules, "module", path)
    for name, optimizer in trainer.optimizers.items():
        try:
            tensors_to_optimizer(f"optimizer.{name}", optimizer, tensors, meta["optimizers"][name])
        except (KeyError, ValueError, RuntimeError) as error:
            raise ModelFileError(f"{str(path)!r} has a damaged optimizer state ({error}).") from error
    prefix = f"rank{trainer.context.rank}."
    rank_state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if meta.get("world_size") == trainer.context.world_size and "torch_rng" in rank_state:
        _set_global_rng_state(rank_state, trainer.context.device)
        trainer.load_rank_state(rank_state)
    else:
        # Another number of processes: weights and optimizers carry over, random streams restart.
        torch.manual_seed(rank_seed(trainer.config.seed, trainer.context.rank, stream=meta["step"]))
    return int(meta["step"]), dict(meta.get("losses", {}))


def _json_roundtrip(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


def run_training(
    trainer: StageTrainer, out_dir: str | os.PathLike, stop_at: int | None = None
) -> tuple[int, dict[str, float]]:
    """Train ``trainer`` in ``out_dir``, resuming from its checkpoint when there is one.

    Args:
        trainer: the stage's state, freshly built with ``config.seed``.
        out_dir: the run's folder; ``checkpoint.safetensors`` there is resumed from.
        stop_at: stop once this many iterations in total are done (a checkpoint is written),
            e.g. to split a long run into jobs; ``None`` trains to the end.

    Returns:
        ``(iterations done, the last losses)``.
    """
    config = trainer.config
    total = config.total_iterations
    stop = total if stop_at is None else min(int(stop_at), total)
    if stop < 0:
        raise SinganInsertError(f"stop_at must be >= 0, got {stop_at!r}.")
    path = Path(out_dir) / CHECKPOINT_NAME
    torch.manual_seed(rank_seed(config.seed, trainer.context.rank))
    step, losses = load_checkpoint(path, trainer) if path.is_file() else (0, {})
    trainer.distribute()
    show = config.progress and trainer.context.is_main
    bar = tqdm(total=total, initial=step, disable=not show, desc=trainer.description, unit="it")
    try:
        while step < stop:
            factor = learning_rate_factor(step, config.iterations, config.decay_iterations)
            for optimizer in trainer.optimizers.values():
                for group in optimizer.param_groups:
                    group["lr"] = config.learning_rate * factor
            step_losses = trainer.train_step(step)
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == stop:
                losses = {name: float(value) for name, value in step_losses.items()}
                bar.set_postfix({name: f"{value:.3g}" for name, value in losses.items()}, refresh=False)
            if step % config.checkpoint_every == 0 or step == stop:
                save_checkpoint(path, trainer, step, losses)
    finally:
        bar.close()
    return step, losses


def train_stage(
    config: StageTrainingConfig,
    build_trainer: Callable[[DistributedContext], StageTrainer],
    out_dir: str | os.PathLike,
    model_name: str,
    stop_at: int | None = None,
):
    """Build a stage's trainer in its (distributed) context, train it, save the model at the end.

    The torch random state of the caller is restored afterwards. The model file
    ``<out_dir>/<model_name>`` is written by rank 0 once all
    :attr:`~StageTrainingConfig.total_iterations` are done (not when ``stop_at`` stops early).

    Returns:
        The trainer's ``model`` in ``eval`` mode, its :attr:`~StageModel.info` holding the
        iterations done, the last losses and the data fingerprint.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with distributed_context(config.device) as context:
        cuda = [context.device] if context.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            trainer = build_trainer(context)
            step, losses = run_training(trainer, out_dir, stop_at)
    model = trainer.model.eval()
    model.info = {"iterations_done": step, "losses": losses, "data": trainer.data_fingerprint()}
    if step == config.total_iterations and context.is_main:
        model.save(out_dir / model_name)
    return model


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the CPU generator seeded, restoring the caller's random state after.

    Only the CPU generator is touched (``torch.manual_seed`` would also reseed every GPU's).
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def set_requires_grad(modules: list[nn.Module], flag: bool) -> None:
    """Freeze (``False``) or unfreeze the parameters of ``modules``."""
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(flag)


class StageModel(nn.Module):
    """A trained stage (its generators) with its config; saved as safetensors + JSON.

    A subclass sets :attr:`model_kind` and :attr:`config_class`, builds its networks from the
    config in ``__init__`` (seeded with ``config.seed``, so a fresh model is the initial state
    of a training run with that config) and lists them in :meth:`networks`.
    """

    model_kind: str = "singan-insert-stage"
    config_class: type[StageTrainingConfig] = StageTrainingConfig

    def __init__(self, config: StageTrainingConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise SinganInsertError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}."
            )
        self.config = config
        #: Facts about the training run (iterations done, last losses, data), saved with the model.
        self.info: dict[str, Any] = {}

    def networks(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _translate(self, generator: nn.Module, image, *, batch_size: int, device, output_normalization):
        """``translate_volume`` with the slicing of this model's config."""
        return translate_volume(
            generator,
            image,
            self.config.axis,
            size=self.config.image_size,
            batch_size=batch_size,
            device=device,
            percentiles=self.config.percentiles,
            output_normalization=output_normalization,
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the networks, config and :attr:`info` to ``path`` (atomically)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, module in self.networks().items():
            tensors.update(state_dict_to_tensors(name, module))
        return save_tensors(
            path, tensors, self.model_kind, {"config": self.config.to_dict(), "info": self.info}
        )

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu"):
        """Read a model written by :meth:`save`, in ``eval`` mode on ``device``.

        Raises:
            ModelFileError: the file is missing, truncated, foreign, of another kind, or its
                tensors do not fit the networks its config describes.
        """
        path = Path(path)
        tensors, meta = load_tensors(path, cls.model_kind)
        try:
            config = cls.config_class.from_dict(meta["config"])
        except (KeyError, TypeError, SinganInsertError) as error:
            raise ModelFileError(f"{str(path)!r} has an unreadable config ({error}).") from error
        model = cls(config)
        load_modules(tensors, model.networks(), "", path)
        model.info = dict(meta.get("info", {}))
        return model.to(device).eval()
