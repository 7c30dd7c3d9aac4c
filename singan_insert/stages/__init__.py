"""Thin wrappers for the other stages of the method (the paper's Fig. 1).

* :mod:`~singan_insert.stages.cyclegan`: unpaired A -> B translation (tumors vanish);
* :mod:`~singan_insert.stages.pix2pix`: paired B' -> A translation with a pixel loss;
* :mod:`~singan_insert.stages.nnunet`: nnU-Net v2 (optional extra ``[nnunet]``) for S_A, with
  its child process :mod:`~singan_insert.stages.nnunet_worker` and short trainers
  (:mod:`~singan_insert.stages.nnunet_trainers`);
* :mod:`~singan_insert.stages.segmenter`: a small Dice+CE U-Net for CPU runs;
* :mod:`~singan_insert.stages.slices`: slice datasets and ``translate_volume``.

CycleGAN and pix2pix share one training loop (``stages/_training.py``: schedule, checkpoints
with exact resume, torchrun). The stages depend on the core, never the other way round; only
:mod:`singan_insert.pipeline` imports them, and :mod:`singan_insert.integrations.nnunet` the
shipped nnU-Net trainers' schedules (:mod:`~singan_insert.stages.nnunet_trainers`).
"""

from singan_insert.stages.cyclegan import CycleGAN, CycleGANConfig, train_cyclegan
from singan_insert.stages.pix2pix import Pix2Pix, Pix2PixConfig, train_pix2pix
from singan_insert.stages.segmenter import Segmenter, SegmenterConfig
from singan_insert.stages.slices import PairedSliceDataset, SliceDataset, translate_volume

__all__ = [
    "CycleGAN", "CycleGANConfig", "train_cyclegan",
    "Pix2Pix", "Pix2PixConfig", "train_pix2pix",
    "Segmenter", "SegmenterConfig",
    "PairedSliceDataset", "SliceDataset", "translate_volume",
]
