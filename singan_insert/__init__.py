"""singan-insert: realistic tumor insertion with a one-shot SinGAN harmonizer.

The main entry points::

    from singan_insert import train_harmonizer, TrainingConfig, Harmonizer, insert_tumor, Placement
    from singan_insert.integrations.torchio import RandomTumorInsertion

The package is organised by concept (see the documentation's architecture page):
:mod:`~singan_insert.harmonizer` (the one-shot model), :mod:`~singan_insert.insertion`
(putting a tumor into a volume), :mod:`~singan_insert.integrations` (TorchIO, MONAI, nnU-Net),
:mod:`~singan_insert.stages` (CycleGAN, pix2pix, nnU-Net), :mod:`~singan_insert.pipeline`
(the paper's workflow), :mod:`~singan_insert.datasets` (crossMoDA layout, simulator) and
:mod:`~singan_insert.evaluation` (metrics, baselines, experiments).
"""

from singan_insert._version import __version__
from singan_insert import _compat
from singan_insert.errors import ModelFileError, SinganInsertError
from singan_insert.harmonizer import Harmonizer, PercentileNormalization, PyramidGeometry, TrainingConfig, train_harmonizer
from singan_insert.insertion import InsertionParameters, Placement, SourceTumor, insert_tumor

_compat.install()

__all__ = [
    "Harmonizer",
    "InsertionParameters",
    "ModelFileError",
    "PercentileNormalization",
    "Placement",
    "PyramidGeometry",
    "SinganInsertError",
    "SourceTumor",
    "TrainingConfig",
    "insert_tumor",
    "train_harmonizer",
    "__version__",
]
