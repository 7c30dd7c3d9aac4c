"""Putting a tumor into a volume.

- :mod:`.placement`: source tumors, affines, resampling and placement in the target;
- :mod:`.intensity`: mapping the source tumor's intensities into the target modality;
- :mod:`.insert`: :func:`insert_tumor` (crop, harmonize every tumor slice in one batch, restack,
  write the label and a replayable record).
"""

from singan_insert.insertion.appearance import AmbiguousLevelWarning, UnannotatedModelWarning
from singan_insert.insertion.insert import InsertionParameters, InsertionResult, insert_tumor
from singan_insert.insertion.placement import Placement, SourceTumor

__all__ = ["AmbiguousLevelWarning", "InsertionParameters", "InsertionResult", "Placement", "SourceTumor",
           "UnannotatedModelWarning", "insert_tumor"]
