"""singan-insert: realistic tumor insertion with a one-shot SinGAN harmonizer.

The main entry points::

    from singan_insert import train_harmonizer, TrainingConfig, Harmonizer
"""

__version__ = "0.1.0"

from .errors import ModelFileError, SinganInsertError  # noqa: E402
from .harmonizer import Harmonizer  # noqa: E402
from .intensity import PercentileNormalization  # noqa: E402
from .pyramid import PyramidGeometry  # noqa: E402
from .training import TrainingConfig, train_harmonizer  # noqa: E402

__all__ = [
    "Harmonizer",
    "ModelFileError",
    "PercentileNormalization",
    "PyramidGeometry",
    "SinganInsertError",
    "TrainingConfig",
    "train_harmonizer",
    "__version__",
]
