"""The one-shot harmonizer: a SinGAN generator pyramid trained on ONE 2D slice of modality B.

- :mod:`.pyramid`: scale geometry and the one resize;
- :mod:`.networks`: the per-scale generator and critic;
- :mod:`.training`: presets, losses, checkpoints and resume;
- :mod:`.training_slice`: choosing the training slice of a volume;
- :mod:`.normalization`: the percentile map into :math:`[-1, 1]` stored with the model;
- :mod:`.model`: :class:`Harmonizer` (load, harmonize a batch of slices, blend, save);
- :mod:`.model_file`: the safetensors + JSON file format.
"""

from singan_insert.devices import select_device
from singan_insert.harmonizer.model import MODEL_FILE_NAME, MODEL_KIND, Harmonizer, blend_weight
from singan_insert.harmonizer.normalization import PercentileNormalization
from singan_insert.harmonizer.pyramid import PyramidGeometry
from singan_insert.harmonizer.training import TrainingConfig, train_harmonizer

__all__ = [
    "MODEL_FILE_NAME",
    "MODEL_KIND",
    "Harmonizer",
    "PercentileNormalization",
    "PyramidGeometry",
    "TrainingConfig",
    "blend_weight",
    "select_device",
    "train_harmonizer",
]
