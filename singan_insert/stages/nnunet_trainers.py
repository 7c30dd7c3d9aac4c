"""Short nnU-Net v2 trainers shipped with singan-insert, for smoke tests and CPU runs.

nnU-Net's default trainer runs 1000 epochs of 250 iterations; on a CPU one such epoch of a
tiny 48x48x32 dataset already takes 7-8 minutes. These subclasses only shorten the schedule
(everything else -- network, loss, augmentation, polynomial learning-rate decay over
``num_epochs`` -- is nnU-Net's own):

================================  ======  ====================  ========================
trainer                           epochs  iterations per epoch  validation iterations
================================  ======  ====================  ========================
``nnUNetTrainer_SinganInsertSmoke``   1        5                     2
``nnUNetTrainer_SinganInsertShort``  20       25                     5
================================  ======  ====================  ========================

They are meant to be used through :class:`singan_insert.stages.nnunet.NnUNetWorkspace`, which
constructs trainers directly (see that module for why nnU-Net's by-name lookup is avoided);
the class names follow nnU-Net's ``nnUNetTrainer_<variant>`` convention because nnU-Net names
its result folders ``<trainer>__<plans>__<configuration>`` after them. The on-the-fly
insertion trainers ``nnUNetTrainerTumorInsertion_Smoke`` and ``_Short``
(:mod:`singan_insert.integrations.nnunet`) take their schedules from these two.

Importing this module needs the optional package ``nnunetv2`` (``pip install
'singan-insert[nnunet]'``). Absolute imports are used on purpose: nnU-Net may import trainer
files as top-level modules.
"""

from __future__ import annotations

import torch

from singan_insert.errors import MissingExtraError

try:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError("nnunetv2", "nnunet", "The shipped nnU-Net trainers") from error

__all__ = [
    "nnUNetTrainer_SinganInsertSmoke",
    "nnUNetTrainer_SinganInsertShort",
    "SHIPPED_TRAINERS",
]


class _ShortSchedule(nnUNetTrainer):  # noqa: N801
    """nnU-Net's trainer with the schedule of the class attributes below (nothing else changed)."""

    epochs: int = 1000
    iterations_per_epoch: int = 250
    validation_iterations: int = 50

    # nnU-Net records the constructor's arguments by name (for its checkpoints): keep its signature.
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.epochs
        self.num_iterations_per_epoch = self.iterations_per_epoch
        self.num_val_iterations_per_epoch = self.validation_iterations


class nnUNetTrainer_SinganInsertSmoke(_ShortSchedule):  # noqa: N801 - nnU-Net's naming scheme
    """One epoch of 5 training and 2 validation iterations: proves that the pipeline runs."""

    epochs, iterations_per_epoch, validation_iterations = 1, 5, 2


class nnUNetTrainer_SinganInsertShort(_ShortSchedule):  # noqa: N801 - nnU-Net's naming scheme
    """20 epochs of 25 iterations (500 in all, 1/500 of the default), for small CPU runs."""

    epochs, iterations_per_epoch, validation_iterations = 20, 25, 5


SHIPPED_TRAINERS: dict[str, type[nnUNetTrainer]] = {
    cls.__name__: cls for cls in (nnUNetTrainer_SinganInsertSmoke, nnUNetTrainer_SinganInsertShort)
}
