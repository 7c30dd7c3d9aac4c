"""The paper's Fig. 1 workflow on a crossMoDA folder.

* :mod:`.settings`: :class:`~.settings.PipelineSettings` (every knob, named profiles, stage
  configs);
* :mod:`.resample`: the :class:`~.resample.WorkingGrid` and resampling of images and label maps;
* :mod:`.workflow`: :class:`~.workflow.CrossModaPipeline`, one method per step of the workflow;
* :mod:`.variants`: the benchmark's extra B' variants (oracle, GBA-style) and seeded pix2pix runs.

The crossMoDA layout itself (:class:`~singan_insert.datasets.crossmoda.CrossModaData`,
:func:`~singan_insert.datasets.crossmoda.simulate_crossmoda`) lives in
:mod:`singan_insert.datasets.crossmoda`; it is re-exported here for convenience.
"""

from singan_insert.datasets.crossmoda import CrossModaData, SourceCase, simulate_crossmoda
from singan_insert.pipeline.resample import WorkingGrid, resample_image, resample_labels
from singan_insert.pipeline.settings import PipelineSettings
from singan_insert.pipeline.workflow import (
    METHOD_TITLES,
    METHODS,
    CrossModaPipeline,
    read_volume,
    write_volume,
)

__all__ = [
    "METHODS",
    "METHOD_TITLES",
    "CrossModaData",
    "CrossModaPipeline",
    "PipelineSettings",
    "SourceCase",
    "WorkingGrid",
    "read_volume",
    "resample_image",
    "resample_labels",
    "simulate_crossmoda",
    "write_volume",
]
